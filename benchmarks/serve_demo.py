#!/usr/bin/env python
"""A small localhost HTTP server over `MultiDeltaModel`, with a self-checking load test.

    python benchmarks/serve_demo.py --load-test                 # 1000 requests, tiny Llama, 4 deltas
    python benchmarks/serve_demo.py --load-test --requests 200 --clients 4
    python benchmarks/serve_demo.py --quick                     # check the script: 60 requests, 3 deltas (~10 s)
    python benchmarks/serve_demo.py --serve --port 8000         # tiny demo model, serve until Ctrl-C

Standard library only on the HTTP side (`http.server.ThreadingHTTPServer`, `http.client`), bound to
127.0.0.1 (never another address). Endpoints (JSON in, JSON out):

    POST   /generate        {"prompt_ids": [int, ...], "delta": "name" | null, "max_new_tokens": n}
                            -> 200 {"generated_ids": [...], "delta": name|null, "delta_id": int, "batch": b}
    POST   /deltas/<name>   {"path": "<server-side artifact dir>"}   (written by deltacome_ao.save_delta)
                            -> 200 {"name", "id", "bytes"}
    DELETE /deltas/<name>   -> 200 {"name"}
    GET    /deltas          -> 200 {"deltas": {name: id}}

Errors are JSON `{"error": kind, "message": text}` with a 4xx status: 400 bad request (bad JSON,
bad ids, bad max_new_tokens), 403 artifact path outside `artifact_root`, 404 unknown delta / route /
artifact, 409 delta in use (unload while a batch uses it) or name already loaded, 413 body too large,
422 artifact refused (format, base fingerprint, not servable per row), 503 shutting down. 500 only
for a bug (the load test fails on it).

Micro-batching: every /generate request goes into a queue; one background thread takes the first
request, collects more for `wait_ms` (or until `max_batch`), left-pads the prompts and runs ONE
greedy `MultiDeltaModel.generate` with per-row `delta_ids` (a mixed batch), then answers every
request with its own row, cut to its own `max_new_tokens` (and after EOS). Names are resolved to
delta ids just before the batch runs; a delta unloaded in between makes the request fail with 404
(ids are never reused, so a stale id can never reach another delta).

Load test (`--load-test`): a tiny random-init Llama (hidden 64, 2 layers) as the base, N synthetic
fine-tunes (base + a low-rank delta on the projection weights only), each compressed with
`quantize_(ft, DeltaCoMeConfig(base=base, group_size=32))` and saved with `save_delta` into a temp
dir. The expected greedy output of every (prompt, delta) is computed beforehand by the delta's own
compressed model alone (batch of 1); prompts whose greedy path has a near-tie (top-2 logit margin
below `--min-margin`) or on which two deltas give the same first tokens are dropped, so batching
noise cannot flip a token and a wrong delta is always visible. Then the server starts in-process on
127.0.0.1:<ephemeral>, client threads fire requests (random prompt, delta or base, max_new_tokens)
while a churn thread unloads and reloads some deltas over HTTP. Every 200 is checked against the
expected tokens; requests for a delta that is unloaded must get 404 (409 for a busy unload). Exit
status 1 on any wrong answer, 5xx, transport error or unexpected error kind. `--quick` is a small
load test (60 requests, 3 client threads, 3 deltas of which 1 churns, 8 prompts) whose summary goes
to a temporary JSON file unless `--json` is given.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deltacome_ao import artifact  # noqa: E402
from deltacome_ao.serving import (  # noqa: E402
    BASE,
    DeltaInUseError,
    MultiDeltaModel,
    UnknownDeltaError,
    UnsupportedDeltaError,
)

HOST = "127.0.0.1"
MAX_BODY = 1 << 20
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


# --- micro-batching ------------------------------------------------------------------------------


class _Pending:
    __slots__ = ("prompt", "delta", "max_new", "done", "result", "error")

    def __init__(self, prompt: list[int], delta: Optional[str], max_new: int):
        self.prompt, self.delta, self.max_new = prompt, delta, max_new
        self.done = threading.Event()
        self.result: Optional[dict] = None
        self.error: Optional[ApiError] = None

    def finish(self, result=None, error=None):
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class MicroBatcher:
    """One background thread; collects requests for `wait_ms` (at most `max_batch`) and runs them as
    one mixed batch through `served.generate(..., delta_ids=...)`."""

    def __init__(self, served: MultiDeltaModel, max_batch: int = 16, wait_ms: float = 5.0,
                 pad_token_id: int = 0, eos_token_id: Optional[int] = None):
        self.served, self.max_batch, self.wait = served, max_batch, wait_ms / 1000.0
        self.pad, self.eos = pad_token_id, eos_token_id
        self.queue: "queue.Queue[_Pending]" = queue.Queue()
        self.stopping = threading.Event()
        self.batches = Counter()  # batch size -> count
        self.thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], delta: Optional[str], max_new: int, timeout: float = 60.0) -> dict:
        if self.stopping.is_set():
            raise ApiError(503, "shutting_down", "the server is shutting down")
        p = _Pending(prompt, delta, max_new)
        self.queue.put(p)
        if not p.done.wait(timeout):
            p.finish(error=ApiError(503, "timeout", f"no answer within {timeout} s"))
        if p.error is not None:
            raise p.error
        return p.result

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=10)
        while True:
            try:
                self.queue.get_nowait().finish(error=ApiError(503, "shutting_down", "the server is shutting down"))
            except queue.Empty:
                break

    def _loop(self):
        while not self.stopping.is_set():
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            except Exception as e:  # a bug: answer 500, keep serving
                for p in batch:
                    p.finish(error=ApiError(500, "internal", f"{type(e).__name__}: {e}"))

    def _run(self, batch: list[_Pending]):
        for _ in range(5):
            known = self.served.deltas()
            live, ids = [], []
            for p in batch:
                if p.done.is_set():
                    continue
                if p.delta is None:
                    live.append(p), ids.append(BASE)
                elif p.delta in known:
                    live.append(p), ids.append(known[p.delta])
                else:
                    p.finish(error=ApiError(404, "unknown_delta", f"no delta named {p.delta!r} is loaded"))
            if not live:
                return
            try:
                rows = self._generate(live, ids)
            except UnknownDeltaError:
                continue  # unloaded between the lookup and the pin: look the names up again
            for p, d, row in zip(live, ids, rows):
                p.finish(result={"generated_ids": row, "delta": p.delta, "delta_id": d, "batch": len(live)})
            self.batches[len(live)] += 1
            return
        for p in batch:
            p.finish(error=ApiError(409, "delta_churn", "the requested delta kept being reloaded; retry"))

    def _generate(self, live: list[_Pending], ids: list[int]) -> list[list[int]]:
        length = max(len(p.prompt) for p in live)
        x = torch.full((len(live), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(live), length), dtype=torch.long)
        for i, p in enumerate(live):  # left padding: every row's last prompt token is at the end
            x[i, length - len(p.prompt):] = torch.tensor(p.prompt)
            mask[i, length - len(p.prompt):] = 1
        max_new = max(p.max_new for p in live)
        with torch.inference_mode():
            out = self.served.generate(x, delta_ids=torch.tensor(ids), attention_mask=mask, max_new_tokens=max_new,
                                       min_new_tokens=0, do_sample=False, pad_token_id=self.pad,
                                       eos_token_id=self.eos)
        return [cut(out[i, length:].tolist(), p.max_new, self.eos) for i, p in enumerate(live)]


def cut(tokens: list[int], n: int, eos: Optional[int]) -> list[int]:
    """The first `n` tokens, ending at the first EOS (included)."""
    tokens = tokens[:n]
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens


# --- HTTP ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, fmt, *args):
        if self.server.demo.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, obj: dict):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad_request", "bad Content-Length")
        if n > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "too_large", f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n else b""
        try:
            obj = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"body is not JSON: {e}")
        if not isinstance(obj, dict):
            raise ApiError(400, "bad_json", "body must be a JSON object")
        return obj

    def _dispatch(self, method: str):
        try:
            path = self.path.split("?", 1)[0]
            body = self._json() if method in ("POST", "DELETE") else {}
            status, obj = self.server.demo.handle(method, path, body)
        except ApiError as e:
            status, obj = e.status, {"error": e.kind, "message": e.message}
        except Exception as e:  # a bug
            status, obj = 500, {"error": "internal", "message": f"{type(e).__name__}: {e}"}
        self._send(status, obj)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    demo: "DemoServer"


class DemoServer:
    """The HTTP front end + micro-batcher over one `MultiDeltaModel`, on 127.0.0.1:`port` (0 = any)."""

    def __init__(self, served: MultiDeltaModel, port: int = 0, artifact_root=None, max_batch: int = 16,
                 wait_ms: float = 5.0, max_new_tokens: int = 64, verify: str = "full", verbose: bool = False):
        self.served = served
        self.vocab = served.model.get_input_embeddings().num_embeddings
        config = getattr(served.model, "config", None)
        gen = getattr(served.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        pad = getattr(gen, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(config, "pad_token_id", None) or 0)
        self.max_prompt = getattr(config, "max_position_embeddings", 4096)
        self.max_new_tokens, self.verify, self.verbose = max_new_tokens, verify, verbose
        self.artifact_root = Path(artifact_root).resolve() if artifact_root is not None else None
        self.batcher = MicroBatcher(served, max_batch, wait_ms, pad_token_id=pad, eos_token_id=eos)
        self.httpd = _Server((HOST, port), _Handler)
        self.httpd.demo = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "DemoServer":
        self.thread.start()
        return self

    def close(self):
        self.batcher.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- routes ---

    def handle(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        if path == "/generate" and method == "POST":
            return 200, self._generate(body)
        if path == "/deltas" and method == "GET":
            return 200, {"deltas": self.served.deltas()}
        if path.startswith("/deltas/") and method in ("POST", "DELETE"):
            name = path[len("/deltas/"):]
            if not NAME_RE.fullmatch(name):
                raise ApiError(400, "bad_name", "a delta name is 1-64 characters of [A-Za-z0-9_.-]")
            return 200, (self._load(name, body) if method == "POST" else self._unload(name))
        if path in ("/generate", "/deltas") or path.startswith("/deltas/"):
            raise ApiError(405, "method_not_allowed", f"{method} {path} is not supported")
        raise ApiError(404, "not_found", f"no route {method} {path}")

    def _generate(self, body: dict) -> dict:
        prompt, delta = body.get("prompt_ids"), body.get("delta")
        n = body.get("max_new_tokens", min(16, self.max_new_tokens))
        if not isinstance(prompt, list) or not prompt or not all(type(t) is int for t in prompt):
            raise ApiError(400, "bad_prompt", "prompt_ids must be a non-empty list of integers")
        if any(t < 0 or t >= self.vocab for t in prompt):
            raise ApiError(400, "bad_prompt", f"token ids must be in [0, {self.vocab})")
        if type(n) is not int or not 1 <= n <= self.max_new_tokens:
            raise ApiError(400, "bad_max_new_tokens",
                           f"max_new_tokens must be an integer in [1, {self.max_new_tokens}]")
        if len(prompt) + n > self.max_prompt:
            raise ApiError(400, "too_long", f"prompt + max_new_tokens must be at most {self.max_prompt}")
        if delta is not None and not isinstance(delta, str):
            raise ApiError(400, "bad_delta", "delta must be a name (string) or null")
        if delta is not None and delta not in self.served.deltas():
            raise ApiError(404, "unknown_delta", f"no delta named {delta!r} is loaded")
        return self.batcher.submit(prompt, delta, n)

    def _load(self, name: str, body: dict) -> dict:
        raw = body.get("path")
        if not isinstance(raw, str) or not raw:
            raise ApiError(400, "bad_path", "body must be {\"path\": \"<artifact directory>\"}")
        path = Path(raw).resolve()
        if self.artifact_root is not None and not path.is_relative_to(self.artifact_root):
            raise ApiError(403, "forbidden_path", "artifacts must be under the server's artifact root")
        if not (path / "delta_config.json").is_file():
            raise ApiError(404, "artifact_not_found", f"no delta artifact at {raw!r}")
        if name in self.served.deltas():
            raise ApiError(409, "delta_exists", f"a delta named {name!r} is already loaded; unload it first")
        try:
            delta_id = self.served.load_delta(name, path, verify=self.verify)
        except artifact.BaseMismatchError as e:
            raise ApiError(422, "base_mismatch", str(e))
        except artifact.DeltaFormatError as e:
            raise ApiError(422, "bad_artifact", str(e))
        except UnsupportedDeltaError as e:
            raise ApiError(422, "unsupported_delta", str(e))
        except ValueError as e:
            if "already loaded" in str(e):  # lost a race with another load of the same name
                raise ApiError(409, "delta_exists", str(e))
            raise ApiError(422, "bad_artifact", str(e))
        try:
            nbytes = self.served.delta_nbytes(name)
        except UnknownDeltaError:  # unloaded right away by someone else
            nbytes = None
        return {"name": name, "id": delta_id, "bytes": nbytes}

    def _unload(self, name: str) -> dict:
        try:
            self.served.unload_delta(name)
        except UnknownDeltaError as e:
            raise ApiError(404, "unknown_delta", str(e))
        except DeltaInUseError as e:
            raise ApiError(409, "delta_in_use", str(e))
        return {"name": name}


# --- client --------------------------------------------------------------------------------------


class Client:
    """A keep-alive JSON client for one thread (http.client, 127.0.0.1 only)."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.port, self.timeout = port, timeout
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def call(self, method: str, path: str, obj=None, raw: Optional[bytes] = None) -> tuple[int, dict]:
        body = raw if raw is not None else (json.dumps(obj).encode() if obj is not None else None)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, json.loads(data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        self.conn.close()


# --- the load-test fixture -----------------------------------------------------------------------


def tiny_llama(seed: int = 0, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def synthetic_finetune(base, seed: int, rank: int = 4, scale: float = 0.3):
    """base + a rank-`rank` delta (decaying spectrum) on every projection weight; nothing else changes."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and name.endswith("proj.weight"):
                o, i = p.shape
                u = torch.linalg.qr(torch.randn(o, rank, generator=g))[0]
                v = torch.linalg.qr(torch.randn(i, rank, generator=g))[0]
                s = 1 / (torch.arange(rank) + 1.0) ** 0.5
                p += scale * p.norm() / s.norm() * (u * s) @ v.T
    return ft


def build_fixture(root: Path, n_deltas: int = 4, n_prompts: int = 24, max_new: int = 6, min_new: int = 2,
                  min_margin: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Base, `n_deltas` compressed fine-tunes saved under `root`, and the expected greedy outputs of
    every (prompt, delta or None) computed by that model alone."""
    from torchao import quantize_

    from deltacome_ao import DeltaCoMeConfig, save_delta

    t0 = time.perf_counter()
    base = tiny_llama(seed)
    models, dirs = {None: base}, {}
    for k in range(n_deltas):
        name = f"ft{k}"
        ft = synthetic_finetune(base, seed=100 + k)
        quantize_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
        models[name] = ft.eval()
        dirs[name] = str(save_delta(ft, root / name, base=base))
    t_compress = time.perf_counter() - t0

    gen = base.generation_config
    rng = random.Random(seed)
    vocab = base.config.vocab_size
    prompts, expected, tried = [], {}, 0
    t0 = time.perf_counter()
    while len(prompts) < n_prompts and tried < 20 * n_prompts:
        tried += 1
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 10))]
        outs, ok = {}, True
        for name, model in models.items():
            with torch.inference_mode():
                r = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                   pad_token_id=gen.pad_token_id, eos_token_id=gen.eos_token_id,
                                   output_logits=True, return_dict_in_generate=True)
            top2 = torch.stack([lg[0].float().topk(2).values for lg in r.logits])
            if float((top2[:, 0] - top2[:, 1]).min()) < min_margin:
                ok = False  # a near-tie: batching noise could flip it
                break
            outs[name] = r.sequences[0, len(prompt):].tolist()
        if not ok:
            continue
        heads = [tuple(o[:min_new]) for o in outs.values()]
        if len(set(heads)) < len(heads):
            continue  # two models agree on the first tokens: a wrong delta could go unnoticed
        for name, o in outs.items():
            expected[(len(prompts), name)] = o
        prompts.append(prompt)
    if len(prompts) < max(4, n_prompts // 4):
        raise RuntimeError(f"only {len(prompts)} usable prompts out of {tried}; the fine-tunes are too similar")
    log(f"fixture: {n_deltas} deltas compressed + saved in {t_compress:.1f} s; {len(prompts)} prompts kept of "
        f"{tried} tried (margin >= {min_margin}, first {min_new} tokens differ between all models), expected "
        f"outputs in {time.perf_counter() - t0:.1f} s")
    return {"base": base, "root": str(root), "dirs": dirs, "prompts": prompts, "expected": expected, "max_new": max_new,
            "min_new": min_new, "eos": gen.eos_token_id, "names": list(dirs)}


# --- the load test -------------------------------------------------------------------------------


def run_load_test(requests: int = 1000, clients: int = 6, n_deltas: int = 4, churn: int = 2, max_batch: int = 16,
                  wait_ms: float = 5.0, time_limit: float = 300.0, seed: int = 0, n_prompts: int = 24,
                  min_margin: float = 1e-3, cache_dequantized: bool = True, fixture: Optional[dict] = None,
                  log=print) -> dict:
    """Run the whole load test; returns the summary (`ok` False on any wrong answer / crash).
    `fixture`: a `build_fixture` result to reuse (its artifact dir must still exist)."""
    with tempfile.TemporaryDirectory(prefix="serve-demo-") as tmp:
        fx = fixture or build_fixture(Path(tmp), n_deltas=n_deltas, n_prompts=n_prompts, min_margin=min_margin,
                                     seed=seed, log=log)
        if not 0 <= churn < len(fx["names"]):
            raise ValueError("keep at least one delta loaded all the time (0 <= churn < number of deltas)")
        served = MultiDeltaModel(copy.deepcopy(fx["base"]), cache_dequantized=cache_dequantized)
        server = DemoServer(served, artifact_root=fx["root"], max_batch=max_batch, wait_ms=wait_ms).start()
        try:
            return _drive(server, fx, requests, clients, churn, time_limit, seed, log)
        finally:
            server.close()


def _drive(server: DemoServer, fx: dict, total: int, clients: int, churn: int, time_limit: float, seed: int,
           log) -> dict:
    names, dirs, expected, prompts = fx["names"], fx["dirs"], fx["expected"], fx["prompts"]
    churned = set(names[-churn:]) if churn else set()
    admin = Client(server.port)
    for name in names:
        status, obj = admin.call("POST", f"/deltas/{name}", {"path": dirs[name]})
        if status != 200:
            raise RuntimeError(f"loading {name}: {status} {obj}")

    lock = threading.Lock()
    counts = Counter()  # outcome kind -> count
    wrong: list[dict] = []
    latencies: list[float] = []
    issued = [0]
    stop = threading.Event()
    t_start = time.perf_counter()
    deadline = t_start + time_limit

    def take() -> bool:
        with lock:
            if issued[0] >= total or time.perf_counter() > deadline:
                return False
            issued[0] += 1
            return True

    def classify(pi: int, delta, n: int, got: list[int]) -> Optional[str]:
        want = cut(expected[(pi, delta)], n, fx["eos"])
        if got == want:
            return None
        for other in [None, *names]:
            if other != delta and got == cut(expected[(pi, other)], n, fx["eos"]):
                return f"wrong_delta({delta}->{other})"
        return "wrong_tokens"

    def client_loop(k: int):
        rng = random.Random(seed * 1000 + k)
        c = Client(server.port)
        try:
            while take():
                pi = rng.randrange(len(prompts))
                delta = rng.choice([None, *names])
                n = rng.randint(fx["min_new"], fx["max_new"])
                t0 = time.perf_counter()
                try:
                    status, obj = c.call("POST", "/generate",
                                         {"prompt_ids": prompts[pi], "delta": delta, "max_new_tokens": n})
                except Exception as e:  # transport failure = crash
                    with lock:
                        counts[f"transport_error:{type(e).__name__}"] += 1
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if status == 200:
                        bad = classify(pi, delta, n, obj["generated_ids"])
                        if bad is None:
                            counts["ok"] += 1
                        else:
                            counts["wrong_answer"] += 1
                            wrong.append({"kind": bad, "prompt": pi, "delta": delta, "n": n, "got": obj})
                    elif status in (404, 409) and delta in churned and \
                            obj.get("error") in ("unknown_delta", "delta_churn"):
                        counts[f"{status}:{obj['error']}(unloaded)"] += 1
                    else:
                        counts[f"unexpected:{status}:{obj.get('error')}"] += 1
        finally:
            c.close()

    churn_stats = Counter()

    def churn_loop():
        rng = random.Random(seed + 7)
        c = Client(server.port)
        try:
            while not stop.is_set() and churned:
                name = rng.choice(sorted(churned))
                status, obj = c.call("DELETE", f"/deltas/{name}")
                churn_stats[f"unload:{status}:{obj.get('error', 'ok')}"] += 1
                if status == 200:
                    stop.wait(rng.uniform(0.01, 0.08))  # unloaded for a while: requests get 404
                    for _ in range(100):
                        status, obj = c.call("POST", f"/deltas/{name}", {"path": dirs[name]})
                        churn_stats[f"load:{status}:{obj.get('error', 'ok')}"] += 1
                        if status == 200:
                            break
                        stop.wait(0.01)
                    if status != 200:
                        raise RuntimeError(f"reloading {name}: {status} {obj}")
                elif status != 409:
                    raise RuntimeError(f"unloading {name}: {status} {obj}")
                stop.wait(rng.uniform(0.02, 0.1))
        except Exception as e:
            churn_stats[f"churn_crash:{type(e).__name__}: {e}"] += 1
        finally:
            c.close()

    threads = [threading.Thread(target=client_loop, args=(k,), name=f"client{k}") for k in range(clients)]
    churner = threading.Thread(target=churn_loop, name="churn")
    churner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit + 120)
    stop.set()
    churner.join(30)
    elapsed = time.perf_counter() - t_start
    hung = [t.name for t in [*threads, churner] if t.is_alive()]

    # final consistency: every delta is loaded again (or can be), and a mixed batch still checks out
    final = admin.call("GET", "/deltas")[1]["deltas"]
    admin.close()

    answered = sum(v for k, v in counts.items() if not k.startswith("transport_error"))
    batches = server.batcher.batches
    n_batches = sum(batches.values())
    crashes = sum(v for k, v in counts.items() if k.startswith(("transport_error", "unexpected:5")))
    crashes += sum(v for k, v in churn_stats.items() if k.startswith("churn_crash"))
    unexpected = sum(v for k, v in counts.items() if k.startswith("unexpected"))
    lat = sorted(latencies)
    summary = {
        "requests_issued": issued[0],
        "requests_answered": answered,
        "outcomes": dict(sorted(counts.items())),
        "wrong_answers": counts["wrong_answer"],
        "wrong_examples": wrong[:5],
        "crashes": crashes,
        "unexpected_errors": unexpected,
        "hung_threads": hung,
        "churn": dict(sorted(churn_stats.items())),
        "churned_deltas": sorted(churned),
        "loaded_at_end": final,
        "elapsed_s": round(elapsed, 2),
        "throughput_req_s": round(answered / elapsed, 1) if elapsed else None,
        "batches": n_batches,
        "mean_batch": round(sum(k * v for k, v in batches.items()) / n_batches, 2) if n_batches else 0,
        "max_batch_seen": max(batches) if batches else 0,
        "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 1),
                       "p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1),
                       "max": round(1000 * lat[-1], 1)} if lat else None,
        "clients": clients,
        "deltas": len(names),
    }
    summary["ok"] = summary["wrong_answers"] == 0 and crashes == 0 and unexpected == 0 and not hung
    return summary


