"""Layer-sequential calibration: the Hessians GPTQ needs, one decoder layer at a time.

Used by `DeltaCoMeConfig(calibration=...)` while it plans (before anything in the model changes):

1. Find the decoder layers: the `nn.ModuleList` holding the most of the selected linear layers.
2. Run the model on each calibration sample until the first decoder layer; a forward pre-hook
   records the hidden states and every other argument of that call (attention mask, position
   embeddings, ...) and stops the forward.
3. For each decoder layer in order: run it with its own (fine-tuned) weights while forward hooks
   accumulate H_x = Σ xᵀx / N for each selected linear inside it; compress those linears with GPTQ
   against their H_x; then run the layer again with the *compressed* weights (substituted through
   `torch.func.functional_call`, so the model itself is never modified) to get the next layer's
   inputs. Only one layer's activations are held at a time.

Layers whose arguments differ between layers (e.g. alternating sliding-window masks, announced by
`config.layer_types`) get their own recorded arguments, at the price of one full forward.
"""

from __future__ import annotations

import sysconfig
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import handing_over_base

__all__ = ["find_decoder_layers", "calibrated_weights", "STDLIB_CORPUS_FILES", "stdlib_text"]

# A calibration text that exists wherever Python does: fixed files of its standard library (the
# zoo's pre-training corpus). The CLI's default for `--calib` without `--calib-file`.
STDLIB_CORPUS_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "dataclasses.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "pathlib.py", "random.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "textwrap.py", "tokenize.py", "typing.py",
)


def stdlib_text(files: tuple[str, ...] = STDLIB_CORPUS_FILES) -> bytes:
    """Concatenated bytes of the given standard-library files (sorted, so the order never varies).
    Raises FileNotFoundError naming a file this Python does not ship."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}; pass a calibration text file instead")
    return b"\n".join((root / f).read_bytes() for f in sorted(files))


class _StopForward(Exception):
    """Raised by the capture hook to stop the model's forward once the inputs are recorded."""


def find_decoder_layers(root: nn.Module, modules) -> tuple[str, nn.ModuleList]:
    """(name, list) of the `nn.ModuleList` whose items contain the most of `modules`.

    Ties go to the outermost list (e.g. the decoder layers rather than experts inside one layer).
    """
    wanted = {id(m) for m in modules}
    best = None
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        count = sum(1 for item in module for sub in item.modules() if id(sub) in wanted)
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    if best is None:
        raise ValueError(
            "calibration needs the model's decoder layers (an nn.ModuleList containing the compressed linear "
            "layers) but found none; compress without calibration="
        )
    return best[1], best[2]


def _model_inputs(sample, device) -> dict:
    if isinstance(sample, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    ids = torch.as_tensor(sample)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"calibration samples must be input_ids (1-D or batch x seq integer tensors) or dicts of model "
            f"inputs, got a {tuple(ids.shape)} {ids.dtype} tensor"
        )
    return {"input_ids": ids.to(device)}


