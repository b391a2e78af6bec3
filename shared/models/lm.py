"""Image-prefix decoder-only transformer and its LoRA fine-tuning path (peft), for models past the GRU's size.

The language model is built from an ``LMConfig`` with random initialisation (nothing is downloaded): a
small CNN encodes the view, its feature map is pooled to ``prefix_tokens`` cells and projected to the
model width (LLaVA's multimodal projector), and those prefix embeddings precede the text token
embeddings in one causal sequence. Logits are returned for the text positions only.

LoRA goes through peft's documented path for custom models: ``get_peft_model(model, LoraConfig(...))``
with ``target_modules`` naming the ``nn.Linear`` layers to adapt (q_proj, k_proj, v_proj, o_proj,
up_proj, down_proj, projector, lm_head); with no ``task_type`` peft wraps any ``nn.Module`` and
forwards its arguments unchanged. Each targeted Linear(in, out) gains A (r x in) and B (out x r), so
the trainable count is ``sum r * (in + out)`` over the targeted layers; everything else is frozen.

Adapters are saved with ``save_pretrained`` (adapter_model.safetensors + adapter_config.json) plus a
fingerprint of the base weights, and ``load_adapter`` refuses a base that does not match it: an adapter
applied to another base would run without error and produce garbage.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.models.captioner import TextGenerator
from shared.models.registry import register_model
from shared.text.conversation import IGNORE_INDEX

if TYPE_CHECKING:
    from peft import PeftModel

FINGERPRINT_FILE = "base_fingerprint.json"


@dataclass
class LMConfig:
    vocab_size: int = 1536
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 512  # text positions; the image prefix has its own position embeddings
    image_size: int = 64
    encoder_channels: tuple[int, ...] = field(default=(16, 32, 64))
    prefix_tokens: int = 4  # a square number: the feature map is pooled to sqrt x sqrt cells
    dropout: float = 0.0
    image_token_id: int = 4  # the tokenizer's <image> id (4 in every shared.text tokenizer)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidArgument(f"unknown LMConfig fields: {sorted(unknown)}")
        data = dict(data)
        if "encoder_channels" in data:
            data["encoder_channels"] = tuple(data["encoder_channels"])
        return cls(**data)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise InvalidArgument(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        side = round(self.prefix_tokens ** 0.5)
        if side * side != self.prefix_tokens:
            raise InvalidArgument(f"prefix_tokens must be a square number, got {self.prefix_tokens}")


class ImagePrefix(nn.Module):
    """Conv stages -> adaptive pool to prefix_tokens cells -> Linear projector to the model width."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in cfg.encoder_channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
            cin = cout
        side = round(cfg.prefix_tokens ** 0.5)
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(side))
        self.projector = nn.Linear(cin, cfg.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(images).flatten(2).transpose(1, 2))  # (B, prefix_tokens, dim)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        heads = lambda y: y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.down_proj = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.down_proj(F.gelu(self.up_proj(self.norm2(x)))))


