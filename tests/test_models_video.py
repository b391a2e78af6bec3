"""Trajectory-video models: input preparation, registry, sizes and cost, the output contract, gradients, batch
independence, camera fusion."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import video as tv_video

from shared.benchmark.flops import count_flops
from shared.errors import InvalidArgument
from shared.models.registry import create_model, list_models
from shared.models.video import TRAJ_PIXEL_MEAN, TRAJ_PIXEL_STD, prepare_clips

EXTRACTORS = ["traj_i3d", "traj_slowfast", "traj_transformer", "traj_magvit"]
BASELINES = {"traj_r3d_18": tv_video.r3d_18, "traj_r2plus1d_18": tv_video.r2plus1d_18}
CLIP = (4, 32, 3, 64, 64)  # the dataset's uint8 sample: cameras, frames, channels, height, width
INPUT = (4, 3, 16, 32, 32)  # what the models see by default: channels first, every 2nd frame and pixel
# The torchvision baselines are full-size ResNets: a short, small clip keeps their tests fast.
SMALL = {"frames": 16, "image_size": 32}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _videos(batch: int, shape: tuple[int, ...] = CLIP) -> torch.Tensor:
    return torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- input preparation


def test_prepare_clips_subsamples_then_normalises():
    videos = _videos(2)
    x = prepare_clips(videos)
    assert x.dtype == torch.float32 and x.shape == (2, *INPUT)
    # Frames 1, 3, ..., 31 (the last one is kept) and the top-left pixel of every 2x2 block, channels first.
    kept = videos[:, :, 1::2, :, ::2, ::2].permute(0, 1, 3, 2, 4, 5).double() / 255
    mean = torch.tensor(TRAJ_PIXEL_MEAN, dtype=torch.float64).view(3, 1, 1, 1)
    std = torch.tensor(TRAJ_PIXEL_STD, dtype=torch.float64).view(3, 1, 1, 1)
    torch.testing.assert_close(x.double(), (kept - mean) / std, rtol=1e-5, atol=1e-5)


def test_prepare_clips_keeps_the_last_frame_and_takes_any_leading_dims():
    videos = torch.zeros(1, *CLIP, dtype=torch.uint8)
    videos[:, :, -1] = 255
    x = prepare_clips(videos, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert (x[:, :, :, -1] == 1).all() and (x[:, :, :, :-1] == 0).all()
    one = _videos(1)
    assert torch.equal(prepare_clips(one[0]), prepare_clips(one)[0])
    assert prepare_clips(one, frame_stride=4, pixel_stride=1).shape == (1, 4, 3, 8, 64, 64)


@pytest.mark.parametrize("bad", [
    {"videos": torch.zeros(1, *CLIP)},  # float: already converted
    {"frame_stride": 3},
    {"pixel_stride": 0},
    {"mean": (0.5,), "std": (0.25,)},  # one value for 3 channels would broadcast silently
])
def test_prepare_clips_rejects_bad_input(bad):
    kwargs = {"videos": _videos(1), **bad}
    with pytest.raises(InvalidArgument):
        prepare_clips(**kwargs)


def test_model_prepare_uses_its_strides_and_checks_the_clip():
    model = create_model("traj_i3d", frame_stride=1, pixel_stride=1)
    assert model.input_shape == (4, 3, 32, 64, 64)
    videos = _videos(1)
    assert torch.equal(model.prepare(videos), prepare_clips(videos, 1, 1))
    with pytest.raises(InvalidArgument, match="expected clips"):
        model.prepare(_videos(1, (4, 16, 3, 64, 64)))


# ---- registry, sizes, cost


def test_all_models_registered():
    assert set(EXTRACTORS) | set(BASELINES) <= set(list_models("traj_*"))


@pytest.mark.parametrize("name", EXTRACTORS)
def test_extractors_are_small_and_cheap(name):
    model = create_model(name, num_classes=4, in_chans=3).eval()
    assert 400_000 <= _n_params(model) <= 2_000_000
    # The CPU training budget: ~0.01-0.015 GMACs (all 4 cameras) per sample; FLOPs = 2 x MACs.
    flops, _ = count_flops(model, model.prepare(_videos(1)))
    assert 0.008e9 <= flops / 2 <= 0.016e9


# ---- the output contract


@pytest.mark.parametrize("name", EXTRACTORS)
@pytest.mark.parametrize("training", [True, False])
def test_output_contract(name, training):
    model = create_model(name, num_classes=5).train(training)
    out = model(model.prepare(_videos(2)))
    assert set(out) == {"logits", "future_position", "aux_loss", "aux"}
    assert out["logits"].shape == (2, 5)
    assert out["future_position"].shape == (2, 3)
    assert out["aux_loss"].shape == ()
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["future_position"]).all()
    if name == "traj_magvit" and training:
        assert set(out["aux"]) == {"recon", "quant"}
        assert all(v.shape == () and torch.isfinite(v) for v in out["aux"].values())
        assert out["aux"]["recon"] > 0
        weights = model.encoder.aux_weights
        expected = sum(weights[k] * v for k, v in out["aux"].items())
        assert torch.allclose(out["aux_loss"], expected)
    else:
        assert out["aux"] == {}
        assert out["aux_loss"].item() == 0.0


def test_magvit_aux_weights_scale_aux_loss():
    light = create_model("traj_magvit", recon_weight=0.5, quant_weight=2.0)
    out = light(torch.randn(2, *INPUT))
    assert torch.allclose(out["aux_loss"], 0.5 * out["aux"]["recon"] + 2.0 * out["aux"]["quant"])


@pytest.mark.parametrize("name", EXTRACTORS)
def test_gradients_reach_every_parameter(name):
    model = create_model(name).train()
    out = model(torch.randn(2, *INPUT))
    (out["logits"].sum() + out["future_position"].sum() + out["aux_loss"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", EXTRACTORS)
def test_eval_output_does_not_depend_on_the_batch(name):
    model = create_model(name)
    model.train()
    model(torch.randn(2, *INPUT))  # moves BatchNorm running statistics off their initial values
    model.eval()
    x = torch.randn(3, *INPUT)
    with torch.no_grad():
        batched, alone = model(x), model(x[1:2])
    for key in ("logits", "future_position"):
        assert torch.allclose(batched[key][1:2], alone[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("name", EXTRACTORS)
def test_camera_fusion_knows_which_camera_is_which(name):
    # Train mode (BatchNorm on batch statistics, which a camera swap leaves unchanged): at initialisation, eval-mode
    # BatchNorm can leave traj_magvit's quantised tokens constant, whichever the camera.
    model = create_model(name, dropout=0.0).train()
    x = torch.randn(1, *INPUT)
    swapped = x[:, [1, 0, 2, 3]]
    with torch.no_grad():
        a, b = model(x)["future_position"], model(swapped)["future_position"]
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", EXTRACTORS)
@pytest.mark.parametrize("x", [
    torch.randn(1, 3, 3, 16, 32, 32),  # 3 cameras
    torch.randn(1, *CLIP),  # the raw clip's layout and size, not prepared
    torch.zeros(1, *INPUT, dtype=torch.uint8),  # prepared shape, but not normalised floats
], ids=["cameras", "raw-clip", "uint8"])
def test_wrong_input_is_rejected(name, x):
    model = create_model(name)
    with pytest.raises(InvalidArgument, match="expected input"):
        model(x)


@pytest.mark.parametrize("name", EXTRACTORS)
def test_other_clip_sizes_and_channels(name):
    model = create_model(name, cameras=2, frames=16, image_size=32, in_chans=1).eval()
    x = model.prepare(_videos(2, (2, 16, 1, 32, 32)), mean=(0.5,), std=(0.25,))
    assert x.shape == (2, 2, 1, 8, 16, 16)
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (2, 4) and out["future_position"].shape == (2, 3)


@pytest.mark.parametrize("kwargs", [{"image_size": 40}, {"frames": 20}, {"frame_stride": 3}])
def test_indivisible_clip_size_is_rejected(kwargs):
    with pytest.raises(InvalidArgument, match="multiple"):
        create_model("traj_i3d", **kwargs)


@pytest.mark.parametrize("name,builder", BASELINES.items())
def test_torchvision_baselines(name, builder):
    model = create_model(name, **SMALL)
    # The backbone is torchvision's architecture, unchanged: its parameters less the classifier's.
    reference = builder(weights=None)
    assert _n_params(model.encoder) == _n_params(reference) - _n_params(reference.fc)
    x = model.prepare(_videos(2, (4, SMALL["frames"], 3, SMALL["image_size"], SMALL["image_size"])))
    with torch.no_grad():
        out = model.eval()(x)
        swapped = model(x[:, [1, 0, 2, 3]])["future_position"]
    assert out["logits"].shape == (2, 4) and out["future_position"].shape == (2, 3)
    assert out["aux"] == {} and out["aux_loss"].item() == 0.0
    assert (out["future_position"] - swapped).abs().max() > 1e-4
