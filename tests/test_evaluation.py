"""Retention instruments: held-out anchors, drift against independent float64 references, the Evaluator under
FSDP against one process, eval_retention.py end to end."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from craft.anchor_cache import AnchorCache, anchor_indices
from craft.retention import retention_loss, retention_loss_per_anchor
from eval_worker import BATCH_SIZE, EPSILON, VAL_BATCHES, evaluator, perturbed_model, synthetic_frames
from launch import ROOT, child_env
from prismatic.conf.eval import EvalConfig
from prismatic.models import ImageProcessor, load_pretrained, save_pretrained
from prismatic.training.anchor_builder import split_by_episode
from prismatic.training.batches import anchor_inputs
from prismatic.training.evaluation import anchor_sets, training_anchor_subset
from prismatic.training.metrics import action_metrics
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator, training_example

HERE = Path(__file__).resolve().parent


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_heldout_anchors_come_from_other_episodes_and_training_draws_never_reach_them(demo):
    cache = AnchorCache.open(demo / "anchor_cache")
    heldout = cache.heldout()
    assert heldout.num_anchors == 8 == cache.meta["heldout"]["num_anchors"]
    assert heldout.meta["hidden_layer"] == cache.meta["hidden_layer"] and heldout.meta["role"] == "heldout"
    train_episodes, heldout_episodes = set(cache.episode_ids()), set(heldout.episode_ids())
    assert train_episodes and heldout_episodes and not train_episodes & heldout_episodes
    assert cache.meta["heldout"]["num_episodes"] == len(heldout_episodes)

    def key(rows, i):
        return rows["images"][i].tobytes() + rows["input_ids"][i].tobytes()

    heldout_keys = {key(heldout.arrays, i) for i in range(heldout.num_anchors)}
    drawn = set()
    for world in (1, 2):
        for step in range(12):  # several passes over the 16 training anchors
            for rank in range(world):
                idx = anchor_indices(step, 4, cache.num_anchors, seed=0, rank=rank, world_size=world)
                drawn.update(int(i) for i in idx)
    assert drawn == set(range(cache.num_anchors))
    rows = cache.batch(np.arange(cache.num_anchors))
    assert not {key(rows, i) for i in drawn} & heldout_keys


def test_cache_without_heldout_anchors_still_evaluates_with_a_note(demo, tmp_path):
    cache_dir = tmp_path / "old_cache"
    shutil.copytree(demo / "anchor_cache", cache_dir)
    shutil.rmtree(cache_dir / "heldout")
    (cache_dir / "episodes.json").unlink()
    meta = json.loads((cache_dir / "meta.json").read_text())
    del meta["heldout"]
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    cache = AnchorCache.open(cache_dir)
    assert cache.heldout() is None and cache.episode_ids() is None
    sets, notes = anchor_sets(cache, train_subset=4)
    assert [s.name for s in sets] == ["train"] and sets[0].indices.tolist() == [0, 4, 8, 12]
    assert len(notes) == 1 and "no held-out anchors" in notes[0] and "held-out drift metrics are not computed" in notes[0]
    assert anchor_sets(None, 4) == ([], ["no anchor cache given: drift metrics (eval/heldout_*, eval/train_*) are not "
                                         "computed"])


def test_episode_split_is_disjoint_and_refuses_too_few_episodes():
    rng = np.random.default_rng(0)
    frames = [{"episode_id": f"ep{e}", "step": s} for e, s in rng.permutation([(e, s) for e in range(20) for s in range(9)])]
    train, heldout = split_by_episode(iter(frames), 30, 10, "mix")
    assert len(train) == 30 and len(heldout) == 10
    assert not {f["episode_id"] for f in train} & {f["episode_id"] for f in heldout}
    train, heldout = split_by_episode(iter(frames), 30, 0, "mix")
    assert len(train) == 30 and heldout == []
    one_episode = ({"episode_id": "only", "step": s} for s in range(10_000))
    with pytest.raises(ValueError, match=r"--num_heldout_anchors 2: .*\(episodes seen: 1\)"):
        split_by_episode(one_episode, 5, 2, "mix")


def test_eval_config_checks_numbers_and_the_retention_mix(demo):
    EvalConfig(retention_mix="libero_90").validate(demo / "rlds")
    with pytest.raises(ValueError, match="--eval.batches must be >= 1; found 0"):
        EvalConfig(batches=0).validate(demo / "rlds")
    with pytest.raises(ValueError, match=r"--eval.retention_mix libero_spatial_no_noops: .* not found"):
        EvalConfig(retention_mix="libero_spatial_no_noops").validate(demo / "rlds")


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
def test_per_anchor_drift_averages_to_the_training_loss(loss_type):
    gen = torch.Generator().manual_seed(0)
    f, t = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    per = retention_loss_per_anchor(f, t, loss_type)
    assert per.shape == (5,)
    torch.testing.assert_close(per.mean(), retention_loss(f, t, loss_type), rtol=1e-6, atol=0)


def test_training_subset_is_evenly_spaced_and_distinct():
    assert training_anchor_subset(16, 4).tolist() == [0, 4, 8, 12]
    assert training_anchor_subset(5, 64).tolist() == [0, 1, 2, 3, 4]
    assert len(set(training_anchor_subset(512, 64).tolist())) == 64


def test_pretrained_model_has_no_drift_on_its_own_cache(demo, demo_bf16_cache):
    """At the builder's precision, exactly the cached features: float32 against the demo's float32 cache, fp32
    weights with bf16 autocast against the same anchors' bf16 cache. Across precisions only bf16 rounding remains,
    under 1e-3 of the targets' mean square (measured 4e-6)."""
    model, tokenizer, config = load_pretrained(demo / "model")
    model.train()
    for cache_dir, autocast in ((demo / "anchor_cache", None), (demo_bf16_cache, _bf16)):
        same = evaluator(model, tokenizer, config, demo, autocast=autocast, cache_dir=cache_dir)(step=0,
                                                                                                 epsilon=EPSILON)
        assert same["eval/heldout_L_ret"] == 0.0 and same["eval/train_L_ret"] == 0.0, cache_dir
        assert same["eval/heldout_frac_over_eps"] == 0.0 and same["eval/heldout_cos"] == pytest.approx(1.0, abs=1e-6)
        assert model.training  # train mode restored
    cache = AnchorCache.open(demo_bf16_cache)
    scale = float(np.mean(np.square(cache.arrays["target_features"], dtype=np.float64)))
    across = evaluator(model, tokenizer, config, demo, cache_dir=demo_bf16_cache)(step=0, epsilon=EPSILON)
    for name in ("heldout", "train"):
        assert 0.0 < across[f"eval/{name}_L_ret"] < 1e-3 * scale, across[f"eval/{name}_L_ret"] / scale


