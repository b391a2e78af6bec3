"""LLaVA conversation records -> (input_ids, labels) for teacher forcing, and batch collation.

One record ``{"conversations": [{"from": "human", "value": "<image>\\n<instruction>"}, {"from": "gpt",
"value": <answer>}]}`` becomes

    input_ids = [BOS] + tokens(human value) + [SEP] + tokens(answer) + [EOS]
    labels    = [-100] * (1 + len(human tokens) + 1) + tokens(answer) + [EOS]

as LLaVA builds its targets: everything up to and including the separator that opens the answer (its
"ASSISTANT:") is IGNORE_INDEX, so the loss falls on the answer tokens and the EOS only. ``<image>`` in the
human value encodes to the tokenizer's image id (the slot where image features belong). Labels are
aligned with input_ids (Hugging Face convention): the model's prediction at position t is scored
against labels[t + 1], the models shift.

Truncation to ``max_len`` (default 384 tokens; the longest synthetic description is ~100 tokens with
the 1,536-token BPE, ~57 on average):
1. the instruction is cut first, from its end, keeping every image token: it carries no loss;
2. if the answer alone does not fit in ``max_len - 3`` (BOS, SEP, EOS), the instruction text is gone
   and the answer is cut from its end, and the EOS is dropped: the model must not learn to stop
   where the text did not end. ``Example.truncated`` says when either happened.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import InvalidArgument
from shared.text.tokenizer import IMAGE, Tokenizer

IGNORE_INDEX = -100  # what torch's cross_entropy skips, and LLaVA's IGNORE_INDEX
DEFAULT_MAX_LEN = 384


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with the pad id
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on the instruction and on padding
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    lengths: torch.Tensor  # (B,) int64, real tokens per row


def human_and_answer(record: Mapping[str, Any]) -> tuple[str, str]:
    """The first human turn and the gpt turn that answers it."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise InvalidArgument(f"record {record.get('id')!r}: needs a human turn and a gpt turn")
    human, answer = turns[0], turns[1]
    if human.get("from") != "human" or answer.get("from") != "gpt":
        raise InvalidArgument(f"record {record.get('id')!r}: expected turns human then gpt, "
                              f"got {human.get('from')!r} then {answer.get('from')!r}")
    return str(human.get("value", "")), str(answer.get("value", ""))


def record_texts(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Instruction and answer texts of ``records`` (image placeholders removed), to train a tokenizer on."""
    out: list[str] = []
    for record in records:
        human, answer = human_and_answer(record)
        out += [human.replace(IMAGE, ""), answer]
    return out


def _cut_instruction(ids: list[int], excess: int, image_id: int) -> list[int]:
    """Drop ``excess`` non-image tokens from the end of ``ids``."""
    keep = list(ids)
    for i in range(len(keep) - 1, -1, -1):
        if excess <= 0:
            break
        if keep[i] != image_id:
            del keep[i]
            excess -= 1
    return keep


def prompt_ids(human: str, tokenizer: Tokenizer, max_len: int = DEFAULT_MAX_LEN) -> list[int]:
    """[BOS] + instruction + [SEP]: the prefix generation starts from (the instruction cut to ``max_len``)."""
    ids = tokenizer.encode(human)
    ids = _cut_instruction(ids, len(ids) + 2 - max_len, tokenizer.image_id)
    return [tokenizer.bos_id, *ids, tokenizer.sep_id]


def encode_record(record: Mapping[str, Any], tokenizer: Tokenizer, max_len: int = DEFAULT_MAX_LEN) -> Example:
    """Teacher-forcing input and labels for one record's human -> gpt turn (see the module doc)."""
    if max_len < 4:
        raise InvalidArgument(f"max_len must be at least 4 (BOS, SEP, one answer token, EOS), got {max_len}")
    human, answer = human_and_answer(record)
    instruction, reply = tokenizer.encode(human), tokenizer.encode(answer)
    truncated = False
    excess = 3 + len(instruction) + len(reply) - max_len
    if excess > 0:
        truncated = True
        instruction = _cut_instruction(instruction, excess, tokenizer.image_id)
        excess = 3 + len(instruction) + len(reply) - max_len
    end = [tokenizer.eos_id]
    if excess > 0:
        # Only image tokens are left of the instruction: the answer itself is too long.
        reply, end = reply[:max_len - 2 - len(instruction)], []
    prefix = [tokenizer.bos_id, *instruction, tokenizer.sep_id]
    target = [*reply, *end]
    return Example(prefix + target, [IGNORE_INDEX] * len(prefix) + target, truncated)


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad a list of examples into tensors (labels padded with IGNORE_INDEX)."""
    if not examples:
        raise InvalidArgument("cannot collate an empty batch")
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.long)
    width = int(lengths.max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    attention_mask = torch.arange(width)[None, :] < lengths[:, None]
    return Batch(input_ids, labels, attention_mask, lengths)
