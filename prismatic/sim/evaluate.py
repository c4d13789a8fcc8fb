"""Closed-loop LIBERO evaluation: N simulator workers, one batched policy call per step, resumable results.

Each worker plays whole episodes; at every step the frames of all workers that are mid-episode go through one
`predict_action` call. Each finished episode is appended to `episodes.jsonl` at once, so a rerun with the same
output folder plays only the episodes still missing.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prismatic.models.checkpoint import read_config
from prismatic.sim.protocol import MAX_STEPS, SUITES, env_actions, policy_image, resolve_unnorm_key
from prismatic.sim.results import EpisodeLog, markdown_table, summarize

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Settings that change an episode's outcome: a resumed evaluation must match them.
IDENTITY_FIELDS = ("checkpoint", "task_suite", "center_crop", "unnorm_key", "seed", "max_steps", "dtype")


@dataclass
class LiberoEvalConfig:
    checkpoint: Path | None = None  # an OpenVLA checkpoint folder
    task_suite: str = "libero_spatial"  # libero_spatial | libero_object | libero_goal | libero_10 | libero_90
    num_trials_per_task: int = 50  # episode i starts from the suite's fixed initial state i
    num_envs: int = 1  # simulator worker processes stepping in parallel
    center_crop: bool = False  # for checkpoints trained with image augmentation (--image_aug true)
    unnorm_key: str | None = None  # default: the suite's dataset (or its `_no_noops` variant)
    seed: int = 7
    output_dir: Path | None = None  # default: runs/libero_eval/<checkpoint folder name>/<task_suite>
    task_ids: list[int] | None = None  # a subset of the suite's tasks (default: all)
    max_steps: int | None = None  # policy steps per episode; default: the suite's (220/280/300/520/400)
    video_episodes: list[int] = field(default_factory=list)  # episode indices to save as GIFs, for every task
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"

    def validate(self) -> None:
        """Everything checkable without the simulator or the model; fills in the defaults that depend on others."""
        if self.checkpoint is None:
            raise ValueError("--checkpoint is required: an OpenVLA checkpoint folder")
        self.checkpoint = Path(self.checkpoint).resolve()
        config = read_config(self.checkpoint)
        if self.task_suite not in SUITES:
            raise ValueError(f"--task_suite must be one of {list(SUITES)}, got {self.task_suite!r}")
        self.unnorm_key = resolve_unnorm_key(self.task_suite, config.norm_stats, self.unnorm_key)
        for flag in ("num_trials_per_task", "num_envs"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        self.max_steps = MAX_STEPS[self.task_suite] if self.max_steps is None else self.max_steps
        if self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.output_dir is None:
            self.output_dir = Path("runs/libero_eval") / self.checkpoint.name / self.task_suite
        self._check_resumable()

    def identity(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k in IDENTITY_FIELDS}

    def _check_resumable(self) -> None:
        saved = Path(self.output_dir) / "run.json"
        if saved.exists():
            before = json.loads(saved.read_text())
            changed = {k: (before.get(k), v) for k, v in self.identity().items() if before.get(k) != v}
            if changed:
                raise ValueError(f"--output_dir {self.output_dir} holds an evaluation with other settings "
                                 f"(setting: (saved, now)) {changed}; use another --output_dir")


class LiberoPolicy:
    """Frames and task descriptions in, LIBERO actions out: OpenVLA's preprocessing and action mapping around one
    batched, greedy `predict_action`."""

    def __init__(self, model, tokenizer, unnorm_key: str, center_crop: bool):
        from prismatic.models.processor import ImageProcessor

        self.model, self.tokenizer, self.unnorm_key, self.center_crop = model, tokenizer, unnorm_key, center_crop
        self.processor = ImageProcessor(model.config)

    @classmethod
    def from_config(cls, cfg: LiberoEvalConfig) -> LiberoPolicy:
        from prismatic.models.checkpoint import load_pretrained

        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        model, tokenizer, _ = load_pretrained(cfg.checkpoint, dtype=DTYPES[cfg.dtype], device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint} has no tokenizer files")
        return cls(model, tokenizer, cfg.unnorm_key, cfg.center_crop)

    def __call__(self, frames: list[np.ndarray], instructions: list[str]) -> np.ndarray:
        from prismatic.models.predict import predict_action

        images = [policy_image(f, self.processor.size, self.center_crop) for f in frames]
        actions = predict_action(self.model, images, instructions, self.tokenizer, self.unnorm_key, self.processor)
        return env_actions(actions)


@dataclass
class _Episode:
    task_id: int
    episode: int
    language: str
    steps: int = 0
    started: bool = False
    frames: list | None = None  # upright agent-view frames, when this episode is filmed


def evaluate(cfg: LiberoEvalConfig, policy: LiberoPolicy | None = None) -> dict[str, Any]:
    """Play the missing episodes and return (and write) the summary; `policy` defaults to the checkpoint's."""
    from prismatic.sim.libero_env import suite_tasks
    from prismatic.sim.workers import EnvWorkers

    cfg.validate()
    tasks = suite_tasks(cfg.task_suite)
    task_ids = list(range(len(tasks))) if cfg.task_ids is None else list(cfg.task_ids)
    for task_id in task_ids:
        if not 0 <= task_id < len(tasks):
            raise ValueError(f"--task_ids: {cfg.task_suite} has tasks 0..{len(tasks) - 1}, got {task_id}")
        if cfg.num_trials_per_task > tasks[task_id].num_init_states:
            raise ValueError(f"--num_trials_per_task {cfg.num_trials_per_task}: task {task_id} of {cfg.task_suite} "
                             f"has {tasks[task_id].num_init_states} fixed initial states")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(cfg.identity(), indent=2) + "\n")
    log = EpisodeLog(out / "episodes.jsonl")
    played = {(r["task_id"], r["episode"]) for r in log.load()}
    todo = deque(_Episode(t, e, tasks[t].language) for t in task_ids for e in range(cfg.num_trials_per_task)
                 if (t, e) not in played)

    if todo:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        policy = policy or LiberoPolicy.from_config(cfg)
        with EnvWorkers(cfg.task_suite, min(cfg.num_envs, len(todo))) as workers:
            _play(cfg, policy, workers, todo, log, out)

    rows = [r for r in log.load() if r["task_id"] in task_ids and r["episode"] < cfg.num_trials_per_task]
    summary = {**cfg.identity(), "num_trials_per_task": cfg.num_trials_per_task,
               **summarize(rows, {t: tasks[t].language for t in task_ids})}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(summary, f"{cfg.task_suite}: {cfg.checkpoint.name}"))
    return summary


