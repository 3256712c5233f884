"""`deltacome`: the command line around the library (compress, inspect, eval, merge).

    deltacome compress BASE FINETUNED OUT [--alpha 0.0625] [--method deltacome] [--calib N --calib-file F] [--stream]
    deltacome inspect DELTA [--png PATH] [--base BASE]
    deltacome eval BASE DELTA [--pair llama-arith | --text-file F [--finetuned DIR]]
    deltacome merge BASE DELTA OUT

BASE / FINETUNED are local Hugging Face model directories (`save_pretrained` output, safetensors);
nothing is fetched from a hub. User errors (missing directories, a delta made against another base,
an unreadable artifact, ...) print one `Error:` line and exit with status 1 (2 for bad usage), never
a traceback. See docs/cli.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from functools import wraps
from pathlib import Path
from typing import Optional

import click

from .version import __version__

__all__ = ["main", "encode_text", "text_windows"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError, OSError)


def _user_errors(fn):
    """Turn the library's user-facing exceptions into a one-line `Error:` and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except _USER_ERRORS as e:
            from .fingerprint import BaseMismatchError
            from .format import DeltaFormatError

            kind = {BaseMismatchError: "wrong base", DeltaFormatError: "bad delta artifact"}.get(type(e))
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(f"{kind}: {message}" if kind else str(message)) from None

    return wrapper


class MethodName(click.ParamType):
    """A registered compression method (`deltacome_ao.methods`), looked up only when used, so that
    `deltacome --help` does not import torch."""

    name = "method"

    def _names(self) -> tuple[str, ...]:
        from .methods import method_names

        return method_names()

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self._names()) + "]"

    def convert(self, value, param, ctx):
        if value in self._names():
            return value
        self.fail(f"{value!r} is not a registered method; choose from {', '.join(self._names())}", param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self._names() if n.startswith(incomplete)]


_dir = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)
_file = click.Path(exists=True, file_okay=True, dir_okay=False, path_type=Path)


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _load(model_dir: Path, dtype: str = "auto"):
    """A causal LM from a local directory, in its saved dtype (`auto`) or the one asked for."""
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise FileNotFoundError(f"{model_dir} holds no model weights (*.safetensors); give a save_pretrained directory")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; give a save_pretrained directory")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_dtype(dtype), local_files_only=True).eval()


# --- text -> token ids (calibration and perplexity) --------------------------------------------------


def encode_text(text: str, model_dir: Path, config) -> list[int]:
    """Token ids of `text` for the model in `model_dir`.

    With a tokenizer in the directory (tokenizer.json / tokenizer_config.json / tokenizer.model):
    that tokenizer. Without one: byte-level ids (each UTF-8 byte is its own id, which needs a
    vocabulary of at least 256 — the shipped pairs are byte-level models), preceded by
    `config.bos_token_id` when the model has one.
    """
    if any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)(text)["input_ids"])
    vocab = getattr(config, "vocab_size", 0) or 0
    if vocab < 256:
        raise ValueError(
            f"{model_dir} has no tokenizer and a vocabulary of {vocab} (< 256), so the text cannot be byte-encoded; "
            f"save the tokenizer next to the model"
        )
    bos = getattr(config, "bos_token_id", None)
    return ([bos] if isinstance(bos, int) and 0 <= bos < vocab else []) + list(text.encode("utf-8"))


def text_windows(ids: list[int], n: int, seq_len: int, seed: int = 0):
    """`n` random windows of `seq_len` tokens (one [n, seq_len] tensor), or every consecutive
    window when `n` is 0 (the whole text, for perplexity)."""
    import torch

    if len(ids) < 2:
        raise ValueError("the text file encodes to fewer than 2 tokens")
    seq_len = min(seq_len, len(ids))
    if n <= 0:
        rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        return [torch.tensor([r], dtype=torch.long) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen).tolist()
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


# --- summaries -----------------------------------------------------------------------------------------


def _bands_text(spec: dict) -> str:
    """The layer's structure as its tensor kind describes it (an empty weight of that structure)."""
    from .format import shell

    return shell(spec).describe()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def _summary(document: dict, delta_dir: Optional[Path] = None) -> str:
    layers = document["layers"]
    width = max([len("layer")] + [len(n) for n in layers])
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'bands (bits×vectors)':<24} {'bits/param':>10} {'bytes':>10}"]
    params = 0
    for name, spec in layers.items():
        n = 1
        for d in spec["shape"]:
            n *= d
        params += n
        lines.append(
            f"{name:<{width}}  {'x'.join(map(str, spec['shape'])):>11}  {_bands_text(spec):<24} "
            f"{8 * spec['delta_bytes'] / n:>10.3f} {spec['delta_bytes']:>10,}"
        )
    nbytes = document.get("bytes", {})
    compressed, kept = nbytes.get("compressed", 0), nbytes.get("kept", 0)
    fields = {k: document.get(k) for k in ("method", "alpha", "group_size", "allocation", "calibrated")}
    lines += [
        "",
        "  ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
        f"{len(layers)} compressed layers, {params:,} parameters: {compressed:,} bytes "
        f"({8 * compressed / max(params, 1):.3f} bits/param, {compressed / max(2 * params, 1):.4f} of fp16)",
        f"{len(document.get('kept', []))} kept tensors (embeddings, norms, lm_head, ...): {kept:,} bytes",
    ]
    lines += _coverage_lines(document.get("coverage"))
    if delta_dir is not None:
        on_disk = sum(f.stat().st_size for f in Path(delta_dir).iterdir() if f.is_file())
        lines.append(f"total {compressed + kept:,} bytes of tensors; {_human(on_disk)} on disk in {delta_dir}")
    return "\n".join(lines)


