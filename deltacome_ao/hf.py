"""Stage 8 (integrations): compressed models through transformers' `save_pretrained` / `from_pretrained`.

Importing this module registers `quant_method="deltacome"` with transformers (a
`QuantizationConfigMixin` and an `HfQuantizer`, through `register_quantization_config` /
`register_quantizer`). Then

    from deltacome_ao.hf import save_pretrained
    save_pretrained(model, "out")                       # or enable_save_pretrained(model); model.save_pretrained("out")
    model = AutoModelForCausalLM.from_pretrained("out")  # needs `import deltacome_ao.hf` first

The checkpoint is a standalone model: each compressed weight is stored as its inner tensors
`<module>.weight:<inner>` (`base_weight` included), every other tensor as usual, and `config.json`'s
`quantization_config` lists the structure of every compressed layer (tensor type, shape, dtype,
bands, group size). On load the quantizer puts an empty tensor-subclass shell of exactly that
structure in place of each listed weight (an `nn.Linear` / `Conv1D` / embedding `weight`, or a stacked
expert parameter, stored as `<parameter>:<inner>`) before any tensor is read, checks that the
checkpoint holds every inner tensor of every listed layer (and no others), and rebuilds each weight
from its inner tensors with `format.assemble` (shapes and dtypes checked). Nothing is left at its
random init: a listed layer that was not rebuilt is an error.

Why not transformers' `TorchAoConfig`: its quantizer knows only torchao's own inner-tensor names
(`qdata`, `scale`, ...), so a third-party subclass saves but reloads with its weights silently left
at random init.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
from typing import Any, Optional

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from .compress import compressed_layers, on_compressed
from .config import DeltaCoMeConfig
from .delta_tensor import DeltaTensor
from .fingerprint import VERIFY_LEVELS, full_hash, is_sha256
from .format import (
    FORMAT_VERSION,
    SEP,
    DeltaFormatError,
    IntegrityWarning,
    TensorFile,
    assemble,
    check_record_table,
    check_spec,
    check_tensor,
    flatten_state_dict,
    method_fields,
    layer_key,
    shell,
    spec_key,
    stored_names,
    tensor_record,
)
from .methods import tensor_kinds
from .version import __version__

__all__ = ["QUANT_METHOD", "DeltaCoMeHfConfig", "DeltaCoMeHfQuantizer", "enable_save_pretrained", "save_pretrained",
           "verification", "GUARD_TEXT"]

QUANT_METHOD = "deltacome"
# Stored (uint8, 1-D) under the first compressed layer's `<module>.weight`: transformers without
# deltacome_ao skips the unknown quant_method and would load the compressed layers at random init;
# this tensor's shape differs from that weight's, which stock transformers refuses (size mismatch).
GUARD_TEXT = "deltacome_ao checkpoint: `import deltacome_ao.hf` before from_pretrained (pip install deltacome-ao)"
_VERIFY = contextvars.ContextVar("deltacome_hf_verify", default="full")


@contextlib.contextmanager
def verification(verify: str):
    """`with verification("none"): AutoModelForCausalLM.from_pretrained(dir)` loads without checking
    the compressed layers' tensors against their recorded sha256 ("full", the default, checks them)."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    token = _VERIFY.set(verify)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def _guard_tensor() -> torch.Tensor:
    return torch.tensor(list(GUARD_TEXT.encode()), dtype=torch.uint8)