def _split_call(args, kwargs):
    """(hidden states, other positional args, kwargs) of a decoder layer call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        raise ValueError("could not find the hidden states among the decoder layer's arguments")
    return kwargs.pop("hidden_states"), (), kwargs


def _layer_output(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read hidden states from a decoder layer output of type {type(out).__name__}")


def _capture(root: nn.Module, layers: nn.ModuleList, samples, per_layer: bool):
    """Per sample: [hidden states entering layer 0, positional args, kwargs of every layer]."""
    device = next(iter(root.parameters())).device
    extra = {"use_cache": False} if hasattr(getattr(root, "config", None), "use_cache") else {}
    last = len(layers) - 1 if per_layer else 0
    state: dict = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden, rest, kw = _split_call(args, kwargs)
            if index == 0:
                state["hidden"], state["rest"] = hidden.detach(), rest
            state.setdefault("kwargs", []).append(kw)
            if index == last:
                raise _StopForward

        return hook

    records = []
    handles = [layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in range(last + 1)]
    try:
        for sample in samples:
            state.clear()
            try:
                root(**_model_inputs(sample, device), **extra)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward never reached its decoder layers")
            kwargs = state["kwargs"] if per_layer else state["kwargs"] * len(layers)
            records.append([state["hidden"], state["rest"], kwargs])
    finally:
        for h in handles:
            h.remove()
    return records


def _differs_per_layer(root: nn.Module) -> bool:
    layer_types = getattr(getattr(root, "config", None), "layer_types", None)
    return bool(layer_types) and len(set(layer_types)) > 1


@torch.no_grad()
def calibrated_weights(root: nn.Module, targets, config, compress_layer) -> dict:
    """Compress `targets` (`compress.Layer`s) with GPTQ, decoder layer by decoder layer.

    `compress_layer(layer, finetuned, base, config, hessian=None)` compresses one of them (the
    caller's, so that Conv1D weights are compressed in their (out, in) orientation: the Hessian is
    over the module's input either way), or returns None for one that stays dense. Returns
    {(id(module), param): compressed weight or None}. Targets
    outside the decoder layers, and stacked experts (their inputs depend on the routing, which is not
    captured), are compressed without calibration, with a warning naming them. The model is left
    exactly as it was.
    """
    samples = list(config.calibration)
    if not samples:
        raise ValueError("calibration= is empty; pass a list of input_ids tensors")
    _, layers = find_decoder_layers(root, [t.module for t in targets])
    owner = {}
    for index, layer in enumerate(layers):
        for sub_name, sub in layer.named_modules():
            owner[id(sub)] = (index, sub_name)
    by_layer: list[list] = [[] for _ in layers]
    weights = {}
    outside, experts = [], []
    for target in targets:
        if target.form == "experts":
            experts.append(target)
        elif id(target.module) in owner:
            index, sub_name = owner[id(target.module)]
            by_layer[index].append((sub_name, target))
        else:
            outside.append(target)
    if outside:
        warnings.warn(
            f"{len(outside)} selected layers lie outside the decoder layers and are compressed without "
            f"calibration (first: {outside[0].name!r})",
            stacklevel=2,
        )
    if experts:
        warnings.warn(
            f"{len(experts)} stacked expert parameters are compressed without calibration: GPTQ needs each "
            f"expert's own inputs, which depend on the routing (first: {experts[0].name!r})",
            stacklevel=2,
        )
    records = _capture(root, layers, samples, _differs_per_layer(root))
    last = max((i for i, group in enumerate(by_layer) if group), default=-1)
    bar = tqdm(range(last + 1), desc=f"{config.method} delta (GPTQ)", disable=not config.progress, unit="layer")
    for index in bar:
        layer, group = layers[index], by_layer[index]
        hessians = _layer_hessians(layer, group, records, index) if group else {}
        compressed = {}
        for sub_name, target in group:
            finetuned = getattr(target.module, target.param).detach()
            stored = config.base[target.key]
            base = stored.to(device=finetuned.device, dtype=finetuned.dtype)
            weight = compress_layer(target, finetuned, base, _owning(config, base, stored),
                                    hessian=hessians.pop(id(target.module)))
            weights[(id(target.module), target.param)] = weight
            if weight is not None:  # (None: stays dense, the next layer sees the fine-tuned weight)
                compressed[f"{sub_name}.{target.param}" if sub_name else target.param] = weight.dequantize(finetuned.dtype)
        if index == last:
            continue  # no later layer needs its outputs
        for record in records:
            hidden, rest, kwargs = record
            out = torch.func.functional_call(layer, compressed, (hidden, *rest), kwargs[index])
            record[0] = _layer_output(out).detach()
    for target in outside + experts:
        finetuned = getattr(target.module, target.param).detach()
        stored = config.base[target.key]
        base = stored.to(device=finetuned.device, dtype=finetuned.dtype)
        weights[(id(target.module), target.param)] = compress_layer(target, finetuned, base,
                                                                    _owning(config, base, stored))
    return weights


def _owning(config, base, stored):
    """`config`, or (`base` a cast made here, not the caller's tensor) its copy that lets the compressed
    weight hold `base` as it is (`methods.handing_over_base`)."""
    return handing_over_base(config) if base is not stored else config


def _layer_hessians(layer: nn.Module, group, records, index: int) -> dict:
    """{id(linear): Σ xᵀx / N} over all calibration tokens, running `layer` with its own weights.

    Modules that read the very same input tensor (q/k/v of an attention block, gate/up of an MLP) share
    one accumulation and get the same Hessian tensor (so `gptq.prepare_hessian` factors it once): the
    sharing is decided on the first record and must hold on every record (else RuntimeError)."""
    sums = {}  # id(module) -> [Σ xᵀx, token count, modules served], one list per distinct input
    seen = {}  # this record: id(input tensor) -> (the tensor, kept alive so no id is reused; its accumulator)
    added = {}  # this record: id(accumulator) -> the input tensor added to it

    def make_hook(module):
        def hook(mod, args, out):
            inp = args[0]
            acc = sums.get(id(module))
            if acc is None:
                hit = seen.get(id(inp))
                if hit is not None and hit[0] is inp:  # the same tensor another module just read: share
                    sums[id(module)] = hit[1]
                    hit[1][2] += 1
                    return
            elif acc[2] > 1 and id(acc) in added:
                if added[id(acc)] is inp:
                    return  # added already, through a module reading the same tensor
                raise RuntimeError(f"{mod.__class__.__name__}: its calibration input, the same tensor as another "
                                   "module's on the first sample, differs on a later one; cannot share its Hessian")
            x = inp.detach().reshape(-1, inp.shape[-1]).float()
            if acc is None:
                acc = sums[id(module)] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0, 1]
            acc[0].addmm_(x.T, x)
            acc[1] += x.shape[0]
            seen[id(inp)] = (inp, acc)
            added[id(acc)] = inp

        return hook

    handles = [target.module.register_forward_hook(make_hook(target.module)) for _, target in group]
    try:
        for hidden, rest, kwargs in records:
            seen.clear()
            added.clear()
            layer(hidden, *rest, **kwargs[index])
    finally:
        seen.clear()
        added.clear()
        for h in handles:
            h.remove()
    out, done = {}, {}
    for _, target in group:
        module = target.module
        if id(module) not in sums:
            raise RuntimeError(f"{target.name or 'module'} never ran during calibration; cannot compute its Hessian")
        acc = sums[id(module)]
        if id(acc) not in done:
            done[id(acc)] = acc[0] / max(acc[1], 1)
        out[id(module)] = done[id(acc)]
    return out
