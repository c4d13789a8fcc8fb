"""The retention signals and the baselines beside CRaFT, each against an independent expectation: the KL of the
action mode and nmse against float64 NumPy, zero drift of the pretrained model on its own cache in every mode,
L2-SP's gradient against autograd of its penalty, replay's loss against the loss over the joint frames."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from craft.action_retention import ActionSignal
from craft.anchor_cache import AnchorCache
from craft.retention import cache_signal, retention_loss, retention_loss_per_anchor
from craft.step import baseline_step
from prismatic.models import ImageProcessor, load_pretrained, save_pretrained
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator, training_example
from prismatic.training.anchor_builder import AnchorCacheConfig, build_anchor_cache
from prismatic.training.batches import AnchorInputs, stack_rows
from prismatic.training.l2_sp import L2SP
from prismatic.training.preflight import PreflightError, preflight
from test_preflight import _cfg


def _softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class _LogitsModel:
    """Returns fixed logits at the labelled positions, as OpenVLA's forward does with labels."""

    def __init__(self, logits: np.ndarray, vocab: int, bins: int):
        self.logits, self.config = logits, SimpleNamespace(base_vocab_size=vocab, n_action_bins=bins)

    def __call__(self, *inputs, labels):
        return SimpleNamespace(action_logits=torch.from_numpy(self.logits))


def test_action_kl_matches_a_float64_hand_computation():
    rng = np.random.default_rng(0)
    b, positions, bins, vocab = 3, 7, 8, 40
    logits = rng.normal(size=(b * positions, vocab + 8)).astype(np.float32)
    target = np.log(_softmax64(rng.normal(size=(b, positions, bins)) * 2))
    model = _LogitsModel(logits, vocab, bins)
    batch = {"pixel_values": None, "input_ids": None, "attention_mask": None,
             "labels": torch.zeros(b, 20, dtype=torch.long), "target_logprobs": torch.from_numpy(target).float()}

    q = _softmax64(logits[:, vocab - bins : vocab]).reshape(b, positions, bins)  # the bins alone, renormalised
    p = np.exp(target.astype(np.float32).astype(np.float64))
    expected = (p * (np.log(p) - np.log(q))).sum(axis=-1).mean(axis=-1)
    got = ActionSignal().per_anchor(model, batch)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5)
    assert ActionSignal()(model, batch).item() == pytest.approx(expected.mean(), rel=2e-5)
    logits[:, :vocab - bins] += 5.0  # tokens outside the action bins do not count
    np.testing.assert_allclose(ActionSignal().per_anchor(model, batch).numpy(), expected, rtol=2e-5)


@pytest.mark.parametrize("layers", [1, 3])
def test_nmse_mse_and_cosine_per_layer_match_numpy(layers):
    rng = np.random.default_rng(1)
    d = 5
    targets = rng.normal(size=(4, layers * d)) * np.repeat(rng.uniform(0.1, 50, size=layers), d)
    features = targets + rng.normal(size=targets.shape)
    f, t = features.reshape(4, layers, d), targets.reshape(4, layers, d)
    expected = {
        "mse": ((f - t) ** 2).mean(-1).mean(-1),
        "nmse": (((f - t) ** 2).mean(-1) / (t ** 2).mean(-1)).mean(-1),
        "cosine": (1 - (f * t).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(t, axis=-1)).mean(-1),
    }
    for loss_type, want in expected.items():
        got = retention_loss_per_anchor(torch.from_numpy(features), torch.from_numpy(targets), loss_type, layers)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)  # float32, as in training
        assert retention_loss(torch.from_numpy(features), torch.from_numpy(targets), loss_type, layers).item() == \
            pytest.approx(want.mean(), rel=1e-5, abs=1e-6)
    # nmse is scale-free: the same relative drift of features ten times larger is the same loss
    scaled = retention_loss(torch.from_numpy(features * 10), torch.from_numpy(targets * 10), "nmse", layers)
    assert scaled.item() == pytest.approx(expected["nmse"].mean(), rel=1e-5)


