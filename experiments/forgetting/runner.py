"""Trainer runs driven through their command-line flags: in this process, or in a pool of single-threaded workers
(two small runs side by side use two cores better than one run with two threads).

A run is done when its logs are complete. Fine-tuning runs drop their checkpoint as soon as they finish and copy
their logs to an export folder, which is what lets a fresh machine, given that folder, skip them (Run.settle)."""

import json
import multiprocessing
import os
import shutil
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

LOGS = ("metrics.jsonl", "eval.jsonl", "config.yaml")


@dataclass(frozen=True)
class Run:
    run_root: Path
    run_id: str
    steps: int
    args: tuple  # every trainer flag but --run_root_dir/--run_id/--vla.max_steps/--save_interval
    keep_checkpoint: bool = False  # the final checkpoint is an input of later steps (pretraining, calibration)
    export: Optional[Path] = None  # the logs of the finished run are copied to <export>/<run_id>/

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.run_id

    def settle(self) -> bool:
        """Whether the run is done: the last step's metrics row and the final evaluation row are written (and, where
        kept, the final checkpoint, which the trainer writes after them). A done run is brought to its finished
        state, whatever stopped it before: logs found only in the export folder are restored, logs not yet
        exported are, an unkept checkpoint is deleted."""
        exported = self.export is not None and _logs_complete(self.export / self.run_id, self.steps)
        if exported and not _logs_complete(self.run_dir, self.steps):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            shutil.copytree(self.export / self.run_id, self.run_dir)
        checkpoint = self.run_dir / "checkpoints" / f"step-{self.steps:06d}"
        if not _logs_complete(self.run_dir, self.steps) or (self.keep_checkpoint and not checkpoint.is_dir()):
            return False
        if not self.keep_checkpoint:
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        if self.export is not None and not exported:
            (self.export / self.run_id).mkdir(parents=True, exist_ok=True)
            for name in LOGS:
                shutil.copy2(self.run_dir / name, self.export / self.run_id / name)
        return True

    def flags(self) -> List[str]:
        return [*map(str, self.args), "--run_root_dir", str(self.run_root), "--run_id", self.run_id,
                "--vla.max_steps", str(self.steps), "--save_interval", str(self.steps)]


def train_run(run: Run) -> Run:
    """One trainer run; its console output goes to `<run_id>.log` beside the run folder. An unfinished folder
    from an interrupted earlier attempt is removed first (the trainer refuses to write into an existing one)."""
    import draccus

    from prismatic.conf.train import TrainConfig
    from prismatic.training.trainer import train

    if run.settle():
        return run
    shutil.rmtree(run.run_dir, ignore_errors=True)
    run.run_root.mkdir(parents=True, exist_ok=True)
    with open(run.run_root / f"{run.run_id}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            train(draccus.parse(TrainConfig, args=run.flags()))
        except BaseException:
            traceback.print_exc()
            raise
    if not run.settle():
        raise RuntimeError(f"{run.run_id}: the trainer returned without its last log rows")
    return run


def _logs_complete(run_dir: Path, steps: int) -> bool:
    """Whether the trainer's last metrics row is step `steps` and an evaluation row of that step follows (a line
    cut short by an interrupted write is not a row)."""
    if not all((run_dir / name).is_file() for name in LOGS):
        return False
    try:
        last = [json.loads((run_dir / name).read_text().splitlines()[-1]) for name in ("metrics.jsonl", "eval.jsonl")]
    except (IndexError, ValueError):
        return False
    return all(row.get("step") == steps for row in last)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextmanager
def one_thread():
    """This process computes on one thread inside the block (as the workers do), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_runs(runs: Sequence[Run], workers: int) -> None:
    """All runs, `workers` at a time; the first failure is raised once the others have finished."""
    pending = [r for r in runs if not r.settle()]
    if workers <= 1:
        for run in pending:
            train_run(run)
            print(f"done {run.run_id}", flush=True)
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the workers' OpenMP before torch sets its own count
    errors = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = {pool.submit(train_run, run): run for run in pending}
        for future in as_completed(futures):
            run = futures[future]
            if future.exception() is not None:
                errors.append(f"{run.run_id}: {future.exception()!r} (log: {run.run_root / run.run_id}.log)")
            print(f"{'FAILED' if future.exception() else 'done'} {run.run_id}", flush=True)
    if errors:
        raise RuntimeError("trainer runs failed:\n" + "\n".join(errors))
