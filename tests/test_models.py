"""Model zoo: exact parameter counts, shapes, timm pass-through, local pretrained weights, summaries."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cli.models import cmd_models_list, cmd_models_summary
from shared.errors import InvalidArgument, NotFound
from shared.models import (
    backbone_stages,
    count_params,
    create_model,
    freeze_backbone,
    list_models,
    model_summary,
    register_model,
    unfreeze_schedule,
    unfreeze_stages,
)
from shared.models.registry import builder_accepts

MNIST_COUNTS = {"mnist_rough": 6_379_786, "mnist_cake": 388_582, "mnist_ultralight": 6_008}


@pytest.mark.parametrize("name,count", MNIST_COUNTS.items())
def test_mnist_models_exact_param_counts_and_shapes(name, count):
    model = create_model(name)
    assert count_params(model) == count
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    out.sum().backward()  # every parameter takes part in the forward pass
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MNIST_COUNTS)
def test_mnist_options_change_the_model(name):
    model = create_model(name, num_classes=7, batchnorm=True, dropout=0.2, gap_head=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model.eval()
    # the GAP head accepts other input sizes
    assert model(torch.randn(2, 1, 36, 36)).shape == (2, 7)


def test_timm_model_through_factory():
    model = create_model("resnet18", num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert "mnist_cake" in list_models()
    assert "resnet18" in list_models("resnet1*", include_timm=True)
    assert list_models("mnist_*") == ["mnist_cake", "mnist_rough", "mnist_ultralight"]


def test_unknown_model_suggests_close_names():
    with pytest.raises(NotFound, match="did you mean.*mnist_cake"):
        create_model("mnist_cak")
    with pytest.raises(InvalidArgument, match="pretrained_path"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(InvalidArgument, match="bad arguments"):
        create_model("mnist_cake", wings=2)


def test_register_model_decorator():
    @register_model(name="test_tiny_linear")
    def _build(num_classes: int = 10, in_chans: int = 1):
        """A tiny linear model for the registry test."""
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_chans * 4, num_classes))

    assert create_model("test_tiny_linear", num_classes=3, in_chans=2)(torch.randn(1, 2, 2, 2)).shape == (1, 3)
    with pytest.raises(InvalidArgument, match="already registered"):
        register_model(lambda: None, name="test_tiny_linear")


def test_pretrained_path_safetensors_and_pth(tmp_path):
    torch.manual_seed(0)
    src = create_model("mnist_cake").eval()
    x = torch.randn(3, 1, 28, 28)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_model("mnist_cake", pretrained_path=tmp_path / name).eval()
        assert torch.equal(loaded(x), src(x))
    # a new class count keeps the backbone and skips only the mismatched final layer
    ten = create_model("mnist_cake", num_classes=4, pretrained_path=tmp_path / "w.safetensors")
    assert torch.equal(ten.features[0].weight, src.features[0].weight)
    assert ten.classifier[-1].weight.shape == (4, 100)


def test_pretrained_path_rejects_misfit_and_garbage(tmp_path):
    save_file(create_model("mnist_ultralight").state_dict(), str(tmp_path / "u.safetensors"))
    with pytest.raises(InvalidArgument, match="do not fit"):
        create_model("mnist_cake", pretrained_path=tmp_path / "u.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgument):
        create_model("mnist_cake", pretrained_path=tmp_path / "bad.safetensors")
    with pytest.raises(NotFound):
        create_model("mnist_cake", pretrained_path=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name,count", MNIST_COUNTS.items())
def test_summary_totals_match(name, count):
    summary = model_summary(create_model(name), (1, 28, 28))
    assert summary.total_params == summary.trainable_params == count
    assert sum(r.params for r in summary.rows) == count
    assert summary.output_shape == [10]
    text = summary.to_text()
    assert f"Total params: {count:,}" in text
    convs = [r for r in summary.rows if r.type == "Conv2d"]
    assert convs[0].input_shape == [1, 28, 28] and convs[0].kernel == "3x3"


def test_cli_functions():
    text = cmd_models_summary("mnist_rough", "1x28x28")
    assert "Total params: 6,379,786" in text
    assert "features.0 (Conv2d)" in text and "1x28x28" in text
    listing = cmd_models_list(None)
    assert "mnist_ultralight" in listing and "6,008" in listing
    with pytest.raises(InvalidArgument, match="CxHxW"):
        cmd_models_summary("mnist_rough", "28x28")


def test_summary_of_a_model_without_in_chans():
    # cad_captioner's builder has no in_chans (its input is RGB): the summary must not pass one.
    assert not builder_accepts("cad_captioner", "in_chans")
    assert builder_accepts("mnist_cake", "in_chans") and builder_accepts("resnet18", "in_chans")
    text = cmd_models_summary("cad_captioner", "3x64x64")
    assert "Total params: 657,432" in text and "3x64x64" in text
    assert "Total params: 388,870" in cmd_models_summary("mnist_cake", "3x28x28")  # 288 more weights: 3 channels in


@pytest.mark.parametrize("head", ["linear", "mlp256", "mlp128bn"])
def test_logo_heads(head):
    model = create_model("logo_efficientnet_b0", num_classes=4, head=head).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == {"linear": [4], "mlp256": [256, 4], "mlp128bn": [128, 4]}[head]


def test_logo_loads_a_local_timm_imagenet_checkpoint(tmp_path):
    # transfer learning: a 1000-class timm efficientnet_b0 file fills the backbone, the new head stays fresh
    imagenet = create_model("efficientnet_b0")
    torch.save(imagenet.state_dict(), tmp_path / "efficientnet_b0.pth")
    model = create_model("logo_efficientnet_b0", num_classes=4, head="mlp256",
                         pretrained_path=tmp_path / "efficientnet_b0.pth")
    assert torch.equal(model.conv_stem.weight, imagenet.conv_stem.weight)
    assert torch.equal(model.blocks[6][0].conv_pw.weight, imagenet.blocks[6][0].conv_pw.weight)
    assert model.classifier[-1].weight.shape == (4, 256)


def test_logo_gradual_unfreezing():
    model = create_model("logo_efficientnet_b0", num_classes=4, head="linear")
    total = count_params(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    stages = backbone_stages(model)
    assert len(stages) == 9  # stem, 7 block groups, head conv
    assert freeze_backbone(model) == head
    last = sum(p.numel() for m in stages[-1] for p in m.parameters())
    assert unfreeze_stages(model, 1) == head + last
    # schedule: frozen before epoch 2, last 1 stage from 2, everything from 5
    schedule = {2: 1, 5: "all"}
    assert unfreeze_schedule(model, 0, schedule) == 0 and count_params(model, True) == head
    assert unfreeze_schedule(model, 3, schedule) == 1 and count_params(model, True) == head + last
    assert unfreeze_schedule(model, 7, schedule) == "all" and count_params(model, True) == total

    # a frozen stage's BatchNorm keeps its running statistics through train-mode steps
    freeze_backbone(model)
    model.train()
    bn = model.bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)
    unfreeze_stages(model, "all")
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)
    with pytest.raises(InvalidArgument, match="unknown head"):
        create_model("logo_efficientnet_b0", head="mlp999")
