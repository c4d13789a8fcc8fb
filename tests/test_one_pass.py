"""One-pass CRaFT gradients equal the two-pass reference (separate action and anchor passes), whether the split is
taken at the Linear layers (LoRA) or by intercepting every torch call (full fine-tuning)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import child_env, run_script, user_flags

from craft.config import CraftConfig
from craft.one_pass import RowGroupSplit
from prismatic.models import OpenVLA, preset_config
from prismatic.models.lora import add_lora, lora_targets
from prismatic.training.distributed import DistEnv, dist_env_from_environ, init_process_group, shard_model
from prismatic.training.objective import Objective

B, A = 3, 2


def _model(lora: bool):
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    if lora:
        model = add_lora(model, 4, 8, 0.0, lora_targets(model, "all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.05)
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(1)

    def rows(n, length):
        ids = torch.randint(3, 3000, (n, length), generator=g)
        ids[:, 0] = 1
        return {"pixel_values": torch.randn(n, 6, 224, 224, generator=g), "input_ids": ids,
                "attention_mask": torch.ones_like(ids, dtype=torch.bool)}

    act, anc = rows(B, 11), rows(A, 8)
    act["labels"] = act["input_ids"].clone()
    act["labels"][:, :6] = -100
    anc["attention_mask"][1, 6:] = False  # a padded anchor prompt
    anc["target_features"] = torch.randn(A, 64, generator=g)
    return act, anc


def _grads(params):
    out = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, False), (False, True), (True, True)])
def test_one_pass_gradients_equal_two_pass(lora, checkpointing):
    """The objective's joint loss against its separate action and anchor losses (the trainer's own pieces)."""
    model = _model(lora)
    objective = Objective.build(model, CraftConfig(step_impl="one_pass", pooling="last_token"), env=DistEnv(),
                                device=torch.device("cpu"), sharding_strategy="full-shard", autocast_dtype=None,
                                gradient_checkpointing=checkpointing, max_grad_norm=1.0)
    params, split = objective.params, objective.split
    act, anc = _batches()
    objective.action(act)().backward()
    ref_act = _grads(params)
    objective.retention(anc)().backward()
    ref_ret = _grads(params)

    joint = objective.joint(act, anc)
    assert (joint.n_action_rows, joint.rows) == (B, B + A)
    with split.rows(B, B + A):
        sum(joint()).backward()
    got_act, got_ret = _grads(params), split.take_ret(params)
    checked = 0
    for name_p, ra, rr, ga, gr in zip(params, ref_act, ref_ret, got_act, got_ret):
        for ref, got in ((ra, ga), (rr, gr)):
            if ref is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
                checked += 1
    assert checked > len(params)  # both gradients were compared on many tensors


@pytest.mark.parametrize("nproc", [1, 2])
def test_one_pass_run_matches_two_pass_run(demo, tmp_path, nproc):
    """The trainer's composition (joint batches, checkpointing re-entering the split, FSDP with 2 ranks);
    without checkpointing the gradients are compared directly above."""
    # No projection: at step 1 the joint batch's g_ret is rounding-level (see below), and projecting g_act off a
    # noise direction would make the runs differ from step 2 on for a reason that is not the composition.
    common = {"vla.max_steps": 2, "vla.per_device_batch_size": 4, "vla.enable_gradient_checkpointing": "true",
              "save_interval": 100, "craft.conflict_projection": "false"}
    rows = {}
    for impl in ("two_pass", "one_pass"):
        res = run_script(user_flags(demo, tmp_path, **{**common, "run_id": impl, "craft.step_impl": impl}), nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        rows[impl] = [json.loads(x) for x in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["two_pass"], rows["one_pass"]):
        # Step 1: the model still equals the cache's. The separate anchor pass computes the features exactly as the
        # cache was built (BOS and the image), so L_ret and g_ret are 0 (grad_cos 0 by definition); the joint
        # batch feeds whole prompts, equal up to rounding, so its g_ret is rounding-level and its direction
        # (grad_cos, the sign of grad_dot) is noise; its size is not.
        first = a["L_ret"] == 0.0
        if first:
            assert b["L_ret"] < 1e-6 and abs(b["grad_dot"]) < 1e-6, b
        assert a["projection"] is b["projection"] is False
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "grad_norm"):
            if first and key in ("L_ret", "grad_dot", "grad_cos"):
                continue
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-6), (a["step"], key)


def _interceptions(monkeypatch) -> list:
    """Every call that reaches RowGroupSplit.__torch_function__ from now on."""
    seen = []
    intercept = RowGroupSplit.__torch_function__

    def counted(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return intercept(self, func, types, args, kwargs)

    monkeypatch.setattr(RowGroupSplit, "__torch_function__", counted)
    return seen


@pytest.mark.parametrize("lora", [True, False])
def test_lora_split_is_taken_at_its_linear_layers_and_full_fine_tuning_uses_the_mode(monkeypatch, lora):
    """LoRA (only Linear weights trainable): not one torch call is intercepted in a joint forward and its
    checkpointed backward, and the anchor gradients still arrive; full fine-tuning (norms, embeddings, ...)
    goes through the TorchFunctionMode."""
    model = _model(lora)
    objective = Objective.build(model, CraftConfig(step_impl="one_pass", pooling="last_token"), env=DistEnv(),
                                device=torch.device("cpu"), sharding_strategy="full-shard", autocast_dtype=None,
                                gradient_checkpointing=True, max_grad_norm=1.0)
    split, seen = objective.split, _interceptions(monkeypatch)
    assert split.uses_mode is not lora
    joint = objective.joint(*_batches())
    with split.rows(joint.n_action_rows, joint.rows):
        sum(joint()).backward()
    got_ret = split.take_ret(objective.params)
    assert sum(g is not None and bool(g.any()) for g in got_ret) > len(objective.params) // 3
    if lora:
        assert seen == []
        assert {id(m.weight) for m in split.linears} == {id(p) for p in objective.params}  # the adapters
    else:
        assert len(seen) > 100 and F.layer_norm in seen and F.linear in seen


def _tiny_split(at_linears: bool):
    """A Linear whose weight and bias are trained, split at the layer (model given) or by the mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    return model, RowGroupSplit(model=model if at_linears else None)


