"""Simulator worker processes: each owns one scene and steps it on request, so N scenes render in parallel.

Workers are spawned (not forked): each makes its own rendering context, and none inherits the policy's threads.
A simulator exception is answered as an error and the scene is rebuilt for the next episode; a worker that dies
is restarted.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection, wait

import numpy as np


def _serve(conn: Connection, task_suite: str) -> None:
    """Commands: ("start", task_id, episode) -> ("frame", image, False); ("step", action) -> ("frame", image, done);
    any failure -> ("error", message); ("close",) ends the worker."""
    from prismatic.sim.libero_env import TaskEnv

    env = None
    while True:
        command = conn.recv()
        if command[0] == "close":
            break
        try:
            if command[0] == "start":
                _, task_id, episode = command
                if env is None or env.task_id != task_id:
                    if env is not None:
                        env.close()
                    env = TaskEnv(task_suite, task_id)
                conn.send(("frame", env.start(episode), False))
            else:
                conn.send(("frame", *env.step(command[1])))
        except Exception as e:  # the episode fails; the scene may be broken, so build it anew
            env = None
            conn.send(("error", f"{type(e).__name__}: {e}"))
    if env is not None:
        env.close()


class EnvWorkers:
    def __init__(self, task_suite: str, num_workers: int):
        self._ctx = mp.get_context("spawn")
        self.task_suite = task_suite
        self._procs: list = [None] * num_workers
        self._conns: list[Connection] = [None] * num_workers
        for i in range(num_workers):
            self._start(i)

    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.task_suite), daemon=True, name=f"libero-env-{i}")
        proc.start()
        child.close()
        self._procs[i], self._conns[i] = proc, parent

    def __len__(self) -> int:
        return len(self._procs)

    def send(self, i: int, command: tuple) -> None:
        try:
            self._conns[i].send(command)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # the worker died: its next reply reads as an error

    def start_episode(self, i: int, task_id: int, episode: int) -> None:
        self.send(i, ("start", task_id, episode))

    def step(self, i: int, action: np.ndarray) -> None:
        self.send(i, ("step", np.asarray(action)))

    def replies(self, required: list[int], optional: list[int]) -> dict[int, tuple]:
        """Replies of every `required` worker (waiting for them) and of the `optional` ones that have answered
        already; with nothing required, waits for the first optional one."""
        out: dict[int, tuple] = {}
        pending = set(required)
        if not pending and optional:
            wait([self._conns[i] for i in optional])
        while pending:
            for conn in wait([self._conns[i] for i in pending]):
                i = self._conns.index(conn)
                out[i] = self._receive(i)
                pending.discard(i)
        for i in optional:
            if self._conns[i].poll():
                out[i] = self._receive(i)
        return out

    def _receive(self, i: int) -> tuple:
        try:
            return self._conns[i].recv()
        except (EOFError, ConnectionResetError):
            code = self._procs[i].exitcode
            self._procs[i].join(timeout=5)
            self._start(i)
            return ("error", f"simulator worker {i} died (exit code {code})")

    def close(self) -> None:
        for i in range(len(self)):
            self.send(i, ("close",))
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    def __enter__(self) -> EnvWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
