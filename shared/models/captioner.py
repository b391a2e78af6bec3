"""``cad_captioner``: a CNN image encoder and a GRU decoder that writes a CAD part's construction text.

Input images: float tensors (B, 3, S, S), S = ``image_size`` (64 by default), values ``(rgb/255 - 0.5) / 0.5``
in [-1, 1]; ``preprocess_images`` makes them from uint8 views of any size (area-averaged down to S).
Why 64 px: the views are flat-shaded parts with black outlines, framed so the part fills the image; at
64 px outlines, holes and bosses stay visible, and the encoder costs a quarter of what it would at 128 px
in a training step that the ~125 GRU steps per sample already dominate.

Encoder: four stride-2 conv stages (GroupNorm) over the image and two coordinate channels (CoordConv), pooled by
mean and by max: where a silhouette ends is what a part's size is in a view, and the renderer draws every view of
a part at one scale, so a view shows the part's extents as fractions of its largest side.

Decoder: token embedding (E) -> GRU (H) -> [h_t ; attention context over the feature map] -> tanh projection
(E) -> vocabulary logits. The image conditions the decoder four ways:
- a linear map of the whole flattened feature map (where things are, not only what) is the GRU's initial
  hidden state; it is left unsquashed: a tanh here saturated in training and cut the image off;
- as in LLaVA, the ``<image>`` placeholder's input embedding is replaced by a projection of that code;
- the pooled features are added to every input embedding: the same as concatenating them to each input
  (the GRU's input map is linear), without paying for a wider input at every step;
- each output reads a dot-product attention over the cells of one encoder stage's map (``attn_stage``, the last,
  4x4, by default), each cell with a learnt position embedding (Luong-style, after the GRU, so all steps attend
  in one batched matmul);
- facts heads on the pooled features predict what a view shows of the part (extrusion count, first sketch
  plane, each step's operation and shape, the extents across and down the view:
  ``shared.cad.descriptions.fact_targets``), trained beside the text with ``facts_weight``, and their predicted
  distributions are added into the initial hidden state and into every step's input, so the decoder reads them
  where it writes them.
``loss`` computes logits only at labelled positions: the vocabulary projection is the largest per-token
cost after the recurrence, and the instruction and padding need none.

Default config (vocab 1,536, image 64, channels 16-32-64-128 with a second conv at 8x8, GroupNorm, E 64,
H 128, attention 64, dropout 0.35): 657,432 parameters; the vocabulary's embedding and output layer hold 198,144 of
them, the map -> initial-state layers 139,456, cheap because they run once per sample, not per token.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from shared.cad.descriptions import FACT_GROUPS, fact_targets
from shared.errors import InvalidArgument
from shared.models.registry import register_model
from shared.text.conversation import IGNORE_INDEX, prompt_ids
from shared.text.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def preprocess_images(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) RGB -> float (B, 3, size, size) in [-1, 1], area-averaged.

    Not ``shared.preprocess.Preprocessor``: that normalises (one fused op) before it resizes, which moves these
    values by up to 4e-7; with the length-sorted training batches of an earlier version that was enough to move
    the 2,000-model acceptance run's count head from 39.5% to 26.8%, and the acceptance figures are measured with
    this function. Training, evaluation, the benchmark and serving all call it."""
    if images.dtype != torch.uint8:
        raise InvalidArgument(f"preprocess_images expects uint8 RGB, got {images.dtype}")
    x = images[None] if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise InvalidArgument(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    x = x.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        # Area averaging keeps thin outlines as grey lines instead of aliasing them away.
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.sub_(0.5).div_(0.5)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _conv_norm(cin: int, cout: int, stride: int, norm: str = "group") -> list[nn.Module]:
    # GroupNorm, not BatchNorm: per-sample statistics are the same in training and when one view is served (with
    # the length-sorted batches of an earlier version, each of one extrusion count, BatchNorm's batch statistics
    # told the count in training and the count head stayed at chance on validation).
    if norm == "none":
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
    layer = nn.GroupNorm(8, cout) if norm == "group" else nn.BatchNorm2d(cout)
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), layer, nn.ReLU(inplace=True)]


