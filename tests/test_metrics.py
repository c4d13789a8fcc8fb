"""The sinks every step goes to: console, metrics.jsonl, and Weights & Biases in offline mode."""

import json

import numpy as np
import torch

from prismatic.training.metrics import CRAFT_LOG_FIELDS, ConsoleSink, JsonlSink, WandbSink, action_metrics
from prismatic.models.action_tokenizer import ActionTokenizer

RECORD = {"step": 1, "retention_mode": "hidden", "L_act": 2.5, "L_ret": 0.01, "lambda": 0.2, "epsilon": 0.05,
          "grad_dot": -0.1, "grad_cos": -0.3, "projection": True, "learning_rate": 2e-5, "action_accuracy": 0.5,
          "step_time_s": 0.4, "skipped": False}


def test_the_user_guides_field_names_are_pinned():
    assert CRAFT_LOG_FIELDS == ("retention_mode", "L_act", "L_ret", "lambda", "epsilon", "grad_dot", "grad_cos",
                                "projection")


def test_console_and_jsonl_carry_the_eight_fields(tmp_path, capsys):
    ConsoleSink().log(RECORD)
    line = capsys.readouterr().out
    assert all(f"{k}=" in line for k in CRAFT_LOG_FIELDS) and "projection=True" in line
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.log(RECORD)
    sink.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == RECORD


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(tmp_path, "run-x", project="p", entity=None, mode="offline", config={"a": 1})
    sink.log(RECORD)
    sink.log({**RECORD, "step": 2, "L_ret": None})
    sink.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_action_metrics_by_hand():
    at = ActionTokenizer()
    targets = torch.tensor([31744, 31872, 2])  # +1, 0, then EOS (not an action)
    logits = torch.zeros(3, 32064)
    logits[0, 31744] = 1  # right
    logits[1, 31873] = 1  # one bin off
    logits[2, 5] = 1
    m = action_metrics(logits, targets, at)
    assert m["action_accuracy"] == 0.5
    assert m["l1_loss"] == np.float64(abs(at.decode(np.array([31873]))[0] - at.decode(np.array([31872]))[0])) / 2