@pytest.fixture(scope="module")
def caches(demo, tmp_path_factory):
    """The demo model's caches for the other signals, built as users build them."""
    root = tmp_path_factory.mktemp("signal_caches")
    out = {"hidden": demo / "anchor_cache"}
    for name, flags in (("action", dict(retention_mode="action")),
                        ("layers", dict(hidden_layers=(-1, -2), pooling="last_token"))):
        cfg = AnchorCacheConfig(pretrained_checkpoint=demo / "model", data_root_dir=demo / "rlds", data_mix="libero_90",
                                output_dir=root / name, num_anchors=12, num_heldout_anchors=0, dtype="float32",
                                device="cpu", shuffle_buffer_size=200, **flags)
        cfg.validate()
        out[name] = build_anchor_cache(cfg)
    return out


@pytest.mark.parametrize("cache_name,loss_type", [("hidden", "mse"), ("hidden", "nmse"), ("hidden", "cosine"),
                                                  ("layers", "nmse"), ("action", None)])
def test_the_pretrained_model_has_zero_retention_loss_on_its_own_cache(demo, caches, cache_name, loss_type):
    model, tokenizer, config = load_pretrained(demo / "model")
    cache = AnchorCache.open(caches[cache_name])
    signal = cache_signal(cache.meta, loss_type)
    inputs = AnchorInputs(ImageProcessor(config), ActionTokenizer(config.n_action_bins), tokenizer.eos_token_id,
                          config.pad_token_id)
    rows = cache.batch(np.arange(cache.num_anchors)[::-1].copy())  # another batch composition than the builder's
    with torch.no_grad():
        drift = signal.per_anchor(model, inputs.for_signal(rows, signal))
    assert drift.shape == (cache.num_anchors,)
    assert drift.abs().max().item() < 1e-6
    with torch.no_grad():  # and the loss does see a change of the weights
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        assert signal(model, inputs.for_signal(rows, signal)).item() > 1e-4


def test_action_cache_holds_distributions_over_the_bins_of_the_training_sequence(demo, caches):
    cache = AnchorCache.open(caches["action"])
    assert cache.meta["retention_mode"] == "action" and "target_features" not in cache.arrays
    logprobs = np.asarray(cache.arrays["target_logprobs"], dtype=np.float64)
    assert logprobs.shape == (12, 7, 256)
    np.testing.assert_allclose(np.exp(logprobs).sum(-1), 1.0, atol=1e-5)
    _, tokenizer, config = load_pretrained(demo / "model")
    action_tokenizer = ActionTokenizer(config.n_action_bins)
    inputs = AnchorInputs(ImageProcessor(config), action_tokenizer, tokenizer.eos_token_id, config.pad_token_id)
    rows = cache.batch(np.arange(3))
    batch = inputs.for_signal(rows, ActionSignal())
    instructions = json.loads((caches["action"] / "instructions.json").read_text())
    for i in range(3):  # OpenVLA's training sequence of the anchor, labelled on the 7 action tokens only
        ids, labels = training_example(tokenizer, action_tokenizer, instructions[i], rows["actions"][i])
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == labels[:-1] + [-100]
        assert not batch["attention_mask"][i, n:].any()


def test_a_cache_built_for_one_mode_is_refused_for_another(demo, caches, tmp_path):
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": caches["action"]}))
    assert "--craft.retention_mode is 'hidden' but the anchor cache" in str(err.value)
    assert "built for 'action'" in str(err.value)
    with pytest.raises(PreflightError, match="--craft.hidden_layers is \\[-1, -2\\] but the anchor cache"):
        preflight(_cfg(demo, tmp_path, **{"craft.hidden_layers": (-1, -2)}))
    with pytest.raises(PreflightError, match="--craft.retention_loss_type must be one of \\['kl'\\]"):
        preflight(_cfg(demo, tmp_path, **{"craft.retention_mode": "action", "craft.retention_loss_type": "mse"}))
    with pytest.raises(PreflightError, match="--vla.replay_batch_size 2 replays anchor frames from "
                                             "--craft.anchor_cache_dir, which is not set"):
        preflight(_cfg(demo, tmp_path, **{"craft.enabled": False, "craft.anchor_cache_dir": None,
                                          "vla.replay_batch_size": 2}))
    with pytest.raises(PreflightError, match="--vla.l2_sp_weight pulls the weights toward those of "
                                             "--pretrained_checkpoint, which is not set"):
        preflight(_cfg(demo, tmp_path, **{"vla.l2_sp_weight": 0.1, "pretrained_checkpoint": None}))
    plan = preflight(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": caches["action"],
                                             "craft.retention_mode": "action", "vla.replay_batch_size": 2}))
    assert plan.cache.mode == "action"
    plain = preflight(_cfg(demo, tmp_path, **{"craft.enabled": False, "craft.anchor_cache_dir": caches["layers"]}))
    assert plain.cache.meta["hidden_layers"] == [-1, -2]  # plain fine-tuning measures drift with the cache's signal


