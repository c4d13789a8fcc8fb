"""LoRA-CRaFT: surgery over adapter gradients, exact resume, merged export."""

import json

import numpy as np
import pytest
import torch
from launch import run_cut_at, run_script, superseded_steps, user_flags

from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint
from craft.retention import pool_hidden, retention_loss
from craft.step import craft_step
from prismatic.models import OpenVLA, load_pretrained, preset_config
from prismatic.models.lora import add_lora, lora_targets
from prismatic.training.checkpointing import load_adapters

LORA = {"vla.use_lora": "true", "vla.lora_rank": 4, "vla.per_device_batch_size": 4, "save_interval": 3}


def _lora_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    model = add_lora(model, 4, 8, 0.0, lora_targets(model, "all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)  # away from the zero init, so both losses have real adapter gradients
    return model.to(dtype)


def _batches():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 3000, (2, 9), generator=g)
    ids[:, 0] = 1
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids, dtype=torch.bool)
    return torch.randn(2, 6, 224, 224, generator=g), ids, mask, labels, torch.randn(2, 64, generator=g)


def _losses(model, dtype):
    pv, ids, mask, labels, target = _batches()
    pv, target = pv.to(dtype), target.to(dtype)
    act = lambda: model(pv, ids, mask, labels=labels).loss  # noqa: E731
    ret = lambda: retention_loss(pool_hidden(model.hidden_states(pv, ids, mask, layers=(-2,))[0], "mean_image_tokens",  # noqa: E731
                                             model.image_token_slice, mask), target, "mse")
    return act, ret


def test_surgery_over_adapters_matches_float64_reference():
    ref = _lora_model(torch.float64)
    params64 = [p for p in ref.parameters() if p.requires_grad]
    act, ret = _losses(ref, torch.float64)
    a = torch.cat([g.reshape(-1) for g in torch.autograd.grad(act(), params64, materialize_grads=True)])
    r = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ret(), params64, materialize_grads=True)])
    lam = 0.3
    g = a - (a @ r) / (r @ r) * r + lam * r if a @ r < 0 else a + lam * r
    expected = torch.cat([p.detach().reshape(-1) for p in params64]) - 0.1 * g

    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    act, ret = _losses(model, torch.float32)
    c = RetentionConstraint(EpsilonSchedule("constant", end=0.01), DualMultiplier(lam, lr=1.0))
    res = craft_step(params, torch.optim.SGD(params, lr=0.1), c, [act], [ret], max_grad_norm=1e9)
    assert res.grad_dot == pytest.approx((a @ r).item(), rel=1e-3)
    got = torch.cat([p.detach().reshape(-1) for p in params]).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lora_craft_resumes_exactly_and_exports_a_plain_checkpoint(demo, demo_bf16_cache, tmp_path):
    """With mixed precision, as users train: a bf16 frozen base under bf16 autocast, against a bf16 cache."""
    mixed = {**LORA, "vla.enable_mixed_precision_training": "true", "craft.anchor_cache_dir": demo_bf16_cache}
    ref = run_script(user_flags(demo, tmp_path, **{**mixed, "run_id": "ref", "vla.max_steps": 5}))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_cut_at(tmp_path / "ref", 3, tmp_path / "cut")
    resumed = run_script(user_flags(demo, tmp_path, **{**mixed, "run_id": "cut", "vla.max_steps": 5,
                                                       "resume_from": "latest"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("ref", "cut")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5]
    assert superseded_steps(tmp_path / "cut") == [4, 5]  # redone by the resumed run, not kept from the copy
    for a, b in zip(*rows):
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "projection", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)

    ckpt = tmp_path / "ref" / "checkpoints" / "step-000005"
    merged, _, _ = load_pretrained(ckpt)  # the merged export is a plain OpenVLA checkpoint
    adapted, _, _ = load_pretrained(demo / "model", dtype=torch.bfloat16)  # the frozen base, as trained
    adapted = add_lora(adapted.float(), 4, 4, 0.0, lora_targets(adapted, "all-linear"))
    load_adapters(adapted, ckpt)
    pv, ids, mask, _, _ = _batches()
    with torch.no_grad():
        la, lb = adapted.eval()(pv, ids, mask).logits, merged.eval()(pv, ids, mask).logits
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    assert not np.allclose(la.numpy(), load_pretrained(demo / "model")[0].eval()(pv, ids, mask).logits.detach().numpy(),
                           atol=1e-4)  # the adapters did change the model


def test_adapters_cover_every_linear_but_the_head_and_train_in_float32():
    model = OpenVLA.from_config(preset_config("tiny")).to(torch.bfloat16)
    targets = lora_targets(model, "all-linear")
    assert "language_model.lm_head" not in targets
    assert any(t.startswith("vision_backbone.fused_featurizer") for t in targets)
    assert any(t.startswith("projector.") for t in targets) and any(".q_proj" in t for t in targets)
    assert lora_targets(model, "q_proj,v_proj") == [t for t in targets if t.endswith(("q_proj", "v_proj"))]
    with pytest.raises(ValueError, match="--vla.lora_target_modules 'lm_head' matches no Linear"):
        lora_targets(model, "lm_head")
    model = add_lora(model, 4, 4, 0.0, targets)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
