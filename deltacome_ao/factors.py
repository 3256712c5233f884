"""Stage 4 (packing): `PackedFactors`, the value type of one matrix's packed low-rank delta.

`Û diag(s) V̂` of an (out, in) delta, with V̂ (r, in) and Ûᵀ (r, out) quantized in bands of
decreasing bit-width and packed (`packing.py`): seven tensors plus the band list travel together as
one frozen value. Everything after this stage (the tensor subclass, serving, the artifact format,
the kernels' dispatcher) passes a `PackedFactors`; only the `torch.library` operators take its
tensors flat (`op_args`), because a custom op's schema has no room for a Python object.

Tensors (r = Σ counts, q = rows of quantized bands, i.e. every band but fp16 ones, G = groups):

    v_packed  (Σ packed bytes of every band of V̂,)  uint8    rows of length `in_features`
    v_scale   (q, ceil(in / group_size))            float16
    v_zero    (q, ceil(in / group_size))            uint8
    u_packed, u_scale, u_zero                       the same for Ûᵀ (rows of length `out_features`)
    s         (r,)                                  float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

from .allocate import FP16_BITS, SUPPORTED_BITS, Band
from .packing import band_offsets, pack_rows, packed_nbytes, unpack_rows
from .quantize import QuantizedRows, dequantize_codes

__all__ = ["PackedFactors", "TENSOR_NAMES", "low_rank_term", "split_bands"]

TENSOR_NAMES = ("v_packed", "v_scale", "v_zero", "u_packed", "u_scale", "u_zero", "s")


def _pack_one(quantized: Sequence[QuantizedRows], length: int, group_size: int):
    """One factor's `QuantizedRows` (one per band, band order) -> (packed, scale, zero)."""
    packed, scales, zeros = [], [], []
    for q in quantized:
        packed.append(pack_rows(q.codes, q.bits))
        if q.bits != FP16_BITS:
            scales.append(q.scale)
            zeros.append(q.zero)
    groups = math.ceil(length / group_size)
    scale = torch.cat(scales) if scales else torch.zeros(0, groups, dtype=torch.float16)
    zero = torch.cat(zeros) if zeros else torch.zeros(0, groups, dtype=torch.uint8)
    return (torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)), scale, zero


