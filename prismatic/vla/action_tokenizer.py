"""The action tokenizer lives in `prismatic.models.action_tokenizer` (the model's inference needs it); this name
stays importable for existing callers."""

from prismatic.models.action_tokenizer import LLAMA_VOCAB_SIZE, ActionTokenizer

__all__ = ["LLAMA_VOCAB_SIZE", "ActionTokenizer"]
