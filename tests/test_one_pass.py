"""One-pass CRaFT gradients equal the two-pass reference (separate action and anchor passes)."""

import json

import pytest
import torch
from launch import run_script, user_flags

from craft.config import CraftConfig
from prismatic.models import OpenVLA, preset_config
from prismatic.models.lora import add_lora, lora_targets
from prismatic.training.distributed import DistEnv
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
    common = {"vla.max_steps": 2, "vla.per_device_batch_size": 4, "vla.enable_gradient_checkpointing": "true",
              "save_interval": 100}
    rows = {}
    for impl in ("two_pass", "one_pass"):
        res = run_script(user_flags(demo, tmp_path, **{**common, "run_id": impl, "craft.step_impl": impl}), nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        rows[impl] = [json.loads(x) for x in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["two_pass"], rows["one_pass"]):
        assert a["projection"] == b["projection"]
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-6), (a["step"], key)
