"""CRaFT under FSDP2 on 2 CPU ranks (gloo) against one rank with gradient accumulation, two-pass and one-pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def launch(nproc: int, out: Path, step_impl: str = "two_pass", micro_per_step: int = 2,
           strategy: str = "full-shard") -> None:
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), str(HERE / "dist_worker.py"), str(out), step_impl, str(micro_per_step),
           strategy]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    launch(1, root / "one_m4", micro_per_step=4)
    launch(2, root / "two_m4", micro_per_step=4)
    launch(2, root / "two_gathered_m4", "two_pass_gathered", micro_per_step=4)
    launch(2, root / "two_one_pass_m4", "one_pass", micro_per_step=4)  # 2 micro-batches per rank
    launch(2, root / "hybrid_one_pass_m4", "one_pass", micro_per_step=4, strategy="hybrid-shard")
    launch(1, root / "one_action_l2sp_m4", "action_l2sp", micro_per_step=4)
    launch(2, root / "two_action_l2sp_m4", "action_l2sp", micro_per_step=4)
    return root


def _assert_same_run(runs, reference: str, other: str):
    one = json.loads((runs / reference / "rank0.json").read_text())
    two = json.loads((runs / other / "rank0.json").read_text())
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["projection"] == b["projection"]
        for key in ("L_act", "L_ret", "grad_dot", "grad_cos", "grad_norm", "lambda"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert any(r["lambda"] != 0.5 for r in one)  # the dual variable really moved
    w1, w2 = torch.load(runs / reference / "weights.pt"), torch.load(runs / other / "weights.pt")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_ranks_match_one_rank_with_accumulation(runs):
    _assert_same_run(runs, "one_m4", "two_m4")


@pytest.mark.parametrize("run", ["two_one_pass_m4", "hybrid_one_pass_m4"])
def test_one_pass_on_two_ranks_gives_each_rank_the_two_pass_gradient_shards(runs, run):
    """Per rank, before any update: g_act and g_ret shards (DTensors, param.grad's layout) from one joint
    pass equal those of two separate passes, and so do the globally reduced products; sharded over both
    ranks, or (hybrid) replicated over two one-rank "nodes"."""
    for rank in (0, 1):
        report = json.loads((runs / run / f"compare_rank{rank}.json").read_text())
        assert report["compared"] > report["num_params"]  # both gradients, most tensors non-empty here
        assert report["max_rel_err"] <= 1e-5
        assert report["got_products"] == pytest.approx(report["ref_products"], rel=1e-6)
        assert report["ref_products"][0] != 0.0


@pytest.mark.parametrize("run", ["two_one_pass_m4", "hybrid_one_pass_m4"])
def test_one_pass_on_two_ranks_matches_two_pass_on_one_rank(runs, run):
    _assert_same_run(runs, "one_m4", run)


def test_action_retention_with_l2_sp_on_two_ranks_matches_one_rank(runs):
    """The action signal's anchor pass and L2-SP's pull (each rank pulling its own shards toward the rows it holds of
    the checkpoint's weights) under FSDP give the single process's steps and weights."""
    _assert_same_run(runs, "one_action_l2sp_m4", "two_action_l2sp_m4")
    rows = json.loads((runs / "one_action_l2sp_m4" / "rank0.json").read_text())
    assert rows[0]["L_ret"] > 0.1 and all(r["grad_dot"] != 0 for r in rows)


def test_lambda_is_bitwise_identical_on_every_rank(runs):
    r0 = json.loads((runs / "two_m4" / "rank0.json").read_text())
    r1 = json.loads((runs / "two_m4" / "rank1.json").read_text())
    assert [r["lambda_hex"] for r in r0] == [r["lambda_hex"] for r in r1]
    assert [r["projection"] for r in r0] == [r["projection"] for r in r1]


def test_keeping_weights_gathered_changes_no_value_and_the_anchor_pass_gathers_nothing(runs):
    """--craft.keep_weights_gathered: the same steps bit for bit (the next step's forward would see stale gathered
    weights if a unit were not resharded after the update), without a single all-gather in the anchor pass."""
    for rank in (0, 1):
        plain = json.loads((runs / "two_m4" / f"rank{rank}.json").read_text())
        kept = json.loads((runs / "two_gathered_m4" / f"rank{rank}.json").read_text())
        for p, k in zip(plain, kept):
            assert {key: p[key] for key in p if "gathers" not in key} == \
                {key: k[key] for key in k if "gathers" not in key}
        assert all(p["anchor_all_gathers"] > 0 for p in plain)
        assert all(k["anchor_all_gathers"] == 0 for k in kept)
        assert all(k["all_gathers"] <= p["all_gathers"] - p["anchor_all_gathers"] for p, k in zip(plain, kept))
    w1, w2 = torch.load(runs / "two_m4" / "weights.pt"), torch.load(runs / "two_gathered_m4" / "weights.pt")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