class DeltaCoMeHfConfig(QuantizationConfigMixin):
    """`quantization_config` of a compressed checkpoint (stored in `config.json`).

    modules: {module name: layer structure} (`DeltaTensor.spec()`) for every compressed layer.
    digests / guard: per-tensor sha256 of the compressed layers' inner tensors and the guard tensor's name
        (docs/integrity.md).
    tensors: {name in the checkpoint files: {dtype, shape, sha256}} of every other stored tensor
        (embeddings, norms, lm_head, biases, ...), checked against the stored bytes on load.
    how: how it was compressed, when known (`format.method_fields`: method, alpha, group_size,
        allocation, calibrated, method_options, calibration, global_allocation); any other field is ignored with a warning.
    """

    HOW = ("method", "alpha", "group_size", "allocation", "calibrated", "method_options", "calibration",
           "global_allocation")
    OPTIONAL = ("method_options", "calibration", "global_allocation")  # written only when set

    def __init__(self, modules: Optional[dict] = None, format_version: int = FORMAT_VERSION,
                 library_version: Optional[str] = None, digests: Optional[dict] = None, guard: Optional[str] = None,
                 tensors: Optional[dict] = None, **how):
        self.quant_method = QUANT_METHOD
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise DeltaFormatError(f"quantization_config: field 'format_version' must be an integer >= 1, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise DeltaFormatError(
                f"quantization_config format_version {format_version!r}; this deltacome_ao reads versions up to "
                f"{FORMAT_VERSION} (upgrade it)"
            )
        if modules is not None and not isinstance(modules, dict):
            raise DeltaFormatError(f"quantization_config: field 'modules' must be an object {{module: layer spec}}, "
                                   f"got {type(modules).__name__}")
        for name, spec in (modules or {}).items():
            if not isinstance(spec, dict):
                raise DeltaFormatError(f"quantization_config: modules[{name!r}] must be an object, got {type(spec).__name__}")
        if digests is not None and not (isinstance(digests, dict) and all(
                isinstance(k, str) and is_sha256(v) for k, v in digests.items())):
            raise DeltaFormatError("quantization_config: field 'digests' must be an object {stored tensor name: sha256 hex}")
        if guard is not None and not isinstance(guard, str):
            raise DeltaFormatError(f"quantization_config: field 'guard' must be a tensor name, got {guard!r}")
        if tensors is not None:
            check_record_table(tensors, "quantization_config", "tensors")
        self.digests, self.guard, self.tensors = digests, guard, tensors
        self.format_version = format_version
        if library_version is None:
            library_version = __version__
        self.library_version = library_version
        for name in self.HOW:
            setattr(self, name, how.get(name))
        if self.method_options is not None and not isinstance(self.method_options, dict):
            raise DeltaFormatError(f"quantization_config: field 'method_options' must be an object, got {self.method_options!r}")
        self.modules = {name: dict(spec) for name, spec in (modules or {}).items()}
        for name, spec in self.modules.items():
            check_spec(spec, f"quantization_config: modules[{name!r}]")
        unknown = set(how) - set(self.HOW) - {"quant_method"}
        if unknown:  # written by a newer release of the same format version: informational only
            warnings.warn(f"quantization_config: ignoring unknown fields {sorted(unknown)}", stacklevel=2)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: Optional[DeltaCoMeConfig] = None) -> "DeltaCoMeHfConfig":
        layers = compressed_layers(model)
        if not layers:
            raise ValueError("the model has no compressed layer; run compress_(model, DeltaCoMeConfig(base=...)) first")
        return cls(modules={name: w.spec() for name, w in layers.items()}, **method_fields(config))

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "library_version": self.library_version,
            **{name: getattr(self, name) for name in self.HOW if name not in self.OPTIONAL},
            **{name: getattr(self, name) for name in self.OPTIONAL if getattr(self, name)},
            "modules": {name: dict(spec) for name, spec in self.modules.items()},
            "guard": self.guard,
            "digests": None if self.digests is None else dict(self.digests),
            "tensors": None if self.tensors is None else {k: dict(v) for k, v in self.tensors.items()},
        }


