"""LLaVA on a tiny, really fine-tuned LlavaForConditionalGeneration (transformers 5.23 names:
`model.language_model.layers.N...`, `model.vision_tower.encoder.layers.N...`, `model.multi_modal_projector...`):
by default every matmul weight is compressed (vision tower and projector included); the paper's
language-only choice is the recipe `LLAVA_LANGUAGE_ONLY`."""

import copy

import pytest
import torch
from torchao import quantize_
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from deltacome_ao import DeltaCoMeConfig, MixedPrecisionDeltaTensor
from deltacome_ao.artifact import compressed_layers
from deltacome_ao.recipes import recipe_for
from deltacome_ao.recipes.llava import LLAVA_LANGUAGE_ONLY

IMAGE_TOKEN, VOCAB, PATCHES = 127, 128, 16  # 32x32 image, 8x8 patches


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=PATCHES, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def batch(n: int, gen: torch.Generator) -> dict:
    """`n` rows of [16 image tokens, 12 text tokens] with their images."""
    text = torch.randint(0, 100, (n, 12), generator=gen)
    ids = torch.cat([torch.full((n, PATCHES), IMAGE_TOKEN), text], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(n, 3, 32, 32, generator=gen)}


@pytest.fixture(scope="module")
def pair():
    base = tiny_llava()
    ft = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(ft.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):  # a real (tiny) fine-tune: every module gets a gradient delta
        inputs = batch(4, gen)
        labels = inputs["input_ids"].clone()
        labels[labels == IMAGE_TOKEN] = -100
        loss = ft(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, ft.eval()


def test_names_match_the_recipe(pair):
    base, _ = pair
    assert base.config.model_type == "llava"
    assert recipe_for("llava").name == "generic"  # no exception registered: every matmul weight
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = {n for n in names if LLAVA_LANGUAGE_ONLY.selects(n)}
    expected = {n for n in names if n.startswith("model.language_model.layers.")}
    assert chosen == expected and len(chosen) == 14
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in names)  # skipped despite q_proj


def test_default_compresses_every_matmul_weight(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    with torch.no_grad():
        quantize_(model, DeltaCoMeConfig(base=base, group_size=32, progress=False))
    layers = compressed_layers(model)
    assert set(layers) == {n for n, m in ft.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert any(n.startswith("model.vision_tower.") for n in layers)
    assert any(n.startswith("model.multi_modal_projector.") for n in layers)
    gen = torch.Generator().manual_seed(7)
    inputs = batch(2, gen)
    with torch.no_grad():
        ref, base_logits, got = ft(**inputs).logits, base(**inputs).logits, model(**inputs).logits
    assert (got - ref).norm() / (base_logits - ref).norm() < 0.2


def test_only_language_projections_compressed(pair):
    base, ft = pair
    model = copy.deepcopy(ft)
    moved = {n for n, p in ft.named_parameters() if not torch.equal(p, base.state_dict()[n])}
    assert any("vision_tower" in n for n in moved) and any("multi_modal_projector" in n for n in moved)
    with torch.no_grad():
        quantize_(model, DeltaCoMeConfig(base=base, group_size=32, progress=False, recipe=LLAVA_LANGUAGE_ONLY))

    layers = compressed_layers(model)
    assert set(layers) == {n for n, m in ft.named_modules()
                           if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.layers.")}
    assert all(isinstance(w, MixedPrecisionDeltaTensor) for w in layers.values())
    ft_state = ft.state_dict()
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") in layers:
            continue
        assert torch.equal(tensor, ft_state[name]), name  # vision tower, projector, norms, embeddings, lm_head
    assert any(n.startswith("model.vision_tower.") for n in model.state_dict())

    gen = torch.Generator().manual_seed(7)
    inputs = batch(2, gen)
    with torch.no_grad():
        ref, base_logits, got = ft(**inputs).logits, base(**inputs).logits, model(**inputs).logits
    err = (got - ref).norm() / (base_logits - ref).norm()
    assert err < 0.2, float(err)  # much closer to the fine-tune than the base is
    torch.testing.assert_close(got.softmax(-1), ref.softmax(-1), atol=0.05, rtol=0)
