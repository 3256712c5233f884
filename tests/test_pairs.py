"""The shipped base/fine-tuned pair is real: it loads, the fine-tune learned its task,
and the metrics behave (KL is zero against itself, positive across the pair)."""

import dataclasses
import json
import math

import pytest
import torch

from deltacome_ao.evaluate import exact_match_accuracy, kl_divergence, perplexity
from deltacome_ao.pairs import BOS, EOS, PAIRS, REPO, decode, encode, get_pair, load_pair

NAME = "llama-arith"
TASK = PAIRS[NAME].task


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(2)
    return load_pair(NAME)


def test_tokenization_round_trips():
    text = "def f(x):\n    return x + 1  # héllo ✓"
    ids = encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert max(ids[1:-1]) < 256
    assert decode(ids) == text
    assert decode(encode("12+34=") + encode("046", eos=True) + [65]) == "12+34=046"


def test_shipped_pair_is_used_and_fp32():
    base_dir, ft_dir = get_pair(NAME)
    assert base_dir == REPO / "assets" / "pairs" / NAME / "base"
    assert (ft_dir / "model.safetensors").is_file()
    meta = json.loads((ft_dir / "pair.json").read_text())
    assert meta["spec"]["name"] == NAME
    assert meta["accuracy_200_heldout"]["finetuned"] >= 0.9


def test_pair_shapes(pair):
    base, ft = pair
    cfg = ft.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.intermediate_size % 128 != 0 and cfg.hidden_size >= 192
    assert not cfg.tie_word_embeddings
    for (name, pb), pf in zip(base.named_parameters(), ft.parameters()):
        assert pb.dtype == pf.dtype == torch.float32
        assert not torch.equal(pb, pf), f"{name} was not fine-tuned"


def test_eval_problems_are_held_out():
    train = {TASK.format(a, b) for a, b in TASK.train_items()}
    problems = TASK.eval_problems(200, seed=3)
    assert len(set(problems)) == 200 and not train & set(problems)
    assert problems == TASK.eval_problems(200, seed=3)


def test_finetuned_learned_the_task(pair):
    base, ft = pair
    problems = TASK.eval_problems(50, seed=1)
    prompts, answers = [p for p, _ in problems], [a for _, a in problems]
    acc = {
        name: exact_match_accuracy(m, prompts, answers, TASK.encode_prompt, decode, TASK.answer_len + 1)
        for name, m in (("base", base), ("ft", ft))
    }
    assert acc["ft"] >= 0.8
    assert acc["base"] <= 0.1


def test_kl_and_perplexity(pair):
    base, ft = pair
    task = TASK.text_batches("task", n_batches=2, batch_size=8)
    python = TASK.text_batches("python", n_batches=2, batch_size=4, seq_len=64)
    assert kl_divergence(ft, ft, task) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(base, ft, task) > 0.1
    assert kl_divergence(base, ft, python) > 0
    for model in (base, ft):
        for batches in (task, python):
            assert math.isfinite(perplexity(model, batches))
    assert perplexity(ft, task) < perplexity(base, task)


def test_get_pair_builds_into_cache_then_reuses_it(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        PAIRS[NAME], name="tiny", pretrain_steps=2, pretrain_seq_len=32, finetune_steps=2,
        model=dict(PAIRS[NAME].model, num_hidden_layers=1),
    )
    monkeypatch.setitem(PAIRS, "tiny", tiny)
    monkeypatch.setenv("DELTACOME_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pair 'tiny' is neither shipped .* nor cached .*pairs build --name tiny"):
        get_pair("tiny")  # never trains silently
    assert not (tmp_path / "pairs").exists()
    base_dir, ft_dir = get_pair("tiny", build=True)
    assert base_dir == tmp_path / "pairs" / "tiny" / "base"
    meta = json.loads((ft_dir / "pair.json").read_text())
    assert meta["role"] == "finetuned" and meta["spec"]["finetune_steps"] == 2
    stamp = (ft_dir / "model.safetensors").stat().st_mtime_ns
    assert get_pair("tiny") == (base_dir, ft_dir)
    assert (ft_dir / "model.safetensors").stat().st_mtime_ns == stamp
    get_pair("tiny", rebuild=True)
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["tiny"]
