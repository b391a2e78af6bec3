"""Multi-camera trajectory-video models: four feature extractors and two torchvision baselines.

Registered builders (``create_model(name, ...)``):

- ``traj_i3d``: an I3D-style 3D CNN (a patch stem, an inflated 3x3x3 conv striding in space and time, two
  inflated Inception blocks).
- ``traj_slowfast``: a slow pathway (every 4th frame, wide) and a fast one (all frames, 1/8 of the
  channels) with time-strided lateral fast->slow connections.
- ``traj_transformer``: 4x4x4 tubelet embedding, 2x2 token merging, learned space and time position
  embeddings, a small pre-norm transformer encoder.
- ``traj_magvit``: a MAGVIT-v2-style tokenizer encoder (causal 3D convolutions to a latent grid of
  lookup-free-quantised tokens) whose token embeddings feed the heads; in train mode it also decodes the
  tokens and reports its reconstruction and quantiser losses.
- ``traj_r3d_18``, ``traj_r2plus1d_18``: torchvision's video ResNets (``weights=None``, nothing
  downloads) as full-size reference baselines: ~33 M parameters and ~13 GMACs per sample, against
  0.45-0.65 M and 0.011-0.016 GMACs for the four above, so they are meant for accelerators.

Input path: the dataset's uint8 clips (B, cameras, frames, in_chans, image_size, image_size) go through
``prepare_clips`` (or the model's ``prepare``, which calls it with the model's strides), which keeps every
``frame_stride``-th frame and ``pixel_stride``-th pixel (2 and 2 by default) *before* converting to float,
then normalises. The trainer and the inference server both call it, so a served model sees exactly what it
was trained on. Subsampling first matters on CPU: converting a whole (32, 4, 32, 3, 64, 64) batch to float
(~130 ms) costs most of these models' training step (~200 ms on one core); an eighth of it costs ~20 ms. The
ball (~8 px across at 64 px) stays ~4 px across at 32, and the newest frame, nearest to the predicted one,
is kept.

Contract (every ``traj_*`` model):

- kwargs ``num_classes=4, cameras=4, frames=32, image_size=64, in_chans=3, frame_stride=2,
  pixel_stride=2`` (plus per-model options); ``frames`` and ``image_size`` are the dataset clip's.
- ``model.prepare(videos)``: uint8 (B, *model.clip_shape) -> the forward input;
- forward input: float (B, *model.input_shape) = (B, cameras, in_chans, frames / frame_stride,
  image_size / pixel_stride, image_size / pixel_stride), channels first, normalised as ``prepare_clips`` does;
- output: ``{"logits": (B, num_classes), "future_position": (B, 3), "aux_loss": scalar tensor,
  "aux": {name: scalar tensor}}``. ``future_position`` is in world units: the head's standardised output
  times ``target_std`` plus ``target_mean`` (kwargs; the trainer passes the training split's statistics).
  ``aux`` holds unweighted auxiliary terms (``{"recon", "quant"}`` for traj_magvit in train mode, empty
  otherwise) and ``aux_loss`` their weighted sum, to be added to the task loss as is (0 when ``aux`` is empty).
- ``**head`` kwargs of every builder go to ``MultiCameraVideoNet`` (``target_mean``, ``target_std``, widths).
- In eval mode a sample's outputs do not depend on the rest of its batch.

Layout: one encoder, shared by all cameras, maps each camera's clip (cameras folded into the batch, as
(N, C, T, H, W)) to a small spatio-temporal feature grid. ``MultiCameraVideoNet`` reads that grid out
without pooling it away (a per-cell projection, then flatten: global pooling would discard where and when
the ball is, which the regression needs), fuses the cameras by ordered concatenation (each camera's image
coordinates map to the world through its own fixed geometry, so the fusion must know which camera is which)
and applies the classification and regression heads.

Cost: each extractor spends 2.5-4 M MACs per camera clip, 15-25% of it in its first layer (every input
value times that layer's output channels), so the encoders are narrow and most parameters sit in the
readout. Small 3D convolutions run far below a CPU's matmul rate, so layer choices here were made on
measured CPU training time, not on MACs alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.models import video as tv_video

from shared.errors import InvalidArgument
from shared.models.registry import register_model
from shared.preprocess import Normalizer

Size3 = tuple[int, int, int]

# Per-channel pixel statistics (in [0, 1] units) of the rendered trajectory dataset (services.render.trajectories),
# measured on 400 training clips as prepare_clips subsamples them: dark frames, hence the small std.
TRAJ_PIXEL_MEAN = (0.085, 0.093, 0.101)
TRAJ_PIXEL_STD = (0.061, 0.065, 0.069)


def prepare_clips(videos: torch.Tensor, frame_stride: int = 2, pixel_stride: int = 2,
                  mean: Sequence[float] = TRAJ_PIXEL_MEAN, std: Sequence[float] = TRAJ_PIXEL_STD) -> torch.Tensor:
    """uint8 clips (..., T, C, H, W) -> normalised float32 (..., C, T/frame_stride, H/pixel_stride, W/pixel_stride):
    ``normalize_clips(subsample_clips(...))``. Subsampling comes first, on uint8, so only the kept values are
    converted (see the module docstring). Any leading dims: a batch (B, cameras, ...) or one sample."""
    return normalize_clips(subsample_clips(videos, frame_stride, pixel_stride), mean, std)


def subsample_clips(videos: torch.Tensor, frame_stride: int = 2, pixel_stride: int = 2) -> torch.Tensor:
    """uint8 clips (..., T, C, H, W) -> uint8 (..., C, T/frame_stride, H/pixel_stride, W/pixel_stride).

    Keeps frames ``frame_stride - 1, 2 * frame_stride - 1, ...`` (the last of every group, so the clip's last
    frame is in) and the top-left pixel of every ``pixel_stride`` x ``pixel_stride`` block, channels first. The
    trainer's DataLoader workers run this step, so an eighth of the bytes crosses to the training process.
    """
    if videos.dtype != torch.uint8 or videos.dim() < 4:
        raise InvalidArgument(f"videos must be uint8 (..., T, C, H, W), got {videos.dtype} {tuple(videos.shape)}")
    t, _c, h, w = videos.shape[-4:]
    if frame_stride < 1 or pixel_stride < 1 or t % frame_stride or h % pixel_stride or w % pixel_stride:
        raise InvalidArgument(f"clips of {t} frames of {h}x{w} cannot be subsampled by frame_stride {frame_stride} "
                              f"and pixel_stride {pixel_stride}")
    kept = videos[..., frame_stride - 1:: frame_stride, :, ::pixel_stride, ::pixel_stride]
    return kept.transpose(-4, -3).contiguous()  # one strided uint8 copy


def normalize_clips(kept: torch.Tensor, mean: Sequence[float] = TRAJ_PIXEL_MEAN,
                    std: Sequence[float] = TRAJ_PIXEL_STD) -> torch.Tensor:
    """uint8 (..., C, T, H, W) -> ``(x / 255 - mean) / std`` in float32 (``shared.preprocess.Normalizer``)."""
    c = kept.shape[-4]
    if len(mean) != c or len(std) != c:
        raise InvalidArgument(f"normalization needs {c} mean/std values, got {mean} / {std}")
    flat = kept.reshape(-1, c, kept.shape[-3] * kept.shape[-2], kept.shape[-1])  # Normalizer sees images
    return Normalizer(mean, std, kept.device)(flat).view(kept.shape)


def _triple(v: int | Size3) -> Size3:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _encoder_clip(frames: int, image_size: int, frame_stride: int, pixel_stride: int, t: int, s: int
                  ) -> tuple[int, int]:
    """(frames, image size) the encoder sees after prepare_clips; it needs them to be multiples of ``t`` and ``s``."""
    if frame_stride < 1 or pixel_stride < 1:
        raise InvalidArgument(f"frame_stride ({frame_stride}) and pixel_stride ({pixel_stride}) must be >= 1")
    ft, ps = frame_stride * t, pixel_stride * s
    if frames % ft or image_size % ps:
        raise InvalidArgument(f"frames ({frames}) must be a multiple of {ft} and image_size ({image_size}) of {ps} "
                              f"(frame_stride {frame_stride} x {t}, pixel_stride {pixel_stride} x {s})")
    return frames // frame_stride, image_size // pixel_stride


def conv_bn(cin: int, cout: int, kernel: int | Size3, stride: int | Size3 = 1) -> nn.Sequential:
    """Conv3d + BatchNorm + ReLU; the padding gives exactly ``size // stride`` for the kernels used here."""
    k, s = _triple(kernel), _triple(stride)
    pad = tuple((ki - si + 1) // 2 for ki, si in zip(k, s, strict=True))
    return nn.Sequential(nn.Conv3d(cin, cout, k, s, pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class ClipEncoder(nn.Module):
    """Per-camera encoder: clips (N, C, T, H, W) -> ((N, out_channels, *grid) features, aux terms).

    ``aux_weights`` gives each auxiliary term's weight in ``aux_loss``; encoders without any keep it empty.
    """

    out_channels: int
    grid: Size3

    def __init__(self) -> None:
        super().__init__()
        self.aux_weights: dict[str, float] = {}


class MultiCameraVideoNet(nn.Module):
    """Shared encoder per camera, position-preserving readout, ordered camera fusion, two heads."""

    pretrained_cfg = {"classifier": "classifier"}  # lets load_pretrained() skip a head of another class count

    def __init__(self, encoder: ClipEncoder, *, num_classes: int, cameras: int, frames: int, image_size: int,
                 in_chans: int, frame_stride: int, pixel_stride: int, cell_dim: int = 32, embed_dim: int = 192,
                 hidden_dim: int = 256, dropout: float = 0.1, target_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 target_std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.frame_stride, self.pixel_stride = frame_stride, pixel_stride
        self.clip_shape = (cameras, frames, in_chans, image_size, image_size)
        self.input_shape = (cameras, in_chans, frames // frame_stride, image_size // pixel_stride,
                            image_size // pixel_stride)
        self.encoder = encoder
        cells = encoder.grid[0] * encoder.grid[1] * encoder.grid[2]
        self.cell_proj = nn.Sequential(nn.Linear(encoder.out_channels, cell_dim), nn.GELU())
        self.readout = nn.Sequential(nn.Linear(cells * cell_dim, embed_dim), nn.LayerNorm(embed_dim), nn.GELU())
        self.fusion = nn.Sequential(nn.Linear(cameras * embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, num_classes)
        self.regressor = nn.Linear(hidden_dim, 3)
        # The regression head predicts the standardised target; these (the training split's statistics, given
        # by the trainer as kwargs and so recorded in the model card) map it back to world units, so every
        # caller, in process or served, gets positions.
        if len(target_mean) != 3 or len(target_std) != 3 or min(target_std) <= 0:
            raise InvalidArgument(f"target_mean and target_std need 3 values, std > 0: {target_mean} / {target_std}")
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32), persistent=False)

    def prepare(self, videos: torch.Tensor, mean: Sequence[float] = TRAJ_PIXEL_MEAN,
                std: Sequence[float] = TRAJ_PIXEL_STD) -> torch.Tensor:
        """uint8 clips (B, *clip_shape) -> this model's forward input: ``prepare_clips`` with its strides."""
        if tuple(videos.shape[1:]) != self.clip_shape:
            raise InvalidArgument(f"expected clips (B, {', '.join(map(str, self.clip_shape))}), "
                                  f"got {tuple(videos.shape)}")
        return prepare_clips(videos, self.frame_stride, self.pixel_stride, mean, std)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        if not x.is_floating_point() or tuple(x.shape[1:]) != self.input_shape:
            raise InvalidArgument(f"expected input float (B, {', '.join(map(str, self.input_shape))}) (uint8 clips go "
                                  f"through prepare()), got {x.dtype} {tuple(x.shape)}")
        b, v = x.shape[:2]
        grid, aux = self.encoder(x.flatten(0, 1))  # cameras folded into the batch: one pass of the shared encoder
        cells = self.cell_proj(grid.flatten(2).transpose(1, 2))  # (B*V, cells, cell_dim)
        per_camera = self.readout(cells.flatten(1)).view(b, v, -1)
        fused = self.fusion(per_camera.flatten(1))  # camera order is kept: concatenation, not pooling
        aux_loss = x.new_zeros(())
        for name, value in aux.items():
            aux_loss = aux_loss + self.encoder.aux_weights[name] * value
        position = torch.addcmul(self.target_mean, self.regressor(fused), self.target_std)
        return {"logits": self.classifier(fused), "future_position": position,
                "aux_loss": aux_loss, "aux": aux}


# ------------------------------------------------------------------------------------------------ I3D


class ChannelsLastMaxPool3d(nn.MaxPool3d):
    """MaxPool3d on a channels-last copy of its input: PyTorch's CPU kernel is ~4x faster on that layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last_3d))


class Inception3d(nn.Module):
    """Inflated Inception-v1 block: 1x1x1, two 1x1x1->3x3x3 and a maxpool->1x1x1 branch, concatenated."""

    def __init__(self, cin: int, b0: int, b1: tuple[int, int], b2: tuple[int, int], b3: int):
        super().__init__()
        self.branches = nn.ModuleList([
            conv_bn(cin, b0, 1),
            nn.Sequential(conv_bn(cin, b1[0], 1), conv_bn(b1[0], b1[1], 3)),
            nn.Sequential(conv_bn(cin, b2[0], 1), conv_bn(b2[0], b2[1], 3)),
            nn.Sequential(ChannelsLastMaxPool3d(3, 1, 1), conv_bn(cin, b3, 1)),
        ])
        self.out_channels = b0 + b1[1] + b2[1] + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class I3DEncoder(ClipEncoder):
    """(2,4,4) patch stem, a strided inflated 3x3x3 conv (space and time), two Inception blocks at (T/4, H/8, W/8).

    The Inception blocks sit at the coarsest grid only: at finer ones their many small branches cost
    several times their MACs on CPU.
    """

    def __init__(self, in_chans: int, frames: int, image_size: int, width: int = 16):
        super().__init__()
        w = width
        mixed_a = Inception3d(2 * w, w // 2, (w, w), (w // 4, w // 2), w // 2)
        mixed_b = Inception3d(mixed_a.out_channels, w // 2, (w, w), (w // 4, w // 2), w // 2)
        self.features = nn.Sequential(
            conv_bn(in_chans, w, (2, 4, 4), (2, 4, 4)),  # non-overlapping patches
            conv_bn(w, 2 * w, 3, 2),
            mixed_a,
            mixed_b,
        )
        self.out_channels = mixed_b.out_channels
        self.grid = (frames // 4, image_size // 8, image_size // 8)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.features(clips), {}


# ------------------------------------------------------------------------------------------- SlowFast


class SlowFastEncoder(ClipEncoder):
    """Slow: every ``alpha``-th frame, ``width`` channels; fast: all frames, ``width // 8`` channels.

    Lateral connections are time-strided convolutions (stride ``alpha``) from fast to slow, concatenated to
    the slow features after the stems and after stage 2 (as in SlowFast). At the end the fast features are
    folded time-to-channel onto the slow time axis and both are fused by a 1x1x1 convolution.
    """

    def __init__(self, in_chans: int, frames: int, image_size: int, alpha: int = 4, width: int = 32):
        super().__init__()
        self.alpha = alpha
        fast = max(width // 8, 1)
        self.slow_stem = conv_bn(in_chans, width // 2, (1, 4, 4), (1, 4, 4))
        self.fast_stem = conv_bn(in_chans, fast, (1, 4, 4), (1, 4, 4))
        self.lateral1 = conv_bn(fast, 2 * fast, (5, 1, 1), (alpha, 1, 1))
        # Slow: temporal kernels only in the last stage (as in SlowFast: its frames are too far apart early on).
        self.slow2 = conv_bn(width // 2 + 2 * fast, width, (1, 3, 3), (1, 2, 2))
        self.fast2 = conv_bn(fast, 2 * fast, 3, (1, 2, 2))
        self.lateral2 = conv_bn(2 * fast, 4 * fast, (5, 1, 1), (alpha, 1, 1))
        self.slow3 = conv_bn(width + 4 * fast, width, 3, (2, 1, 1))
        # Fast: temporal kernels in every stage (as in SlowFast); its last one is temporal only, which halves its cost.
        self.fast3 = conv_bn(2 * fast, 2 * fast, (3, 1, 1))
        self.fuse = conv_bn(width + 2 * fast * alpha * 2, width, 1)
        self.out_channels = width
        self.grid = (frames // alpha // 2, image_size // 8, image_size // 8)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slow = self.slow_stem(clips[:, :, self.alpha - 1:: self.alpha])  # the last frame of every alpha
        fast = self.fast_stem(clips)
        slow = self.slow2(torch.cat([slow, self.lateral1(fast)], 1))
        fast = self.fast2(fast)
        slow = self.slow3(torch.cat([slow, self.lateral2(fast)], 1))
        fast = self.fast3(fast)
        n, c, t, h, w = fast.shape
        t_slow = slow.shape[2]
        folded = fast.reshape(n, c, t_slow, t // t_slow, h, w).transpose(2, 3).reshape(n, -1, t_slow, h, w)
        return self.fuse(torch.cat([slow, folded], 1)), {}


# ---------------------------------------------------------------------------------------- Transformer


class TransformerEncoder(ClipEncoder):
    """Tubelet embedding, 2x2 token merging, factorised learned space/time position embeddings, ``depth`` blocks.

    Merging 2x2 neighbouring tubelets (Swin-style) quarters the token count so attention stays cheap on CPU,
    and the narrow tubelet embedding keeps the per-pixel projection, the costliest layer, small. The embedding
    is followed by BatchNorm and ReLU (a convolutional stem, as in early-convolution ViTs): with a plain linear
    one this small transformer sometimes sat at chance for its whole first epoch.
    """

    def __init__(self, in_chans: int, frames: int, image_size: int, tubelet: Size3 = (4, 4, 4),
                 embed_dim: int = 16, dim: int = 40, depth: int = 2, heads: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        tt, th, tw = tubelet
        self.embed = conv_bn(in_chans, embed_dim, tubelet, tubelet)
        self.merge = nn.Sequential(nn.LayerNorm(4 * embed_dim), nn.Linear(4 * embed_dim, dim))
        self.grid = (frames // tt, image_size // (2 * th), image_size // (2 * tw))
        self.pos_time = nn.Parameter(torch.zeros(1, self.grid[0], 1, dim))
        self.pos_space = nn.Parameter(torch.zeros(1, 1, self.grid[1] * self.grid[2], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim
        trunc_normal_(self.pos_time, std=0.02)
        trunc_normal_(self.pos_space, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.embed(clips)  # (N, E, t, 2h, 2w)
        n, e, t, h2, w2 = x.shape
        # 2x2 merge: each 2x2 neighbourhood of tubelets becomes one token of 4E features.
        x = x.reshape(n, e, t, h2 // 2, 2, w2 // 2, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(n, t, -1, 4 * e)
        x = self.merge(x) + self.pos_time + self.pos_space  # (N, t, h*w, D)
        x = self.norm(self.blocks(x.flatten(1, 2)))
        _, h, w = self.grid
        return x.transpose(1, 2).reshape(n, -1, t, h, w), {}


# --------------------------------------------------------------------------------------------- MAGVIT


class CausalConv3d(nn.Module):
    """Conv3d whose output at time i sees only inputs up to the end of its stride block (MAGVIT-v2)."""

    def __init__(self, cin: int, cout: int, kernel: int | Size3, stride: int | Size3 = 1, bias: bool = True):
        super().__init__()
        k, s = _triple(kernel), _triple(stride)
        self.time_pad = k[0] - s[0]  # all of it in the past
        self.conv = nn.Conv3d(cin, cout, k, s, (0, (k[1] - s[1] + 1) // 2, (k[2] - s[2] + 1) // 2), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 0, 0, 0, self.time_pad, 0)) if self.time_pad else x)


def causal_bn(cin: int, cout: int, kernel: int | Size3, stride: int | Size3 = 1) -> nn.Sequential:
    # BatchNorm rather than GroupNorm: GroupNorm's statistics span time and would leak the future into the past.
    return nn.Sequential(CausalConv3d(cin, cout, kernel, stride, bias=False), nn.BatchNorm3d(cout),
                         nn.SiLU(inplace=True))


class MagvitEncoder(ClipEncoder):
    """Causal conv tokenizer to a grid of ``bits``-bit LFQ tokens (T/4, H/4, W/4); the heads read their embeddings.

    Training mode also decodes the quantised tokens and reports ``recon`` (MSE to the input at half its frame
    rate and resolution: every second frame and pixel, which keeps the decoder as cheap as the encoder) and
    ``quant`` (LFQ's weighted entropy and commitment loss; its entropy part is negative when the batch spreads
    over the codebook).
    """

    def __init__(self, in_chans: int, frames: int, image_size: int, width: int = 16, bits: int = 8,
                 recon_weight: float = 1.0, quant_weight: float = 1.0, entropy_weight: float = 0.1,
                 commitment_weight: float = 0.25, entropy_fraction: float = 0.0625):
        super().__init__()
        self.in_chans = in_chans
        self.encode = nn.Sequential(
            causal_bn(in_chans, width // 2, (2, 4, 4), (2, 4, 4)),  # non-overlapping patches
            causal_bn(width // 2, width, 3, (2, 1, 1)),
            causal_bn(width, width, (3, 1, 1)),
            CausalConv3d(width, bits, 1),
        )
        # Lookup-free quantisation (MAGVIT-v2): each latent channel is a sign bit, no codebook to learn. The
        # entropy term is estimated on a random fraction of the tokens: its cost is tokens x 2^bits.
        # Imported here: the package costs seconds at import, and only this extractor needs it.
        from vector_quantize_pytorch import LFQ

        self.quantizer = LFQ(dim=bits, entropy_loss_weight=entropy_weight, commitment_loss_weight=commitment_weight,
                             frac_per_sample_entropy=entropy_fraction)
        # Decoder: a causal conv, then a 1x1x1 conv to each token's 2x2x2 target pixels (a 3D pixel shuffle).
        self.decode = nn.Sequential(causal_bn(bits, width // 2, 3), CausalConv3d(width // 2, in_chans * 2 * 2 * 2, 1))
        # Token embeddings -> features for the heads: a spatially strided and a temporal causal conv.
        self.token_head = nn.Sequential(causal_bn(bits, 2 * width, 3, (1, 2, 2)),
                                        causal_bn(2 * width, 2 * width, (3, 1, 1)))
        self.aux_weights = {"recon": recon_weight, "quant": quant_weight}
        self.out_channels = 2 * width
        self.grid = (frames // 4, image_size // 8, image_size // 8)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, _, quant_loss = self.quantizer(self.encode(clips))
        features = self.token_head(tokens)
        if not self.training:
            return features, {}
        y = self.decode(tokens)  # (N, C*2*2*2, t, h, w) -> (N, C, 2t, 2h, 2w)
        n, _, t, h, w = y.shape
        y = y.reshape(n, self.in_chans, 2, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        recon = F.mse_loss(y.reshape(n, self.in_chans, 2 * t, 2 * h, 2 * w), clips[:, :, 1::2, ::2, ::2])
        return features, {"recon": recon, "quant": quant_loss}


# ------------------------------------------------------------------------------ torchvision baselines


class TorchvisionVideoEncoder(ClipEncoder):
    """A torchvision video ResNet (random init) up to its last stage, as a feature grid."""

    def __init__(self, arch: str, in_chans: int, frames: int, image_size: int):
        super().__init__()
        net = getattr(tv_video, arch)(weights=None)
        if in_chans != 3:
            first = net.stem[0]
            net.stem[0] = nn.Conv3d(in_chans, first.out_channels, first.kernel_size, first.stride, first.padding,
                                    bias=False)
        self.stem = net.stem
        self.stages = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = 512
        self.grid = (frames // 8, image_size // 16, image_size // 16)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.stages(self.stem(clips)), {}


# ---------------------------------------------------------------------------------------------- builders


def _build(encoder: ClipEncoder, num_classes: int, cameras: int, frames: int, image_size: int, in_chans: int,
           frame_stride: int, pixel_stride: int, dropout: float, **head: Any) -> MultiCameraVideoNet:
    return MultiCameraVideoNet(encoder, num_classes=num_classes, cameras=cameras, frames=frames,
                               image_size=image_size, in_chans=in_chans, frame_stride=frame_stride,
                               pixel_stride=pixel_stride, dropout=dropout, **head)


@register_model
def traj_i3d(num_classes: int = 4, cameras: int = 4, frames: int = 32, image_size: int = 64, in_chans: int = 3,
             frame_stride: int = 2, pixel_stride: int = 2, width: int = 16, dropout: float = 0.1,
             **head: Any) -> nn.Module:
    """I3D-style 3D CNN (inflated Inception blocks) per camera, ordered camera fusion."""
    t, s = _encoder_clip(frames, image_size, frame_stride, pixel_stride, 4, 8)
    return _build(I3DEncoder(in_chans, t, s, width), num_classes, cameras, frames, image_size, in_chans,
                  frame_stride, pixel_stride, dropout, **head)


@register_model
def traj_slowfast(num_classes: int = 4, cameras: int = 4, frames: int = 32, image_size: int = 64,
                  in_chans: int = 3, frame_stride: int = 2, pixel_stride: int = 2, alpha: int = 4, width: int = 32,
                  dropout: float = 0.1, **head: Any) -> nn.Module:
    """SlowFast-style two-pathway 3D CNN with lateral fast->slow connections, ordered camera fusion."""
    t, s = _encoder_clip(frames, image_size, frame_stride, pixel_stride, 2 * alpha, 8)
    return _build(SlowFastEncoder(in_chans, t, s, alpha, width), num_classes, cameras, frames, image_size, in_chans,
                  frame_stride, pixel_stride, dropout, **head)


@register_model
def traj_transformer(num_classes: int = 4, cameras: int = 4, frames: int = 32, image_size: int = 64,
                     in_chans: int = 3, frame_stride: int = 2, pixel_stride: int = 2, depth: int = 2, dim: int = 40,
                     heads: int = 2, dropout: float = 0.1, **head: Any) -> nn.Module:
    """Tubelet-embedding video transformer per camera, ordered camera fusion."""
    t, s = _encoder_clip(frames, image_size, frame_stride, pixel_stride, 4, 8)
    encoder = TransformerEncoder(in_chans, t, s, dim=dim, depth=depth, heads=heads)
    return _build(encoder, num_classes, cameras, frames, image_size, in_chans, frame_stride, pixel_stride, dropout,
                  **head)


@register_model
def traj_magvit(num_classes: int = 4, cameras: int = 4, frames: int = 32, image_size: int = 64, in_chans: int = 3,
                frame_stride: int = 2, pixel_stride: int = 2, width: int = 16, bits: int = 8, recon_weight: float = 1.0,
                quant_weight: float = 1.0, dropout: float = 0.1, **head: Any) -> nn.Module:
    """MAGVIT-style causal tokenizer encoder with LFQ; recon + quantiser aux losses in training."""
    t, s = _encoder_clip(frames, image_size, frame_stride, pixel_stride, 4, 8)
    encoder = MagvitEncoder(in_chans, t, s, width, bits, recon_weight=recon_weight, quant_weight=quant_weight)
    return _build(encoder, num_classes, cameras, frames, image_size, in_chans, frame_stride, pixel_stride, dropout,
                  **head)


def _torchvision_baseline(arch: str):
    """A builder of torchvision's ``arch`` (random init) per camera with ordered camera fusion."""

    def build(num_classes: int = 4, cameras: int = 4, frames: int = 32, image_size: int = 64, in_chans: int = 3,
              frame_stride: int = 2, pixel_stride: int = 2, dropout: float = 0.1, **head: Any) -> nn.Module:
        t, s = _encoder_clip(frames, image_size, frame_stride, pixel_stride, 8, 16)
        return _build(TorchvisionVideoEncoder(arch, in_chans, t, s), num_classes, cameras, frames, image_size,
                      in_chans, frame_stride, pixel_stride, dropout, **head)

    build.__doc__ = f"Reference baseline: torchvision {arch} (random init) per camera, ordered camera fusion."
    return build


traj_r3d_18 = register_model(_torchvision_baseline("r3d_18"), name="traj_r3d_18")
traj_r2plus1d_18 = register_model(_torchvision_baseline("r2plus1d_18"), name="traj_r2plus1d_18")
