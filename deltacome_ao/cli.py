"""`deltacome`: the command line around the library (compress, inspect, eval, merge).

    deltacome compress BASE FINETUNED OUT [--alpha 0.0625] [--method deltacome] [--calib N --calib-file F] [--stream]
    deltacome inspect DELTA [--png PATH] [--base BASE]
    deltacome eval BASE DELTA [--pair llama-arith | --text-file F [--finetuned DIR]]
    deltacome merge BASE DELTA OUT
    deltacome export-lora BASE DELTA OUT [--max-rank R] [--vllm]
    deltacome compress-lora BASE ADAPTER OUT [--alpha 0.0625]

BASE / FINETUNED are local Hugging Face model directories (`save_pretrained` output, safetensors);
nothing is fetched from a hub. User errors (missing directories, a delta made against another base,
an unreadable artifact, ...) print one `Error:` line and exit with status 1 (2 for bad usage), never
a traceback. See docs/cli.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import uuid
import warnings
from functools import wraps
from pathlib import Path
from typing import Optional

import click

from .version import __version__

__all__ = ["main", "encode_text", "text_windows"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError, OSError,
                NotImplementedError)  # docs/integrity.md: what compressed weights or a format cannot do


def _user_errors(fn):
    """Turn the library's user-facing exceptions (and a file safetensors cannot read) into one
    `Error:` message and exit status 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            from safetensors import SafetensorError

            from .checkpoint import CheckpointMismatchError
            from .fingerprint import BaseMismatchError
            from .format import DeltaFormatError

            if not isinstance(e, _USER_ERRORS + (SafetensorError,)):
                raise
            kind = {BaseMismatchError: "wrong base", DeltaFormatError: "bad delta artifact",
                    CheckpointMismatchError: "base and fine-tune do not match",
                    SafetensorError: "unreadable safetensors file"}.get(type(e))
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(f"{kind}: {message}" if kind else str(message)) from None

    return wrapper