class ImagePrefixLM(TextGenerator, nn.Module):
    """Decoder-only transformer over [image prefix ; text tokens]; forward(images, input_ids) -> text logits.

    A captioning model like ``cad_captioner`` (``loss``, ``generate``, ``describe``, its tokenizer published
    beside the weights), so the platform trains, evaluates and serves it the same way, LoRA-tuned or not.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.vocab_size, self.image_token_id, self.image_size = cfg.vocab_size, cfg.image_token_id, cfg.image_size
        self.tokenizer = None
        self.image_prefix = ImagePrefix(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.prefix_tokens + cfg.max_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for the text positions: position t predicts token t + 1. Without ``input_ids``, one
        BOS (id 1): the cost of the first generated token, what a model summary and a FLOP count measure."""
        if input_ids is None:
            input_ids = torch.ones(images.shape[0], 1, dtype=torch.long, device=images.device)
        if input_ids.shape[1] > self.config.max_len:
            raise InvalidArgument(f"sequence of {input_ids.shape[1]} tokens exceeds max_len {self.config.max_len}")
        x = torch.cat([self.image_prefix(images), self.embed(input_ids)], dim=1)
        x = x + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x[:, self.config.prefix_tokens:]))

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
             facts: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over labelled tokens (labels aligned with input_ids; IGNORE_INDEX skipped)."""
        logits = self(images, input_ids)[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        return F.cross_entropy(logits[keep], target[keep])

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_new_tokens: int = 256, bos_id: int = 1, eos_id: int = 2,
                 num_beams: int = 1, prompts: list[list[int]] | None = None, pad_id: int = 0,
                 length_penalty: float = 1.0) -> torch.Tensor:
        """Greedy decoding after each prompt (B, L <= max_new_tokens), EOS included when reached, pad_id after it.

        Prompts of different lengths share one right-padded buffer: attention is causal, so what follows a
        sample's last real token never changes its logits there. No key/value cache: the whole buffer is run
        again each step, which at these sizes costs less than the bookkeeping would save.
        """
        if num_beams != 1:
            raise InvalidArgument("cad_prefix_lm decodes greedily: num_beams must be 1")
        if max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be at least 1")
        b = images.shape[0]
        prompts = prompts if prompts is not None else [[bos_id]] * b
        if len(prompts) != b or not all(prompts):
            raise InvalidArgument(f"need one non-empty prompt per image ({b}), got {len(prompts)}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.config.max_len:
            max_new_tokens = self.config.max_len - longest
            if max_new_tokens < 1:
                raise InvalidArgument(f"a prompt of {longest} tokens leaves no room in max_len {self.config.max_len}")
        was_training = self.training
        self.eval()
        try:
            buf = torch.full((b, longest + max_new_tokens), pad_id, dtype=torch.long, device=images.device)
            for i, p in enumerate(prompts):
                buf[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            lengths = torch.tensor([len(p) for p in prompts], device=images.device)
            prefix = self.image_prefix(images)
            done = torch.zeros(b, dtype=torch.bool, device=images.device)
            rows = torch.arange(b, device=images.device)
            steps: list[torch.Tensor] = []
            for _ in range(max_new_tokens):
                x = torch.cat([prefix, self.embed(buf[:, :int(lengths.max())])], dim=1)
                x = x + self.pos[: x.shape[1]]
                for block in self.blocks:
                    x = block(x)
                h = x[rows, self.config.prefix_tokens + lengths - 1]
                token = self.lm_head(self.norm(h)).argmax(-1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                steps.append(token)
                done |= token == eos_id
                if bool(done.all()):
                    break
                buf[rows, lengths] = token
                lengths = lengths + 1
            return torch.stack(steps, dim=1)
        finally:
            self.train(was_training)


def build_lm(config: LMConfig | dict[str, Any] | None = None, seed: int | None = None) -> ImagePrefixLM:
    """The base model from its config, randomly initialised (``seed`` makes the initialisation reproducible)."""
    cfg = config if isinstance(config, LMConfig) else LMConfig.from_dict(config or {})
    if seed is None:
        return ImagePrefixLM(cfg)
    with torch.random.fork_rng(devices=[]):  # weights are created on the CPU; leave the global seed alone
        torch.manual_seed(seed)
        return ImagePrefixLM(cfg)


@register_model
def cad_prefix_lm(**config: Any) -> nn.Module:
    """Image-prefix decoder-only transformer (the base for LoRA fine-tuning), built from LMConfig fields."""
    return build_lm(LMConfig.from_dict(config))


def lora_targets(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Linear]:
    """The Linear layers peft will adapt: those whose name ends with one of ``target_modules``."""
    suffixes = tuple(target_modules)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)}


def lora_param_count(model: nn.Module, target_modules: Iterable[str], r: int) -> int:
    """sum r * (in + out) over the targeted Linear layers: what a LoRA of rank r adds and trains."""
    return sum(r * (m.in_features + m.out_features) for m in lora_targets(model, target_modules).values())


def add_lora(model: nn.Module, target_modules: Iterable[str] = ("q_proj", "v_proj"), r: int = 8,
             alpha: int | None = None, dropout: float = 0.0) -> PeftModel:
    """Wrap ``model`` (modified in place) with LoRA adapters; only the adapters stay trainable."""
    targets = list(target_modules)
    if not lora_targets(model, targets):
        raise InvalidArgument(f"no nn.Linear in the model matches target_modules {targets}")
    from peft import LoraConfig, get_peft_model  # peft (and transformers) load only when LoRA is used

    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights (names, shapes and bytes), LoRA tensors excluded."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        # peft renames a wrapped layer's weight to <layer>.base_layer.weight; hash the original name.
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """adapter_model.safetensors + adapter_config.json (peft's format) + the base fingerprint."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / FINGERPRINT_FILE).write_text(json.dumps({"sha256": base_fingerprint(model)}) + "\n")
    return directory


def load_adapter(base: nn.Module, directory: str | Path, trainable: bool = False) -> PeftModel:
    """Attach a saved adapter to ``base`` (modified in place); refuses a base whose weights differ."""
    directory = Path(directory)
    if not (directory / "adapter_model.safetensors").is_file():
        raise NotFound(f"no adapter_model.safetensors in {directory}")
    fingerprint = directory / FINGERPRINT_FILE
    if fingerprint.is_file():
        expected = json.loads(fingerprint.read_text())["sha256"]
        if base_fingerprint(base) != expected:
            raise FailedPrecondition(f"adapter in {directory} was trained on another base model (weights differ)")
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", FINGERPRINT_FILE)


def adapter_files(model: PeftModel) -> dict[str, bytes]:
    """The adapter as the files ``save_adapter`` writes (published beside a LoRA-tuned model's merged weights)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}


def merged_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base's state dict with the adapters folded in (W + B A * alpha / r), ``model`` left as it is."""
    import copy

    return {k: v.detach().cpu().contiguous() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


def load_published_adapter(store, name: str, version: int | None = None) -> PeftModel:
    """A published LoRA-tuned model as its base (the published model its card names) plus its adapter, unmerged;
    refuses a base whose weights are not the ones the adapter was trained on."""
    import tempfile

    from shared.modelcard import load_published, model_prefix, parse_model_ref, read_card

    card = read_card(store, name, version)
    base_ref = getattr(card, "base_model", None)
    if not base_ref:
        raise FailedPrecondition(f"model {name}:{card.version} is not LoRA-tuned (its card names no base_model)")
    ref = parse_model_ref(base_ref)
    base, _ = load_published(store, ref.name, ref.resolve(store))
    prefix = model_prefix(name, card.version)
    with tempfile.TemporaryDirectory() as tmp:
        for file in ADAPTER_FILES:
            (Path(tmp) / file).write_bytes(store.get_verified(prefix, file))
        return load_adapter(base, tmp)


def merge(model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights (W + B A * alpha / r) and return the plain base module."""
    return model.merge_and_unload()
