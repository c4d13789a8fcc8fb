"""The prompt, loss mask and collator live in `prismatic.models.batching` (the model's inference needs them);
this name stays importable for existing callers."""

from prismatic.models.batching import (
    IGNORE_INDEX,
    SPACE_TOKEN_ID,
    PaddedCollator,
    prompt_ids,
    prompt_text,
    training_example,
)

__all__ = ["IGNORE_INDEX", "SPACE_TOKEN_ID", "PaddedCollator", "prompt_ids", "prompt_text", "training_example"]