def print_summary(s: dict, out=sys.stdout):
    print("\n== serve_demo load test (CPU, tiny Llama; timings are this machine's, not a GPU's) ==", file=out)
    print(f"requests issued {s['requests_issued']}, answered {s['requests_answered']} by {s['clients']} client threads "
          f"in {s['elapsed_s']} s -> {s['throughput_req_s']} req/s", file=out)
    print(f"micro-batches {s['batches']} (mean {s['mean_batch']} rows, max {s['max_batch_seen']}); latency "
          f"{s['latency_ms']}", file=out)
    print("outcomes:", file=out)
    for k, v in s["outcomes"].items():
        print(f"  {k:40s} {v}", file=out)
    print(f"delta churn over HTTP ({', '.join(s['churned_deltas'])}): {s['churn']}", file=out)
    print(f"WRONG ANSWERS: {s['wrong_answers']}   crashes: {s['crashes']}   unexpected errors: "
          f"{s['unexpected_errors']}   hung threads: {s['hung_threads'] or 0}", file=out)
    for w in s["wrong_examples"]:
        print(f"  wrong: {w}", file=out)
    print("RESULT:", "PASS" if s["ok"] else "FAIL", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--load-test", action="store_true", help="self-checking load test (in-process server)")
    mode.add_argument("--quick", action="store_true",
                      help="a small load test: 60 requests, 3 clients, 3 deltas (1 churned), 8 prompts, summary "
                           "JSON to a temporary file")
    mode.add_argument("--serve", action="store_true", help="serve the tiny demo model + deltas until Ctrl-C")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--deltas", type=int, default=4)
    ap.add_argument("--churn", type=int, default=2, help="how many deltas get unloaded / reloaded during the test")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--time-limit", type=float, default=300.0, help="stop issuing requests after this many seconds")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--port", type=int, default=0, help="--serve: port on 127.0.0.1 (0 = ephemeral)")
    ap.add_argument("--no-cache", action="store_true", help="cache_dequantized=False (unpack factors every step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=24, help="distinct prompts (with precomputed expected outputs)")
    ap.add_argument("--min-margin", type=float, default=1e-3, help="drop prompts whose greedy path has a top-2 "
                    "logit margin below this (batching noise could flip such a token)")
    ap.add_argument("--json", type=str, default=None, help="also write the summary here (--quick: a temporary file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.requests, args.clients, args.deltas, args.churn, args.prompts = 60, 3, 3, 1, 8
        args.json = args.json or str(Path(tempfile.gettempdir()) / "deltacome-benchmarks" / "serve-demo.json")

    if args.serve:
        tmp = tempfile.mkdtemp(prefix="serve-demo-")
        fx = build_fixture(Path(tmp), n_deltas=args.deltas, n_prompts=8, seed=args.seed)
        served = MultiDeltaModel(copy.deepcopy(fx["base"]), cache_dequantized=not args.no_cache)
        for name, d in fx["dirs"].items():
            served.load_delta(name, d)
        server = DemoServer(served, port=args.port, artifact_root=tmp, max_batch=args.max_batch,
                            wait_ms=args.wait_ms, verbose=True).start()
        print(f"serving on {server.url}; deltas {served.deltas()}; artifacts under {tmp}")
        print(f"example: curl -s {server.url}/generate -d '{{\"prompt_ids\": {fx['prompts'][0]}, \"delta\": \"ft0\", "
              f"\"max_new_tokens\": 4}}'")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.close()
        return 0

    summary = run_load_test(requests=args.requests, clients=args.clients, n_deltas=args.deltas, churn=args.churn,
                            max_batch=args.max_batch, wait_ms=args.wait_ms, time_limit=args.time_limit,
                            seed=args.seed, n_prompts=args.prompts, min_margin=args.min_margin,
                            cache_dequantized=not args.no_cache)
    print_summary(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
