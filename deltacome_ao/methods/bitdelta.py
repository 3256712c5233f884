"""BitDelta baseline: `W_base + scale · sign(D)`, the sign packed at 1 bit, one fp32 scale per matrix.

The scale is BitDelta's initialisation, mean |D| (the L2-optimal scale for a sign matrix; BitDelta,
arXiv 2402.10193 §3.1); the optional distillation step of the paper is not part of this baseline.
Registered as method "bitdelta" at the end of this file.
"""

from __future__ import annotations

import torch

from ..decompose import weight_delta
from ..delta_tensor import DeltaTensor
from . import base_handed_over, register_method
from ..packing import pack_rows, packed_nbytes, unpack_rows

__all__ = ["BitDeltaTensor"]


class BitDeltaTensor(DeltaTensor):
    """Tensor data: `base_weight` (out, in), `sign_packed` flat uint8 (1 bit per entry, rows padded to
    8), `scale` (1,) fp32. No attributes."""

    tensor_data_names = ["base_weight", "sign_packed", "scale"]
    tensor_attribute_names = []

    def __new__(cls, base_weight, sign_packed, scale):
        return torch.Tensor._make_wrapper_subclass(
            cls, base_weight.shape, dtype=base_weight.dtype, device=base_weight.device, requires_grad=False
        )

    def __init__(self, base_weight, sign_packed, scale):
        super().__init__()
        self.base_weight, self.sign_packed, self.scale = base_weight, sign_packed, scale

    @classmethod
    def from_hp(cls, finetuned: torch.Tensor, base: torch.Tensor, name: str = "weight", *,
                copy_base: bool = True) -> "BitDeltaTensor":
        """Sign and mean |D| of `finetuned - base` (fp32 math). Raises ValueError on bad shapes / NaN.
        The tensor holds a contiguous copy of `base` (`copy_base=False`: `base` itself when contiguous,
        as `MixedPrecisionDeltaTensor.from_hp`)."""
        delta = weight_delta(finetuned, base, name)
        bits = (delta > 0).to(torch.uint8)
        scale = delta.abs().mean().reshape(1)
        del delta
        base = base.detach()
        base = base.clone(memory_format=torch.contiguous_format) if copy_base else base.contiguous()
        return cls(base, pack_rows(bits, 1).to(base.device), scale.to(base.device))

    @classmethod
    def delta_layout(cls, shape, attributes):
        out_features, in_features = shape
        return {"sign_packed": ((packed_nbytes(1, out_features, in_features),), torch.uint8),
                "scale": ((1,), torch.float32)}

    def describe(self) -> str:
        return "sign+scale"

    def sign(self) -> torch.Tensor:
        out_features, in_features = self.base_weight.shape
        return unpack_rows(self.sign_packed, 1, out_features, in_features).float() * 2 - 1

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.sign()

    def delta_term(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x.float() @ self.sign().T)

    def _with_signs(self, base: torch.Tensor, positive: torch.Tensor) -> "BitDeltaTensor":
        return BitDeltaTensor(base, pack_rows(positive.contiguous(), 1), self.scale)

    def _positive(self) -> torch.Tensor:
        return unpack_rows(self.sign_packed, 1, *self.base_weight.shape)

    def sliced(self, dim, start, end):
        """The same scale, the sign bits of the slice repacked (exact)."""
        base = self.base_weight.narrow(dim, start, end - start).contiguous()
        return self._with_signs(base, self._positive().narrow(dim, start, end - start))

    def transposed(self):
        return self._with_signs(self.base_weight.t(), self._positive().t())


def _compress(finetuned, base, config, *, name="weight", hessian=None):
    return BitDeltaTensor.from_hp(finetuned, base, name=name, copy_base=not base_handed_over(config))


register_method("bitdelta", BitDeltaTensor, _compress, description="BitDelta: sign of the delta + one scale")

BitDeltaTensor.__module__ = "deltacome_ao"
torch.serialization.add_safe_globals([BitDeltaTensor])
