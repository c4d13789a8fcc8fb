"""The anchor cache: round trip, memory mapping, validation, deterministic anchor draws."""

import json

import numpy as np
import pytest

from craft.anchor_cache import (AnchorCache, AnchorCacheError, AnchorCacheWriter, anchor_indices,
                                check_cache_matches, read_meta)
from craft.config import CraftConfigError

META = {"hidden_layer": -2, "pooling": "mean_image_tokens", "dtype": "bfloat16", "hidden_dim": 6,
        "model": {"checkpoint": "m"}}


def _shapes(n, d=6, length=5):
    return {"images": (n, 8, 8, 3), "input_ids": (n, length), "attention_mask": (n, length), "target_features": (n, d)}


def _rows(rng, n, d=6, length=5):
    return {
        "images": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
        "input_ids": rng.integers(0, 32000, (n, length)).astype(np.int32),
        "attention_mask": rng.random((n, length)) > 0.3,
        "target_features": rng.standard_normal((n, d)).astype(np.float32),
    }


def _write(path, n=10, d=6, chunks=(4, 6)):
    rng = np.random.default_rng(0)
    rows = _rows(rng, n, d)
    writer = AnchorCacheWriter(path, _shapes(n, d))
    start = 0
    for c in chunks:
        writer.append({k: v[start : start + c] for k, v in rows.items()}, [f"task {i}" for i in range(start, start + c)])
        start += c
    writer.close({**META, "hidden_dim": d})
    return rows


def test_round_trip_is_memory_mapped_and_exact(tmp_path):
    rows = _write(tmp_path / "cache")
    cache = AnchorCache.open(tmp_path / "cache")
    assert isinstance(cache.arrays["target_features"], np.memmap)
    assert cache.num_anchors == 10 and cache.meta["hidden_dim"] == 6 and cache.meta["pooling"] == "mean_image_tokens"
    idx = np.array([7, 2, 9, 2])
    batch = cache.batch(idx)
    for name, arr in rows.items():
        np.testing.assert_array_equal(batch[name], arr[idx])
    assert json.loads((tmp_path / "cache" / "instructions.json").read_text())[7] == "task 7"
    assert not (tmp_path / "cache.partial").exists()


def test_writer_refuses_to_overwrite_and_incomplete_cache_is_not_published(tmp_path):
    _write(tmp_path / "cache")
    before = (tmp_path / "cache" / "target_features.npy").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        AnchorCacheWriter(tmp_path / "cache", _shapes(10))
    assert (tmp_path / "cache" / "target_features.npy").read_bytes() == before
    writer = AnchorCacheWriter(tmp_path / "other", _shapes(10))
    writer.append({k: v[:3] for k, v in _rows(np.random.default_rng(1), 3).items()}, ["a"] * 3)
    with pytest.raises(ValueError, match="only 3 written"):
        writer.close(dict(META))
    assert not (tmp_path / "other").exists()


def test_truncated_or_missing_files_give_one_clear_error(tmp_path):
    _write(tmp_path / "cache")
    f = tmp_path / "cache" / "target_features.npy"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(AnchorCacheError, match="target_features.npy is corrupt or truncated"):
        AnchorCache.open(tmp_path / "cache")
    f.unlink()
    with pytest.raises(AnchorCacheError, match="missing target_features.npy"):
        AnchorCache.open(tmp_path / "cache")
    with pytest.raises(AnchorCacheError, match="does not exist"):
        read_meta(tmp_path / "nowhere")
    (tmp_path / "cache" / "meta.json").write_text("{not json")
    with pytest.raises(AnchorCacheError, match="not valid JSON"):
        read_meta(tmp_path / "cache")


def _check(**overrides):
    meta = {**META, "hidden_dim": 64, "num_anchors": 16, "shapes": {}}
    args = dict(retention_mode="hidden", layers=(-2,), pooling="mean_image_tokens", dtype="bfloat16", hidden_dim=64,
                anchor_batch_size=4)
    check_cache_matches(meta, **{**args, **overrides})


