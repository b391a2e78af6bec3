"""Tokenizer and LLaVA conversation encoding (shared/text), on small synthetic CAD descriptions."""
from __future__ import annotations

import random
import re

import pytest
import torch

from shared.errors import InvalidArgument
from shared.text import (
    IGNORE_INDEX,
    Tokenizer,
    collate,
    encode_record,
    human_and_answer,
    prompt_ids,
    record_texts,
    train_tokenizer,
)

SHAPES = ("a circle of diameter {a}", "a rectangle {a} × {b}", "a 6-sided polygon spanning {a} × {b}")
PROMPTS = ("This is the {v} view of a CAD part. Describe how the part is constructed.",
           "Describe the CAD construction history of the part shown in this {v} view.")


def _num(rng: random.Random) -> str:
    return f"{rng.uniform(-1.5, 1.5):.4g}"


def _record(i: int, rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    steps = " ".join(
        f"Step {k + 1}: on the XY plane (normal -Z), sketch "
        + rng.choice(SHAPES).format(a=_num(rng), b=_num(rng))
        + f". Extrude it by {_num(rng)} as a new body."
        for k in range(n))
    answer = (f"The part is built from {n} extrusion{'s' if n > 1 else ''}. Its overall size is "
              f"{_num(rng)} × {_num(rng)} × {_num(rng)} (X × Y × Z). {steps}")
    prompt = rng.choice(PROMPTS).format(v=rng.choice(("front", "top", "right")))
    return {"id": f"{i:08d}_front", "image": f"{i:08d}_front.png",
            "conversations": [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def data() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    records = [_record(i, rng) for i in range(80)]
    return records[:60], records[60:]


@pytest.fixture(scope="module")
def tok(data) -> Tokenizer:
    train, _ = data
    return train_tokenizer(record_texts(train), vocab_size=400)


def test_special_ids_are_distinct_and_fixed(tok):
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.image_id]
    assert ids == [0, 1, 2, 3, 4]
    assert tok.special_ids == frozenset(ids)
    assert 261 < tok.vocab_size <= 400


def test_numbers_are_short_pieces_and_round_trip(tok):
    text = "size 0.6198 × -12.5 and 1e-05, 3141592653 at Z = -0.0007 and 123.45"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = tok.tokens(text)
    for piece in pieces:
        digits = [c for c in piece if c.isdigit()]
        # Digits only with digits: an integer part with its point and up to two decimals, or a digit pair.
        assert not digits or re.fullmatch(r"\d{1,2}\.\d{0,2}|\d{1,2}", piece), piece
    assert any(p.startswith("0.") for p in pieces)  # the integer part keeps its point
    # Every digit of the text shows up in order.
    assert "".join(c for p in pieces for c in p if c.isdigit()) == "".join(c for c in text if c.isdigit())


def test_held_out_texts_round_trip_with_no_unknown_tokens(tok, data):
    _, val = data
    texts = [t for r in val for t in human_and_answer(r)]
    texts.append("unseen characters: ß ∅ ø ⌀ 🙂 and tabs\tand\nnewlines")
    for text in texts:
        ids = tok.encode(text.replace("<image>", ""))
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text.replace("<image>", "")


def test_merges_shorten_the_descriptions(tok, data):
    _, val = data
    answer = human_and_answer(val[0])[1]
    # Templated phrases merge and numbers go by digit pairs: far fewer tokens than characters.
    assert len(tok.encode(answer)) < 0.5 * len(answer)


def test_save_load_gives_identical_ids(tok, data, tmp_path):
    _, val = data
    path = tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    texts = [t for r in val for t in human_and_answer(r)]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    assert (loaded.vocab_size, loaded.eos_id, loaded.image_id) == (tok.vocab_size, tok.eos_id, tok.image_id)


def test_vocab_floor_is_enforced():
    with pytest.raises(InvalidArgument):
        train_tokenizer(["abc"], vocab_size=100)


def test_image_placeholder_encodes_to_its_id(tok, data):
    human, _ = human_and_answer(data[0][0])
    assert tok.encode(human)[0] == tok.image_id
    assert prompt_ids(human, tok)[:2] == [tok.bos_id, tok.image_id]
    assert prompt_ids(human, tok)[-1] == tok.sep_id


def test_instruction_is_masked_and_only_the_answer_plus_eos_carry_labels(tok, data):
    record = data[1][0]
    human, answer = human_and_answer(record)
    ex = encode_record(record, tok)
    n_prompt = len(prompt_ids(human, tok))
    answer_ids = tok.encode(answer)
    assert ex.input_ids[:n_prompt] == prompt_ids(human, tok)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == answer_ids + [tok.eos_id]
    assert ex.input_ids[n_prompt:] == answer_ids + [tok.eos_id]
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert len(labelled) == len(answer_ids) + 1
    assert tok.decode(labelled) == answer
    assert not ex.truncated


def test_truncation_cuts_the_instruction_first(tok, data):
    record = data[1][0]
    human, answer = human_and_answer(record)
    full = encode_record(record, tok)
    n_answer = len(tok.encode(answer))
    ex = encode_record(record, tok, max_len=n_answer + 5)  # BOS, image, one instruction token, SEP, EOS
    assert ex.truncated and len(ex.input_ids) == n_answer + 5
    assert ex.input_ids[:2] == [tok.bos_id, tok.image_id]
    assert ex.labels[-(n_answer + 1):] == full.labels[-(n_answer + 1):]  # the answer and its EOS intact


def test_truncation_of_a_too_long_answer_drops_the_eos(tok, data):
    ex = encode_record(data[1][0], tok, max_len=12)
    assert ex.truncated and len(ex.input_ids) == 12
    assert ex.input_ids[:3] == [tok.bos_id, tok.image_id, tok.sep_id]  # the image token survives
    assert tok.eos_id not in ex.input_ids and tok.eos_id not in ex.labels
    assert ex.labels[:3] == [IGNORE_INDEX] * 3 and IGNORE_INDEX not in ex.labels[3:]


def test_collate_pads_ids_labels_and_mask(tok, data):
    examples = [encode_record(r, tok) for r in data[1][:3]]
    batch = collate(examples, tok.pad_id, pad_to_multiple_of=8)
    longest = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.input_ids.shape[1] % 8 == 0 and batch.input_ids.shape[1] >= longest
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch.lengths[row] == n
        assert batch.input_ids[row, :n].tolist() == e.input_ids
        assert batch.labels[row, :n].tolist() == e.labels
        assert torch.all(batch.input_ids[row, n:] == tok.pad_id)
        assert torch.all(batch.labels[row, n:] == IGNORE_INDEX)
        assert batch.attention_mask[row].sum() == n


def test_records_must_be_human_then_gpt():
    with pytest.raises(InvalidArgument):
        human_and_answer({"id": "x", "conversations": [{"from": "gpt", "value": "a"},
                                                       {"from": "human", "value": "b"}]})
