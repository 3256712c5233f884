"""lm-eval's HFLM on the local llama-arith task must score exactly what ``task.accuracy`` does,
for the fine-tuned model and for a Delta-CoMe-compressed one; the byte tokenizer must match
``pairs.encode``/``decode`` and survive save/load."""

import copy

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig
from deltacome_ao.harness import ByteTokenizer, harness_eval, write_task
from deltacome_ao.pairs import BOS, EOS, PAD, PAIRS, decode, encode, load_pair

import lm_eval  # noqa: F401,E402  (the dev extra installs it: fail, do not skip, when it is missing)

N = 50


@pytest.fixture(scope="module")
def models():
    base, finetuned = load_pair("llama-arith")
    compressed = copy.deepcopy(finetuned)
    with torch.no_grad():
        quantize_(compressed, DeltaCoMeConfig(base=base, alpha=1 / 16, progress=False))
    return {"finetuned": finetuned, "deltacome": compressed}


@pytest.mark.parametrize("which", ["finetuned", "deltacome"])
def test_harness_accuracy_equals_task_accuracy(models, which):
    model = models[which]
    task = PAIRS["llama-arith"].task
    reference = task.accuracy(model, n=N)
    out = harness_eval(model, n=N)
    assert out["n"] == N
    assert out["accuracy"] == reference
    # same problems, in the same order, as the reference scores
    assert [(p, a) for p, a, _ in out["generations"]] == task.eval_problems(N, seed=0)
    if which == "finetuned":
        assert reference > 0.9  # the check is not vacuous


def test_tokenizer_matches_pair_encoding():
    tok = ByteTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    assert len(tok) == 259
    for text in ["56+72=", "héllo wörld\n", "a <eos> b", ""]:
        assert tok.encode(text) == encode(text, bos=True)
        assert tok.encode(text, add_special_tokens=False) == encode(text)
        ids = encode(text, bos=True, eos=True) + [PAD]
        assert tok.decode(ids, skip_special_tokens=True) == decode(ids) == text
    assert tok.decode([BOS, 53, 54, EOS, PAD]) == "<bos>56<eos><pad>"
    assert tok.decode([0xE2, 0x82]) == decode([0xE2, 0x82])  # invalid UTF-8 -> replacement char
    task = PAIRS["llama-arith"].task
    for prompt, _ in task.eval_problems(5):
        assert tok(prompt)["input_ids"] == task.encode_prompt(prompt)


def test_tokenizer_save_load(tmp_path):
    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path)
    again = ByteTokenizer.from_pretrained(tmp_path)
    text = "12+34=" + "é"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(again.encode(text), skip_special_tokens=True) == text
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id, len(again)) == (BOS, EOS, PAD, 259)


def test_write_task_files(tmp_path):
    name = write_task(tmp_path, "llama-arith", n=7, seed=3)
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    assert len(lines) == 7
    yaml_text = (tmp_path / f"{name}.yaml").read_text()
    assert "generate_until" in yaml_text and "max_gen_toks: 4" in yaml_text
