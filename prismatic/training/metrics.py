"""Per-step metrics and the sinks they go to: console, `metrics.jsonl`, Weights & Biases."""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from prismatic.vla.action_tokenizer import ActionTokenizer

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


class ConsoleSink:
    KEYS = ("step", *CRAFT_LOG_FIELDS, "action_accuracy", "learning_rate", "step_time_s")

    def log(self, record: dict) -> None:
        print(" ".join(f"{k}={_fmt(record.get(k))}" for k in self.KEYS) + (" SKIPPED" if record.get("skipped") else ""),
              flush=True)

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
    """Fans each step's record out to every sink."""

    def __init__(self, sinks: List):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
