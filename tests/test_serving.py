"""Multi-tenant serving (`deltacome_ao.serving`): one tiny Llama base, several compressed deltas
loaded from artifacts, rows of one batch routed to different deltas.

Covers: per-row logits of a mixed batch (deltas A, B, C, D + base rows) equal to each compressed
model run alone; greedy generation of the mixed batch equal to each model's own; a delta with its
own embedding table and lm_head (served per row); the layer on its own (cached and on-the-fly
factors); loading / unloading other deltas in threads while forwards run; unloading a delta in use;
unknown names / ids; deltas that cannot be served per row (changed buffers, BitDelta) refused with
nothing changed.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor, save_delta
from deltacome_ao.serving import (
    DeltaInUseError,
    MultiDeltaEmbedding,
    MultiDeltaLinear,
    MultiDeltaModel,
    UnknownDeltaError,
    UnsupportedDeltaError,
    routing,
)
from tiny_models import VOCAB, finetune, ids, structured_finetune, tiny

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _compress(ft, base, config=None):
    quantize_(ft, config or DeltaCoMeConfig(base=base, group_size=32, progress=False))
    return ft


def _with_head_and_embedding(base, seed):
    """Projections fine-tuned, plus a changed lm_head and embedding table (norms unchanged)."""
    ft = structured_finetune(base, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ft.lm_head.weight += 0.05 * torch.randn(ft.lm_head.weight.shape, generator=g)
        ft.model.embed_tokens.weight += 0.05 * torch.randn(ft.model.embed_tokens.weight.shape, generator=g)
    return ft


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("serving")
    base = tiny("llama", seed=0)
    fts = {
        "a": structured_finetune(base, seed=10),
        "b": structured_finetune(base, seed=11, rank=3),
        "c": structured_finetune(base, seed=12, scale=0.08),
        "d": _with_head_and_embedding(base, seed=13),
    }
    models, dirs = {}, {}
    for name, ft in fts.items():
        models[name] = _compress(ft, base).eval()
        dirs[name] = save_delta(models[name], root / name, base=base)
    return base, models, dirs, root


def _served(setup, names=("a", "b", "c", "d"), **kw):
    base, _, dirs, _ = setup
    served = MultiDeltaModel(copy.deepcopy(base), **kw)
    for n in names:
        served.load_delta(n, dirs[n])
    return served


ROWS = ["a", "b", None, "c", "d", "a"]


def test_kept_tensors_of_projection_deltas_equal_base(setup):
    _, _, dirs, _ = setup
    import json

    for n in "abc":
        assert json.loads((dirs[n] / "delta_config.json").read_text())["kept"] == []
    assert sorted(json.loads((dirs["d"] / "delta_config.json").read_text())["kept"]) == [
        "lm_head.weight", "model.embed_tokens.weight"]


@pytest.mark.parametrize("cache", [True, False])
def test_mixed_batch_logits_match_each_model(setup, cache):
    base, models, _, _ = setup
    served = _served(setup, cache_dequantized=cache)
    x = ids(seed=3, batch=len(ROWS), length=10)
    with torch.no_grad():
        out = served(x, delta_ids=ROWS).logits
        for i, n in enumerate(ROWS):
            ref = (models[n] if n else base)(x[i:i + 1]).logits[0]
            torch.testing.assert_close(out[i], ref, **TOL)
        # the deltas really differ from each other and from the base
        assert not torch.allclose(out[0], base(x[:1]).logits[0], atol=1e-3)
        assert not torch.allclose(models["a"](x[1:2]).logits[0], out[1], atol=1e-3)
    # ids instead of names, as a tensor; same result
    ids_ = torch.tensor([served.deltas()[n] if n else -1 for n in ROWS])
    with torch.no_grad():
        torch.testing.assert_close(served(x, delta_ids=ids_).logits, out, rtol=0, atol=0)
    # all-base routing and no routing give the base model
    with torch.no_grad():
        torch.testing.assert_close(served(x).logits, base(x).logits, **TOL)
        torch.testing.assert_close(served(x, delta_ids=[None] * len(ROWS)).logits, base(x).logits, **TOL)


def test_mixed_batch_greedy_generate_matches_each_model(setup):
    base, models, _, _ = setup
    served = _served(setup)
    x = ids(seed=4, batch=len(ROWS), length=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = served.generate(x, delta_ids=ROWS, attention_mask=torch.ones_like(x), **kw)
        assert out.shape == (len(ROWS), 14)
        for i, n in enumerate(ROWS):
            ref = (models[n] if n else base).generate(x[i:i + 1], attention_mask=torch.ones_like(x[i:i + 1]), **kw)
            assert torch.equal(out[i], ref[0]), (i, n, out[i].tolist(), ref[0].tolist())
    # generations differ between deltas on the same prompt
    same = x[:1].expand(5, -1)
    with torch.no_grad():
        g = served.generate(same, delta_ids=["a", "b", "c", "d", None], attention_mask=torch.ones_like(same), **kw)
    assert len({tuple(r.tolist()) for r in g}) > 1


def test_layer_alone(setup):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=True)
    fts = [lin.weight.detach() + 0.05 * torch.randn(40, 3) @ torch.randn(3, 48) for _ in range(2)]
    tensors = [MixedPrecisionDeltaTensor.from_hp(w, lin.weight.detach(), alpha=0.25, group_size=16) for w in fts]
    for cache in (True, False):
        layer = MultiDeltaLinear(lin, cache_dequantized=cache)
        i0, i1 = layer.add("p", tensors[0]), layer.add("q", tensors[1])
        x = torch.randn(5, 3, 48)
        rows = torch.tensor([i1, -1, i0, i1, i0])
        with torch.no_grad():
            y = layer(x, rows)
            for r, d in enumerate(rows.tolist()):
                w = lin.weight if d == -1 else tensors[[i0, i1].index(d)]
                torch.testing.assert_close(y[r], torch.nn.functional.linear(x[r], w, lin.bias), **TOL)
            with routing(rows):  # the same through the context
                torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
        size = layer.delta_nbytes("p")
        assert size == (tensors[0].delta_nbytes() + (4 * tensors[0].rank * (48 + 40) if cache else 0))
        layer.remove("p")
        with pytest.raises(UnknownDeltaError, match="not loaded"):
            layer(x, rows)
        with pytest.raises(UnknownDeltaError):
            layer.remove("p")
    with pytest.raises(ValueError, match="rows"):
        layer(x, torch.tensor([-1, -1]))
    with pytest.raises(Exception, match="another base"):
        MultiDeltaLinear(torch.nn.Linear(48, 40)).add("p", tensors[0])


def test_modules_replaced_and_state_dict_names_unchanged(setup):
    base = setup[0]
    served = _served(setup, names=("a", "d"))
    mods = served.multi_modules()
    assert isinstance(mods["lm_head"], MultiDeltaLinear)
    assert isinstance(mods["model.embed_tokens"], MultiDeltaEmbedding)
    assert sum(isinstance(m, MultiDeltaLinear) for m in mods.values()) == 14 + 1
    assert list(served.model.state_dict()) == list(base.state_dict())
    # every multi module knows every loaded delta (those the delta leaves alone as 'base')
    for m in mods.values():
        assert set(m.delta_ids()) == {"a", "d"}
    # a dense lm_head copy is counted in the delta's bytes
    assert served.delta_nbytes("d") > served.delta_nbytes("a") + base.lm_head.weight.numel() * 4


def test_unknown_delta_errors(setup):
    served = _served(setup, names=("a",))
    x = ids(batch=2, length=4)
    with pytest.raises(UnknownDeltaError, match="nope"):
        served(x, delta_ids=["a", "nope"])
    with pytest.raises(UnknownDeltaError, match="99"):
        served(x, delta_ids=torch.tensor([99, -1]))
    with pytest.raises(UnknownDeltaError):
        served(x, delta_ids=torch.tensor([-2, -1]))
    with pytest.raises(UnknownDeltaError):
        served.unload_delta("nope")
    with pytest.raises(ValueError, match="already loaded"):
        served.load_delta("a", setup[2]["a"])
    with pytest.raises(ValueError, match="rows"):
        served(x, delta_ids=["a"])


def test_unload_in_use_is_refused(setup):
    base, models, dirs, _ = setup
    served = _served(setup, names=("a", "b"))
    x = ids(batch=2, length=5)
    with served.route(["a", None]):
        with pytest.raises(DeltaInUseError, match="'a'"):
            served.unload_delta("a")
    # a forward running in another thread pins its deltas until it ends
    entered, release = threading.Event(), threading.Event()

    def hook(module, args):
        entered.set()
        assert release.wait(30)

    handle = served.model.model.layers[1].register_forward_pre_hook(hook)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("y", served(x, delta_ids=["b", "a"]).logits.detach()))
    t.start()
    assert entered.wait(30)
    with pytest.raises(DeltaInUseError):
        served.unload_delta("b")
    release.set()
    t.join(30)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(result["y"][0], models["b"](x[:1]).logits[0], **TOL)
    served.unload_delta("b")
    served.unload_delta("a")
    assert served.deltas() == {}
    for m in served.multi_modules().values():
        assert m.delta_ids() == {}
    with torch.no_grad():
        torch.testing.assert_close(served(x).logits, base(x).logits, **TOL)
    # a name can be loaded again; it gets a fresh id (old ids never come back)
    new = served.load_delta("a", dirs["a"])
    assert new >= 2


def test_concurrent_load_unload_while_serving(setup):
    base, models, dirs, _ = setup
    served = _served(setup, names=("a", "b"))
    x = ids(seed=5, batch=4, length=5)
    rows = ["a", "b", None, "a"]
    with torch.no_grad():
        expected = torch.stack([(models[n] if n else base)(x[i:i + 1]).logits[0] for i, n in enumerate(rows)])
    stop, errors = threading.Event(), []

    def churn(k):
        i = 0
        try:
            while not stop.is_set() and i < 6:
                name = f"churn{k}-{i}"
                served.load_delta(name, dirs["c" if k == 0 else "d"], verify="sample")
                with torch.no_grad():  # the churned delta serves correctly while loaded
                    y = served(x[:1], delta_ids=[name]).logits[0]
                torch.testing.assert_close(y, models["c" if k == 0 else "d"](x[:1]).logits[0], **TOL)
                served.unload_delta(name)
                i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            with torch.no_grad():
                out = served(x, delta_ids=rows).logits
            torch.testing.assert_close(out, expected, **TOL)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert set(served.deltas()) == {"a", "b"}


def test_per_row_tensors_are_never_swapped_on_the_shared_module(setup):
    """A delta's own tensors (here d's embedding table) reach its rows through a shallow copy of the module
    (`with_tensors`): while one thread's rows run inside the module's forward with them, another thread's
    base rows on the same module get the base table (functional_call swapped the table on the module for
    the call, so a concurrent base row got the delta's table)."""
    base, models, _, _ = setup
    served = _served(setup, names=("d",))
    emb = served.model.model.embed_tokens
    assert isinstance(emb, MultiDeltaEmbedding)
    inner, base_table = emb._inner, emb._inner.weight
    inside, release = threading.Event(), threading.Event()

    main = threading.current_thread()

    def hook(module, args):
        if module.weight is not base_table and threading.current_thread() is not main:
            inside.set()
            assert release.wait(30)

    handle = inner.register_forward_pre_hook(hook)
    x = ids(seed=3, batch=1, length=5)
    out = {}

    def delta_rows():
        with torch.no_grad():
            out["d"] = emb(x, delta_ids=[served.deltas()["d"]])

    t = threading.Thread(target=delta_rows)
    t.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            y = emb(x)
        torch.testing.assert_close(y, base.model.embed_tokens(x), rtol=0, atol=0)
    finally:
        release.set()
        t.join(30)
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(out["d"], models["d"].model.embed_tokens(x), **TOL)
        assert not torch.equal(out["d"], y)


def test_per_row_module_with_tied_tensors_replaces_every_name():
    """A per-row module holding one tensor under several names (a submodule used twice, a parameter
    registered twice): the delta's replacement, given under the one name `named_parameters` lists,
    reaches every name (functional_call's tie_weights did; the shallow copy left the alias on the base)."""

    class SharedChild(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class TiedParameter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(4))
            self.w2 = self.w1

        def forward(self, x):
            return x * self.w1 + self.w2

    torch.manual_seed(0)
    for module in (SharedChild(), TiedParameter()):
        replaced = {k: torch.randn_like(v) for k, v in module.named_parameters()}
        alone = copy.deepcopy(module)
        with torch.no_grad():
            for k, v in replaced.items():
                alone.get_parameter(k).copy_(v)
        _assert_rows_served(module, replaced, alone)


def _assert_rows_served(module, replaced, delta_model):
    """`module` as a MultiDeltaModule with `replaced` as delta 0: rows 0 and 2 (delta 0) give what
    `delta_model` gives them, row 1 (base) what `module` gives it."""
    from deltacome_ao.serving.layers import MultiDeltaModule

    layer = MultiDeltaModule(module)
    layer.add("d", dict(replaced), delta_id=0)
    x = torch.randn(3, 4)
    with torch.no_grad(), routing(torch.tensor([0, -1, 0])):
        y = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(y[[0, 2]], delta_model(x[[0, 2]]), **TOL)
        torch.testing.assert_close(y[1:2], module(x[1:2]), **TOL)


def test_per_row_parametrized_module():
    """A per-row module with a parametrization (weight_norm): its shallow copy is made without pickling
    hooks, which a parametrized module refuses (copy.copy raised RuntimeError; functional_call served it)."""
    torch.manual_seed(0)
    module = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))
    replaced = {k: torch.randn_like(v) for k, v in module.named_parameters()}
    _assert_rows_served(module, replaced, lambda x: torch.func.functional_call(module, replaced, (x,)))


