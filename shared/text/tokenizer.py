"""Byte-level BPE tokenizer for the CAD descriptions, trained on the training split only (nothing downloaded).

Why byte-level BPE with numbers cut into short pieces rather than a character vocabulary:
- byte-level: every string encodes (the base alphabet is the 256 bytes), so no text is ever unknown
  and ``decode(encode(t)) == t`` for any ``t`` that holds no special-token string;
- numbers are split off before BPE by a regex pre-tokenizer (NUMBER_PIECE): an integer part of one or two
  digits with its point and up to two decimals, then pairs of digits: "0.5764" is "0.57" "64". A token never
  mixes digits with letters nor holds more than three digits, so numbers round-trip exactly, and the first
  piece of a number carries its two leading digits: the magnitude a view can show, in one decision, the
  rest in the next. Four of five characters' worth of a description is numbers: with one token per digit a
  description is ~117 tokens, with these pieces and a 1,536 vocabulary ~57; the sequence length is what a
  GRU pays for step by step;
- between numbers no whitespace pre-split is done, so merges may cross words: the descriptions are
  templated ("Extrude it symmetrically by ", " (normal -Z), sketch a circle of diameter "), and whole
  phrases become single tokens.

The tokenizer is one JSON file (the ``tokenizers`` format: model, pre-tokenizer, decoder and special
tokens together), saved beside the model and loaded back with ``Tokenizer.load``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from shared.errors import InvalidArgument, NotFound

PAD, BOS, EOS, SEP, IMAGE = "<pad>", "<s>", "</s>", "<sep>", "<image>"
# Fixed order, so the special ids are 0..4 in every trained tokenizer. IMAGE is the literal LLaVA
# placeholder: "<image>" in a human turn encodes straight to its id.
SPECIAL_TOKENS = (PAD, BOS, EOS, SEP, IMAGE)
DEFAULT_VOCAB_SIZE = 1536
NUMBER_PIECE = r"\d{1,2}\.\d{1,2}|\d{1,2}\.|\d{1,2}"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Isolate number pieces ("0.57", "64"), then map bytes to the byte-level alphabet with no further splitting.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(NUMBER_PIECE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    """A trained byte-level BPE tokenizer with the five special tokens of ``SPECIAL_TOKENS``."""

    def __init__(self, backend: _Backend):
        self._tok = backend
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise InvalidArgument(f"tokenizer lacks the special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.image_id = ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.image_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added (conversation.py places those)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text`` (byte-level alphabet: 'Ġ' is a space), for inspection."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    def to_bytes(self) -> bytes:
        """The tokenizer as its JSON file's bytes (what ``save`` writes)."""
        return self._tok.to_str().encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "tokenizer") -> Tokenizer:
        try:
            backend = _Backend.from_str(data.decode())
        except Exception as exc:  # the Rust side raises a bare Exception for malformed JSON
            raise InvalidArgument(f"{source} is not a tokenizers JSON file: {exc}") from None
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"tokenizer file {path} does not exist")
        return cls.from_bytes(path.read_bytes(), str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on ``texts`` (the training split only: validation text must stay unseen).

    ``vocab_size`` counts the 256 byte tokens and the 5 special tokens; the result can be smaller when
    the texts run out of pairs seen ``min_frequency`` times.
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise InvalidArgument(f"vocab_size must be at least {floor} (256 bytes + special tokens), got {vocab_size}")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend)
