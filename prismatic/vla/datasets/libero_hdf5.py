"""Convert LIBERO HDF5 demonstrations into the modified-LIBERO RLDS format that OpenVLA trains on.

    python vla-scripts/convert_libero_to_rlds.py --libero_hdf5_dir DIR --output_dir DIR --dataset_name NAME \
        [--image_size 256] [--filter_noops true]

writes `<output_dir>/<dataset_name>/1.0.0/`, readable by `tfds.builder_from_directory` and, when
`<dataset_name>` is registered in `prismatic/vla/datasets/registry.py` (`libero_90_no_noops`,
`libero_spatial_no_noops`, ...), by `RLDSStream(output_dir, dataset_name)` and the trainer.

LIBERO-90 -> `--vla.data_mix libero_90`
-----------------------------------------
OpenVLA publishes the four evaluation suites in RLDS form (`openvla/modified_libero_rlds`), but not
LIBERO-90; convert it yourself from the LIBERO release:

1. Download the LIBERO datasets (the `libero_90` folder holds 90 files such as
   `KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it_demo.hdf5`, 50 demos each).
2. Convert, into the same folder that holds the other RLDS datasets:

       python vla-scripts/convert_libero_to_rlds.py --libero_hdf5_dir /data/LIBERO/libero_90 \
           --output_dir /data/rlds --dataset_name libero_90_no_noops

3. Train with `--data_root_dir /data/rlds --vla.data_mix libero_90` (the mixture `libero_90` is the
   dataset `libero_90_no_noops`). Statistics are computed on first use and cached next to the data.

The same works for any other suite (`--libero_hdf5_dir .../libero_spatial --dataset_name
libero_spatial_no_noops`), and for HDF5 files that were regenerated at 256x256 (OpenVLA's
`regenerate_libero_dataset.py`), which are the better source when you have them: see "Differences".

What the conversion does
------------------------
Input: one `<task words>_demo.hdf5` per task (the folder is not searched recursively), with
`data/demo_<i>/{actions [T,7], obs/agentview_rgb [T,H,W,3] uint8, obs/eye_in_hand_rgb [T,H,W,3] uint8,
obs/ee_states [T,6], obs/gripper_states [T,2], obs/joint_states [T,7]}`. Other keys are ignored.

Per kept step t of a demo:

- `observation/image` = agentview_rgb[t] rotated by 180 degrees (`img[::-1, ::-1]`; LIBERO renders
  upside down), `observation/wrist_image` = eye_in_hand_rgb[t] rotated likewise; resized to
  `--image_size` (PIL, Lanczos) only when the source has another size, then JPEG-encoded (TF's
  encoder at quality 95, as tfds does).
- `observation/state` = float32 concat(ee_states[t], gripper_states[t]) (8),
  `observation/joint_state` = float32 joint_states[t] (7), `action` = float32 actions[t] (7) unchanged
  (gripper -1 open / +1 close; the loader maps it to 1 open / 0 close).
- `discount` = 1; `reward` = 1 on the last kept step else 0; `is_first` on the first kept step;
  `is_last` = `is_terminal` on the last kept step.
- `language_instruction` from the file name: strip `_demo.hdf5`, drop a leading scene prefix
  `<UPPERCASE_WORDS>SCENE<digits>_` (e.g. `KITCHEN_SCENE3_`, `LIVING_ROOM_SCENE2_`), underscores to
  spaces.
- `episode_metadata/file_path` = the path of the source HDF5 file.

The RLDS episode key is `<file stem>/<demo name>`; episodes are stored shuffled by a hash of that
key (deterministic, as a tfds builder does), so the loader's `train[:95%]` split holds a random 95%
of all demos rather than leaving out the last tasks.

No-op rule (`--filter_noops true`, the default), applied to each demo on its own, in order:

    previous = None                       # gripper command of the last KEPT step of this demo
    for each step t:
        still = ||actions[t, :6]||_2 < 1e-4
        if still and (previous is None or actions[t, 6] == previous):
            drop step t (its observations and its action)
        else:
            keep step t; previous = actions[t, 6]

So a still step is kept only when it changes the gripper command relative to the last kept step;
still steps at the start of a demo (no kept step yet) are always dropped, like OpenVLA's
`is_noop(action, prev_action=None)`. Comparing with the last *kept* step (not the previous raw one)
is also what OpenVLA's regeneration does. A demo with no step left is skipped. The number of
dropped steps and skipped demos is reported.

Differences from OpenVLA's own `*_no_noops` data
------------------------------------------------
OpenVLA regenerated the demos by replaying them in simulation: observations were re-rendered at
256x256 after each kept action, and demos that failed on replay were dropped. This converter has no
simulator: it keeps every demo and, on the original 128x128 release, upsamples the stored images to
`--image_size`. Observations of kept steps are the stored ones (after a dropped still step the scene
has not moved, so they agree with a replay up to simulator noise).

Memory: files are opened with h5py and read one demo at a time; episodes go to the tfds writer from a
generator (tfds buffers at most ~1 GB of encoded episodes before spilling to temporary files), so
memory does not grow with the number of demos.
"""

