"""Text side of the image->text models: the BPE tokenizer and LLaVA conversation encoding."""
from shared.text.conversation import (
    DEFAULT_MAX_LEN,
    IGNORE_INDEX,
    Batch,
    Example,
    collate,
    encode_record,
    human_and_answer,
    prompt_ids,
    record_texts,
)
from shared.text.tokenizer import DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_MAX_LEN", "DEFAULT_VOCAB_SIZE", "IGNORE_INDEX", "SPECIAL_TOKENS", "Batch", "Example", "Tokenizer",
    "collate", "encode_record", "human_and_answer", "prompt_ids", "record_texts", "train_tokenizer",
]
