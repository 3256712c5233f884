"""CPU implementations of the `deltacome::` operators: a small C kernel, built at first use.

The reference path (`ops.py`) unpacks and dequantizes the whole factors to fp32 on every call, which
costs ~8× the base GEMV at decode. The kernel in `cpu_kernel.c` reads the packed codes directly
inside the two skinny products (`t = (x V̂ᵀ)·s`, then `y += t Ûᵀ`), 16 codes per vector operation,
rows (V̂) and output columns (Ûᵀ) split over torch's threads; nothing is materialised. The base
product stays torch's (`F.linear`, MKL / oneDNN). Beyond `FUSED_MAX_TOKENS` token rows the factors
are dequantized `BLOCK_ROWS` vectors at a time by the same kernel and multiplied with torch's GEMM
(the unpacking is then amortised over the tokens; the blocks stay in cache and nothing is kept).

Registered with `register_kernel("cpu")` on `delta_linear`, `delta_only_linear` and
`segmented_delta_linear` (`register()`, called by `deltacome_ao.kernels`); inputs it does not cover
(other dtypes or devices, non-contiguous factors, autograd) go to the reference implementation.

Build: `gcc -O3 -march=native -fopenmp` (`$CC` if set) into a cache directory keyed by the source,
the flags, the compiler and the CPU (`$DELTACOME_KERNEL_CACHE`, else `$XDG_CACHE_HOME/deltacome_ao`,
else `~/.cache/deltacome_ao`), once per machine: ~5-10 s the first time, a `dlopen` afterwards.
Without a working compiler the reference path is used, with one warning. `DELTACOME_CPU_KERNEL=0`
turns the kernel off (reference path everywhere). The library links the same `libgomp.so.1` torch
has loaded, so both share one OpenMP thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..factors import PackedFactors

__all__ = ["available", "library", "delta_term", "dequantize_rows", "register", "registered",
           "FUSED_MAX_TOKENS", "BLOCK_ROWS", "build_info"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FUSED_MAX_TOKENS = 16  # token rows of one delta up to which the fused kernel runs; above: dequantize blocks + GEMM
BLOCK_ROWS = 128  # vectors dequantized at a time beyond FUSED_MAX_TOKENS
PARALLEL_MIN_MACS = 1 << 22  # below this many multiply-adds the kernel runs on one thread (waking the pool costs more)
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11"]
_OPTIONAL = [["-march=native"], ["-fopenmp"]]

_lock = threading.Lock()
_lib = None
_tried = False
build_info: dict = {}
registered = False


_ENABLED = os.environ.get("DELTACOME_CPU_KERNEL", "1").lower() not in ("0", "false", "no", "off")


def _enabled() -> bool:
    return _ENABLED


def set_enabled(enabled: bool) -> bool:
    """Turn the kernel on or off for this process (the reference path is used while off); returns the
    previous setting. The environment variable DELTACOME_CPU_KERNEL=0 sets it off at import."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def _cache_dir() -> Path:
    explicit = os.environ.get("DELTACOME_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltacome_ao"


def _cpu_id() -> str:
    """What `-march=native` depends on."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(cc: str, src: Path, out: Path, flags: list) -> Optional[str]:
    """Compile; None on success, else the compiler's message."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        r = subprocess.run([cc, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return r.stderr[-2000:] or f"exit status {r.returncode}"
        os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        tmp.unlink(missing_ok=True)


def _build() -> Optional[ctypes.CDLL]:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        build_info["error"] = "no C compiler found (gcc / $CC)"
        return None
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    errors = []
    # the optional flags are dropped one by one from the end when the compiler refuses them
    for keep in range(len(_OPTIONAL), -1, -1):
        flags = _FLAGS + [f for opt in _OPTIONAL[:keep] for f in opt]
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_id().encode(),
                                         platform.machine().encode()])).hexdigest()[:20]
        for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"deltacome_ao-{os.getuid()}"):
            path = directory / f"cpu_kernel-{key}.so"
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                errors.append(str(e))
                continue
            if not path.exists():
                err = _compile(cc, SOURCE, path, flags)
                if err is not None:
                    errors.append(err)
                    if "Permission denied" in err or "Read-only" in err:
                        continue
                    break  # the flags, not the directory: try fewer flags
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                errors.append(str(e))
                continue
            build_info.update(path=str(path), flags=flags, compiler=cc, openmp="-fopenmp" in flags)
            return lib
    build_info["error"] = "; ".join(errors)[-4000:]
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dc_delta.argtypes = [p]
    lib.dc_delta.restype = c_int
    lib.dc_delta1.argtypes = [p, i64, i64, i64, c_int, p, i64, p, i64]
    lib.dc_delta1.restype = c_int
    lib.dc_dequantize_rows.argtypes = [p, p, p, i64, i64, i64, p, p, i64, i64, p, i64, c_int]
    lib.dc_dequantize_rows.restype = c_int


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; None when disabled or unbuildable."""
    global _lib, _tried
    if _lib is not None and _ENABLED:
        return _lib
    if not _ENABLED:
        return None
    with _lock:
        if not _tried:
            _tried = True
            lib = _build()
            if lib is None:
                warnings.warn("deltacome_ao: the CPU kernel could not be built, so compressed weights use the "
                              f"slower reference path on CPU ({build_info.get('error', '?')[:500]})",
                              RuntimeWarning, stacklevel=3)
            else:
                _declare(lib)
                _lib = lib
    return _lib


def available() -> bool:
    return library() is not None


# --- calls -------------------------------------------------------------------------------------------


def _threads(macs: int) -> int:
    return 1 if macs < PARALLEL_MIN_MACS else max(1, torch.get_num_threads())


def _i64(values) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


_WANT = (torch.uint8, torch.float16, torch.uint8, torch.uint8, torch.float16, torch.uint8, torch.float32)


def supported_tensors(tensors) -> bool:
    """Whether the kernel reads these factor tensors (7 per delta, `TENSOR_NAMES` order) as they are:
    on the CPU, contiguous, in the stored dtypes."""
    for k, t in enumerate(tensors):
        if t.dtype is not _WANT[k % 7] or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def supported(f: PackedFactors) -> bool:
    return supported_tensors(f.tensors().values())


_BITS = frozenset((1, 2, 3, 4, 5, 6, 7, 8, 16))  # the bit-widths cpu_kernel.c reads
_U8, _F16, _F32 = torch.uint8, torch.float16, torch.float32
_PLANS: dict = {}  # `_decode_plan`'s key -> (descriptor, multiply-adds per token row, descriptor as a list)
_PLANS_MAX = 65536


def _decode_plan(vp, vs, vz, up, us, uz, s, bits, counts, group_size: int, in_features: int, out_features: int):
    """(descriptor, multiply-adds per token row, the descriptor as a list) for one delta's factors when the
    kernel reads them as they are (on the CPU, contiguous, in the stored dtypes), else None. The
    descriptor of `dc_delta1` / one delta's block of `dc_delta` holds only addresses and numbers; it is
    built once per key, which holds every tensor's address and size, while dtypes, device and contiguity
    are checked on every call, so a changed tensor never meets a stale descriptor. Written out because
    decode calls it once per layer and token step, where each microsecond of Python is a visible share
    of a small layer."""
    if not (vp.dtype is _U8 and vs.dtype is _F16 and vz.dtype is _U8 and up.dtype is _U8 and us.dtype is _F16
            and uz.dtype is _U8 and s.dtype is _F32 and vp.is_cpu and vs.is_cpu and vz.is_cpu and up.is_cpu
            and us.is_cpu and uz.is_cpu and s.is_cpu and vp.is_contiguous() and vs.is_contiguous()
            and vz.is_contiguous() and up.is_contiguous() and us.is_contiguous() and uz.is_contiguous()
            and s.is_contiguous()):
        return None
    key = (vp.data_ptr(), vs.data_ptr(), vz.data_ptr(), up.data_ptr(), us.data_ptr(), uz.data_ptr(), s.data_ptr(),
           vp.numel(), vs.numel(), vz.numel(), up.numel(), us.numel(), uz.numel(), s.numel(),
           tuple(bits), tuple(counts), group_size, in_features, out_features)
    hit = _PLANS.get(key)
    if hit is None:
        hit = _new_plan(key, (vp, vs, vz, up, us, uz, s), bits, counts, group_size, in_features, out_features)
    return hit


def _new_plan(key, tensors, bits, counts, group_size: int, in_features: int, out_features: int) -> tuple:
    """Builds and caches `_decode_plan`'s entry after checking the bands and that every tensor has exactly
    the size they imply (ValueError otherwise): the kernel never reads past a buffer."""
    why = None
    if (len(bits) != len(counts) or any(b not in _BITS for b in bits) or any(c < 0 for c in counts)
            or group_size < 1):
        why = f"bad bands {list(zip(bits, counts))} or group size {group_size}"
    if why is None:
        layout = PackedFactors.layout(bits, counts, group_size, out_features, in_features)
        for t, (name, (shape, _)) in zip(tensors, layout.items()):
            if t.numel() != math.prod(shape):
                why = f"{name} has {t.numel()} elements, the bands need {math.prod(shape)}"
                break
    if why is not None:
        raise ValueError(f"deltacome_ao CPU kernel: inconsistent packed factors: {why}")
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    plan = _i64([group_size, len(bits), *(t.data_ptr() for t in tensors), *bits, *counts])
    hit = _PLANS[key] = (plan, sum(counts) * (in_features + out_features), list(plan))
    return hit


def _call(desc: list) -> None:
    if library().dc_delta(_i64(desc)):
        raise MemoryError("deltacome_ao CPU kernel: out of memory")


def dequantize_rows(f: PackedFactors, which: str, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows [start, end) of V̂ ("v", length in) or Ûᵀ ("u", length out) in fp32, by the kernel."""
    length = f.in_features if which == "v" else f.out_features
    packed, scale, zero = (f.v_packed, f.v_scale, f.v_zero) if which == "v" else (f.u_packed, f.u_scale, f.u_zero)
    n = end - start
    if out is None:
        out = torch.empty(n, length)
    if n and length:
        rc = library().dc_dequantize_rows(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), length, f.group_size,
                                          len(f.bits), _i64(f.bits), _i64(f.counts), start, end, out.data_ptr(),
                                          out.stride(0), _threads(n * length * 64))
        if rc:
            raise MemoryError("deltacome_ao CPU kernel: out of memory")
    return out


