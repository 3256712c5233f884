"""A new compression method is one class + one registration line (docs/extending.md).

The toy kind below — an fp16 rank-r delta, a different tensor layout with an attribute of its own —
is defined here, in the test, and nothing in the package is edited for it. Everything a built-in
method gets must then work for it: the config, `compress_` and `quantize_`, `delta_report`,
`torch.compile`, the delta artifact, the Hugging Face checkpoint, a `weights_only` state dict,
multi-delta serving next to a Delta-CoMe delta, and the CLI.
"""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torchao import quantize_
from transformers import AutoModelForCausalLM

from deltacome_ao import (
    DeltaCoMeConfig,
    DeltaTensor,
    MultiDeltaModel,
    compress_,
    compressed_layers,
    delta_report,
    load_delta,
    save_delta,
)
from deltacome_ao.format import read_delta_config
from deltacome_ao.cli import main
from deltacome_ao.decompose import weight_delta
from deltacome_ao.hf import save_pretrained
from deltacome_ao.methods import register_method, unregister_method
from tiny_models import LAYER_NAMES, ids, structured_finetune, tiny

RANK = 4


class ToyLowRankTensor(DeltaTensor):
    """`W_base + U V` with U (out, rank) and V (rank, in) in fp16."""

    tensor_data_names = ["base_weight", "u", "v"]
    tensor_attribute_names = ["rank"]

    def __new__(cls, base_weight, u, v, rank):
        return torch.Tensor._make_wrapper_subclass(cls, base_weight.shape, dtype=base_weight.dtype,
                                                   device=base_weight.device, requires_grad=False)

    def __init__(self, base_weight, u, v, rank):
        super().__init__()
        self.base_weight, self.u, self.v, self.rank = base_weight, u, v, int(rank)

    @classmethod
    def delta_layout(cls, shape, attributes):
        out_features, in_features = shape
        r = attributes["rank"]
        return {"u": ((out_features, r), torch.float16), "v": ((r, in_features), torch.float16)}

    @classmethod
    def check_attributes(cls, attributes):
        r = attributes["rank"]
        return None if isinstance(r, int) and r >= 1 else f"rank must be a positive integer, got {r!r}"

    def delta_weight(self):
        return self.u.float() @ self.v.float()

    def delta_term(self, x):
        return (x.float() @ self.v.float().T) @ self.u.float().T

    def describe(self):
        return f"fp16 rank {self.rank}"


def compress_toy(finetuned, base, config, *, name="weight", hessian=None):
    u, s, vh = torch.linalg.svd(weight_delta(finetuned, base, name), full_matrices=False)
    return ToyLowRankTensor(base.detach().clone(), (u[:, :RANK] * s[:RANK]).half(), vh[:RANK].half(), RANK)


register_method("toy_lowrank", ToyLowRankTensor, compress_toy, description="fp16 rank-4 delta (test)")
ToyLowRankTensor.__module__ = __name__
torch.serialization.add_safe_globals([ToyLowRankTensor])


@pytest.fixture(scope="module")
def pair():
    base = tiny("llama", seed=0)
    return base, structured_finetune(base, seed=30, rank=RANK)


def toy_config(base):
    return DeltaCoMeConfig(base=base, method="toy_lowrank", group_size=32, progress=False)


@torch.no_grad()
def logits(model, x=None):
    return model(ids(seed=6, batch=3, length=9) if x is None else x).logits


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def toy(pair):
    base, ft = pair
    return compress_(copy.deepcopy(ft), toy_config(base))


def test_compress_report_and_quantize_shortcut(pair, toy):
    base, ft = pair
    assert all(type(toy.get_submodule(n).weight) is ToyLowRankTensor for n in LAYER_NAMES)
    rows = delta_report(toy)
    assert {r["structure"] for r in rows} == {"fp16 rank 4"} and {r["tensor"] for r in rows} == {"ToyLowRankTensor"}
    assert all(r["bands"] is None for r in rows)
    # the fine-tune is rank 4 on every projection: the toy kind recovers it up to fp16 rounding
    assert rel(logits(toy), logits(ft)) < 1e-3 < rel(logits(base), logits(ft))
    via_quantize = copy.deepcopy(ft)
    quantize_(via_quantize, toy_config(base))
    assert torch.equal(logits(via_quantize), logits(toy))


def test_compile_matches_eager(toy):
    x = ids(seed=6, batch=3, length=9)
    torch.testing.assert_close(logits(torch.compile(toy, fullgraph=True), x), logits(toy, x), rtol=1e-4, atol=1e-5)


def test_artifact_round_trip(pair, toy, tmp_path):
    base, _ = pair
    save_delta(toy, tmp_path / "toy", base=base, config=toy_config(base))
    loaded = load_delta(copy.deepcopy(base), tmp_path / "toy")
    assert torch.equal(logits(loaded), logits(toy))
    assert all(type(loaded.get_submodule(n).weight) is ToyLowRankTensor for n in LAYER_NAMES)


