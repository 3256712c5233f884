"""Three real fine-tunes of one base (the zoo's llama-arith, llama-code, llama-json), compressed,
saved as delta artifacts and served together: every row of a mixed batch is answered by its own
fine-tune — same tokens as that compressed model alone, and the task actually solved."""

from __future__ import annotations

import copy

import pytest
import torch
from torchao import quantize_

from deltacome_ao import DeltaCoMeConfig, MultiDeltaModel, save_delta
from deltacome_ao.pairs import PAD, PAIRS, decode, load_pair

NAMES = ("llama-arith", "llama-code", "llama-json")
PER_TASK = 12


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("zoo")
    base = load_pair(NAMES[0])[0]
    models, dirs = {}, {}
    for name in NAMES:
        pair_base, ft = load_pair(name)
        for p, q in zip(pair_base.parameters(), base.parameters()):
            assert torch.equal(p, q), f"{name} is not a fine-tune of {NAMES[0]}'s base"
        quantize_(ft, DeltaCoMeConfig(base=base, alpha=1 / 16, progress=False))
        models[name] = ft.eval()
        dirs[name] = save_delta(ft, root / name, base=base)
    return base, models, dirs


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_three_real_deltas_in_one_batch(zoo):
    base, models, dirs = zoo
    served = MultiDeltaModel(copy.deepcopy(base))
    for name in NAMES:
        served.load_delta(name, dirs[name])
    # Interleave the three tasks' held-out prompts, plus base-only rows.
    rows, routes, answers = [], [], []
    problems = {n: PAIRS[n].task.eval_problems(PER_TASK, seed=5) for n in NAMES}
    for i in range(PER_TASK):
        for name in NAMES:
            prompt, answer = problems[name][i]
            rows.append(PAIRS[name].task.encode_prompt(prompt))
            routes.append(name)
            answers.append(answer)
    rows += [PAIRS[n].task.encode_prompt(problems[n][0][0]) for n in NAMES]
    routes += [None] * len(NAMES)
    ids, mask = _left_padded(rows)
    new = max(PAIRS[n].task.answer_len for n in NAMES) + 1
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        out = served.generate(ids, delta_ids=routes, attention_mask=mask, **kw)
        for i, name in enumerate(routes):
            alone = (models[name] if name else base).generate(ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
            n = alone.shape[1]  # alone stops at its EOS; in the batch the row is padded after it
            assert torch.equal(out[i, :n], alone[0]), (i, name, out[i].tolist(), alone[0].tolist())
            assert (out[i, n:] == PAD).all()
    got = [decode(r[ids.shape[1]:].tolist()) for r in out]
    for name in NAMES:
        right = sum(g == a for g, a, r in zip(got, answers, routes) if r == name)
        assert right >= 0.75 * PER_TASK, (name, right)
    # The base alone solves none of them: the answers come from the deltas.
    for name, g in zip(NAMES, got[-len(NAMES):]):
        assert g != problems[name][0][1]


def test_three_real_deltas_logits_match(zoo):
    base, models, dirs = zoo
    served = MultiDeltaModel(copy.deepcopy(base))
    for name in NAMES:
        served.load_delta(name, dirs[name])
    length = min(PAIRS[n].task.text_batches("task")[0].shape[1] for n in NAMES)
    x = torch.cat([PAIRS[n].task.text_batches("task")[0][:3, :length] for n in NAMES])
    routes = [n for n in NAMES for _ in range(3)]
    with torch.no_grad():
        out = served(x, delta_ids=routes).logits
        for i, name in enumerate(routes):
            torch.testing.assert_close(out[i], models[name](x[i:i + 1]).logits[0], rtol=1e-4, atol=1e-4)
        # and the three deltas really differ on the same input
        same = x[:1].expand(3, -1)
        logits = served(same, delta_ids=list(NAMES)).logits
        assert (logits[0] - logits[1]).abs().max() > 0.1 and (logits[1] - logits[2]).abs().max() > 0.1