import argparse
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

NOOP_THRESHOLD = 1e-4
DEMO_SUFFIX = "_demo.hdf5"
SCENE_PREFIX = re.compile(r"^[A-Z_]*SCENE\d+_")

# key -> (trailing shape, whether it must be uint8); every key has the demo's length T first.
EXPECTED_KEYS = {
    "actions": ((7,), False),
    "obs/agentview_rgb": ((None, None, 3), True),
    "obs/eye_in_hand_rgb": ((None, None, 3), True),
    "obs/ee_states": ((6,), False),
    "obs/gripper_states": ((2,), False),
    "obs/joint_states": ((7,), False),
}


class LiberoFormatError(ValueError):
    """An input HDF5 file does not have the layout of a LIBERO demonstration file."""


@dataclass
class ConversionReport:
    output: Path
    num_files: int = 0
    num_demos: int = 0
    num_episodes: int = 0  # demos written (demos left empty by no-op filtering are skipped)
    empty_demos_skipped: int = 0
    steps_read: int = 0
    steps_written: int = 0
    noops_dropped: int = 0
    resized_from: set = field(default_factory=set)  # source image sizes that were resized
    seconds: float = 0.0

    def summary(self) -> str:
        share = self.noops_dropped / max(self.steps_read, 1)
        lines = [
            f"wrote {self.output}",
            f"  {self.num_files} files, {self.num_demos} demos -> {self.num_episodes} episodes"
            + (f" ({self.empty_demos_skipped} demos skipped: only no-op steps)" if self.empty_demos_skipped else ""),
            f"  {self.steps_read} steps read, {self.steps_written} written, {self.noops_dropped} no-op steps "
            f"dropped ({share:.1%})",
            f"  {self.seconds:.1f} s, {self.steps_read / max(self.seconds, 1e-9):.0f} steps/s",
        ]
        if self.resized_from:
            sizes = ", ".join(f"{h}x{w}" for h, w in sorted(self.resized_from))
            lines.append(f"  images resized from {sizes}")
        return "\n".join(lines)


def instruction_from_filename(path) -> str:
    """`KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5` -> `turn on the stove`."""
    name = Path(path).name
    if name.endswith(DEMO_SUFFIX):
        name = name[: -len(DEMO_SUFFIX)]
    return SCENE_PREFIX.sub("", name).replace("_", " ").strip()


def noop_keep_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """Boolean [T]: True for the steps to keep under the no-op rule of the module docstring."""
    actions = np.asarray(actions)
    still = np.linalg.norm(actions[:, :6].astype(np.float64), axis=1) < threshold
    keep = np.ones(len(actions), dtype=bool)
    previous = None
    for t in range(len(actions)):
        if still[t] and (previous is None or actions[t, 6] == previous):
            keep[t] = False
        else:
            previous = actions[t, 6]
    return keep