@pytest.mark.parametrize("at_linears", [True, False])
def test_linear_gradients_split_by_rows_both_ways(at_linears):
    """Against a hand-written expectation: rows [:n] of y = x W^T + b give g_act, rows [n:] g_ret."""
    model, split = _tiny_split(at_linears)
    assert split.uses_mode is not at_linears
    x, gy = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64)
    model.double()
    with split.rows(2, 5):
        (model(x) * gy).sum().backward()
    w, b = model[0].weight, model[0].bias
    torch.testing.assert_close(w.grad, torch.einsum("rto,rti->oi", gy[:2], x[:2]))
    torch.testing.assert_close(b.grad, gy[:2].sum((0, 1)))
    got_w, got_b = split.take_ret([w, b])
    torch.testing.assert_close(got_w, torch.einsum("rto,rti->oi", gy[2:], x[2:]))
    torch.testing.assert_close(got_b, gy[2:].sum((0, 1)))
    out = model(x[:1])  # outside a joint batch: the plain layer
    torch.testing.assert_close(out, x[:1] @ w.T + b)


@pytest.mark.parametrize("at_linears", [True, False])
def test_linear_input_not_aligned_with_the_batch_is_refused(at_linears):
    model, split = _tiny_split(at_linears)
    with split.rows(2, 5), pytest.raises(RuntimeError, match="without a batch-aligned input; use --craft.step_impl "
                                                              "two_pass"):
        model(torch.randn(4, 3))
    assert split.total == 0 and model(torch.randn(4, 3)).shape == (4, 2)  # refused inside only


def test_lora_split_on_two_ranks_gives_each_rank_the_two_pass_gradient_shards(tmp_path):
    """FSDP2 swaps the unsharded adapter weights in under the same names, for the forward and again for the
    checkpointed recomputation: per rank, the shards of g_act and g_ret from one joint pass split at the Linear
    layers equal those of two separate passes, and so do the globally reduced products."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           __file__, str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert res.returncode == 0, res.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["uses_mode"] is False
        assert report["compared"] > report["num_params"]  # both gradients, most adapters
        assert report["max_rel_err"] <= 1e-5
        assert report["got_products"] == pytest.approx(report["ref_products"], rel=1e-6)
        assert report["ref_products"][0] != 0.0


def _lora_rank(out: Path) -> None:
    """One rank of the test above, run by torchrun."""
    from dist_worker import compare_one_pass

    env, device = dist_env_from_environ(), torch.device("cpu")
    init_process_group(env, device, timeout_s=300)
    model = _model(lora=True)
    shard_model(model, env, device, "full-shard", mixed_precision=False)
    objective = Objective.build(model, CraftConfig(step_impl="one_pass"), env=env, device=device,
                                sharding_strategy="full-shard", autocast_dtype=None, gradient_checkpointing=True,
                                max_grad_norm=1.0)
    report = {**compare_one_pass(objective, [env.rank]), "uses_mode": objective.split.uses_mode}
    (out / f"rank{env.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    _lora_rank(Path(sys.argv[1]))
