"""Read throughput of the anchor cache: `AnchorCache.batch` on the anchor draws a training run makes.

    python benchmarks/bench_anchor_cache.py --num_anchors 2048 --anchor_batch 4 8 16 \
        --out benchmarks/results/anchor_cache_cpu_n2048.json

Writes a cache with AnchorCacheWriter in a temporary folder (or at --cache_dir when given), with the
shapes of a real OpenVLA-7B cache: images uint8 [N, 224, 224, 3], prompts int32/bool [N, --prompt_len],
target features float32 [N, --hidden_dim]; contents are random. The anchor indices are the ones training
draws (`craft.anchor_cache.anchor_indices`, step after step).

For each anchor batch size it reports two read regimes:
  warm  one open cache whose rows were all read once before (page cache and mappings hot), as in a
        training run after its first pass over the cache: memory-map + copy speed;
  cold  before every batch the memory maps are closed, the files dropped from the page cache with
        posix_fadvise(DONTNEED) (after fsync) and the cache reopened, so each batch reads its rows from the
        disk (the drop and the reopen are not timed).
and, separately, the cost of turning the rows into model inputs (`anchor_inputs`: ImageProcessor resize +
normalisation of the images), which the trainer pays on top of the read.
anchors/s = batch size x batches / total time; MB/s counts the bytes of the rows copied out (1 MB = 1e6 B).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_record, cpu_description, median, ru_maxrss_bytes, run_cli  # noqa: E402

import prismatic.models  # noqa: E402,F401
import numpy as np  # noqa: E402

from craft.anchor_cache import INPUTS, AnchorCache, AnchorCacheWriter, anchor_indices  # noqa: E402

ARRAYS = (*INPUTS, "target_features")  # what a hidden-state cache holds

REQUIRED_KEYS = ("date", "device", "num_anchors", "bytes_per_anchor", "cache_bytes", "results")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_anchors", type=int, default=2048)
    p.add_argument("--anchor_batch", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batches", type=int, default=200, help="timed batches per batch size and regime")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--hidden_dim", type=int, default=4096)
    p.add_argument("--prompt_len", type=int, default=40)
    p.add_argument("--cache_dir", default=None,
                   help="where to write the cache (must not exist; removed afterwards unless --keep_cache)")
    p.add_argument("--keep_cache", action="store_true")
    p.add_argument("--no_cold", action="store_true", help="skip the page-cache-dropped regime")
    p.add_argument("--no_preprocess", action="store_true", help="skip timing anchor_inputs (ImageProcessor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.num_anchors < max(args.anchor_batch) or args.batches < 1:
        p.error("--num_anchors must be >= every --anchor_batch and --batches >= 1")
    return args


def write_cache(path: Path, n: int, image_size: int, prompt_len: int, hidden_dim: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    writer = AnchorCacheWriter(path, {"images": (n, image_size, image_size, 3), "input_ids": (n, prompt_len),
                                      "attention_mask": (n, prompt_len), "target_features": (n, hidden_dim)})
    chunk = 64
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=k)
        mask = np.arange(prompt_len)[None, :] < lengths[:, None]
        rows = {
            "images": rng.integers(0, 256, size=(k, image_size, image_size, 3), dtype=np.uint8),
            "input_ids": np.where(mask, rng.integers(3, 32000, size=(k, prompt_len)), 32000).astype(np.int32),
            "attention_mask": mask,
            "target_features": rng.standard_normal((k, hidden_dim), dtype=np.float32),
        }
        writer.append(rows, [f"anchor {start + i}" for i in range(k)])
    out = writer.close({"hidden_layer": -2, "pooling": "mean_image_tokens", "dtype": "bfloat16",
                        "hidden_dim": hidden_dim})
    for name in ARRAYS:  # make the pages clean, so DONTNEED can drop them
        fd = os.open(out / f"{name}.npy", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


def drop_from_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in ARRAYS:
        fd = os.open(path / f"{name}.npy", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def filesystem_of(path: Path) -> str:
    """Type of the mount holding `path`, from /proc/mounts (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount, fstype = parts[1], parts[2]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def time_reads(path: Path, batch: int, batches: int, seed: int, cold: bool, first_step: int):
    """Per-batch seconds of AnchorCache.batch. Warm: one open cache, as the trainer keeps it, after every row
    was read once through it (untimed). Cold: before each batch the memory maps are closed and the files
    dropped from the page cache (a page still mapped into the process would survive DONTNEED), then the
    cache is reopened; none of that is timed."""
    times = []
    cache = AnchorCache.open(path)
    if not cold:
        for start in range(0, cache.num_anchors, batch):
            cache.batch(np.arange(start, min(start + batch, cache.num_anchors)))
    for step in range(first_step, first_step + batches):
        idx = anchor_indices(step, batch, cache.num_anchors, seed)
        if cold:
            del cache
            gc.collect()
            drop_from_page_cache(path)
            cache = AnchorCache.open(path)
        t0 = time.perf_counter()
        rows = cache.batch(idx)
        times.append(time.perf_counter() - t0)
        assert rows["images"].shape[0] == batch
    return times


def resident_fraction(path: Path) -> float:
    """Fraction of the cache files' pages now in the page cache (mincore on a fresh read-only mapping)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        resident = total = 0
        for name in ARRAYS:
            mapped = np.memmap(path / f"{name}.npy", dtype=np.uint8, mode="r")
            n = (mapped.size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(mapped.ctypes.data), ctypes.c_size_t(mapped.size), vec) != 0:
                return float("nan")
            resident += sum(v & 1 for v in vec)
            total += n
            del mapped
        return resident / total
    except (OSError, AttributeError):
        return float("nan")


def run(args: argparse.Namespace) -> dict:
    tmp = None
    if args.cache_dir:
        path = Path(args.cache_dir)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_anchor_cache."))
        path = tmp / "cache"
    try:
        t0 = time.perf_counter()
        write_cache(path, args.num_anchors, args.image_size, args.prompt_len, args.hidden_dim, args.seed)
        t_write = time.perf_counter() - t0
        filesystem = filesystem_of(path)
        cache = AnchorCache.open(path)
        bytes_per_anchor = sum(arr[0].nbytes for arr in cache.arrays.values())
        n = cache.num_anchors
        del cache  # no mapping may outlive a phase: mapped pages survive the cold phase's DONTNEED
        gc.collect()
        drop_from_page_cache(path)
        resident_after_drop = resident_fraction(path)
        cache_bytes = sum((path / f"{name}.npy").stat().st_size for name in ARRAYS)

        processor = None
        if not args.no_preprocess:
            from prismatic.models import ImageProcessor, preset_config
            from prismatic.training.batches import anchor_inputs
            processor = ImageProcessor(preset_config("openvla-7b"))  # only the config: no weights

        results = []
        step = 0
        for batch in args.anchor_batch:
            regimes = ["warm"] + ([] if args.no_cold else ["cold"])
            entry = {"anchor_batch": batch}
            for regime in regimes:
                rss = PeakRSS()
                rss.start()
                times = time_reads(path, batch, args.batches, args.seed, regime == "cold", step)
                gc.collect()
                step += args.batches
                total = sum(times)
                entry[regime] = {
                    "batches": len(times),
                    "anchors_per_s": batch * len(times) / total,
                    "mb_per_s": batch * len(times) * bytes_per_anchor / total / 1e6,
                    "median_batch_ms": median(times) * 1e3,
                    "max_batch_ms": max(times) * 1e3,
                    "peak_rss_delta_bytes": rss.stop(),
                }
            if processor is not None:
                times = []
                cache = AnchorCache.open(path)
                for k in range(min(args.batches, 50)):
                    rows = cache.batch(anchor_indices(step + k, batch, n, args.seed))
                    t0 = time.perf_counter()
                    anchor_inputs(rows, processor)
                    times.append(time.perf_counter() - t0)
                step += len(times)
                del cache, rows
                gc.collect()
                entry["preprocess"] = {
                    "what": "prismatic.training.batches.anchor_inputs (ImageProcessor on the rows), after the read",
                    "batches": len(times),
                    "anchors_per_s": batch * len(times) / sum(times),
                    "median_batch_ms": median(times) * 1e3,
                }
            results.append(entry)
    finally:
        if not args.keep_cache:
            shutil.rmtree(tmp if tmp is not None else path, ignore_errors=True)

    return base_record(
        device=cpu_description(),
        filesystem=filesystem,
        num_anchors=args.num_anchors,
        image_size=args.image_size,
        hidden_dim=args.hidden_dim,
        prompt_len=args.prompt_len,
        bytes_per_anchor=int(bytes_per_anchor),
        cache_bytes=int(cache_bytes),
        write_s=t_write,
        resident_fraction_after_drop=resident_after_drop,
        cold_method="before each batch (not timed): memory maps closed, posix_fadvise(POSIX_FADV_DONTNEED) on "
                    "every .npy (written and fsynced), AnchorCache.open again",
        index_draw="craft.anchor_cache.anchor_indices(step, batch, N, seed), consecutive steps",
        mb_definition="1 MB = 1e6 bytes of rows copied out of the memory maps",
        results=results,
        ru_maxrss_bytes=ru_maxrss_bytes(),
    )


def summary(r: dict) -> str:
    parts = []
    for e in r["results"]:
        s = f"A={e['anchor_batch']}: warm {e['warm']['anchors_per_s']:.0f} anchors/s ({e['warm']['mb_per_s']:.0f} MB/s)"
        if "cold" in e:
            s += f", cold {e['cold']['anchors_per_s']:.0f} anchors/s ({e['cold']['mb_per_s']:.0f} MB/s)"
        if "preprocess" in e:
            s += f", preprocess {e['preprocess']['anchors_per_s']:.0f} anchors/s"
        parts.append(s)
    return f"anchor cache N={r['num_anchors']} ({r['bytes_per_anchor'] / 1e3:.0f} kB/anchor): " + "; ".join(parts)


def main(argv=None) -> dict:
    return run_cli(parse_args, run, summary, argv)


if __name__ == "__main__":
    main()