class DeltaCoMeDeserialize(ConversionOps):
    """Loading op: the inner tensors of one layer (`weight:<inner>` keys) -> its compressed weight."""

    def __init__(self, hf_quantizer: "DeltaCoMeHfQuantizer"):
        self.hf_quantizer = hf_quantizer  # also tells transformers not to cast these tensors

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter for every layer; share the quantizer, do not copy it
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, source_patterns=None, model=None, full_layer_name=None, **kwargs):
        """Check and assemble one layer. A problem (a tensor whose bytes do not match its recorded
        sha256, a wrong shape) is recorded and raised as `DeltaFormatError` once loading is over
        (transformers would turn an exception raised here into a generic conversion error)."""
        quantizer = self.hf_quantizer
        modules = quantizer.quantization_config.modules
        module_name, _, param = full_layer_name.rpartition(".")
        # a stack of experts is listed under its parameter's name, a 2-D weight under its module's
        layer_name = full_layer_name if full_layer_name in modules else module_name
        spec = modules.get(layer_name)
        if spec is None or spec_key(layer_name, spec) != full_layer_name:
            raise DeltaFormatError(
                f"{full_layer_name}: the checkpoint holds compressed-weight tensors for it but "
                f"quantization_config lists no module {module_name!r}"
            )
        module, _ = get_module_from_name(model, full_layer_name)
        target = getattr(module, param)  # the shell: its dtype is the one the model is loaded in
        quantizer.loaded.add(layer_name)
        try:
            tensors = {}
            for key, values in input_dict.items():
                values = values if isinstance(values, list) else [values]
                if len(values) != 1:
                    raise DeltaFormatError(f"{full_layer_name}: {len(values)} tensors for {key}")
                if SEP not in key:  # the guard tensor stored under this weight's own name
                    quantizer.check_guard(full_layer_name, values[0])
                    continue
                inner = key.split(SEP, 1)[1]
                quantizer.check_digest(f"{full_layer_name}{SEP}{inner}", values[0])
                tensors[inner] = values[0]
            weight = assemble(spec, tensors, where=layer_name, dtype=target.dtype)
        except DeltaFormatError as e:
            quantizer.failures.append(str(e))
            weight = shell(spec, device="cpu" if target.device.type == "meta" else target.device, dtype=target.dtype)
        loaded = torch.nn.Parameter(weight, requires_grad=False)
        # the weight, not the module, is initialised: the module's other state (e.g. Gemma's non-persistent
        # embedding scale) is still set by transformers' init
        loaded._is_hf_initialized = True
        return {full_layer_name: loaded}