def _blockwise(x2: torch.Tensor, f: PackedFactors, y: torch.Tensor) -> None:
    """y += ((x2 V̂ᵀ)·s) Ûᵀ, dequantizing BLOCK_ROWS vectors at a time (many token rows)."""
    r = f.rank
    block = min(BLOCK_ROWS, r)
    buf = torch.empty(block * max(f.in_features, f.out_features))
    tt = torch.empty(r, x2.shape[0])  # tᵀ: its row blocks are contiguous
    for r0 in range(0, r, block):
        n = min(block, r - r0)
        v = dequantize_rows(f, "v", r0, r0 + n, buf[:n * f.in_features].view(n, f.in_features))
        torch.mm(v, x2.T, out=tt[r0:r0 + n])
    tt.mul_(f.s[:, None])
    for r0 in range(0, r, block):
        n = min(block, r - r0)
        ut = dequantize_rows(f, "u", r0, r0 + n, buf[:n * f.out_features].view(n, f.out_features))
        y.addmm_(tt[r0:r0 + n].T, ut)


def _term(x2, tensors, bits, counts, group_size, out_features, y=None):
    m, in_features = x2.shape
    if y is None:
        y = torch.zeros(m, out_features)
    rank = sum(counts)
    if rank == 0 or m == 0:
        return y
    if m > FUSED_MAX_TOKENS:
        _blockwise(x2, PackedFactors(*tensors, bits=bits, counts=counts, group_size=group_size,
                                     out_features=out_features, in_features=in_features), y)
        return y
    hit = _decode_plan(*tensors, bits, counts, group_size, in_features, out_features)
    if hit is None:
        raise ValueError("deltacome_ao CPU kernel: factor tensors it cannot read as they are (it needs them on the "
                         "CPU, contiguous, in the stored dtypes); use ops.delta_linear_reference")
    if library().dc_delta1(hit[0], m, in_features, out_features, _threads(m * hit[1]), x2.data_ptr(), x2.stride(0),
                           y.data_ptr(), y.stride(0)):
        raise MemoryError("deltacome_ao CPU kernel: out of memory")
    return y


