"""BitDelta baseline: `W_base + scale · sign(D)`, the sign packed at 1 bit, one fp32 scale per matrix.

The scale is BitDelta's initialisation, mean |D| (the L2-optimal scale for a sign matrix); the
optional distillation step of the BitDelta paper is not part of this baseline.
"""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from .decompose import weight_delta
from .mixed_precision_delta_tensor import copy_to
from .packing import pack_rows, unpack_rows

__all__ = ["BitDeltaTensor"]

aten = torch.ops.aten


class BitDeltaTensor(TorchAOBaseTensor):
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
    def from_hp(cls, finetuned: torch.Tensor, base: torch.Tensor, name: str = "weight") -> "BitDeltaTensor":
        delta = weight_delta(finetuned, base, name)
        bits = (delta > 0).to(torch.uint8)
        scale = delta.abs().mean().reshape(1)
        return cls(base.detach().clone().contiguous(), pack_rows(bits, 1).to(base.device), scale.to(base.device))

    def sign(self) -> torch.Tensor:
        out_features, in_features = self.base_weight.shape
        return unpack_rows(self.sign_packed, 1, out_features, in_features).float() * 2 - 1

    def delta_nbytes(self) -> int:
        return self.sign_packed.numel() + self.scale.numel() * 4

    def bits_per_param(self) -> float:
        return 8 * self.delta_nbytes() / self.base_weight.numel()

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base_weight.float() + self.scale * self.sign()
        return w.to(output_dtype or self.dtype)


implements = BitDeltaTensor.implements
implements_torch_function = BitDeltaTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    y = torch.nn.functional.linear(x, w.base_weight.to(x.dtype)).float()
    y = y + w.scale * (x.float() @ w.sign().T)
    y = y.to(x.dtype)
    return y if bias is None else y + bias


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    return copy_to(args[0], kwargs.get("device"), kwargs.get("dtype"))


BitDeltaTensor.__module__ = "deltacome_ao"
torch.serialization.add_safe_globals([BitDeltaTensor])