def find_task_files(libero_hdf5_dir) -> list[Path]:
    """The `*_demo.hdf5` files directly in `libero_hdf5_dir`, sorted; clear errors when there are none."""
    root = Path(libero_hdf5_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"--libero_hdf5_dir {str(libero_hdf5_dir)!r} {what}")
    files = sorted(p for p in root.glob(f"*{DEMO_SUFFIX}") if p.is_file())
    if files:
        return files
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
    message = (
        f"--libero_hdf5_dir {str(libero_hdf5_dir)!r}: no *{DEMO_SUFFIX} files in it; "
        f"found: {shown or 'nothing (empty folder)'}."
    )
    nested = sorted({p.parent for p in root.rglob(f"*{DEMO_SUFFIX}")})
    if nested:
        listed = ", ".join(str(p) for p in nested[:10]) + (", ..." if len(nested) > 10 else "")
        message += f" Sub-folders hold demo files ({listed}): point --libero_hdf5_dir at one suite's folder."
    raise FileNotFoundError(message)


def _demo_index(name: str):
    suffix = name[len("demo_"):]
    return (0, int(suffix), name) if suffix.isdigit() else (1, 0, name)


def list_demos(path: Path) -> list[str]:
    """The demo names of one file in numeric order, after checking every expected key and its shape.

    Reads only HDF5 metadata, so checking a whole suite before converting it is quick.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise LiberoFormatError(f"{path}: cannot be opened as HDF5 ({e})") from e
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise LiberoFormatError(f"{path}: missing key 'data' (top-level keys: {sorted(f.keys())})")
        demos = sorted((k for k in f["data"].keys() if k.startswith("demo_")), key=_demo_index)
        if not demos:
            raise LiberoFormatError(f"{path}: no demo_* groups under 'data' (it holds {sorted(f['data'].keys())})")
        for demo in demos:
            group = f["data"][demo]
            lengths = {}
            for key, (trailing, is_image) in EXPECTED_KEYS.items():
                if key not in group or not isinstance(group[key], h5py.Dataset):
                    parent = key.rsplit("/", 1)[0] if "/" in key else None
                    present = sorted(group[parent].keys()) if parent and parent in group else sorted(group.keys())
                    raise LiberoFormatError(
                        f"{path}: demo 'data/{demo}' is missing key {key!r} "
                        f"({'data/' + demo + '/' + parent if parent else 'data/' + demo} holds {present})"
                    )
                shape = group[key].shape
                ok = len(shape) == 1 + len(trailing) and all(e is None or e == s for e, s in zip(trailing, shape[1:]))
                if not ok or (is_image and group[key].dtype != np.uint8):
                    want = "[T, " + ", ".join("?" if e is None else str(e) for e in trailing) + "]"
                    raise LiberoFormatError(
                        f"{path}: 'data/{demo}/{key}' has shape {shape} and dtype {group[key].dtype}; "
                        f"expected {want}{' uint8' if is_image else ''}"
                    )
                lengths[key] = shape[0]
            if len(set(lengths.values())) != 1:
                raise LiberoFormatError(f"{path}: the keys of 'data/{demo}' disagree on the number of steps: {lengths}")
    return demos


def _prepare_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """[T, H, W, 3] -> rotated by 180 degrees and, if needed, resized to [T, S, S, 3] (contiguous)."""
    rotated = images[:, ::-1, ::-1]
    if rotated.shape[1:3] == (image_size, image_size):
        return np.ascontiguousarray(rotated)
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((image_size, image_size), Image.LANCZOS))
         for img in rotated]
    )


class _JpegEncoder:
    """JPEG-encodes images on a few threads with TF's encoder (the one tfds would use, at its defaults)."""

    def __init__(self, threads: int):
        from prismatic.util.tf_setup import import_tensorflow

        self._tf = import_tensorflow()
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def _encode(self, image: np.ndarray) -> bytes:
        return self._tf.io.encode_jpeg(image).numpy()

    def __call__(self, images: np.ndarray) -> list:
        if self._pool is None:
            return [self._encode(img) for img in images]
        return list(self._pool.map(self._encode, images))

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def _read_demo(path: Path, demo: str) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        group = f["data"][demo]
        return {key: group[key][()] for key in EXPECTED_KEYS}