def test_per_row_module_with_accelerate_hook():
    """A per-row module dispatched by accelerate (device_map: its `forward` is replaced by a partial bound to
    the module, calling the bound `_old_forward`): the delta's rows run with the delta's tensors (the
    shallow copy's forward ran the original module, so those rows silently got the base's)."""
    hooks = pytest.importorskip("accelerate.hooks")
    from deltacome_ao.serving.layers import MultiDeltaModule

    torch.manual_seed(0)
    norm, embedding = torch.nn.LayerNorm(4), torch.nn.Embedding(10, 4)
    replaced = {k: torch.randn_like(v) for k, v in norm.named_parameters()}
    table = torch.randn(10, 4)
    x, tokens = torch.randn(3, 4), torch.tensor([[1, 2], [3, 4], [5, 6]])
    with torch.no_grad():
        want = torch.func.functional_call(norm, replaced, (x[[0, 2]],))
    for module in (norm, embedding):
        hooks.add_hook_to_module(module, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    layer = MultiDeltaModule(norm)
    layer.add("d", dict(replaced), delta_id=0)
    table_layer = MultiDeltaEmbedding(embedding)
    table_layer.add("d", table, delta_id=0)
    with torch.no_grad(), routing(torch.tensor([0, -1, 0])):
        y, e = layer(x), table_layer(tokens)
    with torch.no_grad():
        torch.testing.assert_close(y[[0, 2]], want, **TOL)
        torch.testing.assert_close(y[1:2], norm(x[1:2]), **TOL)
        torch.testing.assert_close(e[[0, 2]], table[tokens[[0, 2]]], rtol=0, atol=0)
        torch.testing.assert_close(e[1], embedding.weight[tokens[1]], rtol=0, atol=0)


def test_probe_leaves_the_served_model_modes_alone(setup):
    """load_delta's probe runs the shared served model: it must not flip its train/eval modes (other
    threads may be serving at that moment; flipping them gave wrong rows under concurrent loads)."""
    base, models, dirs, _ = setup
    served = _served(setup, names=("a",))
    served.model.train()
    seen = []
    hook = served.model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        served.load_delta("probe-mode", dirs["b"], verify="sample")
    finally:
        hook.remove()
        served.model.eval()
    assert seen and all(seen)  # the probe's forward ran, in the mode the model was in


def test_any_registered_kind_is_served_per_row(setup, tmp_path):
    """A BitDelta artifact (no low-rank factors: served through its own delta term) in the same batch
    as Delta-CoMe deltas: each row equals that fine-tune's compressed model alone."""
    base = setup[0]
    bd = _compress(structured_finetune(base, seed=21), base,
                   DeltaCoMeConfig(base=base, method="bitdelta", group_size=32, progress=False))
    save_delta(bd, tmp_path / "bitdelta", base=base)
    served = _served(setup, names=("a",))
    served.load_delta("bd", tmp_path / "bitdelta")
    x = ids(seed=5, batch=3, length=9)
    with torch.no_grad():
        got = served(x, delta_ids=["bd", "a", None]).logits
        alone = bd(x).logits
        base_only = base(x).logits
    torch.testing.assert_close(got[0], alone[0], atol=2e-5 * alone.abs().max().item(), rtol=0)
    torch.testing.assert_close(got[2], base_only[2], atol=2e-5 * base_only.abs().max().item(), rtol=0)
    assert (got[0] - base_only[0]).abs().max() > 100 * 2e-5 * alone.abs().max()  # the delta does something


def test_unservable_deltas_refused_nothing_changed(setup, tmp_path):
    base = setup[0]
    served = _served(setup, names=("a",))
    before = {n: dict(m.delta_ids()) for n, m in served.multi_modules().items()}
    # a changed buffer (not a parameter) cannot be swapped per row
    ft = _compress(structured_finetune(base, seed=20), base)
    rotary = next(n for n, _ in ft.named_buffers() if n.endswith("inv_freq"))
    owner = ft.get_submodule(rotary.rpartition(".")[0])
    owner.inv_freq = owner.inv_freq * 1.01
    save_delta(ft, tmp_path / "buffer", base=base)
    if "inv_freq" in (tmp_path / "buffer" / "delta_config.json").read_text():
        with pytest.raises(UnsupportedDeltaError, match="inv_freq"):
            served.load_delta("buffer", tmp_path / "buffer")
    # another base: the artifact's own fingerprint check
    with pytest.raises(Exception, match="another base"):
        MultiDeltaModel(tiny("llama", seed=1)).load_delta("a", setup[2]["a"])
    assert served.deltas() == {"a": 0}
    assert {n: dict(m.delta_ids()) for n, m in served.multi_modules().items()} == before


def test_embedding_rows_use_own_table(setup):
    base, models, _, _ = setup
    served = _served(setup, names=("d",))
    tokens = torch.randint(0, VOCAB, (3, 4))
    emb = served.model.model.embed_tokens
    with torch.no_grad():
        y = emb(tokens, torch.tensor([served.deltas()["d"], -1, served.deltas()["d"]]))
        torch.testing.assert_close(y[0], models["d"].model.embed_tokens(tokens[:1])[0], rtol=0, atol=0)
        torch.testing.assert_close(y[1], base.model.embed_tokens(tokens[1:2])[0], rtol=0, atol=0)


def test_beam_search_rows_keep_their_delta(setup):
    base, models, _, _ = setup
    served = _served(setup, names=("a", "d"))
    x = ids(seed=6, batch=3, length=5)
    rows = ["d", None, "a"]
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        out = served.generate(x, delta_ids=rows, attention_mask=torch.ones_like(x), **kw)
        for i, n in enumerate(rows):
            ref = (models[n] if n else base).generate(x[i:i + 1], attention_mask=torch.ones_like(x[i:i + 1]), **kw)
            assert torch.equal(out[i], ref[0]), (i, n)


def test_changed_norms_are_served_per_row(setup, tmp_path):
    """A full fine-tune also moves every RMSNorm weight: those rows use the delta's norms."""
    base, models, dirs, _ = setup
    ft = _compress(finetune(base, seed=20), base).eval()
    save_delta(ft, tmp_path / "norms", base=base)
    served = _served(setup, names=("a",))
    served.load_delta("norms", tmp_path / "norms")
    norms = [n for n, m in served.multi_modules().items() if type(m).__name__ == "MultiDeltaModule"]
    assert any(n.endswith("input_layernorm") for n in norms) and any(n.endswith("model.norm") for n in norms)
    assert sorted(served.model.state_dict()) == sorted(base.state_dict())
    x = ids(seed=6, batch=4, length=9)
    with torch.no_grad():
        out = served(x, delta_ids=["norms", "a", None, "norms"]).logits
        for i, n in enumerate(["norms", "a", None, "norms"]):
            ref = {"norms": ft, "a": models["a"], None: base}[n](x[i:i + 1]).logits[0]
            torch.testing.assert_close(out[i], ref, **TOL)
    served.unload_delta("norms")
    with torch.no_grad():
        torch.testing.assert_close(served(x, delta_ids=[None] * 4).logits, base(x).logits, **TOL)


def test_embedding_subclass_with_own_arguments_is_served_per_row(tmp_path):
    """BioGPT's learned positions: forward(attention_mask, past_key_values_length, position_ids=(1, S)).
    The extra arguments reach the module's own forward (the int is not taken for a routing), batch-first
    ones are cut to each delta's rows and a shared (1, S) output is given to every row."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    from deltacome_ao.compress import compress_
    from deltacome_ao.evaluation.architectures import tiny_finetune

    config = AutoConfig.for_model("biogpt", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_config(config).eval()
    models = {}
    served = MultiDeltaModel(copy.deepcopy(base))
    for name, seed in (("a", 1), ("b", 2)):
        model = tiny_finetune(base, seed=seed)  # every parameter moved, the learned positions included
        compress_(model, DeltaCoMeConfig(base=base, progress=False))
        models[name] = model.eval()
        served.load_delta(name, save_delta(model, tmp_path / name, base=base))
    assert type(served.multi_modules()["biogpt.embed_positions"]).__name__ == "MultiDeltaEmbedding"
    rows = ["a", None, "b", "a"]
    x = ids(seed=7, batch=len(rows), length=9)
    with torch.no_grad():
        out = served(x, delta_ids=rows).logits
        for i, n in enumerate(rows):
            torch.testing.assert_close(out[i], (models[n] if n else base)(x[i:i + 1]).logits[0], **TOL)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        gen = served.generate(x, delta_ids=rows, attention_mask=torch.ones_like(x), **kw)
        for i, n in enumerate(rows):
            ref = (models[n] if n else base).generate(x[i:i + 1], attention_mask=torch.ones_like(x[i:i + 1]), **kw)
            assert torch.equal(gen[i], ref[0]), (i, n)


def _unservable_arch(kind):
    from deltacome_ao.evaluation.architectures import _COMMON, HIDDEN, VOCAB, Arch

    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt_oss":  # attention with sinks: called with keyword arguments and a KV cache
        return Arch("gpt_oss", "gpt_oss", dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                               layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                               **tokens), moe=True), "self_attn"
    if kind == "llama4_text":  # MoE block returning a tuple
        return Arch("llama4_text", "llama4_text", dict(_COMMON, head_dim=16, intermediate_size_mlp=128,
                                                       num_local_experts=4, num_experts_per_tok=1,
                                                       interleave_moe_layer_step=1, no_rope_layers=[1, 1], **tokens),
                    moe=True), "feed_forward"
    if kind == "jamba":  # the Mamba mixer: conv / SSM parameters next to projections, a cache of its own
        return Arch("jamba", "jamba", dict(_COMMON, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                                           attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                           mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, **tokens),
                    moe=True), "mamba"
    assert kind == "opt"  # the decoder flattens (B, S, H) into (B·S, H) before fc1
    return Arch("opt", "opt", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                   **tokens)), "(final_layer_norm|fc1)"


@pytest.mark.parametrize("kind", ["gpt_oss", "llama4_text", "jamba", "opt"])
def test_units_that_cannot_be_cut_by_rows_are_refused_at_load(tmp_path, kind):
    """Modules that cannot be cut by rows (gpt-oss's attention with sinks called with keyword arguments
    and a KV cache, Llama 4's MoE block returning a tuple, Jamba's Mamba mixer, OPT's fc1 on the tokens
    flattened to (B·S, H)) raised UnsupportedDeltaError / ValueError at the first forward routed to the
    delta. Now load_delta's probe forward refuses them: UnsupportedDeltaError naming the module and the
    reason, the served model left as it was (same modules, base outputs, other deltas still served)."""
    from deltacome_ao.compress import compress_
    from deltacome_ao.evaluation.architectures import inputs_for, tiny_base, tiny_finetune
    from deltacome_ao.serving import UnsupportedDeltaError

    arch, where = _unservable_arch(kind)
    base = tiny_base(arch)
    model = tiny_finetune(base)
    compress_(model, DeltaCoMeConfig(base=base, progress=False))
    path = save_delta(model, tmp_path / "ft", base=base)
    served = MultiDeltaModel(copy.deepcopy(base))
    before = [(n, type(m)) for n, m in served.model.named_modules()]
    with pytest.raises(UnsupportedDeltaError, match=rf"delta 'ft' cannot be served per row .*layers\.\d+\.\S*{where}"
                                                    rf".*: .*serve this fine-tune alone"):
        served.load_delta("ft", path)
    assert served.deltas() == {} and served.multi_modules() == {}
    assert [(n, type(m)) for n, m in served.model.named_modules()] == before
    x = inputs_for(arch, base, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(served(**x).logits, base(**x).logits, rtol=0, atol=0)
    # probe=False: registered as before; such a unit then refuses at the first forward routed to it
    served.load_delta("ft", path, probe=False)
    with torch.no_grad(), pytest.raises(ValueError):
        served(**x, delta_ids=["ft", None])


def test_probe_refuses_rows_that_differ_silently(tmp_path, monkeypatch):
    """A served row that differs from the delta's model alone (a wrong per-row path, as Gemma's embedding
    scale once was) is refused at load_delta, not served; a correct delta still loads."""
    from deltacome_ao.serving import UnsupportedDeltaError
    from deltacome_ao.serving.layers import MultiDeltaModule

    base = tiny(seed=0)
    ft = finetune(base)
    from deltacome_ao import compress_

    compress_(ft, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    path = save_delta(ft, tmp_path / "ft", base=base)
    real = MultiDeltaModule._per_row

    def wrong(self, x, args, kwargs, delta_ids):  # the norms' delta rows scaled by 1.5
        y = real(self, x, args, kwargs, delta_ids)
        return y * 1.5 if current_routing() is not None and current_routing().active() else y

    from deltacome_ao.serving.routing import current_routing

    monkeypatch.setattr(MultiDeltaModule, "_per_row", wrong)
    served = MultiDeltaModel(copy.deepcopy(base))
    with pytest.raises(UnsupportedDeltaError, match="differ from each model alone"):
        served.load_delta("ft", path)
    assert served.deltas() == {} and served.multi_modules() == {}
    monkeypatch.setattr(MultiDeltaModule, "_per_row", real)
    assert served.load_delta("ft", path) == 1