def _float64_reference(model, config, cache: AnchorCache, indices, epsilon):
    """Hidden states of the model in float64, pooled and compared in NumPy."""
    model64 = model.double()
    rows = cache.batch(np.asarray(indices))
    inputs = anchor_inputs(rows, ImageProcessor(config))
    with torch.no_grad():
        hidden = model64.hidden_states(inputs["pixel_values"].double(), inputs["input_ids"], inputs["attention_mask"],
                                       layers=(cache.meta["hidden_layer"],))[0].numpy()
    features = hidden[:, 1 : 1 + config.num_image_tokens].mean(axis=1)
    targets = rows["target_features"].astype(np.float64)
    drift = ((features - targets) ** 2).mean(axis=1)
    cos = (features * targets).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(targets, axis=1)
    model.float()
    return drift, cos


def test_perturbed_drift_matches_a_float64_computation(demo):
    model, tokenizer, config = perturbed_model(demo)
    cache = AnchorCache.open(demo / "anchor_cache")
    ref = {"heldout": _float64_reference(model, config, cache.heldout(), np.arange(8), None),
           "train": _float64_reference(model, config, cache, np.arange(16), None)}
    drifts = np.sort(ref["heldout"][0])
    epsilon = float(drifts[2] + drifts[3]) / 2  # 5 of the 8 held-out anchors over budget
    row = evaluator(model, tokenizer, config, demo)(step=3, epsilon=epsilon)
    assert row["step"] == 3 and row["epsilon"] == epsilon
    for name, (drift, cos) in ref.items():
        assert drift.mean() > 1e-3  # a real drift, not noise
        assert row[f"eval/{name}_L_ret"] == pytest.approx(drift.mean(), rel=1e-4)
        assert row[f"eval/{name}_cos"] == pytest.approx(cos.mean(), rel=1e-5)
        assert row[f"eval/{name}_frac_over_eps"] == pytest.approx(np.mean(drift > epsilon))
    assert row["eval/heldout_frac_over_eps"] == 5 / 8