class _DropNoise(logging.Filter):
    """Library-internal log lines a command line user can do nothing about: torchao's optional
    CUDA extensions failing to load (`Failed to load ....so`) and torch's deprecation notices for
    torchao's pytree registrations."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Failed to load") and ".so" in text) and "is deprecated" not in text \
            and "is an Enum subclass" not in text


def _quiet_libraries() -> None:
    """Before torch / torchao / transformers are imported: drop their noise (not our warnings)."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|torchao|transformers|triton)(\.|$)")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """--quiet: no transformers progress bars (loading / writing shards) and no load reports, for
    the duration of the command."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_OPTION_NAMES = {"alpha": "--alpha", "group_size": "--group-size", "method": "--method", "allocation": "--allocation",
                 "method_options": "--method-option"}


def _check_options(**options) -> None:
    """The config's own validation of the compress options, before any model is loaded: a bad value
    is a usage error naming the option (exit status 2)."""
    from .config import DeltaCoMeConfig

    try:
        DeltaCoMeConfig.check_options(**options)
    except ValueError as e:
        text = str(e)
        field = next((f for f in sorted(options, key=len, reverse=True) if text.startswith(f)), None)
        raise click.BadParameter(text, param_hint=_OPTION_NAMES.get(field, "option")) from None


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
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'structure':<24} {'bits/param':>10} {'bytes':>10}"]
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
    _quiet_libraries()


@main.command()
@click.argument("base", type=_dir)
@click.argument("finetuned", type=_dir)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--alpha", type=float, default=1 / 16, show_default="0.0625", help="delta bytes / fp16 bytes of each matrix")
@click.option("--method", type=MethodName(), default="deltacome", show_default=True)
@click.option("--allocation", type=click.Choice(["paper", "optimal", "global"]), default="paper", show_default=True,
              help="paper: 8/3/2-bit schedule; optimal: per-vector widths minimising the measured error; global: "
                   "one budget (alpha of all matrices together) spent where the model's error drops most")
@click.option("--global-cap", type=float, default=4.0, show_default=True,
              help="with --allocation global: the most one matrix may spend, as a multiple of its own alpha budget")
@click.option("--global-sensitivity", type=click.Choice(["weight", "output", "fisher"]),
              help="with --allocation global: the error proxy (default: fisher with calibration, else weight)")
@click.option("--group-size", type=int, default=128, show_default=True, help="values per scale and zero-point (>= 2)")
@click.option("--calib", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPTQ calibration on N sequences: random windows of --calib-file, or with --calib-source "
                   "self / base N sequences sampled from the fine-tuned / base model (0: data-free RTN)")
@click.option("--calib-source", type=click.Choice(["file", "self", "base"]), default="file", show_default=True,
              help="file: windows of --calib-file; self / base: no user data, sequences sampled from the "
                   "fine-tuned / base model itself (--calib-len tokens, --seed)")
@click.option("--target-correction", is_flag=True,
              help="with calibration: quantize U toward the target that corrects V's error (DeltaMix)")
@click.option("--calib-file", type=_file,
              help="text file for --calib, encoded with the model's tokenizer (or bytes); default: the zoo's "
                   "pre-training corpus (Python standard-library source)")
@click.option("--calib-len", type=click.IntRange(min=2), default=128, show_default=True, help="tokens per calibration window")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the calibration window positions")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="load dtype (auto: as saved)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--stream", is_flag=True,
              help="read both checkpoints tensor by tensor (never a whole model in memory); same artifact")
@click.option("--device", default=None, metavar="DEVICE",
              help="compress there (e.g. cuda, cuda:1): the SVDs and quantization run on it (default: cpu)")
@click.option("--method-option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="a setting of the method's own (repeatable; VALUE is JSON, else a string)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar, no per-layer table")
@_user_errors
def compress(base, finetuned, out, **opts):
    """Compress FINETUNED against BASE and write the delta artifact OUT."""
    if out.exists() and not opts["overwrite"]:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    if base.resolve() == finetuned.resolve():
        raise click.UsageError("BASE and FINETUNED are the same directory: there is no delta to store")
    opts["method_options"] = _parse_method_options(opts["method_options"])
    _config_fields(opts)  # --global-* without --allocation global: the command line's own usage error first
    _check_options(**{k: opts[k] for k in ("alpha", "method", "allocation", "group_size", "method_options",
                                           "global_cap")})
    with _quiet_transformers(opts["quiet"]):
        if opts["stream"]:
            _compress_streaming(base, finetuned, out, opts)
        else:
            _compress(base, finetuned, out, opts)


def _parse_method_options(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--method-option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config_fields(opts: dict) -> dict:
    """The DeltaCoMeConfig fields the command line sets."""
    fields = {k: opts[k] for k in ("alpha", "method", "allocation", "group_size")}
    if opts["method_options"]:
        fields["method_options"] = opts["method_options"]
    if opts["allocation"] == "global":
        fields["global_cap"] = opts["global_cap"]
        if opts["global_sensitivity"] is not None:
            fields["global_sensitivity"] = opts["global_sensitivity"]
    elif opts["global_sensitivity"] is not None or opts["global_cap"] != 4.0:
        raise click.UsageError("--global-cap and --global-sensitivity apply only with --allocation global")
    if opts["target_correction"]:
        fields["target_correction"] = True
    return fields


def _compress_streaming(base: Path, finetuned: Path, out: Path, opts: dict):
    from .artifact import read_delta_config
    from .checkpoint import write_dir_atomic
    from .streaming import compress_streaming

    if opts["calib"] or opts["calib_file"] is not None:
        raise click.UsageError("--stream is data-free: --calib needs the whole model (drop --stream)")
    if opts["allocation"] == "global":
        raise click.UsageError("--stream compresses one tensor pair at a time: --allocation global plans over the "
                               "whole model first (drop --stream, or use --allocation optimal)")
    if opts["dtype"] != "auto":
        raise click.UsageError("--stream reads the tensors in their saved dtype: drop --dtype")
    # into a staging directory first: a zero delta must not replace (or become) OUT
    stage = out.parent / f".{out.name}.stream-{uuid.uuid4().hex[:12]}"
    try:
        compress_streaming(base, finetuned, stage, progress=not opts["quiet"], device=opts["device"],
                           **_config_fields(opts),
                           metadata={"base": str(base), "finetuned": str(finetuned), "calibration_windows": 0})
        document = read_delta_config(stage)
        _refuse_zero_delta(document, base, finetuned)
        write_dir_atomic(out, lambda tmp: [os.replace(f, tmp / f.name) for f in stage.iterdir()], opts["overwrite"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _report_written(read_delta_config(out), out, opts["quiet"])


def _compress(base: Path, finetuned: Path, out: Path, opts: dict):
    import torch

    from .artifact import read_delta_config, save_delta
    from .compress import compress_
    from .config import DeltaCoMeConfig
    from .fingerprint import same

    calib, calib_file, quiet, calib_source = opts["calib"], opts["calib_file"], opts["quiet"], opts["calib_source"]
    if calib_file is not None and not calib:
        raise click.UsageError("--calib-file is used only with --calib N (N > 0)")
    if calib_source != "file" and not calib:
        raise click.UsageError(f"--calib-source {calib_source} needs --calib N (N > 0 sampled sequences)")
    if calib_source != "file" and calib_file is not None:
        raise click.UsageError(f"--calib-source {calib_source} samples from the model: drop --calib-file")
    if opts["target_correction"] and not calib:
        raise click.UsageError("--target-correction needs calibration (--calib N)")
    if opts["global_sensitivity"] in ("output", "fisher") and not calib:
        raise click.UsageError(f"--global-sensitivity {opts['global_sensitivity']} needs calibration (--calib N)")
    if not quiet:
        click.echo(f"loading {base} and {finetuned}", err=True)
    base_model = _load(base, opts["dtype"])
    model = _load(finetuned, opts["dtype"])
    base_state, ft_state = base_model.state_dict(), model.state_dict()
    if base_state.keys() == ft_state.keys() and all(same(ft_state[k], v) for k, v in base_state.items()):
        raise click.ClickException(f"{finetuned} holds exactly the weights of {base}: there is no delta to store")
    calibration = None
    source = None
    if calib and calib_source != "file":  # no user data: sampled from the model itself when it is compressed
        from .self_calibration import SelfCalibration

        calibration = SelfCalibration(samples=calib, length=opts["calib_len"], seed=opts["seed"],
                                      source="finetuned" if calib_source == "self" else "base")
        source = f"sampled from the {'fine-tuned' if calib_source == 'self' else 'base'} model"
    elif calib:
        if calib_file is None:  # the zoo's own corpus: Python source from the standard library
            from .calibrate import stdlib_text

            text, source = stdlib_text().decode("utf-8", errors="replace"), "zoo corpus (Python stdlib)"
        else:
            text, source = calib_file.read_text(encoding="utf-8", errors="replace"), str(calib_file)
        ids = encode_text(text, finetuned, model.config)
        calibration = [text_windows(ids, calib, opts["calib_len"], opts["seed"])]
    config = DeltaCoMeConfig(base=base_model, calibration=calibration, progress=not quiet, **_config_fields(opts))
    with torch.no_grad():
        compress_(model, config, device=opts["device"])
        if opts["device"] is not None:
            model.to("cpu")  # the packed factors are written from the CPU
    save_delta(model, out, base=base_model, config=config, overwrite=opts["overwrite"],
               metadata={"base": str(base), "finetuned": str(finetuned), "calibration_windows": calib,
                         "calibration_source": source})
    _report_written(read_delta_config(out), out, quiet)


def _refuse_zero_delta(document: dict, base: Path, finetuned: Path) -> None:
    nbytes = document.get("bytes", {})
    if not nbytes.get("compressed", 0) and not nbytes.get("kept", 0):
        raise click.ClickException(f"{finetuned} holds exactly the weights of {base}: there is no delta to store")


def _report_written(document: dict, out: Path, quiet: bool):
    if not quiet:
        click.echo(_summary(document, out))
    else:
        nbytes = document.get("bytes", {})
        click.echo(f"wrote {out}: {nbytes.get('compressed', 0) + nbytes.get('kept', 0):,} bytes of tensors")


@main.command()
@click.argument("delta", type=_dir)
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="write a figure of the bit allocation per layer")
@click.option("--base", type=_dir, help="base directory: also plot the singular-value spectra (needs --png)")
@click.option("--json", "as_json", is_flag=True, help="print delta_config.json's layers as JSON instead of a table")
@_user_errors
def inspect(delta, png, base, as_json):
    """Per-layer bands, bits and bytes of the delta artifact DELTA (every stored tensor checked
    against its recorded sha256 first)."""
    from .format import IntegrityWarning, verify_artifact

    if base is not None and png is None:
        raise click.UsageError("--base only adds the spectra to the --png figure; give --png PATH too")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)  # said in the summary instead
        document = verify_artifact(delta)
    if as_json:
        click.echo(json.dumps({k: document.get(k) for k in ("method", "alpha", "group_size", "allocation", "bytes", "layers")}, indent=2))
    else:
        click.echo(_summary(document, delta))
        records = (document.get("integrity") or {}).get("tensors")
        click.echo(f"integrity: {len(records)} stored tensors match their sha256" if records else
                   f"integrity: unchecked (format version {document['format_version']} records no digests)")
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

    from .artifact import DeltaCoMeModel, read_delta_config
    from .compress import delta_report

    if pair is None and text_file is None:
        info = base / "pair.json"
        name = json.loads(info.read_text()).get("spec", {}).get("name") if info.is_file() else None
        if name is None:
            raise click.UsageError("give --pair NAME (a shipped pair) or --text-file PATH (perplexity)")
        pair = name
    if pair is not None and text_file is not None:
        raise click.UsageError("--pair and --text-file exclude each other")
    read_delta_config(delta, verify=verify)  # a malformed artifact is reported before any model is loaded
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
@click.option("--quiet", "-q", is_flag=True, help="no progress bars (ours or transformers')")
@_user_errors
def merge(base, delta, out, dtype, overwrite, quiet):
    """Write BASE + DELTA as a plain dense model OUT (safetensors), for tools that need plain weights."""
    with _quiet_transformers(quiet):
        _merge(base, delta, out, dtype, overwrite, quiet)


def _merge(base, delta, out, dtype, overwrite, quiet):
    import torch
    from tqdm.auto import tqdm

    from .artifact import DeltaCoMeModel, read_delta_config
    from .checkpoint import write_dir_atomic
    from .compress import compressed_layers

    if out.exists():
        if not overwrite:
            raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise click.ClickException(f"{out} is not a model directory; refusing to replace it")
    from .format import layer_key

    read_delta_config(delta)  # a malformed artifact is reported before any model is loaded
    model = DeltaCoMeModel.from_pretrained(_load(base), delta)  # the fine-tune's config applied
    layers = compressed_layers(model)
    with torch.no_grad():
        for name, w in tqdm(layers.items(), desc="dequantize", unit="layer", disable=quiet):
            owner, _, param = layer_key(name, w.dim()).rpartition(".")
            setattr(model.get_submodule(owner), param, torch.nn.Parameter(w.dequantize(), requires_grad=False))
    if dtype != "auto":
        model = model.to(_torch_dtype(dtype))

    def fill(tmp: Path):
        model.save_pretrained(str(tmp))
        for f in list(base.glob("tokenizer*")) + [base / "special_tokens_map.json"]:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)

    # the old OUT is replaced only once the new one is complete; files get the usual (umask) permissions
    write_dir_atomic(out, fill, overwrite)
    click.echo(f"wrote {out}: {len(layers)} layers dequantized, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters")


# --- LoRA interoperability (deltacome_ao.lora; docs/lora.md) ---------------------------------------


@main.command("export-lora")
@click.argument("base", type=_dir)
@click.argument("delta", type=_dir)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--max-rank", type=click.IntRange(min=1), help="cap per module (vLLM: --max-lora-rank, default 512)")
@click.option("--rank", type=click.IntRange(min=1), help="rank per module, or the average rank with --allocation global")
@click.option("--allocation", type=click.Choice(["uniform", "global"]), default="uniform", show_default=True,
              help="global: spend the parameters of --rank everywhere on the largest singular values across modules")
@click.option("--selection", type=click.Choice(["svd", "stored"]), default="svd", show_default=True,
              help="svd: top singular directions of the dequantized delta; stored: the first stored vectors")
@click.option("--calib", type=click.IntRange(min=0), default=0, show_default=True,
              help="choose the kept directions in output space from N random windows of --calib-file (0: weight space)")
@click.option("--calib-file", type=_file, help="text for --calib (default: the zoo's corpus, Python stdlib source)")
@click.option("--calib-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--embeddings", type=click.Choice(["full", "lora", "drop"]),
              help="embedding / lm_head deltas: modules_to_save (PEFT default), LoRA targets (--vllm default) or drop")
@click.option("--embedding-rank", type=click.IntRange(min=1), help="rank of embedding / lm_head LoRA targets")
@click.option("--vllm", is_flag=True, help="an adapter vLLM loads as-is: one r, no modules_to_save, no LoRA bias, fp16/bf16")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="of the LoRA factors (default: the model's; fp16 with --vllm)")
@click.option("--verify", type=click.Choice(["full", "sample", "none"]), default="full", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars (ours or transformers')")
@_user_errors
def export_lora_command(base, delta, out, quiet, **opts):
    """Write the delta artifact DELTA of BASE as a PEFT LoRA adapter OUT (PEFT / vLLM load it as-is)."""
    with _quiet_transformers(quiet):
        _export_lora(base, delta, out, **opts)


def _export_lora(base, delta, out, max_rank, rank, allocation, selection, calib, calib_file, calib_len,
                 embeddings, embedding_rank, vllm, dtype, verify, overwrite):
    from .lora import export_lora

    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    if calib_file is not None and not calib:
        raise click.UsageError("--calib-file is used only with --calib N (N > 0)")
    base_model = _load(base)
    calibration = None
    if calib:
        if calib_file is None:
            from .calibrate import stdlib_text

            text = stdlib_text().decode("utf-8", errors="replace")
        else:
            text = calib_file.read_text(encoding="utf-8", errors="replace")
        calibration = [text_windows(encode_text(text, base, base_model.config), calib, calib_len)]
    report = export_lora(base_model, delta, out, rank=rank, max_rank=max_rank, allocation=allocation,
                         selection=selection, calibration=calibration, embeddings=embeddings,
                         embedding_rank=embedding_rank, vllm=vllm, dtype=dtype, verify=verify, overwrite=overwrite)
    ranks = sorted({m["rank"] for m in report["modules"].values()})
    click.echo(f"wrote {out}: {report['target']} LoRA adapter, r={report['r']}, {report['dtype']}, "
               f"{report['bytes']['adapter']:,} bytes of tensors (packed delta: {report['bytes']['delta_artifact']:,})")
    click.echo(f"  {len(report['modules'])} linear modules, ranks {ranks[0]}..{ranks[-1]}; relative error of the "
               f"linear deltas {report['linear_rel_error']:.3g}" if ranks else "  no linear module")
    if report["modules_to_save"]:
        click.echo(f"  modules_to_save: {', '.join(report['modules_to_save'])}")
    lora_dense = {n: e for n, e in report["dense"].items() if e.get("as") == "lora"}
    for n, e in lora_dense.items():
        click.echo(f"  {n}: LoRA rank {e['rank']}, relative error {e['rel_error']:.3g}")
    if report["not_represented"]:
        click.echo(f"  not represented ({len(report['not_represented'])}): {', '.join(report['not_represented'])}")
    click.echo(f"  details: {out / 'deltacome_lora.json'}")


@main.command("compress-lora")
@click.argument("base", type=_dir)
@click.argument("adapter", type=_dir)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--alpha", type=float, default=1 / 16, show_default="0.0625", help="delta bytes / fp16 bytes of each matrix")
@click.option("--method", type=MethodName(), default="deltacome", show_default=True)
@click.option("--allocation", type=click.Choice(["paper", "optimal"]), default="paper", show_default=True)
@click.option("--group-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="base load dtype (auto: as saved)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars (ours or transformers')")
@_user_errors
def compress_lora_command(base, adapter, out, quiet, **opts):
    """Compress the PEFT LoRA adapter ADAPTER of BASE into the delta artifact OUT."""
    with _quiet_transformers(quiet):
        _compress_lora(base, adapter, out, **opts)


def _compress_lora(base, adapter, out, alpha, method, allocation, group_size, dtype, overwrite):
    from .artifact import read_delta_config
    from .lora import compress_lora

    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    report = compress_lora(_load(base, dtype), adapter, out, alpha=alpha, method=method, allocation=allocation,
                           group_size=group_size, overwrite=overwrite)
    click.echo(_summary(read_delta_config(out), out))
    click.echo(f"adapter {adapter}: {report['adapter_file_bytes']:,} bytes ({', '.join(report['adapter_dtypes'])}) -> "
               f"{report['artifact_bytes']:,} bytes on disk ({_size_change(report['adapter_file_bytes'], report['artifact_bytes'])})")


def _size_change(before: int, after: int) -> str:
    """'8.5x smaller' / '2.7x larger' (a tiny adapter's artifact can be larger: its JSON is most of it)."""
    if after <= before:
        return f"{before / max(after, 1):.1f}x smaller"
    return f"{after / max(before, 1):.1f}x larger"


if __name__ == "__main__":
    main()