@dataclass(frozen=True)
class PackedFactors:
    """Packed `Û diag(s) V̂` of one (out_features, in_features) delta; see the module docstring."""

    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    u_packed: torch.Tensor
    u_scale: torch.Tensor
    u_zero: torch.Tensor
    s: torch.Tensor
    bits: tuple[int, ...]
    counts: tuple[int, ...]
    group_size: int
    out_features: int
    in_features: int

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        object.__setattr__(self, "group_size", int(self.group_size))

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def pack(cls, v_rows: Sequence[QuantizedRows], u_rows: Sequence[QuantizedRows], s: torch.Tensor,
             group_size: int, out_features: int, in_features: int, device=None) -> "PackedFactors":
        """Pack quantized V̂ rows and Ûᵀ rows (one `QuantizedRows` per band, same bands in both)."""
        bits = [q.bits for q in v_rows]
        counts = [q.codes.shape[0] for q in v_rows]
        if [q.bits for q in u_rows] != bits or [q.codes.shape[0] for q in u_rows] != counts:
            raise ValueError("V̂ and Ûᵀ must be quantized in the same bands")
        v = _pack_one(v_rows, in_features, group_size)
        u = _pack_one(u_rows, out_features, group_size)
        device = device if device is not None else s.device
        tensors = [t.to(device) for t in (*v, *u)] + [s.float().contiguous().to(device)]
        return cls(*tensors, bits=tuple(bits), counts=tuple(counts), group_size=group_size,
                   out_features=out_features, in_features=in_features)

    @classmethod
    def from_tensors(cls, tensors, bits, counts, group_size: int, out_features: int,
                     in_features: int) -> "PackedFactors":
        """From a mapping {name: tensor} with exactly `TENSOR_NAMES` (no checks beyond the names)."""
        return cls(*(tensors[n] for n in TENSOR_NAMES), bits=tuple(bits), counts=tuple(counts),
                   group_size=group_size, out_features=out_features, in_features=in_features)

    @staticmethod
    def layout(bits: Sequence[int], counts: Sequence[int], group_size: int, out_features: int,
               in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{tensor name: (shape, dtype)} of the factors with these bands (see the module docstring)."""
        quantized = sum(c for b, c in zip(bits, counts) if b != FP16_BITS)
        out = {}
        for factor, length in (("v", in_features), ("u", out_features)):
            groups = math.ceil(length / group_size)
            out[f"{factor}_packed"] = ((sum(packed_nbytes(b, c, length) for b, c in zip(bits, counts)),), torch.uint8)
            out[f"{factor}_scale"] = ((quantized, groups), torch.float16)
            out[f"{factor}_zero"] = ((quantized, groups), torch.uint8)
        out["s"] = ((sum(counts),), torch.float32)
        return {n: out[n] for n in TENSOR_NAMES}

    @staticmethod
    def check_bands(bits, counts, group_size) -> str | None:
        """Why these bands cannot describe packed factors (None if they can)."""
        if not (isinstance(bits, (list, tuple)) and isinstance(counts, (list, tuple)) and len(bits) == len(counts)):
            return "bits and counts must be lists of the same length"
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if any(not is_int(b) or b not in SUPPORTED_BITS for b in bits) or any(not is_int(c) or c < 1 for c in counts):
            return f"bad bands {list(zip(bits, counts))} (bit-widths from {SUPPORTED_BITS}, counts >= 1)"
        if not (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1):
            return f"bad group_size {group_size!r}"
        return None

    # --- views ----------------------------------------------------------------------------------

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(Band(b, c) for b, c in zip(self.bits, self.counts))

    @property
    def rank(self) -> int:
        return sum(self.counts)

    @property
    def device(self) -> torch.device:
        return self.s.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in TENSOR_NAMES}

    def nbytes(self) -> int:
        """Bytes of everything stored (codes, scales, zero-points, S)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def op_args(self) -> tuple:
        """The flat arguments of the `deltacome::` operators: 7 tensors, bits, counts, group_size."""
        return (*self.tensors().values(), list(self.bits), list(self.counts), self.group_size)

    def to(self, device) -> "PackedFactors":
        return replace(self, **{n: t.to(device) for n, t in self.tensors().items()})

    def map_tensors(self, fn) -> "PackedFactors":
        return replace(self, **{n: fn(t) for n, t in self.tensors().items()})

    def transposed(self) -> "PackedFactors":
        """Factors of the transposed delta `V̂ᵀ diag(s) Û`: the two factors swap roles."""
        return replace(self, v_packed=self.u_packed, v_scale=self.u_scale, v_zero=self.u_zero,
                       u_packed=self.v_packed, u_scale=self.v_scale, u_zero=self.v_zero,
                       out_features=self.in_features, in_features=self.out_features)

    # --- math -----------------------------------------------------------------------------------

    def _dequantize_one(self, packed, scale, zero, length: int) -> torch.Tensor:
        rows, q_row = [], 0
        for b, c, (start, end) in zip(self.bits, self.counts, band_offsets(self.bits, self.counts, length)):
            codes = unpack_rows(packed[start:end], b, c, length)
            if b == FP16_BITS:
                rows.append(codes.float())
                continue
            rows.append(dequantize_codes(codes, scale[q_row:q_row + c], zero[q_row:q_row + c], b, self.group_size))
            q_row += c
        if not rows:
            return torch.zeros(0, length, device=packed.device)
        return torch.cat(rows)

    def dequantize_factor(self, which: str) -> torch.Tensor:
        """One factor, fp32: "v" -> V̂ (r, in), "u" -> Ûᵀ (r, out)."""
        if which == "v":
            return self._dequantize_one(self.v_packed, self.v_scale, self.v_zero, self.in_features)
        if which == "u":
            return self._dequantize_one(self.u_packed, self.u_scale, self.u_zero, self.out_features)
        raise ValueError(f"which must be 'v' or 'u', got {which!r}")

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V̂ (r, in), Ûᵀ (r, out)), fp32."""
        return self.dequantize_factor("v"), self.dequantize_factor("u")

    def dense(self) -> torch.Tensor:
        """The (out, in) delta `Û diag(s) V̂`, fp32."""
        v, ut = self.dequantize()
        return (ut.T * self.s) @ v


def low_rank_term(x: torch.Tensor, v: torch.Tensor, ut: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`((x V̂ᵀ) * s) Ûᵀ` in fp32: its inputs are tiny compared with the base output."""
    return ((x.float() @ v.T) * s) @ ut


def split_bands(rows: torch.Tensor, bands: Iterable[Band]) -> list[torch.Tensor]:
    """Consecutive row blocks of `rows`, one per band."""
    out, start = [], 0
    for band in bands:
        out.append(rows[start:start + band.count])
        start += band.count
    return out

