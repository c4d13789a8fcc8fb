"""Model FLOPs and MFU of the step benchmark: torch's counter against counts derived by hand."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import anchor_pass_flops  # noqa: E402
import bench_step  # noqa: E402
import flops  # noqa: E402
from prismatic.models import OpenVLA  # noqa: E402
from prismatic.models.batching import IGNORE_INDEX  # noqa: E402
from prismatic.models.config import PATCH_SIZE, preset_config  # noqa: E402
from prismatic.models.vision import TINY_VITS  # noqa: E402

B, A = 3, 2
CPU = torch.device("cpu")


@pytest.mark.parametrize("input_grad, factor", [(True, 6), (False, 4)])
def test_linear_forward_backward_is_6_or_4_n_in_out(input_grad, factor):
    n, d_in, d_out = 5, 7, 3
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(n, d_in, requires_grad=input_grad)
    assert flops.counted_flops(lambda: layer(x).sum().backward()) == factor * n * d_in * d_out


def test_attention_backward_is_twice_its_forward():
    b, h, s, d = 2, 3, 11, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    forward = 2 * (2 * b * h * s * s * d)  # q k^T, then scores v
    assert flops.counted_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 3 * forward


def _objective(step_impl="two_pass", grad_checkpointing=False):
    args = bench_step.parse_args(["--preset", "tiny", "--step_impl", step_impl,
                                  "--grad_checkpointing", str(grad_checkpointing).lower()])
    return bench_step.prepare_model(args, bench_step.dist_env_from_environ(), CPU, torch.float32, 16, False)


@pytest.fixture(scope="module")
def tiny():
    objective = _objective()
    act, _, anchors = bench_step.synthetic_batches(preset_config("tiny"), B, A, seed=0)
    clear = bench_step.NoOpOptimizer(objective.params).zero_grad
    return objective, act, anchors, clear


def _analytic_tiny(text_len: int, supervised: int, llm_backward_layers: int) -> int:
    """One row's forward + backward FLOPs on the tiny preset, from its configuration: 2 per multiply-add
    forward, 4 more backward (input and weight gradients), only the weight gradient for the patch
    embedding (pixels need none); attention's q k^T and scores v likewise. The LLM's first
    `llm_backward_layers` layers get a backward, the others run forward only."""
    config = preset_config("tiny")
    llm = config.llama_config()
    d, f, layers, vocab = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size
    kv = llm.num_key_value_heads * (d // llm.num_attention_heads)
    patches = config.num_image_tokens
    s = text_len + patches

    layer_fwd = 2 * s * (d * d + 2 * d * kv + d * d + 3 * d * f) + 2 * 2 * s * s * d
    total = 3 * layer_fwd * llm_backward_layers + layer_fwd * (layers - llm_backward_layers)
    total += 3 * 2 * supervised * d * vocab  # lm_head on the supervised positions only

    vision_dim = 0
    for name in config.timm_model_ids:
        vit = TINY_VITS[name]
        e, depth = vit["embed_dim"], vit["depth"]
        n = patches + vit.get("reg_tokens", 0) + int(vit.get("class_token", True))
        block_fwd = 2 * n * (e * 3 * e + e * e + 2 * e * 4 * e) + 2 * 2 * n * n * e  # mlp_ratio 4
        total += 3 * block_fwd * (depth - 1)  # up to the second-to-last block
        total += 2 * 2 * patches * e * 3 * PATCH_SIZE * PATCH_SIZE  # patch embedding: forward, weight gradient
        vision_dim += e
    total += 3 * 2 * patches * (vision_dim * 4 * vision_dim + 4 * vision_dim * d + d * d)  # projector
    return total


def test_tiny_counts_match_the_analytic_count(tiny):
    objective, act, anchors, clear = tiny
    layers = preset_config("tiny").num_hidden_layers
    supervised = (act["labels"] != IGNORE_INDEX).sum(dim=1)
    assert supervised.tolist() == [8] * B  # 7 action tokens and EOS
    counted = flops.pass_flops(objective, objective.action, act, clear, False)
    assert counted == B * _analytic_tiny(act["input_ids"].shape[1], 8, layers)
    # Anchors: features after the second-to-last layer, so the last layer runs forward only; no lm_head; pooled
    # over image tokens, so the LLM sees BOS and the image only (one text position).
    counted = flops.pass_flops(objective, objective.retention, anchors, clear, False)
    assert anchors["input_ids"].shape[1] > 1 and objective.craft.pooling == "mean_image_tokens"
    assert counted == A * _analytic_tiny(1, 0, layers - 1)
    assert all(p.grad is None for p in objective.params)


def test_one_row_times_rows_is_the_whole_batch(tiny):
    objective, act, anchors, clear = tiny
    for loss_fn, batch in ((objective.action, act), (objective.retention, anchors)):
        whole = flops.counted_flops(lambda: loss_fn(batch)().backward())
        clear()
        assert flops.pass_flops(objective, loss_fn, batch, clear, False) == whole


def test_rows_with_other_supervised_counts_are_counted_apart(tiny):
    objective, act, _, clear = tiny
    uneven = dict(act, labels=act["labels"].clone())
    uneven["labels"][0, (uneven["labels"][0] != IGNORE_INDEX).nonzero()[0]] = IGNORE_INDEX
    assert sorted(len(rows) for rows in flops.rows_alike(uneven).values()) == [1, B - 1]
    whole = flops.counted_flops(lambda: objective.action(uneven)().backward())
    clear()
    assert flops.pass_flops(objective, objective.action, uneven, clear, False) == whole


@pytest.mark.parametrize("step_impl", ["two_pass", "one_pass"])
def test_recomputation_is_not_counted(tiny, step_impl):
    plain, act, _, _ = tiny
    objective = _objective(step_impl, grad_checkpointing=True)
    clear = bench_step.NoOpOptimizer(objective.params).zero_grad
    row = flops.row_slice(act, 0)
    with_recompute = flops.counted_flops(lambda: objective.action(row)().backward())
    clear()
    expected = flops.pass_flops(plain, plain.action, row, clear, False)
    assert with_recompute > expected
    assert flops.pass_flops(objective, objective.action, row, clear, True) == expected
    # The checkpointing is back as it was: the same recomputation is counted again.
    assert flops.counted_flops(lambda: objective.action(row)().backward()) == with_recompute
    clear()


def test_peak_table_and_override():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H200") == 989.4e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("NVIDIA H100 NVL") is None
    assert flops.peak_flops("NVIDIA H200 NVL") is None
    assert flops.peak_flops(bench_step.device_name(CPU)) is None
    assert flops.peak_flops("NVIDIA H200", 100.0) == 100e12


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_peak_tflops_must_be_positive(bad, capsys):
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--peak_tflops", bad])
    assert "--peak_tflops" in capsys.readouterr().err


def test_bench_step_records_mfu_only_with_a_peak():
    common = ["--preset", "tiny", "--batch", "2", "--anchor_batch", "1", "--repeats", "1", "--warmup", "0"]
    r = bench_step.run(bench_step.parse_args(common))
    assert r["peak_flops"] is None and r["mfu_base"] is None and r["mfu_craft"] is None
    assert "MFU" not in bench_step.summary(r)
    assert r["flops_base"] > 0 and r["flops_anchor"] > 0
    assert r["flops_craft"] == r["flops_base"] + r["flops_anchor"]

    r = bench_step.run(bench_step.parse_args([*common, "--peak_tflops", "0.5"]))
    assert r["peak_flops"] == 0.5e12
    assert r["mfu_base"] == pytest.approx(r["flops_base"] / r["t_base_s"] / 0.5e12)
    assert r["mfu_craft"] == pytest.approx(r["flops_craft"] / r["t_craft_s"] / 0.5e12)
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("mfu_base", "mfu_craft"))
    assert "MFU base" in bench_step.summary(r)


def test_meta_anchor_count_equals_the_real_pass_and_the_hand_count(tiny):
    """benchmarks/anchor_pass_flops.py counts on the meta device: its BOS-and-image count is what the real anchor
    pass runs per anchor, and its whole-prompt count is the hand count of a prompt of that length."""
    objective, _, anchors, clear = tiny
    layers = preset_config("tiny").num_hidden_layers
    with torch.device("meta"):
        meta_model = OpenVLA.from_config(preset_config("tiny")).train()
    prefix = anchor_pass_flops.anchor_flops(meta_model, 1, -2)
    assert A * prefix == flops.pass_flops(objective, objective.retention, anchors, clear, False)
    text_len = anchors["input_ids"].shape[1]
    assert anchor_pass_flops.anchor_flops(meta_model, text_len, -2) == _analytic_tiny(text_len, 0, layers - 1)