class DeltaCoMeHfQuantizer(HfQuantizer):
    """Loads (and saves) checkpoints whose `quantization_config.quant_method` is "deltacome"."""

    requires_calibration = True  # only pre-compressed checkpoints: compression needs the base model

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """The stored names of every registered tensor kind's inner tensors (`<param>:<inner>`), for
        `weight` and for the parameters the checkpoint's stacked experts are (`gate_up_proj`, ...)."""
        inner = dict.fromkeys(n for cls in tensor_kinds().values() for n in cls.tensor_data_names)
        modules = getattr(self.quantization_config, "modules", None) or {}
        params = dict.fromkeys(["weight"] + [spec_key(n, s).rpartition(".")[2] for n, s in modules.items()])
        return {p: [f"{p}{SEP}{n}" for n in inner] for p in params}

    def __init__(self, quantization_config: DeltaCoMeHfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.loaded: set[str] = set()
        self.failures: list[str] = []
        self.verify = "full"

    def get_weight_conversions(self):
        """transformers' converter for the `weight:<inner>` names, which also collects the guard
        tensor (stored under the guard layer's own `<module>.weight`)."""
        conversions = super().get_weight_conversions()
        guard = self.quantization_config.guard
        if guard and conversions:
            module = guard[: -len(".weight")]
            pattern = f"(?<=^{re.escape(module)}\\.)weight$"
            c = conversions[0]
            conversions[0] = WeightConverter(list(c.source_patterns) + [pattern], c.target_patterns, list(c.operations))
        return conversions

    def check_digest(self, key: str, t: torch.Tensor) -> None:
        digests = self.quantization_config.digests
        if self.verify != "none" and digests is not None and full_hash(t) != digests.get(key):
            raise DeltaFormatError(f"{key}: the tensor does not match its recorded sha256 (the checkpoint is corrupted "
                                   f"or was changed)")

    def check_guard(self, key: str, t: torch.Tensor) -> None:
        if key != self.quantization_config.guard or t.dtype != torch.uint8 or t.dim() != 1:
            raise DeltaFormatError(f"{key}: expected the checkpoint's guard tensor (uint8, 1-D) here, got "
                                   f"{t.dtype} {tuple(t.shape)}")

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("deltacome checkpoints cannot be offloaded to disk; remove 'disk' from device_map")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        modules = self.quantization_config.modules
        for name, spec in modules.items():
            owner, _, param = spec_key(name, spec).rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                raise DeltaFormatError(f"quantization_config lists {name!r}, which this model does not have") from None
            w = module._parameters.get(param)
            if w is None or list(w.shape) != spec["shape"]:
                shape = None if w is None else tuple(w.shape)
                raise DeltaFormatError(
                    f"{name}: quantization_config describes a {tuple(spec['shape'])} weight, the model has "
                    f"{type(module).__name__} with {param} {shape}"
                )
            setattr(module, param, torch.nn.Parameter(shell(spec, device=w.device, dtype=w.dtype), requires_grad=False))
        self.verify = _VERIFY.get()
        self._check_integrity_fields()
        if checkpoint_files:
            self._check_checkpoint(checkpoint_files, model)
        self.loaded, self.failures = set(), []

    def _check_integrity_fields(self):
        """Version 2: `digests` covers every stored inner tensor and `guard` names a listed layer's
        weight; version 1 (neither): loads with an `IntegrityWarning`."""
        config = self.quantization_config
        if config.format_version < 2:
            warnings.warn("a format version 1 deltacome checkpoint has no tensor digests, so its integrity is not "
                          "checked; re-save it with this deltacome_ao to add them", IntegrityWarning, stacklevel=2)
            return
        expected = stored_names(config.modules, with_base=True)
        if config.digests is None or set(config.digests) != expected:
            have = set(config.digests or {})
            raise DeltaFormatError(f"quantization_config: field 'digests' must list every stored inner tensor: missing "
                                   f"{sorted(expected - have)[:4]}, unexpected {sorted(have - expected)[:4]}")
        if config.guard is not None and config.guard not in {spec_key(n, spec) for n, spec in config.modules.items()}:
            raise DeltaFormatError(f"quantization_config: field 'guard' {config.guard!r} is not a listed layer's weight")
        if config.tensors is None:
            warnings.warn("this deltacome checkpoint records no digests of its uncompressed tensors (embeddings, norms, "
                          "...; written by an earlier deltacome_ao), so only its compressed layers are checked; re-save it "
                          "with this deltacome_ao to add them", IntegrityWarning, stacklevel=2)

    def _check_checkpoint(self, checkpoint_files, model=None):
        """Every inner tensor of every listed layer is in the checkpoint (and the guard tensor), and no
        other such tensor; every file is a readable safetensors file. Names as the model knows them:
        transformers renames some on load (e.g. LLaVA's)."""
        keys, names, dense = set(), set(), {}
        for path in checkpoint_files:
            if not str(path).endswith(".safetensors"):
                raise DeltaFormatError(f"{path}: deltacome checkpoints are safetensors files only")
            with TensorFile(path) as f:
                stored = f.keys()
                self._check_stored_tensors(f, [k for k in stored if SEP not in k], model, dense)
            names.update(stored)
            keys.update(k for k in stored if SEP in k)
        records = self.quantization_config.tensors
        if records is not None and set(records) - set(dense):
            raise DeltaFormatError(f"the checkpoint lacks tensors its quantization_config records (field 'tensors'): "
                                   f"{sorted(set(records) - set(dense))[:4]}")
        if model is not None:
            keys = {_loaded_name(model, k) for k in keys}
            names = {_loaded_name(model, k) for k in names}
        expected = stored_names(self.quantization_config.modules, with_base=True)
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        guard = self.quantization_config.guard
        if guard and guard not in names:
            missing.append(guard)
        if missing or extra:
            raise DeltaFormatError(
                f"the checkpoint does not match its quantization_config: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}"
            )

    def _check_stored_tensors(self, f: TensorFile, stored: list[str], model, seen: dict) -> None:
        """The tensors transformers loads itself (every stored tensor but the compressed layers' inner
        tensors and the guard): each must be recorded in `tensors` and, unless verify="none", have the
        recorded dtype, shape and sha256. The stored bytes are checked, before transformers casts them."""
        records = self.quantization_config.tensors
        if records is None:
            return
        guard = self.quantization_config.guard
        for key in stored:
            if key == guard or (guard is not None and model is not None and f.layout(key)[0] == "uint8"
                                and _loaded_name(model, key) == guard):
                continue
            if key in seen:
                raise DeltaFormatError(f"{f.path}: tensor {key!r} is stored in two checkpoint files")
            seen[key] = f.path
            record = records.get(key)
            if record is None:
                raise DeltaFormatError(f"{f.path}: tensor {key!r} is not recorded in quantization_config (field "
                                       f"'tensors'; the checkpoint was changed)")
            if self.verify == "none":
                dtype, shape = f.layout(key)
                if dtype != record["dtype"] or shape != record["shape"]:
                    raise DeltaFormatError(
                        f"{f.path}: tensor {key!r} is {dtype} {tuple(shape)}, the recorded digest says "
                        f"{record['dtype']} {tuple(record['shape'])} (the file is corrupted or was changed)")
                continue
            check_tensor(key, f.get_tensor(key), record, f.path)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.failures:
            raise DeltaFormatError(f"{len(self.failures)} compressed layer(s) could not be loaded: "
                                   + "; ".join(self.failures[:4]) + (" ..." if len(self.failures) > 4 else ""))
        left = sorted(set(self.quantization_config.modules) - self.loaded)
        if left:
            raise RuntimeError(f"compressed layers not loaded from the checkpoint (would be uninitialised): {left[:4]}")
        for name, spec in self.quantization_config.modules.items():
            owner, _, param = spec_key(name, spec).rpartition(".")
            w = model.get_submodule(owner)._parameters.get(param)
            if not isinstance(w, DeltaTensor) or any(getattr(w, n).device.type == "meta" for n in w.tensor_data_names):
                raise RuntimeError(f"{name}: the compressed weight was not loaded")
        # Our converter is not a model weight conversion: get_state_dict_and_metadata already writes
        # the stored form, so saving must not try to revert it.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c for c in conversions if not any(isinstance(op, DeltaCoMeDeserialize) for op in getattr(c, "operations", ()))
            ]
        return model

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: every compressed weight becomes the dense `W_base + delta`."""
        for name, w in compressed_layers(model).items():
            owner, _, param = layer_key(name, w.dim()).rpartition(".")
            setattr(model.get_submodule(owner), param, torch.nn.Parameter(w.dequantize(dtype or w.dtype), requires_grad=False))
        return model

    def get_load_operations(self) -> dict:
        return {"deserialize": DeltaCoMeDeserialize}

    def get_state_dict_and_metadata(self, model):
        layers = compressed_layers(model)
        if not layers:  # every compressed weight was replaced (e.g. dequantized): save a plain model
            self.remove_quantization_config(model)
            return model.state_dict(), {}
        _keep_stacks_out_of_conversions(model, layers)
        config = self.quantization_config
        config.modules = {name: w.spec() for name, w in layers.items()}  # config.json is written after this
        state = flatten_state_dict(model.state_dict())
        stored = stored_names(config.modules, with_base=True)  # a tied alias of a compressed table is not stored
        config.digests = {k: full_hash(v) for k, v in state.items() if k in stored}  # every inner tensor
        # the guard sits on a 2-D layer's `<module>.weight` (stacked experts have other parameter names)
        config.guard = next((k for k in (spec_key(n, s) for n, s in config.modules.items()) if k.endswith(".weight")),
                            None)
        guard = _guard_tensor()
        if config.guard is not None:
            state[config.guard] = guard
        config.tensors = _stored_records(model, state, guard)
        config.format_version = FORMAT_VERSION
        model.config.quantization_config = config
        return state, {"deltacome_format_version": str(FORMAT_VERSION)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(DeltaCoMeHfConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(DeltaCoMeHfQuantizer)


def _loaded_name(model, key: str) -> str:
    """The name transformers gives the checkpoint tensor `key` (`<tensor>:<inner>`) when it loads it into
    `model`: its weight renamings applied (LLaVA's `language_model.model.` -> `model.language_model.`, ...)."""
    tensor, sep, inner = key.partition(SEP)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
        tensor, _ = rename_source_key(tensor, renamings, [], getattr(model, "base_model_prefix", None),
                                      model.state_dict())
    except (ImportError, TypeError, AttributeError):
        pass
    return f"{tensor}{sep}{inner}"


def _stored_records(model, state: dict, guard: torch.Tensor) -> dict:
    """`tensor_record` of every tensor `save_pretrained` will write from `state` other than the compressed
    layers' inner tensors and the guard, under the name it will have in the files: transformers removes
    tied aliases and reverts the model's weight conversions (renamings, split experts) before writing."""
    stored = dict(state)
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        stored = revert_weight_conversion(model, remove_tied_weights_from_state_dict(stored, model))
    except ImportError:
        pass
    return {k: tensor_record(v) for k, v in stored.items()
            if SEP not in k and v is not guard and not (v.dtype == torch.uint8 and torch.equal(v, guard))}


def _keep_stacks_out_of_conversions(model, layers) -> None:
    """Saving reverts the model's weight conversions (e.g. Mixtral's per-expert checkpoint tensors are
    merged into one (E, ...) parameter on load, split again on save). A compressed stack of experts is
    stored as its own inner tensors under its own name, so drop the conversions that would split it."""
    stacks = [layer_key(n, w.dim()) for n, w in layers.items() if w.dim() == 3]
    if not stacks:
        return
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    kept = []
    for c in conversions:
        targets = getattr(c, "target_patterns", None) or []
        if isinstance(c, WeightConverter) and any(
                re.search(t.replace("*", r"\d+") if isinstance(t, str) else t, k) for t in targets for k in stacks):
            continue
        kept.append(c)
    model._weight_conversions = kept


def enable_save_pretrained(model: torch.nn.Module, config: Optional[DeltaCoMeConfig] = None) -> torch.nn.Module:
    """Attach the deltacome quantizer to a model compressed with `quantize_`, so that
    `model.save_pretrained(dir)` writes a checkpoint `from_pretrained` can load.
    `config`: the `DeltaCoMeConfig` used (method, alpha, ... are recorded in config.json)."""
    quantizer = DeltaCoMeHfQuantizer(DeltaCoMeHfConfig.from_model(model, config), pre_quantized=True)
    # What from_pretrained leaves on a model it loaded through a quantizer (preprocess_model /
    # postprocess_model), without their loading checks.
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = quantizer.quantization_config
    return model


def save_pretrained(model: torch.nn.Module, save_directory, config: Optional[DeltaCoMeConfig] = None, **kwargs):
    """`enable_save_pretrained(model, config)` then `model.save_pretrained(save_directory, **kwargs)`."""
    if config is not None or getattr(model, "hf_quantizer", None) is None:
        enable_save_pretrained(model, config)
    return model.save_pretrained(save_directory, **kwargs)


@on_compressed
def _attach(model: torch.nn.Module, fields: dict) -> None:
    """A transformers model that `compress_`, `quantize_` or `load_delta` left with compressed weights gets
    the quantizer, so that its own `model.save_pretrained(dir)` writes a checkpoint `from_pretrained` loads
    (without it transformers would try to save the tensor subclasses as plain tensors, and fail)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    if not isinstance(model, PreTrainedModel) or not compressed_layers(model):
        return
    config = DeltaCoMeHfConfig.from_model(model)
    for key in ("method", "alpha", "group_size", "allocation", "calibrated", "calibration", "global_allocation"):
        if fields.get(key) is not None:
            setattr(config, key, fields[key])
    quantizer = DeltaCoMeHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = quantizer.quantization_config