class _Capture:
    """An optimizer whose step records the gradient it was given."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


def _frames_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 31000, (n, 12), generator=g)
    ids[:, 0] = 1
    ids[:, -8:] = torch.randint(31744, 32000, (n, 8), generator=g)
    labels = ids.clone()
    labels[:, :-8] = -100
    return {"pixel_values": torch.randn(n, 6, 224, 224, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}


def test_l2_sp_gradient_is_the_penalty_gradient_toward_the_pretrained_weights(demo, tmp_path):
    model, tokenizer, _ = load_pretrained(demo / "model")
    model.vision_backbone.requires_grad_(False)  # a train stage: only trainable weights are pulled
    save_pretrained(model, tmp_path / "pretrained", tokenizer=tokenizer)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():  # as after some fine-tuning
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    weight, batch = 0.3, _frames_batch(2, 0)

    expected = torch.autograd.grad(
        model(**batch).loss + weight / 2 * sum(((p - pretrained[n]) ** 2).sum()
                                               for n, p in model.named_parameters() if p.requires_grad), params)
    l2_sp = L2SP.from_checkpoint(model, tmp_path / "pretrained", weight)
    optimizer = _Capture(params)
    baseline_step(params, optimizer, [lambda: model(**batch).loss], max_grad_norm=1e12, regularize=l2_sp)
    for got, want in zip(optimizer.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(l2_sp.reference) == len(params) < len(list(model.parameters()))


def test_replay_loss_is_the_action_loss_over_the_joint_frames(demo):
    model, tokenizer, config = load_pretrained(demo / "model")
    cache = AnchorCache.open(demo / "anchor_cache")
    action_tokenizer, processor = ActionTokenizer(config.n_action_bins), ImageProcessor(config)
    inputs = AnchorInputs(processor, action_tokenizer, tokenizer.eos_token_id, config.pad_token_id)
    instructions = json.loads((demo / "anchor_cache" / "instructions.json").read_text())
    frames, replayed = np.array([5, 0, 9, 3]), np.array([7, 1, 12])
    examples = [training_example(tokenizer, action_tokenizer, instructions[i], cache.arrays["actions"][i])
                for i in np.concatenate([frames, replayed])]
    collate = PaddedCollator(config.pad_token_id)
    rows, replay_rows = cache.batch(frames), cache.batch(replayed)
    action = {**collate([e[0] for e in examples[:4]], [e[1] for e in examples[:4]]),
              "pixel_values": processor(rows["images"])}
    joint = stack_rows(action, inputs.replay(replay_rows), config.pad_token_id)
    expected = {**collate([e[0] for e in examples], [e[1] for e in examples]),
                "pixel_values": processor(np.concatenate([rows["images"], replay_rows["images"]]))}
    with torch.no_grad():
        got, want = model(**joint).loss, model(**expected).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with torch.no_grad():  # not the action frames' loss alone
        assert model(**action).loss.item() != pytest.approx(want.item(), rel=1e-4)


def test_old_hidden_caches_keep_working(demo, tmp_path):
    """A cache from before retention modes (no retention_mode, hidden_layers or actions) opens as a hidden one."""
    old = tmp_path / "old_cache"
    shutil.copytree(demo / "anchor_cache", old, ignore=shutil.ignore_patterns("heldout"))
    meta = json.loads((old / "meta.json").read_text())
    for key in ("retention_mode", "hidden_layers", "heldout"):
        meta.pop(key, None)
    meta["shapes"].pop("actions")
    (old / "actions.npy").unlink()
    (old / "meta.json").write_text(json.dumps(meta))
    cache = AnchorCache.open(old)
    assert cache.mode == "hidden" and "actions" not in cache.arrays
    assert cache_signal(cache.meta).layers == (-2,)
    preflight(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": old}))
    with pytest.raises(PreflightError, match="reads the anchors' recorded actions, which the anchor cache .* does not"):
        preflight(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": old, "vla.replay_batch_size": 2}))