class ImageEncoder(nn.Module):
    """Four stride-2 conv stages: (B, 3, S, S) -> the map after a chosen stage and the last map (B, C, S/16, S/16),
    4x4 cells at S = 64.

    ``double``: stages that get a second, stride-1 conv (the 8x8 one by default: cheap per sample there).
    Two coordinate channels (x and y in [-1, 1]) join the image (CoordConv): with them a channel can hold "part
    here, this far right", and the max over the map where the part's silhouette ends, which is what its size is
    in the view.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), double: tuple[int, ...] = (2,),
                 norm: str = "group"):
        super().__init__()
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index in ``net`` after each stage's last layer
        cin = 5
        for i, cout in enumerate(channels):
            layers += _conv_norm(cin, cout, 2, norm)
            if i in double:
                layers += _conv_norm(cout, cout, 1, norm)
            self.stage_ends.append(len(layers))
            cin = cout
        self.net = nn.Sequential(*layers)
        self.stride = 2 ** len(channels)

    def forward(self, x: torch.Tensor, stage: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(the map after ``stage``, the last map)."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([x, ys, xs], 1)
        end, kept = self.stage_ends[stage], None
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i + 1 == end:
                kept = x
        return kept, x


class TextGenerator:
    """What every captioning model (``task: captioning``) shares: its tokenizer and the text in and out.

    The tokenizer is not a parameter: it is trained on the training split's text, published beside the weights
    (TOKENIZER_FILE) and attached by ``load_files`` when a published model is rebuilt. The model provides
    ``vocab_size``, ``image_token_id``, ``image_size`` and ``generate(images, max_new_tokens=, bos_id=, eos_id=,
    num_beams=, prompts=, pad_id=, length_penalty=)``.
    """

    tokenizer: Tokenizer | None

    # ---- the files published beside the weights (shared.modelcard) ----

    def export_files(self) -> dict[str, bytes]:
        if self.tokenizer is None:
            raise InvalidArgument("the model has no tokenizer attached: nothing can decode its output")
        return {TOKENIZER_FILE: self.tokenizer.to_bytes()}

    def load_files(self, files: dict[str, bytes]) -> None:
        if TOKENIZER_FILE not in files:
            raise InvalidArgument(f"a published captioning model needs {TOKENIZER_FILE} beside its weights")
        tokenizer = Tokenizer.from_bytes(files[TOKENIZER_FILE], TOKENIZER_FILE)
        if tokenizer.vocab_size != self.vocab_size or tokenizer.image_id != self.image_token_id:
            raise InvalidArgument(f"{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens (image id {tokenizer.image_id}"
                                  f"), the model {self.vocab_size} (image id {self.image_token_id})")
        self.tokenizer = tokenizer

    @torch.no_grad()
    def describe(self, images: torch.Tensor, prompts: list[str], *, max_new_tokens: int = 256, num_beams: int = 1,
                 length_penalty: float = 1.0) -> list[str]:
        """Text for each image (float, as ``preprocess_images`` makes them) after its human prompt."""
        tok = self.tokenizer
        if tok is None:
            raise InvalidArgument("the model has no tokenizer attached")
        ids = self.generate(images, max_new_tokens=max_new_tokens, bos_id=tok.bos_id, eos_id=tok.eos_id,
                            num_beams=num_beams, prompts=[prompt_ids(p, tok) for p in prompts], pad_id=tok.pad_id,
                            length_penalty=length_penalty)
        return [tok.decode(row) for row in ids.tolist()]


class CadCaptioner(TextGenerator, nn.Module):
    def __init__(self, vocab_size: int = 1536, image_size: int = 64, channels: tuple[int, ...] = (16, 32, 64, 128),
                 double: tuple[int, ...] = (2,), embed_dim: int = 64, hidden_dim: int = 128, attn_dim: int = 64,
                 dropout: float = 0.35, image_token_id: int = 4, facts_weight: float = 3.0, norm: str = "group",
                 attn_stage: int = -1):
        super().__init__()
        # image_token_id: the tokenizer's <image> id (4 in every shared.text tokenizer).
        self.vocab_size, self.image_size, self.image_token_id = vocab_size, image_size, image_token_id
        if norm not in ("group", "batch", "none"):
            raise InvalidArgument(f"norm must be group, batch or none, got {norm!r}")
        if not -len(channels) <= attn_stage < len(channels):
            raise InvalidArgument(f"attn_stage must name one of the {len(channels)} encoder stages, got {attn_stage}")
        self.encoder = ImageEncoder(tuple(channels), tuple(double), norm)
        if image_size % self.encoder.stride:
            raise InvalidArgument(f"image_size must be a multiple of {self.encoder.stride}, got {image_size}")
        c, cells = channels[-1], (image_size // self.encoder.stride) ** 2
        # The initial state sees the whole flattened map, so it knows where things are, not only what;
        # a per-sample linear layer, so its parameters cost almost nothing per token.
        # (a 1x1 conv to 64 channels first halves it: the flattened 128-channel map would need 262K weights)
        self.init_reduce = nn.Conv2d(c, 64, 1)
        self.init_hidden = nn.Linear(64 * cells, hidden_dim)
        # Pooled features: mean and max over the map (the max finds where the silhouette ends).
        self.image_bias = nn.Linear(2 * c, embed_dim)
        # LLaVA-style: the <image> placeholder's input embedding is replaced by a projection of the image.
        self.image_token = nn.Linear(hidden_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        # Attention over the cells of one encoder stage's map, each cell with a learnt position embedding.
        self.attn_stage = attn_stage % len(channels)
        ac, side = channels[self.attn_stage], image_size // 2 ** (self.attn_stage + 1)
        self.cell_pos = nn.Parameter(torch.zeros(side * side, ac))
        self.attn_query = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.attn_key = nn.Linear(ac, attn_dim, bias=False)
        self.attn_value = nn.Linear(ac, attn_dim, bias=False)
        self.pre_out = nn.Linear(hidden_dim + attn_dim, embed_dim)
        self.out = nn.Linear(embed_dim, vocab_size)
        self.drop = nn.Dropout(dropout)
        # Facts heads: the pooled image predicts the part's extrusion count, first sketch plane, each step's
        # operation and shape, and its size across and down the view (shared.cad.descriptions.fact_targets), and the
        # decoder starts from those predictions too. See ``loss``.
        self.facts_weight, self.fact_groups = facts_weight, FACT_GROUPS
        self.facts_head = nn.Linear(2 * c, sum(FACT_GROUPS))
        self.facts_in = nn.Linear(sum(FACT_GROUPS), hidden_dim, bias=False)
        self.facts_embed = nn.Linear(sum(FACT_GROUPS), embed_dim, bias=False)
        self.tokenizer: Tokenizer | None = None

    # ---- pieces shared by training and generation ----

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample image state: initial hidden (1, B, H), <image> embedding and input bias (B, 1, E), attention
        keys and values (B, cells, A)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise InvalidArgument(f"expected images (B, 3, {self.image_size}, {self.image_size}), "
                                  f"got {tuple(images.shape)}")
        attended, fmap = self.encoder(images, self.attn_stage)
        cells = fmap.flatten(2)  # (B, C, cells)
        pooled = torch.cat([cells.mean(2), cells.amax(2)], 1)
        facts = self.facts_head(self.drop(pooled))
        beliefs = torch.cat([group.softmax(1) for group in facts.split(FACT_GROUPS, dim=1)], dim=1)
        code = self.init_hidden(self.drop(self.init_reduce(fmap).flatten(1))) + self.facts_in(beliefs)
        where = attended.flatten(2).transpose(1, 2) + self.cell_pos  # (B, cells, C)
        return {
            "h0": code[None],
            "token": self.image_token(code)[:, None],
            # Into every step's input too: the state from h0 fades over the ~100 steps of a description.
            "bias": (self.image_bias(pooled) + self.facts_embed(beliefs))[:, None],
            "facts": facts,
            "keys": self.attn_key(where),
            "values": self.attn_value(where),
        }

    def _run(self, state: dict[str, torch.Tensor], input_ids: torch.Tensor, h0: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRU over ``input_ids`` (B, T) from ``h0``: outputs (B, T, H) and the last hidden state."""
        x = self.embed(input_ids)
        x = torch.where((input_ids == self.image_token_id)[..., None], state["token"], x)
        return self.gru(self.drop(x + state["bias"]), h0)

    def _features(self, state: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """GRU outputs (B, T, H) -> pre-logit features (B, T, E), attending over the image cells."""
        q = self.attn_query(h)
        weights = torch.softmax(q @ state["keys"].transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
        context = weights @ state["values"]
        return self.drop(torch.tanh(self.pre_out(torch.cat([h, context], dim=-1))))

    # ---- training ----

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V): position t predicts token t + 1. Without ``input_ids``, one step from BOS (id 1): the
        cost of the first generated token, what a model summary and a FLOP count measure."""
        if input_ids is None:
            input_ids = torch.ones(images.shape[0], 1, dtype=torch.long, device=images.device)
        state = self.encode_images(images)
        h, _ = self._run(state, input_ids, state["h0"])
        return self.out(self._features(state, h))

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
             facts: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over labelled tokens (labels aligned with input_ids, IGNORE_INDEX skipped).

        In eval mode the same value as cross_entropy(forward(...)[:, :-1], labels[:, 1:]), but logits are
        computed only where a label exists.
        """
        state = self.encode_images(images)
        h, _ = self._run(state, input_ids, state["h0"])
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        ce = F.cross_entropy(self.out(self._features(state, h[:, :-1])[keep]), target[keep])
        if not self.training or facts is None or self.facts_weight == 0:
            return ce
        # In training, plus facts_weight x the facts heads' loss: teacher forcing alone learns the text's language
        # model first and reads the image late and little (0.2 nats per description on text tokens after 8
        # epochs); the heads give the encoder a direct signal of what a view shows from the first step.
        groups = state["facts"].split(FACT_GROUPS, dim=1)
        aux = sum(F.cross_entropy(g, facts[:, i], ignore_index=-1) for i, g in enumerate(groups))
        return ce + self.facts_weight * aux

    @staticmethod
    def fact_targets(turns: list[tuple[str, str]]) -> torch.Tensor:
        """(B, len(FACT_GROUPS)) int64 class targets of (prompt, answer) turns (-1 where they do not say)."""
        return torch.tensor([fact_targets(answer, prompt) for prompt, answer in turns], dtype=torch.long)

    # ---- generation ----

    def _prefix(self, images: torch.Tensor, prompts: list[list[int]] | None, bos_id: int
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Run the prompts; returns the image state, the hidden state after each prompt and its last token's
        GRU output, ready to predict the first answer token."""
        state = self.encode_images(images)
        b = images.shape[0]
        prompts = prompts if prompts is not None else [[bos_id]] * b
        if len(prompts) != b or not all(prompts):
            raise InvalidArgument(f"need one non-empty prompt per image ({b}), got {len(prompts)}")
        lengths = torch.tensor([len(p) for p in prompts], device=images.device)
        ids = torch.zeros(b, int(lengths.max()), dtype=torch.long, device=images.device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        out, _ = self._run(state, ids, state["h0"])
        # A single-layer GRU's output at the prompt's last real token is its hidden state there.
        last = out[torch.arange(b, device=out.device), lengths - 1]
        return state, last[None].contiguous(), last[:, None]

    def _logprobs(self, state: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.out(self._features(state, out))[:, -1], dim=-1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_new_tokens: int = 256, bos_id: int = 1, eos_id: int = 2,
                 num_beams: int = 1, prompts: list[list[int]] | None = None, pad_id: int = 0,
                 length_penalty: float = 1.0) -> torch.Tensor:
        """Token ids (B, L <= max_new_tokens) written after each prompt, EOS included when reached, pad_id after it.

        ``prompts``: the prefix of each sample, ``conversation.prompt_ids`` (BOS, instruction, SEP), as in
        training; None starts from BOS alone. ``num_beams`` 1 is greedy decoding, more is beam search
        (``beam_search``).
        """
        if max_new_tokens < 1 or num_beams < 1:
            raise InvalidArgument("max_new_tokens and num_beams must be at least 1")
        if num_beams > 1:
            return self.beam_search(images, max_new_tokens, bos_id, eos_id, num_beams, prompts, pad_id, length_penalty)
        with _eval(self):
            return self._greedy(*self._prefix(images, prompts, bos_id), max_new_tokens, eos_id, pad_id)

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, max_new_tokens: int = 256, bos_id: int = 1, eos_id: int = 2,
                    num_beams: int = 4, prompts: list[list[int]] | None = None, pad_id: int = 0,
                    length_penalty: float = 1.0) -> torch.Tensor:
        """Batched beam search, same output layout as ``generate``; with num_beams=1 it equals greedy decoding.

        B x num_beams live beams advance together; a beam that emits EOS moves to its sample's finished list,
        a sample is done once it holds num_beams finished hypotheses, and the best by
        log-probability / length ** length_penalty is returned.
        """
        if max_new_tokens < 1 or num_beams < 1:
            raise InvalidArgument("max_new_tokens and num_beams must be at least 1")
        with _eval(self):
            state, h, out = self._prefix(images, prompts, bos_id)
            return self._beam_search(state, h, out, max_new_tokens, eos_id, pad_id, num_beams, length_penalty)

    def _greedy(self, state: dict[str, torch.Tensor], h: torch.Tensor, out: torch.Tensor, max_new_tokens: int,
                eos_id: int, pad_id: int) -> torch.Tensor:
        b = h.shape[1]
        done = torch.zeros(b, dtype=torch.bool, device=h.device)
        steps: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token = self._logprobs(state, out).argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            steps.append(token)
            done |= token == eos_id
            if bool(done.all()):
                break
            out, h = self._run(state, token[:, None], h)
        return torch.stack(steps, dim=1)

    def _beam_search(self, state: dict[str, torch.Tensor], h: torch.Tensor, out: torch.Tensor, max_new_tokens: int,
                     eos_id: int, pad_id: int, k: int, length_penalty: float) -> torch.Tensor:
        b, device = h.shape[1], h.device
        state = {key: v.repeat_interleave(k, dim=0) for key, v in state.items()}
        h, out = h.repeat_interleave(k, dim=1), out.repeat_interleave(k, dim=0)
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: only one may expand at first
        seqs = torch.zeros(b * k, 0, dtype=torch.long, device=device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            logp = self._logprobs(state, out)
            v = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)
            # 2k candidates so that k live ones remain even when up to k of them end in EOS.
            top_scores, top_idx = cand.topk(2 * k, dim=-1)
            # Python lists: the per-candidate bookkeeping below is far cheaper on them than on tensor elements.
            top_list, src, tok = top_scores.tolist(), (top_idx // v).tolist(), (top_idx % v).tolist()
            new_scores = torch.full((b, k), float("-inf"), device=device)
            new_src = torch.zeros(b, k, dtype=torch.long, device=device)
            new_tok = torch.full((b, k), pad_id, dtype=torch.long, device=device)
            for i in range(b):
                if len(finished[i]) >= k:
                    continue
                live = 0
                for j in range(2 * k):
                    if top_list[i][j] == float("-inf"):
                        break
                    if tok[i][j] == eos_id:
                        if j < k:  # an EOS ranked below k live candidates would not have been kept
                            hyp = seqs[i * k + src[i][j]].tolist() + [eos_id]
                            finished[i].append((top_list[i][j] / len(hyp) ** length_penalty, hyp))
                        continue
                    new_scores[i, live], new_src[i, live], new_tok[i, live] = top_list[i][j], src[i][j], tok[i][j]
                    live += 1
                    if live == k:
                        break
                if len(finished[i]) >= k:
                    new_scores[i] = float("-inf")
            scores = new_scores
            rows = (torch.arange(b, device=device)[:, None] * k + new_src).view(-1)
            seqs = torch.cat([seqs[rows], new_tok.view(-1, 1)], dim=1)
            if all(len(f) >= k for f in finished) or step == max_new_tokens - 1:
                break
            out, h = self._run(state, new_tok.view(-1, 1), h[:, rows].contiguous())
        results: list[list[int]] = []
        for i in range(b):
            hyps = list(finished[i])
            if len(hyps) < k:  # unfinished beams compete at max_new_tokens
                for j in range(k):
                    s = scores[i, j].item()
                    if s != float("-inf"):
                        hyp = seqs[i * k + j].tolist()
                        hyps.append((s / len(hyp) ** length_penalty, hyp))
            results.append(max(hyps, key=lambda t: t[0])[1])
        width = max(len(r) for r in results)
        ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(results):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids


@register_model
def cad_captioner(vocab_size: int = 1536, image_size: int = 64, channels: tuple[int, ...] = (16, 32, 64, 128),
                  double: tuple[int, ...] = (2,), embed_dim: int = 64, hidden_dim: int = 128, attn_dim: int = 64,
                  dropout: float = 0.35, image_token_id: int = 4, facts_weight: float = 3.0,
                  norm: str = "group", attn_stage: int = -1) -> nn.Module:
    """CNN encoder + image-conditioned GRU decoder for CAD view -> text, 657,432 params at the defaults."""
    return CadCaptioner(vocab_size, image_size, channels, double, embed_dim, hidden_dim, attn_dim, dropout,
                        image_token_id, facts_weight, norm, attn_stage)