def _coverage_lines(coverage: Optional[dict]) -> list[str]:
    """What the fine-tune changed that is not compressed, and why (delta_config.json "coverage")."""
    if not coverage:
        return []
    lines = [
        f"coverage: {coverage['compressed_params']:,} of {coverage['changed_params']:,} changed parameters compressed "
        f"({100 * coverage['share']:.1f}%; {100 * coverage['share_outside_embeddings']:.1f}% outside the embeddings, "
        f"whose {coverage['embedding_params']:,} changed parameters are reported apart)",
    ]
    by_reason: dict = {}
    for name, entry in coverage.get("uncompressed", {}).items():
        by_reason.setdefault(entry["reason"], []).append(name)
    for reason, params in coverage.get("uncompressed_by_reason", {}).items():
        names = by_reason.get(reason, [])
        shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        lines.append(f"  uncompressed ({reason}): {params:,} parameters in {len(names)} tensors: {shown}")
    return lines


# --- commands ----------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="deltacome", message="%(prog)s %(version)s")
def main():
    """Delta-CoMe delta compression of fine-tuned LLMs (one base + a small delta per fine-tune)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@main.command()
@click.argument("base", type=_dir)
@click.argument("finetuned", type=_dir)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--alpha", type=float, default=1 / 16, show_default="0.0625", help="delta bytes / fp16 bytes of each matrix")
@click.option("--method", type=MethodName(), default="deltacome", show_default=True)
@click.option("--allocation", type=click.Choice(["paper", "optimal"]), default="paper", show_default=True,
              help="paper: 8/3/2-bit schedule; optimal: per-vector widths minimising the measured error")
@click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--calib", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPTQ calibration on N random windows of --calib-file (0: data-free RTN)")
@click.option("--calib-file", type=_file,
              help="text file for --calib, encoded with the model's tokenizer (or bytes); default: the zoo's "
                   "pre-training corpus (Python standard-library source)")
@click.option("--calib-len", type=click.IntRange(min=2), default=128, show_default=True, help="tokens per calibration window")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the calibration window positions")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="load dtype (auto: as saved)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--stream", is_flag=True,
              help="read both checkpoints tensor by tensor (never a whole model in memory); same artifact")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar, no per-layer table")
@_user_errors
def compress(base, finetuned, out, alpha, method, allocation, group_size, calib, calib_file, calib_len, seed, dtype,
             overwrite, stream, quiet):
    """Compress FINETUNED against BASE and write the delta artifact OUT."""
    from .artifact import read_delta_config

    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    if stream:
        if calib or calib_file is not None:
            raise click.UsageError("--stream is data-free: --calib needs the whole model (drop --stream)")
        if dtype != "auto":
            raise click.UsageError("--stream reads the tensors in their saved dtype: drop --dtype")
        from .streaming import compress_streaming

        compress_streaming(base, finetuned, out, alpha=alpha, method=method, allocation=allocation,
                           group_size=group_size, overwrite=overwrite, progress=not quiet,
                           metadata={"base": str(base), "finetuned": str(finetuned), "calibration_windows": 0})
        _report_written(read_delta_config(out), out, quiet)
        return

    import torch

    from .artifact import save_delta
    from .compress import compress_
    from .config import DeltaCoMeConfig

    if calib_file is not None and not calib:
        raise click.UsageError("--calib-file is used only with --calib N (N > 0)")
    if not quiet:
        click.echo(f"loading {base} and {finetuned}", err=True)
    base_model = _load(base, dtype)
    model = _load(finetuned, dtype)
    calibration = None
    source = None
    if calib:
        if calib_file is None:  # the zoo's own corpus: Python source from the standard library
            from .calibrate import stdlib_text

            text, source = stdlib_text().decode("utf-8", errors="replace"), "zoo corpus (Python stdlib)"
        else:
            text, source = calib_file.read_text(encoding="utf-8", errors="replace"), str(calib_file)
        ids = encode_text(text, finetuned, model.config)
        calibration = [text_windows(ids, calib, calib_len, seed)]
    config = DeltaCoMeConfig(
        base=base_model, alpha=alpha, method=method, allocation=allocation, group_size=group_size,
        calibration=calibration, progress=not quiet,
    )
    with torch.no_grad():
        compress_(model, config)
    save_delta(model, out, base=base_model, config=config, overwrite=overwrite,
               metadata={"base": str(base), "finetuned": str(finetuned), "calibration_windows": calib,
                         "calibration_source": source})
    _report_written(read_delta_config(out), out, quiet)


def _report_written(document: dict, out: Path, quiet: bool):
    if not quiet:
        click.echo(_summary(document, out))
    else:
        click.echo(f"wrote {out}: {document['bytes']['compressed'] + document['bytes']['kept']:,} bytes of tensors")


@main.command()
@click.argument("delta", type=_dir)
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="write a figure of the bit allocation per layer")
@click.option("--base", type=_dir, help="base directory: also plot the singular-value spectra (needs --png)")
@click.option("--json", "as_json", is_flag=True, help="print delta_config.json's layers as JSON instead of a table")
@_user_errors
def inspect(delta, png, base, as_json):
    """Per-layer bands, bits and bytes of the delta artifact DELTA."""
    from .artifact import read_delta_config

    document = read_delta_config(delta)
    if base is not None and png is None:
        raise click.UsageError("--base only adds the spectra to the --png figure; give --png PATH too")
    if as_json:
        click.echo(json.dumps({k: document.get(k) for k in ("method", "alpha", "group_size", "allocation", "bytes", "layers")}, indent=2))
    else:
        click.echo(_summary(document, delta))
    if png is not None:
        spectra = _spectra(base, delta) if base is not None else None
        _plot(document, png, spectra, title=str(delta))
        click.echo(f"wrote {png}")


def _spectra(base: Path, delta: Path) -> dict:
    """{layer: (stored s, singular values of the reconstructed delta)}; checks the base first."""
    import torch

    from .artifact import DeltaCoMeModel
    from .compress import compressed_layers

    model = DeltaCoMeModel.from_pretrained(_load(base), delta)
    out = {}
    with torch.no_grad():
        for name, w in compressed_layers(model).items():
            f = w.low_rank_factors()
            if f is not None and f.rank:
                out[name] = (f.s.float().abs().sort(descending=True).values, torch.linalg.svdvals(f.dense())[: f.rank])
    return out


def _plot(document: dict, png: Path, spectra: Optional[dict], title: str = ""):
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("--png needs matplotlib: pip install matplotlib (or the [dev] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = document["layers"]
    names = list(layers)
    widths = sorted({b for s in layers.values() for b in s.get("bits", [])}, reverse=True)
    panels = 2 if spectra else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(8, 0.35 * len(names) + 2), 4.5 * panels), squeeze=False)
    ax = axes[0][0]
    bottom = [0] * len(names)
    colors = plt.get_cmap("viridis")
    for i, bits in enumerate(widths):
        counts = [dict(zip(s.get("bits", []), s.get("counts", []))).get(bits, 0) for s in layers.values()]
        ax.bar(range(len(names)), counts, bottom=bottom, label=f"{bits}-bit" if bits < 16 else "fp16",
               color=colors(i / max(len(widths) - 1, 1)))
        bottom = [a + b for a, b in zip(bottom, counts)]
    unbanded = [i for i, s in enumerate(layers.values()) if "bits" not in s]
    if unbanded:
        kinds = sorted({_bands_text(s) for s in layers.values() if "bits" not in s})
        ax.bar(unbanded, [1] * len(unbanded), color="gray", label=", ".join(kinds) + " (no singular vectors)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removeprefix("model.") for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("singular vectors kept")
    alpha = document.get("alpha")
    ax.set_title(f"{title}: bit allocation per layer ({document.get('method')}"
                 + (f", alpha={alpha:g})" if isinstance(alpha, (int, float)) else ")"))
    if widths or unbanded:
        ax.legend(fontsize=8)
    if spectra:
        ax = axes[1][0]
        cmap = plt.get_cmap("tab20")
        for i, (name, (stored, effective)) in enumerate(spectra.items()):
            c = cmap(i % 20)
            ax.semilogy(stored.numpy(), color=c, lw=1, label=name.removeprefix("model.") if i < 12 else None)
            ax.semilogy(effective.numpy(), color=c, lw=0.8, ls="--")
        ax.set_xlabel("singular vector index")
        ax.set_ylabel("value")
        ax.set_title("stored S (solid) and singular values of the reconstructed delta (dashed)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


@main.command("eval")
@click.argument("base", type=_dir)
@click.argument("delta", type=_dir)
@click.option("--pair", help="a zoo pair (deltacome_ao.evaluation.pairs): accuracy / KL / perplexity like the main job")
@click.option("--text-file", type=_file, help="other models: perplexity on this text file")
@click.option("--finetuned", type=_dir, help="with --text-file: the fine-tuned model, for its perplexity and the KL")
@click.option("--problems", type=click.IntRange(min=1), default=200, show_default=True, help="held-out problems (--pair)")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="window length (--text-file)")
@click.option("--verify", type=click.Choice(["full", "sample", "none"]), default="full", show_default=True,
              help="how the base is checked against the delta's fingerprint")
@_user_errors
def eval_(base, delta, pair, text_file, finetuned, problems, seq_len, verify):
    """Put DELTA on BASE and measure it (a shipped pair, or perplexity on a text file)."""
    import torch

    from .artifact import DeltaCoMeModel
    from .compress import delta_report

    if pair is None and text_file is None:
        info = base / "pair.json"
        name = json.loads(info.read_text()).get("spec", {}).get("name") if info.is_file() else None
        if name is None:
            raise click.UsageError("give --pair NAME (a shipped pair) or --text-file PATH (perplexity)")
        pair = name
    if pair is not None and text_file is not None:
        raise click.UsageError("--pair and --text-file exclude each other")
    base_model = _load(base)
    model = DeltaCoMeModel.from_pretrained(copy.deepcopy(base_model), delta, verify=verify)
    report = delta_report(model)
    nbytes = sum(r["delta_bytes"] for r in report)
    bits = 8 * nbytes / max(sum(math.prod(r["shape"]) for r in report), 1)
    torch.manual_seed(0)
    if pair is not None:
        from .evaluation.compare import format_table, measure_row
        from .evaluation.pairs import PAIRS, get_pair

        if pair not in PAIRS:
            raise click.BadParameter(f"unknown pair {pair!r}; known: {', '.join(sorted(PAIRS))}", param_hint="--pair")
        reference = _load(get_pair(pair)[1])
        task = PAIRS[pair].task
        batches = {"task": task.text_batches("task"), "python": task.text_batches("python")}
        with torch.no_grad():
            rows = [
                measure_row("base", base_model, reference, task, batches, problems),
                measure_row("fine-tuned", reference, reference, task, batches, problems),
                measure_row(f"delta {delta.name}", model, reference, task, batches, problems, (nbytes, bits)),
            ]
        click.echo(format_table(rows, f"{pair}: {delta}"))
        return
    from .evaluation.metrics import kl_divergence, perplexity

    ids = encode_text(text_file.read_text(encoding="utf-8", errors="replace"), base, base_model.config)
    windows = text_windows(ids, 0, seq_len)
    models = [("base", base_model)]
    reference = _load(finetuned) if finetuned is not None else None
    if reference is not None:
        models.append(("fine-tuned", reference))
    models.append((f"delta {delta.name}", model))
    click.echo(f"{text_file}: {sum(w.numel() for w in windows):,} tokens in {len(windows)} windows of {windows[0].shape[1]}")
    click.echo(f"| model | delta bytes | bits/param | perplexity |{' KL to fine-tuned |' if reference is not None else ''}")
    click.echo("|---|---:|---:|---:|" + ("---:|" if reference is not None else ""))
    for label, m in models:
        ppl = perplexity(m, windows)
        kl = f" {kl_divergence(m, reference, windows):.4f} |" if reference is not None else ""
        size = (f"{nbytes:,} | {bits:.3f}") if m is model else "— | —"
        click.echo(f"| {label} | {size} | {ppl:.3f} |{kl}")


@main.command()
@click.argument("base", type=_dir)
@click.argument("delta", type=_dir)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="dtype of the written weights")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@_user_errors
def merge(base, delta, out, dtype, overwrite):
    """Write BASE + DELTA as a plain dense model OUT (safetensors), for tools that need plain weights."""
    import torch
    from tqdm.auto import tqdm

    from .artifact import DeltaCoMeModel
    from .compress import compressed_layers

    if out.exists():
        if not overwrite:
            raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise click.ClickException(f"{out} is not a model directory; refusing to replace it")
    from .format import layer_key

    model = DeltaCoMeModel.from_pretrained(_load(base), delta)  # the fine-tune's config applied
    layers = compressed_layers(model)
    with torch.no_grad():
        for name, w in tqdm(layers.items(), desc="dequantize", unit="layer"):
            owner, _, param = layer_key(name, w.dim()).rpartition(".")
            setattr(model.get_submodule(owner), param, torch.nn.Parameter(w.dequantize(), requires_grad=False))
    if dtype != "auto":
        model = model.to(_torch_dtype(dtype))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    for f in list(base.glob("tokenizer*")) + [base / "special_tokens_map.json"]:
        if f.is_file():
            shutil.copy2(f, out / f.name)
    click.echo(f"wrote {out}: {len(layers)} layers dequantized, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
