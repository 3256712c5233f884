"""deltacome_ao: one base model + a small mixed-precision SVD delta per fine-tune, on torchao."""

from . import kernels  # noqa: F401  (registers the Triton kernels as the CUDA implementation of the op)
from .allocate import Band
from .bitdelta_tensor import BitDeltaTensor
from .config import DeltaCoMeConfig, delta_report, deltacome_config
from .mixed_precision_delta_tensor import MixedPrecisionDeltaTensor
from .artifact import DeltaCoMeModel, delta_size, load_delta, save_delta
from . import hf  # noqa: F401  (registers quant_method "deltacome" with transformers)
from .serving import MultiDeltaModel

__version__ = "0.1.0"
__all__ = [
    "DeltaCoMeConfig", "MixedPrecisionDeltaTensor", "BitDeltaTensor", "deltacome_config", "delta_report", "Band",
    "DeltaCoMeModel", "save_delta", "load_delta", "delta_size", "MultiDeltaModel",
]
