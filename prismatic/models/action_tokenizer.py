"""Continuous actions <-> the last 256 ids of the Llama-2 text vocabulary (OpenVLA's discretisation)."""

import numpy as np

LLAMA_VOCAB_SIZE = 32000  # text vocabulary without the added <PAD>


class ActionTokenizer:
    """256 uniform bin edges on [-1, 1]; bin k maps to id `vocab_size - k`, so +1 -> 31744, -1 -> 31999."""

    def __init__(self, n_bins: int = 256, vocab_size: int = LLAMA_VOCAB_SIZE, low: float = -1.0, high: float = 1.0):
        self.n_bins, self.vocab_size = n_bins, vocab_size
        self.low, self.high = low, high
        self.bins = np.linspace(low, high, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def action_token_begin_idx(self) -> int:
        """Ids strictly above this one are action tokens (31743 for Llama-2)."""
        return self.vocab_size - (self.n_bins + 1)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        clipped = np.clip(actions, self.low, self.high)
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        idx = np.clip(self.vocab_size - np.asarray(token_ids) - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx]

    def is_action(self, token_ids):
        return token_ids > self.action_token_begin_idx