def test_validation_metrics_equal_one_pass_over_all_frames(demo):
    """3 batches reduced from sums = the same frames as one batch, through the trainer's forward and metrics."""
    model, tokenizer, config = perturbed_model(demo)
    row = evaluator(model, tokenizer, config, demo)(step=0, epsilon=EPSILON)
    act = ActionTokenizer(n_bins=config.n_action_bins)
    examples = [training_example(tokenizer, act, f["instruction"], f["action"])
                for f in synthetic_frames(VAL_BATCHES * BATCH_SIZE)]
    batch = PaddedCollator(tokenizer.pad_token_id, config.llm_max_length)([e[0] for e in examples], [e[1] for e in examples])
    pixels = ImageProcessor(config)(np.stack([f["image"] for f in synthetic_frames(VAL_BATCHES * BATCH_SIZE)]))
    with torch.no_grad():
        out = model.eval()(pixels, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    expected = action_metrics(out.action_logits, out.action_targets, act)
    assert row["eval/val_L_act"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert row["eval/val_action_accuracy"] == pytest.approx(expected["action_accuracy"], abs=1e-9)
    assert row["eval/val_l1"] == pytest.approx(expected["l1_loss"], rel=1e-6)


def test_two_fsdp_ranks_equal_one_process(demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(HERE / "eval_worker.py"), str(demo), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=child_env())
    assert res.returncode == 0, res.stderr[-4000:]
    model, tokenizer, config = perturbed_model(demo)
    one = evaluator(model, tokenizer, config, demo)(step=5, epsilon=EPSILON)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = [k for k in one if k.startswith("eval/")]
    assert len(names) == 9  # held-out and training drift, validation metrics
    for row in rows:
        assert row["training_after"] is True
        assert [k for k in row if k.startswith("eval/")] == names
        for k in names:
            assert row[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k
    assert rows[0] == {**rows[1], "eval_time_s": rows[0]["eval_time_s"]}  # one reduction: identical on every rank


@pytest.fixture(scope="module")
def eval_retention():
    spec = importlib.util.spec_from_file_location("eval_retention", ROOT / "vla-scripts" / "eval_retention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(demo, checkpoints, cache, out):
    return ["--checkpoints", *map(str, checkpoints), "--anchor_cache_dir", str(cache), "--output_dir", str(out),
            "--data_root_dir", str(demo / "rlds"), "--data_mix", "libero_90", "--eval_batches", "2",
            "--batch_size", "4", "--shuffle_buffer_size", "100", "--device", "cpu"]


def test_eval_retention_end_to_end(demo, tmp_path, eval_retention, capsys):
    model, tokenizer, config = perturbed_model(demo)
    tuned = tmp_path / "run" / "checkpoints" / "step-000010"
    save_pretrained(model, tuned, tokenizer=tokenizer)
    out = tmp_path / "out"
    result = eval_retention.main(_args(demo, [demo / "model", tmp_path / "run" / "checkpoints"],
                                       demo / "anchor_cache", out))
    saved = json.loads((out / "retention.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["anchor_cache"] == str(demo / "anchor_cache")
    assert [e["checkpoint"] for e in saved["checkpoints"]] == [str(demo / "model"), str(tuned)]
    pre, post = (e["metrics"] for e in saved["checkpoints"])
    assert pre["eval/heldout_L_ret"] == 0.0 and pre["eval/train_L_ret"] == 0.0 and saved["warnings"] == []
    assert post["eval/heldout_L_ret"] > 1e-3 and post["eval/heldout_frac_over_eps"] == 1.0
    assert {"eval/val_L_act", "eval/val_action_accuracy", "eval/val_l1"} <= pre.keys()
    table = (out / "retention.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| checkpoint | eval/heldout_L_ret") and str(tuned) in table[3]

    # The cache claims to come from the tuned checkpoint, which does not reproduce it: a clear warning.
    cache = tmp_path / "cache"
    shutil.copytree(demo / "anchor_cache", cache)
    meta = json.loads((cache / "meta.json").read_text())
    meta["model"]["checkpoint"] = str(tuned)
    (cache / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    result = eval_retention.main(_args(demo, [tuned], cache, tmp_path / "out2"))
    assert len(result["warnings"]) == 1 and "built the anchor cache" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("out_exists", "--output_dir .* already holds retention.json"),
    ("lora_only", "holds LoRA adapters only"),
    ("nan_cache", r"target_features.npy holds a non-finite value .* row 3"),
    ("unknown_mix", r"--retention_mix libero_91: .* not a known mixture"),
])
def test_eval_retention_refuses_bad_input_before_loading(demo, tmp_path, eval_retention, capsys, case, message):
    cache, ckpt, out = demo / "anchor_cache", demo / "model", tmp_path / "out"
    if case == "out_exists":
        out.mkdir()
        (out / "retention.json").write_text("{}")
    elif case == "unknown_mix":
        pass
    elif case == "lora_only":
        ckpt = tmp_path / "step-000010"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"")
    else:
        cache = tmp_path / "cache"
        shutil.copytree(demo / "anchor_cache", cache)
        features = np.load(cache / "target_features.npy", mmap_mode="r+")
        features[3, 5] = np.nan
        features.flush()
    extra = ["--retention_mix", "libero_91"] if case == "unknown_mix" else []
    with pytest.raises(SystemExit) as exit_info:
        eval_retention.main(_args(demo, [ckpt], cache, out) + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("eval_retention.py: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    if case == "out_exists":
        assert (out / "retention.json").read_text() == "{}"