def _play(cfg: LiberoEvalConfig, policy, workers, todo: deque, log: EpisodeLog, out: Path) -> None:
    from prismatic.sim.video import save_gif

    running: dict[int, _Episode] = {}
    bar = tqdm(total=len(todo), desc=f"{cfg.task_suite} episodes", unit="episode")
    successes = 0

    def begin(worker: int) -> None:
        if not todo:
            running.pop(worker, None)
            return
        episode = running[worker] = todo.popleft()
        if episode.episode in cfg.video_episodes:
            episode.frames = []
        workers.start_episode(worker, episode.task_id, episode.episode)

    def finish(worker: int, success: bool, error: str | None = None) -> None:
        nonlocal successes
        episode = running[worker]
        row = {"task_id": episode.task_id, "task": episode.language, "episode": episode.episode,
               "success": success, "steps": episode.steps}
        log.append({**row, "error": error} if error else row)
        if episode.frames:
            outcome = "success" if success else "failure"
            name = f"task{episode.task_id:02d}_ep{episode.episode:02d}_{outcome}.gif"
            save_gif(episode.frames, out / "videos" / name)
        successes += success
        bar.update(1)
        bar.set_postfix(success=f"{successes}/{bar.n} ({100 * successes / bar.n:.1f}%)")
        begin(worker)

    for worker in range(len(workers)):
        begin(worker)
    while running:
        stepping = [w for w, e in running.items() if e.started]
        starting = [w for w, e in running.items() if not e.started]
        batch: list[int] = []
        frames: dict[int, np.ndarray] = {}
        for worker, reply in workers.replies(stepping, starting).items():
            episode = running[worker]
            episode.started = True
            if reply[0] == "error":
                finish(worker, False, reply[1])
                continue
            _, frame, done = reply
            if episode.frames is not None:
                episode.frames.append(np.ascontiguousarray(frame[::-1, ::-1]))
            if done:
                finish(worker, True)
            elif episode.steps >= cfg.max_steps:
                finish(worker, False)
            else:
                batch.append(worker)
                frames[worker] = frame
        if batch:
            actions = policy([frames[w] for w in batch], [running[w].language for w in batch])
            for worker, action in zip(batch, actions):
                running[worker].steps += 1
                workers.step(worker, action)
    bar.close()
