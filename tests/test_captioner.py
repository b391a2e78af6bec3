"""cad_captioner: parameter count, shapes, loss, greedy and beam generation, and a tiny overfit run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.errors import InvalidArgument
from shared.models.captioner import IGNORE_INDEX, CadCaptioner, preprocess_images
from shared.models.registry import create_model
from shared.models.summary import count_params

VOCAB, BOS, EOS, PAD, SEP = 64, 1, 2, 0, 3
LR = 5e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kwargs) -> CadCaptioner:
    torch.manual_seed(seed)
    kwargs.setdefault("vocab_size", VOCAB)
    return create_model("cad_captioner", **kwargs)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return preprocess_images(torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8, generator=g))


def test_default_parameter_count_is_in_range_and_exact():
    model = create_model("cad_captioner")
    assert count_params(model) == 657_432
    assert 600_000 <= count_params(model) <= 700_000


def test_preprocess_downsamples_and_normalises():
    white = torch.full((2, 3, 512, 512), 255, dtype=torch.uint8)
    x = preprocess_images(white)
    assert x.shape == (2, 3, 64, 64) and torch.allclose(x, torch.ones_like(x))
    assert preprocess_images(torch.zeros(3, 64, 64, dtype=torch.uint8)).min() == -1
    with pytest.raises(InvalidArgument):
        preprocess_images(torch.zeros(1, 3, 64, 64))


def test_forward_shapes_and_image_size_check():
    model = _model()
    ids = torch.randint(0, VOCAB, (3, 17))
    assert model(_images(3), ids).shape == (3, 17, VOCAB)
    with pytest.raises(InvalidArgument):
        model(torch.zeros(3, 3, 96, 96), ids)


def test_attention_reads_the_chosen_encoder_stage():
    model = _model(attn_stage=2).eval()  # the 8x8 map
    state = model.encode_images(_images(2))
    assert state["keys"].shape == (2, 64, 64) and state["values"].shape == (2, 64, 64)
    assert model(_images(2)).shape == (2, 1, VOCAB)
    with pytest.raises(InvalidArgument, match="attn_stage"):
        _model(attn_stage=4)


def test_loss_equals_shifted_cross_entropy_of_forward():
    model = _model().eval()
    images, ids = _images(2), torch.randint(4, VOCAB, (2, 12))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the instruction
    labels[1, 9:] = IGNORE_INDEX  # padding of the shorter row
    logits = model(images, ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(images, ids, labels), expected)


def test_the_image_changes_the_prediction():
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (1, 8)).repeat(2, 1)
    logits = model(_images(2), ids)
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_yields_valid_ids_and_stops_at_eos(num_beams):
    model = _model()
    images = _images(3)
    out = model.generate(images, max_new_tokens=6, bos_id=BOS, eos_id=EOS, num_beams=num_beams, pad_id=PAD)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 6
    assert out.min() >= 0 and out.max() < VOCAB
    assert model.training  # generation restores the training mode
    with torch.no_grad():
        model.out.bias[EOS] = 1e4  # EOS wins at every step
    out = model.generate(images, max_new_tokens=6, bos_id=BOS, eos_id=EOS, num_beams=num_beams, pad_id=PAD)
    assert out.tolist() == [[EOS]] * 3


def _overfit(model: CadCaptioner, steps: int = 300) -> tuple[float, float, torch.Tensor, list[list[int]]]:
    """Teach 4 images 4 different answers; returns (first loss, last loss, images, prompts). Noise images look
    alike to the encoder (mean and max pooled, beside coordinate channels): it tells these four apart after ~200
    steps."""
    torch.manual_seed(0)
    images = _images(4, seed=1)
    prompt = [BOS, 4, SEP]
    answers = [[10 + i, 20 + i, 30 + i, 40 + (i % 2), 50, EOS] for i in range(4)]
    ids = torch.tensor([prompt + a for a in answers])
    labels = ids.clone()
    labels[:, :len(prompt)] = IGNORE_INDEX
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        loss = model.loss(images, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1], images, [prompt] * 4


@pytest.fixture(scope="module")
def overfit() -> tuple[CadCaptioner, float, float, torch.Tensor, list[list[int]]]:
    model = _model(dropout=0.0)
    first, last, images, prompts = _overfit(model)
    return model, first, last, images, prompts


def test_tiny_overfit_reduces_the_loss(overfit):
    _, first, last, _, _ = overfit
    assert last < 0.2 * first


def test_overfit_model_generates_its_answers_and_stops(overfit):
    model, _, _, images, prompts = overfit
    out = model.generate(images, max_new_tokens=10, bos_id=BOS, eos_id=EOS, prompts=prompts, pad_id=PAD)
    for i, row in enumerate(out.tolist()):
        assert row[:6] == [10 + i, 20 + i, 30 + i, 40 + (i % 2), 50, EOS]
        assert all(t == PAD for t in row[6:])  # nothing but padding after EOS


def test_beam_search_with_one_beam_equals_greedy(overfit):
    model, _, _, images, prompts = overfit
    kwargs = dict(max_new_tokens=10, bos_id=BOS, eos_id=EOS, prompts=prompts, pad_id=PAD)
    greedy = model.generate(images, num_beams=1, **kwargs)
    assert torch.equal(model.beam_search(images, num_beams=1, **kwargs), greedy)
    # An untrained model wanders and does not stop within the budget: the unfinished path must match too.
    fresh = _model(seed=3)
    kwargs["max_new_tokens"] = 7
    assert torch.equal(fresh.beam_search(images, num_beams=1, **kwargs), fresh.generate(images, **kwargs))


def test_beam_search_finds_the_overfit_answers(overfit):
    model, _, _, images, prompts = overfit
    out = model.generate(images, max_new_tokens=10, bos_id=BOS, eos_id=EOS, prompts=prompts, pad_id=PAD,
                         num_beams=3)
    assert [row[:6] for row in out.tolist()] == [[10 + i, 20 + i, 30 + i, 40 + (i % 2), 50, EOS] for i in range(4)]


def test_prompts_must_match_the_images():
    with pytest.raises(InvalidArgument):
        _model().generate(_images(2), max_new_tokens=3, prompts=[[BOS]])


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_generation_matches_one_sample_at_a_time(num_beams):
    model = _model(seed=5)
    images = _images(3, seed=2)
    prompts = [[BOS, 4, SEP], [BOS, 4, 7, 8, 9, SEP], [BOS, SEP]]  # different lengths: the batch pads them
    kwargs = dict(max_new_tokens=5, bos_id=BOS, eos_id=EOS, pad_id=PAD, num_beams=num_beams)
    batched = model.generate(images, prompts=prompts, **kwargs)
    for i in range(3):
        alone = model.generate(images[i:i + 1], prompts=prompts[i:i + 1], **kwargs)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()
