"""LoRA on the image-prefix transformer (shared/models/lm.py) through peft."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.lm import (
    LMConfig,
    add_lora,
    build_lm,
    load_adapter,
    lora_param_count,
    merge,
    save_adapter,
)
from shared.models.registry import create_model

CFG = LMConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, mlp_ratio=2, max_len=16, encoder_channels=(8, 16),
               prefix_tokens=4)
TARGETS = ("q_proj", "v_proj", "up_proj", "projector")
R = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 64, 64, generator=g), torch.randint(0, CFG.vocab_size, (3, 10), generator=g)


def _train(model: torch.nn.Module, steps: int = 5) -> None:
    images, ids = _inputs(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        logits = model(images, ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture
def tuned():
    """(LoRA model trained a few steps, base weights before wrapping)."""
    base = build_lm(CFG, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, TARGETS, r=R)
    _train(model)
    return model, before


def test_base_builds_from_a_config_and_the_registry():
    images, ids = _inputs()
    assert build_lm(CFG)(images, ids).shape == (3, 10, CFG.vocab_size)
    model = create_model("cad_prefix_lm", vocab_size=50, dim=16, n_heads=2, max_len=8)
    assert model(images, ids[:, :8] % 50).shape == (3, 8, 50)
    with pytest.raises(InvalidArgument):
        build_lm({"dim": 30, "n_heads": 4})
    with pytest.raises(InvalidArgument):
        build_lm({"no_such_field": 1})


def test_only_the_adapters_train_and_their_count_is_the_lora_formula():
    base = build_lm(CFG, seed=0)
    d, hidden, enc_out = CFG.dim, CFG.mlp_ratio * CFG.dim, CFG.encoder_channels[-1]
    # r * (in + out) per targeted Linear: q, v (d -> d) and up (d -> hidden) in each layer, and the projector.
    formula = R * (CFG.n_layers * ((d + d) + (d + d) + (d + hidden)) + (enc_out + d))
    assert lora_param_count(base, TARGETS, R) == formula
    model = add_lora(base, TARGETS, r=R)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == formula
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_base_weights_stay_bitwise_unchanged_while_the_adapters_move(tuned):
    model, before = tuned
    after = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved, so the adapter is live


def test_merged_and_unmerged_outputs_agree(tuned):
    model, before = tuned
    images, ids = _inputs(2)
    model.eval()
    with torch.no_grad():
        unmerged = model(images, ids)
        plain = build_lm(CFG, seed=0).eval()(images, ids)
        merged_model = merge(model)
        merged = merged_model(images, ids)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    assert (unmerged - plain).abs().max() > 1e-3  # the adapter changes the outputs ...
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)  # ... and merging keeps the change


def test_saved_adapter_loads_onto_a_fresh_base_and_reproduces_outputs(tuned, tmp_path):
    model, before = tuned
    images, ids = _inputs(3)
    model.eval()
    with torch.no_grad():
        expected = model(images, ids)
    save_adapter(model, tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert sum(v.numel() for v in weights.values()) == lora_param_count(build_lm(CFG), TARGETS, R)

    fresh = build_lm(CFG)  # another random init, then the base weights: a fresh copy of the base
    fresh.load_state_dict(before)
    loaded = load_adapter(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids), expected, atol=1e-6, rtol=0)


def test_adapter_refuses_another_base(tuned, tmp_path):
    model, _ = tuned
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(FailedPrecondition):
        load_adapter(build_lm(CFG, seed=1), tmp_path / "adapter")


def test_unknown_target_modules_are_rejected():
    with pytest.raises(InvalidArgument):
        add_lora(build_lm(CFG), ("no_such_layer",), r=2)
