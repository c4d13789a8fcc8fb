"""OpenVLA's action discretisation, prompt and loss mask, pinned to the upstream facts."""

import numpy as np
import pytest
import torch

from prismatic.models import build_tiny_tokenizer
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import IGNORE_INDEX, SPACE_TOKEN_ID, PaddedCollator, prompt_text, training_example


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_action_token_ids_match_openvla():
    at = ActionTokenizer()
    assert at.encode(np.array([1.0, 0.0, -1.0, 5.0, -5.0])).tolist() == [31744, 31872, 31999, 31744, 31999]
    assert at.action_token_begin_idx == 31743
    assert at.decode(np.array([31872]))[0] == pytest.approx(0.0, abs=1e-12)
    assert at.decode(np.array([31744]))[0] == pytest.approx(0.99608, abs=1e-5)


def test_action_round_trip_within_one_bin():
    at = ActionTokenizer()
    a = np.random.default_rng(0).uniform(-1, 1, size=10_000)
    ids = at.encode(a)
    assert ids.min() >= 31744 and ids.max() <= 31999
    assert np.abs(at.decode(ids) - a).max() <= 2 / 255 + 1e-12  # one bin width at most
    assert np.abs(at.decode(at.encode(at.decode(ids))) - at.decode(ids)).max() < 1e-12  # centres are fixed points


def test_prompt_and_loss_mask(tokenizer):
    at = ActionTokenizer()
    action = np.array([0.1, -0.2, 0.3, 0.0, 0.5, -1.0, 1.0], dtype=np.float32)
    ids, labels = training_example(tokenizer, at, "Put The Bowl On The Plate", action)
    assert prompt_text("Put The Bowl") == "In: What action should the robot take to put the bowl?\nOut:"
    assert ids[0] == tokenizer.bos_token_id == 1 and ids[-1] == tokenizer.eos_token_id == 2
    assert ids[-9] == SPACE_TOKEN_ID == 29871
    assert ids[-8:-1] == at.encode(action).tolist()
    assert labels[-8:] == ids[-8:] and set(labels[:-8]) == {IGNORE_INDEX}
    prefix = tokenizer(prompt_text("Put The Bowl On The Plate")).input_ids
    assert ids[: len(prefix)] == prefix and tokenizer.decode(prefix, skip_special_tokens=True).endswith("Out:")


def test_collator_right_pads_and_truncates():
    collate = PaddedCollator(pad_token_id=32000, max_length=4)
    batch = collate([[1, 5, 6], [1, 7, 8, 9, 10]], [[-100, 5, 6], [-100, -100, 8, 9, 10]])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 32000], [1, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, -100, 8, 9]]
    assert batch["attention_mask"].tolist() == [[True, True, True, False], [True] * 4]
    assert batch["input_ids"].dtype == torch.long
