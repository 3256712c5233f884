"""deltacome_ao: one base model + a small compressed delta per fine-tune, on torchao.

`import deltacome_ao` is cheap when torch is not loaded yet (the `deltacome` command, tools that only
need the version): the public names load their modules on first use. When torch is already imported,
the import loads the library at once, so that what 0.1 users relied on holds: the transformers loader
for `quant_method="deltacome"` is registered and the tensor classes are allowed by
`torch.load(weights_only=True)`. `import deltacome_ao.hf` (or using any public name) does the same.
"""

from __future__ import annotations

import importlib
import sys

from .version import __version__ as __version__

# public name -> module that defines it
_PUBLIC = {
    "DeltaCoMeConfig": "config",
    "deltacome_config": "config",
    "SelfCalibration": "self_calibration",
    "compress_": "compress",
    "delta_report": "compress",
    "compressed_layers": "compress",
    "DeltaTensor": "delta_tensor",
    "MixedPrecisionDeltaTensor": "methods.mixed_precision",
    "BitDeltaTensor": "methods.bitdelta",
    "PackedFactors": "factors",
    "Band": "allocate",
    "register_method": "methods",
    "get_method": "methods",
    "method_names": "methods",
    "register_recipe": "recipes",
    "Recipe": "recipes",
    "DeltaCoMeModel": "artifact",
    "save_delta": "artifact",
    "load_delta": "artifact",
    "delta_size": "artifact",
    "DeltaFormatError": "format",
    "BaseMismatchError": "fingerprint",
    "CheckpointMismatchError": "checkpoint",
    "MultiDeltaModel": "serving",
    "unload": "restore",
    "export_lora": "lora",
    "compress_lora": "lora",
}

__all__ = sorted(_PUBLIC)


def _load_core() -> None:
    """Import what registers itself: the built-in methods, the CUDA kernels, the HF quantizer."""
    for name in ("methods", "kernels", "config", "hf"):
        importlib.import_module(f"{__name__}.{name}")


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_core()
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


if "torch" in sys.modules:  # the session already pays for torch: register everything now
    _load_core()


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