def delta_term(x2: torch.Tensor, f: PackedFactors, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`((x2 V̂ᵀ)·s) Ûᵀ` in fp32 for a contiguous fp32 (M, in) `x2`, added to `y` (M, out) fp32 (zeros
    when None); returns `y`."""
    return _term(x2, tuple(f.tensors().values()), f.bits, f.counts, f.group_size, f.out_features, y)


# --- the operators' CPU implementations ------------------------------------------------------------

_ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)


def _usable(x: torch.Tensor, tensors, in_features: int) -> bool:
    return (x.dtype in _ACTIVATIONS and x.device.type == "cpu" and x.numel() > 0 and x.shape[-1] == in_features
            and supported_tensors(tensors) and library() is not None)


def _flat_fp32(x: torch.Tensor, features: int) -> torch.Tensor:
    return x.reshape(-1, features).to(torch.float32).contiguous()


def delta_linear_cpu(x, base_weight, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size):
    out_features, in_features = base_weight.shape
    lib = _lib
    if (lib is not None and _ENABLED and x.dtype is _F32 and base_weight.dtype is _F32 and x.is_cpu
            and x.is_contiguous() and x.shape[-1] == in_features):
        # decode (fp32, up to FUSED_MAX_TOKENS rows): the kernel adds the term straight into the base product
        m = x.numel() // in_features if in_features else 0
        if 0 < m <= FUSED_MAX_TOKENS:
            hit = _decode_plan(v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts, group_size,
                               in_features, out_features)
            if hit is not None:
                y = torch.nn.functional.linear(x, base_weight)
                if hit[1] and lib.dc_delta1(hit[0], m, in_features, out_features, _threads(m * hit[1]),
                                            x.data_ptr(), in_features, y.data_ptr(), out_features):
                    raise MemoryError("deltacome_ao CPU kernel: out of memory")
                return y
    tensors = (v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s)
    if not _usable(x, tensors, in_features):
        from ..ops import delta_linear_reference

        return delta_linear_reference(x, base_weight, PackedFactors(*tensors, bits, counts, group_size,
                                                                    out_features, in_features))
    y = torch.nn.functional.linear(x, base_weight if base_weight.dtype == x.dtype else base_weight.to(x.dtype))
    if not s.numel():
        return y
    if y.dtype == torch.float32:  # the term goes straight into the base product (a new tensor)
        _term(_flat_fp32(x, in_features), tensors, bits, counts, group_size, out_features, y.view(-1, out_features))
        return y
    y = y.float()
    _term(_flat_fp32(x, in_features), tensors, bits, counts, group_size, out_features, y.view(-1, out_features))
    return y.to(x.dtype)


def delta_only_linear_cpu(x, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s, bits, counts,
                          out_features, in_features, group_size):
    tensors = (v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s)
    if not _usable(x, tensors, in_features):
        from ..factors import low_rank_term

        v, ut = PackedFactors(*tensors, bits, counts, group_size, out_features, in_features).dequantize()
        return low_rank_term(x, v, ut, s).to(x.dtype)
    d = _term(_flat_fp32(x, in_features), tensors, bits, counts, group_size, out_features)
    return d.view(*x.shape[:-1], out_features).to(x.dtype)


def segmented_delta_linear_cpu(y, x, rows, tensors, bits, counts, nbands, group_sizes):
    """All deltas of a step in one kernel call (those with at most FUSED_MAX_TOKENS token rows; larger
    ones dequantize blocks + GEMM); no per-delta work beyond assembling the call's descriptor."""
    in_features, out_features = x.shape[-1], y.shape[-1]
    hits = None
    if (y.dtype in _ACTIVATIONS and x.dtype in _ACTIVATIONS and x.is_cpu and x.numel() and _lib is not None
            and _ENABLED):
        hits, b0 = [], 0
        for i, nb in enumerate(nbands):
            hit = _decode_plan(*tensors[7 * i:7 * i + 7], bits[b0:b0 + nb], counts[b0:b0 + nb], group_sizes[i],
                               in_features, out_features)
            b0 += nb
            if hit is None:
                hits = None
                break
            hits.append(hit)
    if hits is None:
        from ..ops import segmented_delta_linear_reference

        return segmented_delta_linear_reference(y, x, rows, tensors, bits, counts, nbands, group_sizes)
    per_row = x.numel() // (x.shape[0] * in_features)  # tokens per batch row
    x2 = _flat_fp32(x, in_features)
    y2 = y.to(torch.float32, copy=True).reshape(-1, out_features)
    steps = torch.arange(per_row) if per_row != 1 else None
    desc, fused, macs, b0 = [], [], 0, 0
    for i, r in enumerate(rows):
        nb = nbands[i]
        if steps is not None:
            r = (r[:, None] * per_row + steps).reshape(-1)
        m = r.numel()
        plan, per_token, listed = hits[i]
        if not per_token or m == 0:
            b0 += nb
            continue
        if m > FUSED_MAX_TOKENS:
            f = PackedFactors(*tensors[7 * i:7 * i + 7], bits[b0:b0 + nb], counts[b0:b0 + nb], group_sizes[i],
                              out_features, in_features)
            y2.index_add_(0, r, delta_term(x2.index_select(0, r), f))
            b0 += nb
            continue
        b0 += nb
        fused.append(r)
        desc.append(m)
        desc += listed
        macs += m * per_token
    if fused:
        r = (torch.cat(fused) if len(fused) > 1 else fused[0]).to(torch.int64).contiguous()
        _call([len(fused), in_features, out_features, _threads(macs), x2.data_ptr(), x2.stride(0), y2.data_ptr(),
               y2.stride(0), r.data_ptr(), *desc])
    return y2.view(y.shape).to(y.dtype)


def register(force: bool = False) -> bool:
    """Register the CPU implementations on the operators (the library itself is built at first use);
    `force`: again, after someone registered another CPU kernel on them."""
    global registered
    from ..ops import delta_linear, delta_only_linear, register_kernel, segmented_delta_linear

    if force or not registered:
        register_kernel(delta_linear, "cpu", delta_linear_cpu)
        register_kernel(delta_only_linear, "cpu", delta_only_linear_cpu)
        register_kernel(segmented_delta_linear, "cpu", segmented_delta_linear_cpu)
        registered = True
    return registered
