"""LoRA over an 8-bit / 4-bit frozen base (bitsandbytes): what is quantized, how close it stays, a run."""

import json

import pytest
import torch
from launch import run_cut_at, run_script, superseded_steps, user_flags
import torch.nn.functional as F
from torch import nn

from prismatic.conf.train import TrainConfig
from prismatic.models import OpenVLA, preset_config
from prismatic.training import preflight as preflight_module
from prismatic.training.preflight import PreflightError, preflight

LORA = {"vla.use_lora": "true", "vla.lora_rank": 4, "vla.merge_on_save": "false"}


def _cfg(demo, tmp_path, **changes):
    cfg = TrainConfig(pretrained_checkpoint=demo / "model", data_root_dir=demo / "rlds", run_root_dir=tmp_path,
                      run_id="run")
    cfg.craft.anchor_cache_dir = demo / "anchor_cache"
    cfg.vla.enable_mixed_precision_training = False  # the demo cache's float32
    cfg.vla.use_lora, cfg.vla.merge_on_save, cfg.vla.base_quantization = True, False, "4bit"
    for key, value in changes.items():
        setattr(cfg.vla, key, value)
    return cfg


@pytest.mark.parametrize("changes,fragment", [
    ({"use_lora": False}, "--vla.use_lora true"),
    ({"merge_on_save": True}, "--vla.merge_on_save false"),
    ({"base_quantization": "2bit"}, "--vla.base_quantization must be one of"),
])
def test_bad_quantization_flags(demo, tmp_path, changes, fragment):
    with pytest.raises(PreflightError, match=fragment):
        preflight(_cfg(demo, tmp_path, **changes))


def test_missing_bitsandbytes_is_one_clear_error(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module, "bitsandbytes_available", lambda: False)
    with pytest.raises(PreflightError, match="needs the bitsandbytes package, which is not installed"):
        preflight(_cfg(demo, tmp_path))
    assert not (tmp_path / "run").exists()


def test_quantization_refuses_several_processes(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(PreflightError, match="--vla.base_quantization 4bit needs one process \\(found 2"):
        preflight(_cfg(demo, tmp_path, global_batch_size=16))


bnb_functional = pytest.importorskip("bitsandbytes.functional")
from prismatic.models.quantize import quantize_base  # noqa: E402


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_every_base_linear_but_projector_and_head_is_quantized(kind):
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny")).eval()
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    count = quantize_base(model, kind, torch.float32)
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {n for n in originals if n.endswith("lm_head") or n.startswith("projector")}
    assert count == len(originals) - len(kept) > 0
    for name, linear in originals.items():
        if name in kept:
            continue
        layer = model.get_submodule(name)
        x = torch.randn(3, linear.in_features)
        want, got = linear(x), layer(x).float()
        if kind == "8bit":  # int8 absmax rounding: ~1 % of the output's scale, never exact
            assert 0 < (got - want).norm() <= 0.02 * want.norm(), name
        else:  # the layer computes with the NF4 weight it holds, and the original bias
            w = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            torch.testing.assert_close(got, F.linear(x, w, linear.bias), rtol=1e-3, atol=1e-4)
            assert not torch.equal(w, linear.weight.float())


def _quantized_lora_run(demo, tmp_path, kind: str, run_id: str, **flags) -> list:
    common = {**LORA, "vla.base_quantization": kind, "vla.per_device_batch_size": 4, "save_interval": 2}
    res = run_script(user_flags(demo, tmp_path, **{**common, **flags, "run_id": run_id}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / run_id / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["skipped"] for r in rows) and all(r["grad_norm"] > 0 for r in rows)
    return rows


def test_lora_craft_over_an_8bit_base_trains(demo, tmp_path):
    rows = _quantized_lora_run(demo, tmp_path, "8bit", "ref", **{"vla.max_steps": 2})
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "ref" / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()


def test_lora_craft_over_a_4bit_base_resumes_exactly(demo, tmp_path):
    """The base is re-quantized from the pretrained weights on resume: the same NF4 base, the same steps."""
    ref = _quantized_lora_run(demo, tmp_path, "4bit", "ref", **{"vla.max_steps": 4})
    run_cut_at(tmp_path / "ref", 2, tmp_path / "cut")
    cut = _quantized_lora_run(demo, tmp_path, "4bit", "cut", **{"vla.max_steps": 4, "resume_from": "latest"})
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and superseded_steps(tmp_path / "cut") == [3, 4]
    for a, b in zip(ref, cut):
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "projection", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
