"""benchmarks/serve_demo.py: the localhost HTTP demo over MultiDeltaModel.

A reduced load test (200 requests, 4 client threads, 2 of 4 deltas unloaded / reloaded meanwhile)
with zero wrong answers and no crash; a negative control (the name -> id lookup deliberately
rotated) that the checker must catch; every error response of the API.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_demo  # noqa: E402
from serve_demo import Client, DemoServer, build_fixture, cut, run_load_test  # noqa: E402

from deltacome_ao.serving import MultiDeltaModel  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(2)
    return build_fixture(tmp_path_factory.mktemp("serve_demo"), n_deltas=4, n_prompts=10, log=lambda *a: None)


def test_load_test_no_wrong_answers(fx):
    s = run_load_test(requests=200, clients=4, churn=2, time_limit=60, fixture=fx, log=lambda *a: None)
    serve_demo.print_summary(s)
    assert s["wrong_answers"] == 0, s["wrong_examples"]
    assert s["crashes"] == 0 and s["unexpected_errors"] == 0 and not s["hung_threads"], s
    assert s["requests_answered"] == 200 and s["ok"]
    assert s["outcomes"].get("ok", 0) > 100
    assert s["max_batch_seen"] > 1  # requests really were batched together
    assert s["churn"].get("unload:200:ok", 0) > 0  # deltas really were unloaded during the test


def test_load_test_catches_wrong_delta(fx, monkeypatch):
    """Negative control: route every named request to another delta; the checker must see it."""
    real = MultiDeltaModel.deltas

    def rotated(self):
        d = real(self)
        names = sorted(d)
        return {n: d[names[(i + 1) % len(names)]] for i, n in enumerate(names)} if len(names) > 1 else d

    monkeypatch.setattr(MultiDeltaModel, "deltas", rotated)
    s = run_load_test(requests=40, clients=2, churn=0, time_limit=60, fixture=fx, log=lambda *a: None)
    assert s["wrong_answers"] > 0 and not s["ok"]
    assert any(w["kind"].startswith("wrong_delta") for w in s["wrong_examples"])


def test_error_responses(fx, tmp_path):
    from torchao import quantize_

    from deltacome_ao import DeltaCoMeConfig, save_delta

    served = MultiDeltaModel(copy.deepcopy(fx["base"]))
    root = Path(fx["root"])
    # an artifact of another base, inside the artifact root: refused by the fingerprint check
    other = serve_demo.tiny_llama(seed=1)
    ft = serve_demo.synthetic_finetune(other, seed=5)
    quantize_(ft, DeltaCoMeConfig(base=other, group_size=32, progress=False))
    save_delta(ft, root / "other_base", base=other)

    with DemoServer(served, artifact_root=root, max_new_tokens=8) as server:
        c = Client(server.port)
        assert server.url.startswith("http://127.0.0.1:")
        prompt = fx["prompts"][0]

        def err(method, path, obj=None, raw=None):
            status, body = c.call(method, path, obj, raw=raw)
            assert set(body) == {"error", "message"} and body["message"], body
            return status, body["error"]

        assert c.call("POST", "/deltas/ft0", {"path": fx["dirs"]["ft0"]})[0] == 200
        assert c.call("GET", "/deltas")[1] == {"deltas": {"ft0": 0}}

        # /generate
        assert err("POST", "/generate", {"prompt_ids": prompt, "delta": "nope"}) == (404, "unknown_delta")
        assert err("POST", "/generate", raw=b"{not json") == (400, "bad_json")
        assert err("POST", "/generate", raw=b"[1, 2]") == (400, "bad_json")
        assert err("POST", "/generate", {"prompt_ids": []}) == (400, "bad_prompt")
        assert err("POST", "/generate", {"prompt_ids": [1, "2"]}) == (400, "bad_prompt")
        assert err("POST", "/generate", {"prompt_ids": [10 ** 6]}) == (400, "bad_prompt")
        assert err("POST", "/generate", {"prompt_ids": prompt, "max_new_tokens": 0}) == (400, "bad_max_new_tokens")
        assert err("POST", "/generate", {"prompt_ids": prompt, "max_new_tokens": 9}) == (400, "bad_max_new_tokens")
        assert err("POST", "/generate", {"prompt_ids": prompt, "delta": 3}) == (400, "bad_delta")
        # routes
        assert err("GET", "/nowhere") == (404, "not_found")
        assert err("GET", "/generate") == (405, "method_not_allowed")
        # loading
        assert err("POST", "/deltas/ft0", {"path": fx["dirs"]["ft0"]}) == (409, "delta_exists")
        assert err("POST", "/deltas/x", {}) == (400, "bad_path")
        assert err("POST", "/deltas/x", {"path": str(root / "missing")}) == (404, "artifact_not_found")
        assert err("POST", "/deltas/x", {"path": str(tmp_path)}) == (403, "forbidden_path")
        assert err("POST", "/deltas/x", {"path": str(root / ".." / root.name / ".." )}) == (403, "forbidden_path")
        assert err("POST", "/deltas/x", {"path": str(root / "other_base")}) == (422, "base_mismatch")
        assert err("POST", "/deltas/a$b", {"path": fx["dirs"]["ft1"]}) == (400, "bad_name")
        assert c.call("GET", "/deltas")[1] == {"deltas": {"ft0": 0}}  # nothing half-loaded
        # unloading
        assert err("DELETE", "/deltas/nope") == (404, "unknown_delta")
        with served.route(["ft0"]):  # a running batch holds ft0
            assert err("DELETE", "/deltas/ft0") == (409, "delta_in_use")

        status, body = c.call("POST", "/generate", {"prompt_ids": prompt, "delta": "ft0", "max_new_tokens": 4})
        assert status == 200 and body["generated_ids"] == cut(fx["expected"][(0, "ft0")], 4, fx["eos"])
        assert c.call("DELETE", "/deltas/ft0")[0] == 200
        assert err("POST", "/generate", {"prompt_ids": prompt, "delta": "ft0"}) == (404, "unknown_delta")
        status, body = c.call("POST", "/generate", {"prompt_ids": prompt, "delta": None, "max_new_tokens": 3})
        assert status == 200 and body["generated_ids"] == cut(fx["expected"][(0, None)], 3, fx["eos"])
        # reloaded under the same name: a new id, the same answers
        status, body = c.call("POST", "/deltas/ft0", {"path": fx["dirs"]["ft0"]})
        assert status == 200 and body["id"] != 0 and body["bytes"] > 0
        status, body = c.call("POST", "/generate", {"prompt_ids": prompt, "delta": "ft0", "max_new_tokens": 4})
        assert status == 200 and body["generated_ids"] == cut(fx["expected"][(0, "ft0")], 4, fx["eos"])
        c.close()
    # after close: a submit is refused cleanly
    with pytest.raises(serve_demo.ApiError) as e:
        server.batcher.submit(prompt, None, 1)
    assert e.value.status == 503