def iter_episodes(
    files: list[Path],
    demos_per_file: dict,
    *,
    image_size: int,
    filter_noops: bool,
    report: ConversionReport,
    encoder=None,
    progress: bool = True,
) -> Iterator[tuple[str, dict]]:
    """Yield `(key, episode)` in the modified-LIBERO schema, reading one demo at a time and counting in `report`."""
    from tqdm import tqdm

    total = sum(len(d) for d in demos_per_file.values())
    bar = tqdm(total=total, desc="Converting LIBERO demos", unit="demo", disable=not progress)
    try:
        for path in files:
            instruction = instruction_from_filename(path)
            for demo in demos_per_file[path]:
                data = _read_demo(path, demo)
                actions = data["actions"]
                keep = noop_keep_mask(actions) if filter_noops else np.ones(len(actions), dtype=bool)
                num_steps, kept = len(actions), int(keep.sum())
                report.num_demos += 1
                report.steps_read += num_steps
                report.noops_dropped += num_steps - kept
                bar.update(1)
                bar.set_postfix(steps=report.steps_read, noops=report.noops_dropped, refresh=False)
                if kept == 0:
                    report.empty_demos_skipped += 1
                    continue

                images = {}
                for out_key, in_key in (("image", "obs/agentview_rgb"), ("wrist_image", "obs/eye_in_hand_rgb")):
                    source = data[in_key][keep]
                    if source.shape[1:3] != (image_size, image_size):
                        report.resized_from.add(tuple(source.shape[1:3]))
                    prepared = _prepare_images(source, image_size)
                    images[out_key] = encoder(prepared) if encoder is not None else list(prepared)
                del data["obs/agentview_rgb"], data["obs/eye_in_hand_rgb"]

                last = np.arange(kept) == kept - 1
                steps = {
                    "observation": {
                        **images,
                        "state": np.concatenate([data["obs/ee_states"][keep], data["obs/gripper_states"][keep]],
                                                axis=1).astype(np.float32),
                        "joint_state": data["obs/joint_states"][keep].astype(np.float32),
                    },
                    "action": actions[keep].astype(np.float32),
                    "discount": np.ones(kept, np.float32),
                    "reward": last.astype(np.float32),
                    "is_first": np.arange(kept) == 0,
                    "is_last": last,
                    "is_terminal": last.copy(),
                    "language_instruction": [instruction] * kept,
                }
                report.num_episodes += 1
                report.steps_written += kept
                yield f"{path.stem}/{demo}", {"steps": steps, "episode_metadata": {"file_path": str(path)}}
    finally:
        bar.close()


