"""Frames per second of one process reading `RLDSStream` at 224x224, image augmentation off and on.

    python benchmarks/bench_loader.py --frames 5000 --out benchmarks/results/loader_cpu.json
    python benchmarks/bench_loader.py --data_root_dir datasets/rlds --data_mix libero_90 --frames 20000

Without --data_root_dir a synthetic modified-LIBERO dataset (prismatic.vla.datasets.write_synthetic_libero,
real TFDS files with JPEG images) is written into a temporary folder first. Per mode the stream is built
(`t_setup_s`: builders, dataset statistics - computed on the first build and cached on disk, read after),
the first frame is taken (`t_first_frame_s`: pipeline start-up and filling the shuffle buffer, which holds
JPEG bytes), then `--frames` frames are read and timed (`frames_per_s`), each one as the trainer gets it:
a dict with a uint8 [224, 224, 3] image, the normalised action and the instruction.

Memory: `peak_rss_delta_bytes` per mode (VmHWM reset through /proc/self/clear_refs, see common.PeakRSS) and
`ru_maxrss_bytes`, the process's peak RSS from resource.getrusage over the whole run (both modes, the
dataset writing and TensorFlow's import included).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_record, cpu_description, ru_maxrss_bytes, run_cli  # noqa: E402

import prismatic.models  # noqa: E402,F401
import numpy as np  # noqa: E402

REQUIRED_KEYS = ("date", "device", "frames", "image_size", "modes", "ru_maxrss_bytes", "tensorflow_version")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root_dir", default=None, help="existing RLDS root; default: write a synthetic one")
    p.add_argument("--data_mix", default="libero_90")
    p.add_argument("--frames", type=int, default=5000, help="timed frames per mode")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--shuffle_buffer_size", type=int, default=10_000)
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"], help="image_aug values")
    # The synthetic dataset (ignored with --data_root_dir); 256 px JPEGs like modified_libero_rlds.
    p.add_argument("--num_tasks", type=int, default=8)
    p.add_argument("--episodes_per_task", type=int, default=5)
    p.add_argument("--steps_per_episode", type=int, default=50)
    p.add_argument("--source_image_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be >= 1")
    return args


def read_mode(root, args, image_aug: bool) -> dict:
    from prismatic.vla.datasets import RLDSStream

    rss = PeakRSS()
    rss.start()
    t0 = time.perf_counter()
    stream = RLDSStream(root, args.data_mix, train=True, image_size=args.image_size,
                        shuffle_buffer_size=args.shuffle_buffer_size, image_aug=image_aug, seed=args.seed)
    t_setup = time.perf_counter() - t0
    frames = iter(stream)
    t0 = time.perf_counter()
    first = next(frames)
    t_first = time.perf_counter() - t0
    if first["image"].shape != (args.image_size, args.image_size, 3) or first["image"].dtype != np.uint8:
        raise RuntimeError(f"unexpected frame image {first['image'].dtype} {first['image'].shape}")
    checksum = 0
    t0 = time.perf_counter()
    for frame in itertools.islice(frames, args.frames):
        checksum += int(frame["image"][0, 0, 0]) + len(frame["instruction"])  # touch what the trainer uses
    elapsed = time.perf_counter() - t0
    return {
        "image_aug": image_aug,
        "t_setup_s": t_setup,
        "t_first_frame_s": t_first,
        "timed_frames": args.frames,
        "t_read_s": elapsed,
        "frames_per_s": args.frames / elapsed,
        "peak_rss_delta_bytes": rss.stop(),
        "checksum": checksum,
    }


def run(args: argparse.Namespace) -> dict:
    tmp, dataset = None, {}
    if args.data_root_dir:
        root = Path(args.data_root_dir)
        dataset = {"source": str(root), "synthetic": False}
    else:
        from prismatic.vla.datasets import write_synthetic_libero

        tmp = Path(tempfile.mkdtemp(prefix="bench_loader."))
        root = tmp / "rlds"
        t0 = time.perf_counter()
        target = write_synthetic_libero(root, num_tasks=args.num_tasks, episodes_per_task=args.episodes_per_task,
                                        steps_per_episode=args.steps_per_episode,
                                        image_size=args.source_image_size, seed=0)
        dataset = {
            "synthetic": True,
            "episodes": args.num_tasks * args.episodes_per_task,
            "steps_per_episode": args.steps_per_episode,
            "source_image_size": args.source_image_size,
            "bytes_on_disk": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
            "write_s": time.perf_counter() - t0,
        }
    try:
        modes = {f"aug_{m}": read_mode(root, args, m == "on") for m in args.modes}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    from prismatic.util.tf_setup import import_tensorflow

    tf = import_tensorflow()
    return base_record(
        device=cpu_description(),
        tensorflow_version=tf.__version__,
        data_mix=args.data_mix,
        dataset=dataset,
        frames=args.frames,
        image_size=args.image_size,
        shuffle_buffer_size=args.shuffle_buffer_size,
        modes=modes,
        ru_maxrss_bytes=ru_maxrss_bytes(),
    )


def summary(r: dict) -> str:
    parts = [f"{k}: {m['frames_per_s']:.0f} frames/s (first frame {m['t_first_frame_s']:.1f}s)"
             for k, m in r["modes"].items()]
    return (f"RLDSStream {r['image_size']}px, {r['frames']} frames per mode, {r['device']}: " + "; ".join(parts)
            + f"; peak RSS {r['ru_maxrss_bytes'] / 1e6:.0f} MB")


def main(argv=None) -> dict:
    return run_cli(parse_args, run, summary, argv)


if __name__ == "__main__":
    main()
