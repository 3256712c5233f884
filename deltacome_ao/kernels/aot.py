"""Compile a kernel launch for a GPU architecture without a GPU (ahead of time).

Triton's compiler (and the ptxas shipped in the triton wheel) run on any machine, so a CPU-only
box can still check that each kernel specialisation lowers to sm_90 (H100) code — catching what
the interpreter lets through (`tl.dot` shapes, layout or type errors) — and report registers,
spills and shared memory per thread block. Used by tests/test_kernels.py and
`benchmarks/kernels.py --aot`. Must run in a process WITHOUT `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["CompiledInfo", "compile_launch"]

_TY = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
    torch.int32: "i32", torch.int64: "i64",
}


@dataclass
class CompiledInfo:
    name: str
    registers: int | None
    spill_bytes: int | None  # stack + local memory per thread (0 = no register spills)
    shared_bytes: int
    num_warps: int


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    spill = [int(m.group(1)) for m in re.finditer(r"(?:STACK|LOCAL):(\d+)", text)]
    return (int(reg.group(1)) if reg else None), (sum(spill) if spill else None)


def compile_launch(kernel, args, kwargs, arch: int = 90) -> CompiledInfo:
    """Compile `kernel[grid](*args, **kwargs)` for sm_`arch`; tensors only lend their dtypes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]  # what Triton's launcher infers for 16-byte aligned args
    for i, name in enumerate(names):
        value = values[name]
        if kernel.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TY[value.dtype]
            attrs[(i,)] = aligned  # CUDA caching-allocator tensors are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises ints equal to 1 at run time; do the same
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(value)}")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, local = _resource_usage(compiled.asm["cubin"])
    return CompiledInfo(kernel.fn.__name__, regs, local, compiled.metadata.shared, compiled.metadata.num_warps)
