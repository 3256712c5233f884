"""Tensor parallelism of compressed weights: exact slices and transposes (`slicing.py`, the
`DeltaTensor` ops), and a compressed tiny Llama under PyTorch's DTensor (`parallelize_module` with
`ColwiseParallel` / `RowwiseParallel`, gloo, 2 CPU processes) giving the logits of one process.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deltacome_ao import BitDeltaTensor, DeltaCoMeConfig, MixedPrecisionDeltaTensor, compress_
from deltacome_ao.slicing import regroup, regroup_cost, shard_bounds, shard_group_size, slice_factors
from tiny_models import finetune, ids, tiny

HERE = os.path.dirname(os.path.abspath(__file__))


def weight(kind: str = "deltacome", out_features: int = 96, in_features: int = 80, group_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_features, in_features, generator=g)
    ft = base + 0.1 * torch.randn(out_features, in_features, generator=g)
    if kind == "bitdelta":
        return BitDeltaTensor.from_hp(ft, base)
    # every band kind, a 16-bit band after an odd number of packed bytes included
    return MixedPrecisionDeltaTensor.from_hp(ft, base, bands=[(8, 2), (3, 5), (2, 4), (16, 1)], group_size=group_size)


def factor_values(f):
    v, ut = f.dequantize()
    return v, ut, f.s


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bounds", [(0, 48), (16, 48), (32, 80), (8, 40), (3, 17), (40, 79)])
def test_slice_factors_is_exact(dim, bounds):
    """The dequantized factors of a slice are bit-identical to the same entries of the whole
    factors, on or off group boundaries (off: a finer group size, same values)."""
    f = weight().factors
    start, end = bounds
    piece = slice_factors(f, dim, start, end)
    v, ut, s = factor_values(f)
    pv, put, ps = factor_values(piece)
    assert torch.equal(ps, s)
    if dim == 0:
        assert (piece.out_features, piece.in_features) == (end - start, f.in_features)
        assert torch.equal(put, ut[:, start:end]) and torch.equal(pv, v)
    else:
        assert (piece.out_features, piece.in_features) == (f.out_features, end - start)
        assert torch.equal(pv, v[:, start:end]) and torch.equal(put, ut)
    assert piece.group_size == (16 if start % 16 == 0 else shard_group_size(16, start))
    # the cut factor really holds only the slice's codes (repacked, not a view of the whole buffer)
    cut = piece.u_packed if dim == 0 else piece.v_packed
    whole = f.u_packed if dim == 0 else f.v_packed
    assert cut.numel() < whole.numel()


def test_regroup_keeps_every_value_and_says_its_cost():
    f = weight().factors
    finer = regroup(f, 4)
    assert finer.group_size == 4
    for a, b in zip(factor_values(finer), factor_values(f)):
        assert torch.equal(a, b)
    assert regroup_cost(f, 4) == finer.nbytes() - f.nbytes() > 0
    assert regroup_cost(f, 16) == 0
    with pytest.raises(ValueError, match="does not divide"):
        regroup(f, 5)


def test_shard_helpers():
    assert shard_bounds(688, 2, 1) == (344, 688)
    with pytest.raises(ValueError, match="equal shards"):
        shard_bounds(10, 4, 0)
    assert shard_group_size(128, 2752) == 64 and shard_group_size(128, 0, 1024) == 128


@pytest.mark.parametrize("kind", ["deltacome", "bitdelta"])
def test_slices_transposes_and_matmuls_of_a_compressed_weight(kind):
    w = weight(kind)
    dense = w.dequantize()
    cases = {
        "rows": (w[:40], dense[:40]),
        "cols": (w[:, 24:56], dense[:, 24:56]),
        "narrow": (w.narrow(0, 48, 48), dense[48:]),
        "t": (w.t(), dense.t()),
        "t-cols": (w.t()[:, 8:24], dense.t()[:, 8:24]),
    }
    for name, (piece, ref) in cases.items():
        assert type(piece) is type(w), name
        torch.testing.assert_close(piece.dequantize(), ref, rtol=0, atol=1e-6, msg=name)
    rows = torch.chunk(w, 2, dim=0)
    assert [type(p) for p in rows] == [type(w)] * 2
    assert torch.equal(torch.cat([p.dequantize() for p in rows]), dense)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.mm(x, w.t()), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.addmm(torch.ones(96), x, w.t()), torch.nn.functional.linear(x, w) + 1,
                               rtol=1e-5, atol=1e-5)
    assert w.detach().shape == w.clone().shape == w.view(96, 80).shape == w.shape
    with pytest.raises(NotImplementedError, match="cannot be viewed"):
        w.view(80, 96)
    with pytest.raises(NotImplementedError, match="strided"):
        w[::2]


# --- DTensor: a compressed tiny Llama, 2 processes, gloo ------------------------------------------

PROJ_PLAN = {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col", "self_attn.o_proj": "row",
             "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row"}


def compressed_llama(method: str):
    base = tiny()
    ft = finetune(base)
    # group 32: the k / v shards (16 rows of 32) start off a group boundary -> the exact regroup path
    compress_(ft, DeltaCoMeConfig(base=base, group_size=32, method=method, progress=False))
    return ft


def _tp_worker(rank: int, world: int, store: str, method: str, out: str):
    sys.path.insert(0, HERE)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = compressed_llama(method)
        mesh = init_device_mesh("cpu", (world,))
        plan = {f"model.layers.{i}.{p}": ColwiseParallel() if kind == "col" else RowwiseParallel()
                for i in range(len(model.model.layers)) for p, kind in PROJ_PLAN.items()}
        # every rank holds the whole compressed model: each cuts its shard locally (no scatter of packed codes)
        parallelize_module(model, mesh, plan, src_data_rank=None)
        shapes = {}
        for name, module in model.named_modules():
            if name.endswith(tuple(PROJ_PLAN)):
                w = module.weight
                assert isinstance(w, DTensor), name
                local = w.to_local()
                assert type(local).__name__ == {"deltacome": "MixedPrecisionDeltaTensor", "bitdelta": "BitDeltaTensor"}[method]
                shapes[name] = tuple(local.shape)
        with torch.no_grad():
            logits = model(ids()).logits
        torch.save({"logits": logits, "shapes": shapes}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["deltacome", "bitdelta"])
def test_parallelize_module_matches_one_process(method):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_worker, args=(2, f"{d}/store", method, f"{d}/out"), nprocs=2, join=True)
        results = [torch.load(f"{d}/out.{r}") for r in range(2)]
    reference = compressed_llama(method)
    with torch.no_grad():
        expected = reference(ids()).logits
    layer = "model.layers.0."
    assert results[0]["shapes"][layer + "self_attn.q_proj"] == (32, 64)  # column-parallel: half the rows
    assert results[0]["shapes"][layer + "self_attn.k_proj"] == (16, 64)
    assert results[0]["shapes"][layer + "self_attn.o_proj"] == (64, 32)  # row-parallel: half the columns
    assert results[0]["shapes"][layer + "mlp.down_proj"] == (64, 64)
    for r in results:
        torch.testing.assert_close(r["logits"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0]["logits"], results[1]["logits"])


# --- one rank's part of an engine's (maybe fused) layer: tensor_parallel.LayerShards -------------

from deltacome_ao.format import DeltaFormatError  # noqa: E402
from deltacome_ao.tensor_parallel import LayerShards, check_shardable, shard_range  # noqa: E402

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 64, 8, 8, 2, 96


def _full_weights(kind: str):
    """q, k, v, gate, up, down of one layer, compressed (group 8: every shard below starts on a group)."""
    shapes = {"q": (HEADS * HEAD, HIDDEN), "k": (KV_HEADS * HEAD, HIDDEN), "v": (KV_HEADS * HEAD, HIDDEN),
              "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    return {n: weight(kind, o, i, group_size=8, seed=s) for s, (n, (o, i)) in enumerate(shapes.items())}


def _rank_layer(full, names, shard_ids, local_out, local_in, rank, tp):
    """What the vLLM plugin does on one rank: stream every stored tensor into LayerShards, then put
    the rank's base slice (cut here the way vLLM's loader cuts it) under the cut deltas."""
    specs = {n: full[n].spec() for n in names}
    shards = LayerShards(names, specs, local_out, local_in, rank, tp, torch.float32)
    assert shards.inner_names[0] == "base_weight"
    for n, sid in zip(names, shard_ids):
        for inner, t in full[n].delta_tensors().items():
            shards.add(inner, sid, t)
    bases = []
    for n, out_j in zip(names, local_out):
        o, i = full[n].shape
        a, b = shard_range(o, out_j, rank, tp)
        c, d = shard_range(i, local_in, rank, tp)
        bases.append(full[n].base_weight[a:b, c:d])
    return shards.local_weights(torch.cat(bases))


@pytest.mark.parametrize("kind", ["deltacome", "bitdelta"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fused_column_parallel_layers_at_every_tp_degree(kind, tp):
    """qkv (kv heads replicated over ranks when tp > kv heads) and gate_up: each rank's sub-matrix
    equals those rows of the whole compressed weight, and the ranks' outputs concatenate to the whole."""
    full = _full_weights(kind)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    kv_local = max(KV_HEADS // tp, 1) * HEAD
    layers = {"qkv": (["q", "k", "v"], ["q", "k", "v"], [HEADS * HEAD // tp, kv_local, kv_local]),
              "gate_up": (["gate", "up"], [0, 1], [INTER // tp, INTER // tp])}
    for names, shard_ids, local_out in layers.values():
        outs = {n: [] for n in names}
        for rank in range(tp):
            local = _rank_layer(full, names, shard_ids, local_out, HIDDEN, rank, tp)
            for n, w, out_j in zip(names, local, local_out):
                a, b = shard_range(full[n].shape[0], out_j, rank, tp)
                assert type(w) is type(full[n]) and tuple(w.shape) == (b - a, HIDDEN)
                torch.testing.assert_close(w.dequantize(), full[n].dequantize()[a:b], rtol=0, atol=1e-6)
                if (b - a) * tp == full[n].shape[0]:  # not a replicated kv shard
                    outs[n].append(torch.nn.functional.linear(x, w))
        for n in names:
            if outs[n]:
                torch.testing.assert_close(torch.cat(outs[n], dim=-1), torch.nn.functional.linear(x, full[n]),
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_row_parallel_partial_outputs_sum_to_the_whole(tp):
    full = _full_weights("deltacome")
    x = torch.randn(5, INTER, generator=torch.Generator().manual_seed(4))
    total = 0
    for rank in range(tp):
        (w,) = _rank_layer(full, ["down"], [None], [HIDDEN], INTER // tp, rank, tp)
        a, b = shard_range(INTER, INTER // tp, rank, tp)
        assert tuple(w.shape) == (HIDDEN, INTER // tp)
        total = total + torch.nn.functional.linear(x[:, a:b], w)  # what vLLM's all-reduce adds up
    torch.testing.assert_close(total, torch.nn.functional.linear(x, full["down"]), rtol=1e-5, atol=1e-5)


def test_layer_shards_errors_and_notes():
    full = _full_weights("deltacome")
    spec = full["down"].spec()
    shards = LayerShards(["down"], {"down": spec}, [HIDDEN], INTER // 2, 1, 2, torch.float32)
    shards.add("v_packed", None, full["down"].v_packed)
    with pytest.raises(DeltaFormatError, match="down.weight:v_scale"):
        shards.local_weights(torch.zeros(HIDDEN, INTER // 2))
    with pytest.raises(DeltaFormatError, match="loaded twice|not in the checkpoint|v_packed"):
        for inner, t in full["down"].delta_tensors().items():
            shards.add(inner, None, t)
        shards.add("v_packed", None, full["down"].v_packed)
    # a dense (uncompressed) sub-matrix of a fused layer gets None and refuses delta tensors
    mixed = LayerShards(["q", "k"], {"q": full["q"].spec()}, [HEADS * HEAD, KV_HEADS * HEAD], HIDDEN, 0, 1, torch.float32)
    with pytest.raises(DeltaFormatError, match="does not list as compressed"):
        mixed.add("s", "k", full["q"].s)
    with pytest.raises(ValueError, match="do not split"):
        shard_range(96, 40, 0, 2)
    note = check_shardable("model.layers.0.mlp.down_proj", {"group_size": 128}, 1, 2752, 5504)
    assert "group_size 128" in note and "group size 64" in note and "down_proj" in note
    assert check_shardable("x", {"group_size": 128}, 0, 1024, 2048) is None


def test_vllm_plugin_is_declared_and_lazy():
    """The entry point vLLM loads in every process names a function that exists, and the library
    never imports the plugin (vllm is an optional extra; scripts/test_vllm.sh runs it for real)."""
    import ast
    import tomllib
    from pathlib import Path

    root = Path(HERE).parent
    eps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"deltacome": "deltacome_ao.vllm_plugin:register"}
    tree = ast.parse((root / "deltacome_ao" / "vllm_plugin.py").read_text())
    assert "register" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for path in (root / "deltacome_ao").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("vllm" in n.split(".") or n.endswith("vllm_plugin") for n in names) \
                or path.name == "vllm_plugin.py", path
