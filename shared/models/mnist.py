"""The three parameter-efficient MNIST CNNs of the study, with their exact parameter counts.

Defaults reproduce the reference architectures exactly (counts asserted in tests); BatchNorm,
dropout and a global-average-pool head are opt-in variants and change the counts.

Counts (3x3 kernels, 28x28 input):
- mnist_rough 6,379,786: biased convs 320 + 18,496 + 73,856 + 295,168 + 1,180,160 + 4,719,616, head conv
  1024->10 92,170. Spatial 28->28->14->14->7->5->3->1, so the head emits 10x1x1.
- mnist_cake 388,582: bias-free convs 144 + 2,304 + 2,304 + 4,608 + 9,216 + 18,432 + 36,864 = 73,872, then
  Linear 3136->100 (313,700) and 100->10 (1,010). 64 channels x 7x7 = 3136.
- mnist_ultralight 6,008: bias-free convs 90 + 900 + 900 + 720 + 576 + 576 + 576 = 4,338, then Linear
  72->20 (1,460) and 20->10 (210). 28->14->7, two unpadded convs 7->5->3, 8x3x3 = 72.
The ReLU between the two Linear layers adds no parameters; without it they would collapse into one.
"""
from __future__ import annotations

from torch import nn

from shared.models.registry import register_model

# Lets load_pretrained() skip a classifier of another class count when fine-tuning these nets.
_CFG = {"classifier": "classifier"}


def _conv(cin: int, cout: int, pad: int, bias: bool, batchnorm: bool) -> list[nn.Module]:
    # A conv followed by BatchNorm needs no bias of its own (BN's shift replaces it).
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=pad, bias=bias and not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class _MnistNet(nn.Module):
    pretrained_cfg = _CFG

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self._init_weights()

    def _init_weights(self) -> None:
        # He (Kaiming-normal) init for the ReLU stacks: with PyTorch's default uniform init the deep,
        # narrow, bias-free nets (ultralight, cake) barely move from chance in the first epochs.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model
def mnist_rough(num_classes: int = 10, in_chans: int = 1, batchnorm: bool = False, dropout: float = 0.0,
                gap_head: bool = False) -> nn.Module:
    """All-conv MNIST net with a conv head, 6,379,786 params."""
    f: list[nn.Module] = []
    f += _conv(in_chans, 32, 1, True, batchnorm) + _conv(32, 64, 1, True, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(64, 128, 1, True, batchnorm) + _conv(128, 256, 1, True, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(256, 512, 0, True, batchnorm) + _conv(512, 1024, 0, True, batchnorm)
    head: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
    head.append(nn.Conv2d(1024, num_classes, 3, padding=0))
    # On 28x28 the head already emits 1x1; GAP lets other input sizes work too.
    head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if gap_head else [nn.Flatten()]
    return _MnistNet(nn.Sequential(*f), nn.Sequential(*head))


@register_model
def mnist_cake(num_classes: int = 10, in_chans: int = 1, batchnorm: bool = False, dropout: float = 0.0,
               gap_head: bool = False) -> nn.Module:
    """Seven bias-free convs and a 100-unit MLP head, 388,582 params."""
    f: list[nn.Module] = []
    f += _conv(in_chans, 16, 1, False, batchnorm) + _conv(16, 16, 1, False, batchnorm)
    f += _conv(16, 16, 1, False, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(16, 32, 1, False, batchnorm) + _conv(32, 32, 1, False, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(32, 64, 1, False, batchnorm) + _conv(64, 64, 1, False, batchnorm)
    pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if gap_head else []
    flat = 64 if gap_head else 64 * 7 * 7
    drop: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
    head = pool + [nn.Flatten()] + drop + [nn.Linear(flat, 100), nn.ReLU(inplace=True)] + drop
    head.append(nn.Linear(100, num_classes))
    return _MnistNet(nn.Sequential(*f), nn.Sequential(*head))


@register_model
def mnist_ultralight(num_classes: int = 10, in_chans: int = 1, batchnorm: bool = False, dropout: float = 0.0,
                     gap_head: bool = False) -> nn.Module:
    """Tiny seven-conv MNIST net, 6,008 params (99.19% test accuracy in the reference run)."""
    f: list[nn.Module] = []
    f += _conv(in_chans, 10, 1, False, batchnorm) + _conv(10, 10, 1, False, batchnorm)
    f += _conv(10, 10, 1, False, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(10, 8, 1, False, batchnorm) + _conv(8, 8, 1, False, batchnorm) + [nn.MaxPool2d(2)]
    f += _conv(8, 8, 0, False, batchnorm) + _conv(8, 8, 0, False, batchnorm)
    pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if gap_head else []
    flat = 8 if gap_head else 8 * 3 * 3
    drop: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
    head = pool + [nn.Flatten()] + drop + [nn.Linear(flat, 20), nn.ReLU(inplace=True)] + drop
    head.append(nn.Linear(20, num_classes))
    return _MnistNet(nn.Sequential(*f), nn.Sequential(*head))
