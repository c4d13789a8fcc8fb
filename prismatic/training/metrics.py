"""Per-step metrics and the sinks they go to: console, `metrics.jsonl`, Weights & Biases."""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from prismatic.models.action_tokenizer import ActionTokenizer

# The user's guide names these; every sink writes them on every step under exactly these keys.
CRAFT_LOG_FIELDS = ("retention_mode", "L_act", "L_ret", "lambda", "epsilon", "grad_dot", "grad_cos", "projection")


def action_metrics(logits: torch.Tensor, targets: torch.Tensor, action_tokenizer: ActionTokenizer) -> Dict[str, float]:
    """Token accuracy and L1 error (normalised action space) over the action positions only (not EOS)."""
    preds = logits.argmax(dim=-1)
    mask = action_tokenizer.is_action(targets)
    if not mask.any():
        return {"action_accuracy": float("nan"), "l1_loss": float("nan")}
    accuracy = (preds[mask] == targets[mask]).float().mean().item()
    pred_actions = action_tokenizer.decode(preds[mask].cpu().numpy())
    true_actions = action_tokenizer.decode(targets[mask].cpu().numpy())
    return {"action_accuracy": accuracy, "l1_loss": float(abs(pred_actions - true_actions).mean())}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


CONSOLE_KEYS = ("step", *CRAFT_LOG_FIELDS, "action_accuracy", "learning_rate", "step_time_s")
EVAL_CONSOLE_KEYS = ("step", "epsilon", "eval/heldout_L_ret", "eval/heldout_frac_over_eps", "eval/train_L_ret",
                     "eval/val_L_act", "eval/val_action_accuracy", "eval/val_l1", "eval/retention_action_accuracy",
                     "eval_time_s")


class ConsoleSink:
    def __init__(self, keys=CONSOLE_KEYS, prefix: str = ""):
        self.keys, self.prefix = keys, prefix

    def log(self, record: dict) -> None:
        print(self.prefix + " ".join(f"{k}={_fmt(record[k])}" for k in self.keys if k in record)
              + (" SKIPPED" if record.get("skipped") else ""), flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbSink:
    def __init__(self, run_dir: Path, run_id: str, project: str, entity: Optional[str], mode: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, name=run_id, id=run_id.replace("/", "_"),
                              dir=str(run_dir), mode=mode, config=config, resume="allow")

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Fans each step's record out to every sink, and each evaluation row to the evaluation sinks."""

    def __init__(self, sinks: List, eval_sinks: Sequence = ()):
        self.sinks, self.eval_sinks = sinks, list(eval_sinks)

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def log_eval(self, row: dict) -> None:
        for sink in self.eval_sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in {id(sink): sink for sink in self.sinks + self.eval_sinks}.values():  # W&B may be in both
            sink.close()