def convert_libero_to_rlds(
    libero_hdf5_dir,
    output_dir,
    dataset_name: str,
    *,
    image_size: int = 256,
    filter_noops: bool = True,
    encode_threads: Optional[int] = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert every `*_demo.hdf5` in `libero_hdf5_dir` into `<output_dir>/<dataset_name>/1.0.0/`.

    Everything is checked before anything is written: the input folder, every file's keys and shapes,
    and that `<output_dir>/<dataset_name>` does not exist yet (it is never written over). If the
    conversion fails midway, the partly written `<output_dir>/<dataset_name>` is removed.
    """
    from prismatic.vla.datasets.libero_schema import write_libero_rlds

    if not dataset_name or "/" in dataset_name or dataset_name in (".", ".."):
        raise ValueError(f"--dataset_name {dataset_name!r} must be a plain folder name, e.g. libero_90_no_noops")
    if image_size <= 0:
        raise ValueError(f"--image_size must be positive, got {image_size}")
    target = Path(output_dir).expanduser() / dataset_name
    if target.exists():
        raise FileExistsError(
            f"--output_dir/--dataset_name: {target} already exists; nothing was written. "
            "Remove it yourself or pick another --output_dir or --dataset_name."
        )
    if Path(output_dir).expanduser().exists() and not Path(output_dir).expanduser().is_dir():
        raise FileExistsError(f"--output_dir {str(output_dir)!r} is a file, not a folder")

    files = find_task_files(libero_hdf5_dir)
    demos_per_file = {path: list_demos(path) for path in files}

    report = ConversionReport(output=target / "1.0.0", num_files=len(files))
    threads = encode_threads if encode_threads is not None else min(8, len(os.sched_getaffinity(0)))
    encoder = _JpegEncoder(threads)
    description = (
        f"LIBERO demonstrations converted from {Path(libero_hdf5_dir).expanduser().resolve()} by "
        f"prismatic.vla.datasets.libero_hdf5 (image_size={image_size}, filter_noops={filter_noops})."
    )
    out_root = Path(output_dir).expanduser()
    created_root = not out_root.exists()
    start = time.perf_counter()
    try:
        episodes = iter_episodes(files, demos_per_file, image_size=image_size, filter_noops=filter_noops,
                                 report=report, encoder=encoder, progress=progress)
        out_root.mkdir(parents=True, exist_ok=True)
        write_libero_rlds(out_root, dataset_name, episodes, image_size, description=description)
    except Exception as e:  # write_libero_rlds has removed what it wrote; remove the folder made here too
        if created_root:
            try:
                out_root.rmdir()
            except OSError:
                pass
        total = sum(len(d) for d in demos_per_file.values())
        if report.num_episodes == 0 and report.num_demos == total:  # tfds refuses an empty split
            raise ValueError(
                f"--filter_noops: every demo in --libero_hdf5_dir {str(libero_hdf5_dir)!r} consists of no-op "
                f"steps only ({report.steps_read} steps); nothing was written"
            ) from e
        raise
    finally:
        encoder.close()
    report.seconds = time.perf_counter() - start
    return report


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None) -> ConversionReport:
    parser = argparse.ArgumentParser(
        prog="convert_libero_to_rlds.py",
        description="Convert LIBERO *_demo.hdf5 files into the modified-LIBERO RLDS format "
                    "(<output_dir>/<dataset_name>/1.0.0/). See prismatic/vla/datasets/libero_hdf5.py.",
    )
    parser.add_argument("--libero_hdf5_dir", required=True, help="folder with one <task>_demo.hdf5 per task")
    parser.add_argument("--output_dir", required=True, help="RLDS root: gets <dataset_name>/1.0.0/")
    parser.add_argument("--dataset_name", required=True, help="e.g. libero_90_no_noops")
    parser.add_argument("--image_size", type=int, default=256, help="output images are SxS (resized if different)")
    parser.add_argument("--filter_noops", type=_parse_bool, default=True, help="drop no-op steps (true/false)")
    parser.add_argument("--encode_threads", type=int, default=None, help="JPEG encoding threads (default: cores, max 8)")
    args = parser.parse_args(argv)

    from prismatic.vla.datasets.registry import DATASETS

    try:
        report = convert_libero_to_rlds(
            args.libero_hdf5_dir, args.output_dir, args.dataset_name, image_size=args.image_size,
            filter_noops=args.filter_noops, encode_threads=args.encode_threads,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(report.summary(), flush=True)
    if args.dataset_name not in DATASETS:
        print(
            f"note: {args.dataset_name!r} is not registered in prismatic/vla/datasets/registry.py, so "
            f"--vla.data_mix cannot use it yet; registered LIBERO names: "
            f"{sorted(n for n in DATASETS if n.endswith('_no_noops'))}",
            file=sys.stderr,
        )
    elif args.dataset_name.endswith("_no_noops") and not args.filter_noops:
        print(f"note: --filter_noops false but the name {args.dataset_name!r} says no-ops were removed", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