def test_state_dict_weights_only_round_trip(pair, toy, tmp_path):
    torch.save(toy.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    w = sd[f"{LAYER_NAMES[0]}.weight"]
    assert type(w) is ToyLowRankTensor and w.rank == RANK


def test_hugging_face_round_trip(toy, tmp_path):
    save_pretrained(copy.deepcopy(toy), tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(reloaded.get_submodule(LAYER_NAMES[0]).weight) is ToyLowRankTensor
    assert torch.equal(logits(reloaded), logits(toy))


def test_served_per_row_next_to_a_deltacome_delta(pair, toy, tmp_path):
    base, ft = pair
    save_delta(toy, tmp_path / "toy", base=base)
    dc = compress_(copy.deepcopy(ft), DeltaCoMeConfig(base=base, group_size=32, progress=False))
    save_delta(dc, tmp_path / "dc", base=base)
    served = MultiDeltaModel(copy.deepcopy(base))
    served.load_delta("toy", tmp_path / "toy")
    served.load_delta("dc", tmp_path / "dc")
    x = ids(seed=6, batch=3, length=9)
    with torch.no_grad():
        got = served(x, delta_ids=["toy", "dc", None]).logits
    for row, model in enumerate((toy, dc, base)):
        want = logits(model, x)[row]
        torch.testing.assert_close(got[row], want, atol=2e-5 * want.abs().max().item(), rtol=0)


def test_cli_offers_and_inspects_the_method(pair, tmp_path):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    runner = CliRunner()
    r = runner.invoke(main, ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "d"),
                             "--method", "toy_lowrank", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert r.output.count("fp16 rank 4") == len(LAYER_NAMES)
    r = runner.invoke(main, ["compress", "--help"])
    assert "toy_lowrank" in r.output


IN_TREE_METHOD = '''
"""A method shipped in the package: this file is the whole change."""
import torch

from ..decompose import weight_delta
from ..delta_tensor import DeltaTensor
from . import register_method


class SignOnlyDeltaTensor(DeltaTensor):
    tensor_data_names = ["base_weight", "signs", "scale"]
    tensor_attribute_names = []

    def __new__(cls, base_weight, signs, scale):
        return torch.Tensor._make_wrapper_subclass(cls, base_weight.shape, dtype=base_weight.dtype,
                                                   device=base_weight.device, requires_grad=False)

    def __init__(self, base_weight, signs, scale):
        super().__init__()
        self.base_weight, self.signs, self.scale = base_weight, signs, scale

    @classmethod
    def delta_layout(cls, shape, attributes):
        return {"signs": (tuple(shape), torch.int8), "scale": ((shape[0], 1), torch.float32)}

    def delta_weight(self):
        return self.signs.float() * self.scale

    def delta_term(self, x):
        return x.float() @ self.delta_weight().T


def compress(finetuned, base, config, *, name="weight", hessian=None):
    d = weight_delta(finetuned, base, name)
    return SignOnlyDeltaTensor(base.detach().clone(), torch.sign(d).to(torch.int8), d.abs().mean(1, keepdim=True))


register_method("sign_rows", SignOnlyDeltaTensor, compress, description="sign + per-row scale")
torch.serialization.add_safe_globals([SignOnlyDeltaTensor])
'''


def test_a_method_file_dropped_into_the_package_is_all_it_takes(tmp_path):
    """Copy the package, add one file to deltacome_ao/methods/, change nothing else: the method is
    registered, offered by the CLI, and its weights survive a weights_only state dict."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "deltacome_ao", tmp_path / "deltacome_ao", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "deltacome_ao" / "methods" / "sign_rows.py").write_text(IN_TREE_METHOD)
    # a method file whose optional dependency is missing costs only its own methods
    (tmp_path / "deltacome_ao" / "methods" / "needs_extra.py").write_text("import no_such_optional_dependency\n")
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests_dir')\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import deltacome_ao.methods\n"
        "assert any('needs_extra.py could not be imported' in str(w.message) for w in caught), caught\n"
        "import deltacome_ao\n"
        "assert deltacome_ao.__file__.startswith(sys.argv[1]), deltacome_ao.__file__\n"
        "from deltacome_ao import DeltaCoMeConfig, compress_, method_names\n"
        "from tiny_models import tiny, finetune, ids\n"
        "assert 'sign_rows' in method_names(), method_names()\n"
        "base = tiny('llama'); ft = finetune(base)\n"
        "m = compress_(ft, DeltaCoMeConfig(base=base, method='sign_rows', progress=False))\n"
        "torch.save(m.state_dict(), sys.argv[1] + '/sd.pt')\n"
        "sd = torch.load(sys.argv[1] + '/sd.pt', weights_only=True)\n"
        "w = sd['model.layers.0.mlp.up_proj.weight']\n"
        "assert type(w).__name__ == 'SignOnlyDeltaTensor' and type(w).__module__ == 'deltacome_ao.methods.sign_rows'\n"
        "from click.testing import CliRunner\n"
        "from deltacome_ao.cli import main\n"
        "assert 'sign_rows' in CliRunner().invoke(main, ['compress', '--help']).output\n"
        "print('ok')\n"
    ).replace("tests_dir", str(repo / "tests"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_registration_is_checked():
    def compress(finetuned, base, config, *, name="weight", hessian=None):
        return None

    with pytest.raises(ValueError, match="identifiers"):
        register_method("no spaces", ToyLowRankTensor, compress_toy)
    with pytest.raises(TypeError, match="DeltaTensor subclass"):
        register_method("plain", torch.Tensor, compress_toy)
    with pytest.raises(TypeError, match="DeltaTensor subclass"):
        register_method("base_class", DeltaTensor, compress_toy)
    with pytest.raises(TypeError, match="compress must be callable"):
        register_method("not_callable", ToyLowRankTensor, 42)
    with pytest.raises(ValueError, match=r"allocations must be a non-empty tuple from \('paper', 'optimal', 'global'\)"):
        register_method("one_string", ToyLowRankTensor, compress_toy, allocations="optimal")
    with pytest.raises(TypeError, match="calibrated must be True or False"):
        register_method("truthy", ToyLowRankTensor, compress_toy, calibrated="no")
    with pytest.raises(ValueError, match="'deltacome' is already registered"):
        register_method("deltacome", ToyLowRankTensor, compress)
    with pytest.raises(ValueError, match="'toy_lowrank' is already registered"):
        register_method("toy_lowrank", ToyLowRankTensor, compress)  # same class, another compress function

    class Incomplete(DeltaTensor):
        tensor_data_names = ["base_weight", "x"]
        tensor_attribute_names = []

    with pytest.raises(TypeError, match=r"must define \['delta_layout', 'delta_term', 'delta_weight'\]"):
        register_method("incomplete", Incomplete, compress)

    class BaseNotFirst(ToyLowRankTensor):
        tensor_data_names = ["u", "base_weight", "v"]

    with pytest.raises(TypeError, match=r"tensor_data_names \['base_weight'"):
        register_method("base_not_first", BaseNotFirst, compress)


class LyingLayoutTensor(ToyLowRankTensor):
    """Says its u is (out, rank + 1): the readers would refuse every artifact it writes."""

    @classmethod
    def delta_layout(cls, shape, attributes):
        layout = super().delta_layout(shape, attributes)
        (out_features, r), dtype = layout["u"]
        return {**layout, "u": ((out_features, r + 1), dtype)}


def compress_lying(finetuned, base, config, *, name="weight", hessian=None):
    t = compress_toy(finetuned, base, config, name=name)
    return LyingLayoutTensor(t.base_weight, t.u, t.v, t.rank)


@pytest.fixture
def registered():
    """Register methods for one test only."""
    names = []

    def register(name, *args, **kwargs):
        names.append(register_method(name, *args, **kwargs).name)

    yield register
    for name in names:
        unregister_method(name)


def test_a_kind_whose_layout_lies_fails_at_compress_time(pair, registered):
    base, ft = pair
    registered("toy_lying", LyingLayoutTensor, compress_lying)
    model = copy.deepcopy(ft)
    with pytest.raises(TypeError, match=r"method 'toy_lying', model\.layers\.0\.\S+: the compressed weight does not "
                                        r"match LyingLayoutTensor\.delta_layout"):
        compress_(model, DeltaCoMeConfig(base=base, method="toy_lying", progress=False))
    assert torch.equal(logits(model), logits(ft))  # nothing changed


def test_a_method_with_settings_of_its_own(pair, tmp_path, registered):
    base, ft = pair

    def compress_rank(finetuned, base, config, *, name="weight", hessian=None):
        r = config.method_options["rank"]
        u, s, vh = torch.linalg.svd(weight_delta(finetuned, base, name), full_matrices=False)
        return ToyLowRankTensor(base.detach().clone(), (u[:, :r] * s[:r]).half(), vh[:r].half(), r)

    registered("toy_rank", ToyLowRankTensor, compress_rank, options={"rank": 2})
    assert DeltaCoMeConfig(base=base, method="toy_rank").method_options == {"rank": 2}
    with pytest.raises(ValueError, match=r"method_options: method 'toy_rank' has no option\(s\) \['rnak'\]; its options: \['rank'\]"):
        DeltaCoMeConfig(base=base, method="toy_rank", method_options={"rnak": 3})
    with pytest.raises(ValueError, match=r"method_options: method 'deltacome' has no option\(s\) \['rank'\]; its options: none"):
        DeltaCoMeConfig(base=base, method_options={"rank": 3})
    config = DeltaCoMeConfig(base=base, method="toy_rank", method_options={"rank": 3}, progress=False)
    model = compress_(copy.deepcopy(ft), config)
    assert {w.rank for w in compressed_layers(model).values()} == {3}
    save_delta(model, tmp_path / "d", base=base, config=config)
    assert read_delta_config(tmp_path / "d")["method_options"] == {"rank": 3}
    (tmp_path / "b").mkdir(), (tmp_path / "f").mkdir()  # never read: the option is refused first
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "b"), str(tmp_path / "f"), str(tmp_path / "c"),
                                  "--method", "toy_rank", "--method-option", "rnak=3"])
    assert r.exit_code == 2 and "no option(s) ['rnak']" in r.output  # refused before any model is loaded