@pytest.mark.parametrize("override,pattern", [
    ({"layers": (-1,)}, r"--craft.hidden_layer is -1 but the anchor cache was built with -2: pass --craft.hidden_layer -2"),
    ({"layers": (-1, -2)}, r"--craft.hidden_layers is \[-1, -2\] but the anchor cache was built with -2"),
    ({"retention_mode": "action"}, r"--craft.retention_mode is 'action' but the anchor cache was built for 'hidden': "
                                   r"pass --craft.retention_mode hidden or build a cache with .* --retention_mode action"),
    ({"needs_actions": "--vla.replay_batch_size"}, r"--vla.replay_batch_size reads the anchors' recorded actions, "
                                                   r"which the anchor cache does not hold"),
    ({"pooling": "last_token"}, r"--craft.pooling is 'last_token' but the anchor cache was built with 'mean_image_tokens'"),
    ({"dtype": "float32"}, r"training computes in float32 but .* targets computed in bfloat16; rebuild the cache with "
                           r"--dtype float32, or compute in bfloat16 \(--vla.enable_mixed_precision_training true\)"),
    ({"hidden_dim": 4096}, r"targets of a model with hidden size 64 but the model's hidden size is 4096:"),
    ({"dtype": "float32", "dtype_flag": "--mixed"}, r"training computes in float32 \(--mixed\) but"),
    ({"hidden_dim": 4096, "model_flag": "--model"}, r"the model's hidden size is 4096 \(--model\)"),
    ({"anchor_batch_size": 17}, r"--craft.anchor_batch_size is 17 but the anchor cache holds only 16 anchors"),
])
def test_mismatches_name_flag_expected_and_found(override, pattern):
    with pytest.raises(CraftConfigError, match=pattern):
        _check(**override)


def test_non_finite_target_is_refused_when_built_and_when_opened(tmp_path):
    rows = _rows(np.random.default_rng(2), 4)
    rows["target_features"][2, 1] = np.inf
    writer = AnchorCacheWriter(tmp_path / "built", _shapes(10))
    writer.append({k: v[:4] for k, v in _rows(np.random.default_rng(1), 4).items()}, ["a"] * 4)
    with pytest.raises(AnchorCacheError, match=r"non-finite target \(NaN or inf\) for anchor 6 \(row 6 of target_features.npy"):
        writer.append(rows, [f"task {i}" for i in range(4)])
    assert not (tmp_path / "built").exists() and not (tmp_path / "built.partial").exists()

    _write(tmp_path / "cache")
    features = np.load(tmp_path / "cache" / "target_features.npy", mmap_mode="r+")
    features[7, 0] = np.nan
    features[9, 3] = np.nan
    features.flush()
    with pytest.raises(AnchorCacheError, match=r"target_features.npy holds a non-finite value \(NaN or inf\) in row 7;"):
        AnchorCache.open(tmp_path / "cache")


def test_first_nonfinite_row_reads_in_blocks(monkeypatch):
    import craft.anchor_cache as ac

    monkeypatch.setattr(ac, "FINITE_CHECK_ROWS", 3)
    features = np.zeros((10, 2), dtype=np.float32)
    assert ac.first_nonfinite_row(features) is None
    features[[8, 4], 1] = [np.nan, -np.inf]
    assert ac.first_nonfinite_row(features) == 4


def test_matching_cache_passes():
    _check()


def test_anchor_draws_are_deterministic_disjoint_across_ranks_and_cover_the_cache():
    n, b, world = 10, 3, 2
    draws = [anchor_indices(s, b, n, seed=5, rank=r, world_size=world) for s in range(5) for r in range(world)]
    flat = np.concatenate(draws)
    # within each pass over the cache (10 positions) every anchor appears exactly once
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    np.testing.assert_array_equal(anchor_indices(3, b, n, 5, 1, world), draws[3 * world + 1])
    assert not np.array_equal(anchor_indices(0, b, n, seed=6), anchor_indices(0, b, n, seed=5))
