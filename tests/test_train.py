"""Training engine: schedule, parameter groups, exact resume, bad input, logging/hooks, DDP/FSDP2.

Everything runs the `tiny` preset shrunk further (2 + 2 layers, 32 px, widths 32) on CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # lerobot_fixtures

from dit4dit.config import ConfigError, get_preset, override  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import init_from, train_state  # noqa: E402
from dit4dit.train.logging import read_metrics  # noqa: E402
from dit4dit.train.optim import EMA, WarmupCosine, build_optimizer, clip_gradients, lr_at, param_groups  # noqa: E402
from dit4dit.bench.train import bench_train  # noqa: E402
from dit4dit.bench.synthetic import SyntheticSamples  # noqa: E402
from dit4dit.data.samples import collate as default_collate  # noqa: E402
from dit4dit.train.step import freeze_frozen_parts  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402

SMALL = [
    "action.num_layers=2", "video.num_layers=2", "feature_blocks=1", "inputs.image_size=[32,32]",
    "video.num_attention_heads=2", "video.attention_head_dim=16", "video.adaln_lora_dim=16",
    "video.text_embed_dim=32", "video.crossattn_proj_in_channels=32", "video.encoder_hidden_states_channels=32",
    "text.width=32", "action.cross_attention_dim=32", "action.num_attention_heads=2",
    "action.attention_head_dim=16", "action.mlp_hidden=64",
    "train.batch_size=2", "train.steps=4", "train.warmup_steps=1", "train.num_workers=0",
    "train.log_every=1", "train.save_every=100", "train.tensorboard=false",
]


def tiny_cfg(*extra: str):
    return get_preset("tiny", SMALL + list(extra))


def build_model(cfg):
    from dit4dit.models.dit4dit import DiT4DiT

    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    freeze_frozen_parts(model)
    return model


# ------------------------------------------------------------------------------------------
# learning-rate schedule and parameter groups
# ------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_peak_cosine_min():
    peak, warm, total, floor = 1e-3, 10, 110, 1e-5
    assert lr_at(1, peak, warm, total, floor) == pytest.approx(peak / warm)
    assert lr_at(5, peak, warm, total, floor) == pytest.approx(peak * 5 / warm)
    assert lr_at(warm, peak, warm, total, floor) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, warm, total, floor) == pytest.approx(floor + (peak - floor) * 0.5)
    assert lr_at(total, peak, warm, total, floor) == pytest.approx(floor)
    assert lr_at(total + 50, peak, warm, total, floor) == pytest.approx(floor)  # stays at min_lr
    seq = [lr_at(k, peak, warm, total, floor) for k in range(1, total + 1)]
    assert all(a <= b for a, b in zip(seq[:warm], seq[1:warm]))  # rising warm-up
    assert all(a >= b for a, b in zip(seq[warm - 1:], seq[warm:]))  # monotone cosine decay
    assert lr_at(3, 0.0, warm, total, floor) == 0.0  # a zero-lr group stays frozen
    assert lr_at(1, peak, 0, total, floor) == pytest.approx(peak, rel=1e-3)  # no warm-up: cosine from the start


def test_scheduler_sets_each_group_from_its_own_peak():
    cfg = tiny_cfg("train.lr_video=1e-4", "train.lr_action=1e-3", "train.lr_other=5e-4",
                   "train.warmup_steps=2", "train.steps=10", "train.min_lr=1e-6")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    sched = WarmupCosine.from_config(opt, cfg.train)
    lrs = sched.set_step(2)
    assert lrs["video_dit"] == pytest.approx(1e-4) and lrs["action_dit"] == pytest.approx(1e-3)
    assert lrs["other"] == pytest.approx(5e-4) and lrs["video_dit.no_decay"] == pytest.approx(1e-4)
    lrs = sched.set_step(10)
    assert all(v == pytest.approx(1e-6) for v in lrs.values())
    state = json.loads(json.dumps(sched.state_dict()))
    sched2 = WarmupCosine.from_config(opt, cfg.train)
    sched2.load_state_dict(state)
    assert sched2.last_step == 10


def test_param_groups_contents_and_frozen_parts_absent():
    cfg = tiny_cfg("train.weight_decay=0.1")
    model = build_model(cfg)
    # A frozen part: a weight inside the codec and a frozen text encoder.
    model.codec.frozen_probe = nn.Linear(3, 3)
    model.text_encoder.trainable = False
    freeze_frozen_parts(model)
    groups = {g.name: g for g in param_groups(model, cfg.train)}
    assert set(groups) == {"video_dit", "video_dit.no_decay", "action_dit", "action_dit.no_decay"}
    names = [n for g in groups.values() for n in g.names]
    assert len(names) == len(set(names))
    assert not any(n.startswith(("codec", "text_encoder")) for n in names)
    expected = {f"{part}.{n}" for part, m in model.trainable_modules().items() for n, p in m.named_parameters()}
    assert set(names) == expected
    assert all(not p.requires_grad for p in model.codec.parameters())
    assert all(not p.requires_grad for p in model.text_encoder.parameters())
    # weight decay: linear weights decay; biases, norms, learned positions/tokens do not
    nd = set(groups["action_dit.no_decay"].names) | set(groups["video_dit.no_decay"].names)
    params = dict(model.named_parameters())
    assert all(params[n].ndim < 2 for n in nd if not n.endswith(("pos_embed", "future_tokens")))
    assert all(params[n].ndim >= 2 for n in groups["action_dit"].names + groups["video_dit"].names)
    assert "action_dit.action_pos_embed" in nd and "action_dit.future_tokens" in nd
    assert "action_dit.blocks.0.attn.to_q.weight" in groups["action_dit"].names
    assert "action_dit.blocks.0.attn.to_q.bias" in nd
    assert groups["action_dit"].weight_decay == 0.1 and groups["action_dit.no_decay"].weight_decay == 0.0
    assert groups["video_dit"].lr == cfg.train.lr_video
    opt = build_optimizer(model, cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.codec.parameters())
    assert not any(id(p) in in_opt for p in model.text_encoder.parameters())


def test_fused_adamw_on_cpu_takes_the_per_tensor_step():
    """train.fused_adam selects the fused AdamW on CPU too; its update matches the per-tensor one."""
    steps = {}
    for fused in (True, False):
        torch.manual_seed(0)
        cfg = tiny_cfg(f"train.fused_adam={str(fused).lower()}", "train.weight_decay=0.1")
        model = build_model(cfg)
        opt = build_optimizer(model, cfg.train, "cpu")
        assert all(bool(g.get("fused")) is fused for g in opt.param_groups)
        for k in range(3):
            for i, p in enumerate(model.parameters()):
                if p.requires_grad:
                    p.grad = torch.full_like(p, 0.01 * (i % 7 - 3) + 0.001 * k)
            opt.step()
        steps[fused] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    moved = max((a - b).abs().max().item() for a, b in zip(steps[True], steps[False]))
    assert moved < 1e-6, moved
    torch.manual_seed(0)
    start = [p for p in build_model(tiny_cfg()).parameters() if p.requires_grad]
    assert max((a - b).abs().max().item() for a, b in zip(steps[True], start)) > 1e-4  # it did step


def test_trainable_text_encoder_is_in_the_other_group():
    cfg = tiny_cfg("train.lr_other=3e-4")
    groups = {g.name: g for g in param_groups(build_model(cfg), cfg.train)}
    assert groups["other"].lr == pytest.approx(3e-4)
    assert all(n.startswith("text_encoder.") for n in groups["other"].names + groups["other.no_decay"].names)


def test_clip_gradients_reports_and_clips_the_global_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)  # global norm sqrt(27 + 64)
    norm = clip_gradients([a, b], 1.0)
    assert norm == pytest.approx(math.sqrt(91.0))
    clipped = torch.cat([a.grad, b.grad]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-4)
    a.grad = torch.full((3,), 0.1)
    b.grad = None
    assert clip_gradients([a, b], 0.0) == pytest.approx(math.sqrt(0.03))  # 0 = report only
    assert torch.allclose(a.grad, torch.full((3,), 0.1))


def test_ema_update_and_swap():
    p = nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], 0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    assert torch.allclose(ema.shadows[0], torch.full((3,), 0.1))
    with ema.swapped_in():
        assert torch.allclose(p, torch.full((3,), 0.1))
    assert torch.allclose(p, torch.ones(3))


# ------------------------------------------------------------------------------------------
# time budget
# ------------------------------------------------------------------------------------------


def test_time_budget_plans_the_steps_that_fit(monkeypatch):
    from dit4dit.train import hooks as tr

    now = [100.0]
    monkeypatch.setattr(tr.time, "perf_counter", lambda: now[0])
    b = tr.TimeBudget(1.0, start_step=0, target=1000)  # 60 s
    now[0] += 0.5
    assert b.plan(tr.TimeBudget.MIN_STEPS - 1) is None  # too few steps to know the pace
    now[0] = 130.0  # 20 steps took 30 s: 1.5 s a step, 30 s left -> 20 more steps
    assert b.plan(20) == 40
    now[0] = 150.0  # the pace improved: 40 steps in 50 s, 10 s left -> 8 more
    assert b.plan(40) == 48
    now[0] = 170.0  # over budget: stop at the current step
    assert b.plan(49) == 49
    fast = tr.TimeBudget(1.0, start_step=500, target=1000)  # resumed at step 500
    now[0] += 2.0
    assert fast.plan(600) == 1000  # 100 steps in 2 s: the configured target fits
    assert tr.TimeBudget(None, 0, 10).plan(50) is None and tr.TimeBudget(None, 0, 10).summary() is None
    # the pace is the recent one: 50 steps at 1 s, then 50 at 0.1 s, in a 100-s budget
    now[0] = 0.0
    b = tr.TimeBudget(100 / 60, start_step=0, target=10_000)
    for step in range(1, 101):
        now[0] += 1.0 if step <= 50 else 0.1
        planned = b.plan(step)
    # 45 s left at the pace of the last 10 s (0.18 s a step) -> 250 more steps; the mean pace since
    # the start (0.55 s a step) would give 81
    assert planned == 100 + int(45 / ((55 - 45) / (100 - 45)))


def test_time_budget_ends_the_schedule_and_the_run(tmp_path):
    cfg = tiny_cfg("train.steps=100000", "train.time_budget_minutes=0.04", "train.min_lr=1e-6",
                   "train.warmup_steps=2")
    data = SyntheticSamples(cfg, num_samples=16)
    s = train(cfg, data, tmp_path / "run", progress=False)
    planned = s["time_budget"]["planned_steps"]
    assert s["time_budget"]["seconds"] == pytest.approx(2.4)
    assert s["step"] == planned and 20 <= planned < 100000 and not s["interrupted"]
    assert ckpt.latest_checkpoint(tmp_path / "run").name == f"step_{planned:06d}"
    rows = [r for r in read_metrics(tmp_path / "run") if "lr/action_dit" in r]
    peak = cfg.train.lr_action
    assert rows[-1]["step"] == planned and rows[-1]["lr/action_dit"] < 0.05 * peak  # the decay has ended
    assert max(r["lr/action_dit"] for r in rows) == pytest.approx(peak)
    with pytest.raises(ConfigError, match="time_budget_minutes"):
        tiny_cfg("train.time_budget_minutes=0")


# ------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, workers):
    # dropout on, gradient accumulation, EMA, and more micro-batches than one epoch holds
    cfg = tiny_cfg("action.dropout=0.1", "train.grad_accum=2", "train.steps=6", "train.warmup_steps=2",
                   f"train.num_workers={workers}", "train.ema_decay=0.9")
    data = SyntheticSamples(cfg, num_samples=10)  # 5 micro-batches an epoch, 12 used
    full = train(cfg, data, tmp_path / "full", progress=False)
    part1 = train(cfg, data, tmp_path / "split", progress=False, stop_at_step=3)
    assert part1["step"] == 3 and ckpt.latest_checkpoint(tmp_path / "split").name == "step_000003"
    part2 = train(cfg, data, tmp_path / "split", progress=False, resume=True)
    assert part2["start_step"] == 3 and part2["step"] == 6
    assert len(full["losses"]) == 6
    assert part1["losses"] + part2["losses"] == full["losses"]  # exact equality, not approx
    a = ckpt.load_checkpoint(tmp_path / "full")
    b = ckpt.load_checkpoint(tmp_path / "split")
    for get in (lambda c: c.model_state(), lambda c: c.ema_state(), lambda c: c.optimizer_state()[0]):
        sa, sb = get(a), get(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_may_extend_steps_but_not_change_the_model(tmp_path):
    cfg = tiny_cfg("train.steps=2")
    data = SyntheticSamples(cfg, num_samples=8)
    train(cfg, data, tmp_path / "run", progress=False)
    # another config: a clear error before any training step
    other = tiny_cfg("train.steps=4", "train.lr_action=5e-4", "lambda_video=0.5")
    with pytest.raises(ConfigError) as e:
        train(other, data, tmp_path / "run", progress=False, resume=True)
    assert "train.lr_action" in str(e.value) and "lambda_video" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000002"
    # more steps (and another logging cadence) are fine
    more = tiny_cfg("train.steps=4", "train.log_every=2")
    s = train(more, data, tmp_path / "run", progress=False, resume=True)
    assert (s["start_step"], s["step"]) == (2, 4)
    # without --resume an existing run is not overwritten
    with pytest.raises(FileExistsError):
        train(more, data, tmp_path / "run", progress=False)
    # nothing to resume
    with pytest.raises(ckpt.CheckpointError):
        train(cfg, data, tmp_path / "empty", progress=False, resume=True)


def test_pca_codec_is_fitted_on_the_training_frames_and_travels_with_the_checkpoint(tmp_path):
    from dit4dit.models.codecs import PCACodec
    from dit4dit.models.dit4dit import DiT4DiT
    from dit4dit.train.codec_fit import fit_codec

    cfg = tiny_cfg("train.steps=2")
    data = SyntheticSamples(cfg, num_samples=8)
    s = train(cfg, data, tmp_path / "run", progress=False)
    fit = s["codec_fit"]
    assert fit["kind"] == "pca" and fit["channels"] == cfg.codec.pca_channels and 0 < fit["explained_variance"] <= 1
    # the basis is the one fitted on these frames (all 8 samples, deterministic), not a random one
    ref = PCACodec(cfg.codec.pixel_factor, cfg.codec.pca_channels)
    ref.fit(torch.stack([data[i]["video"] for i in range(8)]).float())
    model, _, _ = ckpt.load_policy(tmp_path / "run")
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(model.codec.state_dict()[name], t, msg=name)
    # resuming keeps the saved basis (it is not refitted on other data)
    other = SyntheticSamples(cfg, num_samples=8, seed=5)
    train(tiny_cfg("train.steps=3"), other, tmp_path / "run", progress=False, resume=True)
    resumed, _, _ = ckpt.load_policy(tmp_path / "run")
    assert torch.equal(resumed.codec.components, model.codec.components)
    # a staged run (train.init_from) takes the basis its video DiT was trained with
    m = DiT4DiT.from_config(cfg)
    init_from.init_weights_from(m, tmp_path / "run")
    assert m.codec.fitted and fit_codec(m, other, seed=0) is None
    assert torch.equal(m.codec.components, model.codec.components)
    # a codec that is fitted on the data cannot have its latents cached ahead of training
    from dit4dit.models.backbone import BackboneError, codec_identity

    with pytest.raises(BackboneError, match="pca"):
        codec_identity(cfg)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_bad_config_and_bad_data_fail_before_training(tmp_path):
    good = tiny_cfg()
    data = SyntheticSamples(good, num_samples=8)
    with pytest.raises(ConfigError, match="grad_clip"):
        train(tiny_cfg("train.grad_clip=-1"), data, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError):
        tiny_cfg("train.batch_size=0")
    with pytest.raises(ConfigError, match="betas"):
        train(tiny_cfg("train.betas=[0.9,1.5]"), data, tmp_path / "b", progress=False)
    # samples shaped for another config (image size, horizon)
    other = tiny_cfg("inputs.image_size=[64,64]", "action.action_horizon=4")
    with pytest.raises(ValueError) as e:
        train(good, SyntheticSamples(other, num_samples=8), tmp_path / "c", progress=False)
    assert "video" in str(e.value) and "actions" in str(e.value)
    with pytest.raises(ValueError, match="global batch"):
        train(good, SyntheticSamples(good, num_samples=1), tmp_path / "d", progress=False)
    for d in "abcd":
        assert not (tmp_path / d / "checkpoints").exists()


def test_non_finite_loss_stops_without_saving(tmp_path):
    cfg = tiny_cfg()

    def nan_loss(model, batch, generator):
        loss, logs = model.loss(batch, generator)
        return loss * float("nan"), {**logs, "loss": float("nan")}

    with pytest.raises(FloatingPointError, match="step 1"):
        train(cfg, SyntheticSamples(cfg, num_samples=8), tmp_path / "run", progress=False, loss_fn=nan_loss)
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_sigterm_saves_and_stops(tmp_path):
    import signal

    cfg = tiny_cfg("train.steps=10")
    calls = []

    def loss_fn(model, batch, generator):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a preempted cluster job
        return model.loss(batch, generator)

    before = signal.getsignal(signal.SIGTERM)
    s = train(cfg, SyntheticSamples(cfg, num_samples=8), tmp_path / "run", progress=False, loss_fn=loss_fn)
    assert s["interrupted"] and s["step"] == 2
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


def test_dataset_folder_with_and_without_frame_cache(tmp_path):
    from lerobot_fixtures import make_v30_dataset

    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32))
    cfg = tiny_cfg("train.steps=2")
    decoded = train(cfg, root, tmp_path / "decoded", progress=False)
    cached = train(cfg, root, tmp_path / "cached", progress=False, frame_cache=True)
    assert cached["losses"] == decoded["losses"]
    assert (tmp_path / "cached" / "processor.json").is_file()


def test_dataset_that_does_not_fit_the_schema(tmp_path):
    from lerobot_fixtures import make_v30_dataset

    from dit4dit.data.schema import SchemaError

    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32), state_dim=2)
    with pytest.raises(SchemaError) as e:
        train(tiny_cfg(), root, tmp_path / "run", progress=False)
    assert "metaworld_sawyer" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------
# logging and hooks
# ------------------------------------------------------------------------------------------


def test_logging_hooks_and_summary(tmp_path):
    cfg = tiny_cfg("train.steps=4", "train.log_every=2", "train.image_every=2", "train.eval_every=4",
                   "train.ema_decay=0.9", "num_video_steps=1")
    calls: dict[str, list] = {"image": [], "eval": []}

    def image_fn(model, batch, step):
        assert not model.training and not torch.is_grad_enabled()
        calls["image"].append(step)
        return {"strip": np.zeros((8, 16, 3), dtype=np.uint8)}

    def eval_fn(model, step):
        calls["eval"].append(step)
        return {"success_rate": 0.5}

    s = train(cfg, SyntheticSamples(cfg, num_samples=8), tmp_path / "run", progress=False, image_fn=image_fn,
              eval_fn=eval_fn)
    assert calls == {"image": [2, 4], "eval": [4]}
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "loss_action", "loss_video", "grad_norm", "lr/video_dit", "lr/action_dit", "lr/other",
                "samples_per_s", "step_time_s", "epoch"):
        assert key in rows[0] and math.isfinite(rows[0][key])
    assert rows[0]["grad_norm"] > 0
    ev = read_metrics(tmp_path / "run", "eval")
    assert [r["step"] for r in ev] == [4] and ev[0]["success_rate"] == 0.5
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == [
        "step_000002_strip.png", "step_000004_strip.png"]
    assert s["logging"] == ["jsonl"] and s["step"] == 4 and len(s["losses"]) == 4
    assert s["device"] == "cpu" and s["precision"] == "float32" and s["strategy"] == "single"
    assert (tmp_path / "run" / "train.log").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_default_image_strip(tmp_path):
    cfg = tiny_cfg("train.steps=1", "train.image_every=1", "num_video_steps=1")
    train(cfg, SyntheticSamples(cfg, num_samples=4), tmp_path / "run", progress=False)
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "run" / "images" / "step_000001_strip.png"))
    h, w = cfg.inputs.image_size
    assert img.shape == (2 * h, cfg.inputs.num_future_frames * w, 3)


def test_bench_train_reports_device_precision_flops_and_plain_step():
    r = bench_train(tiny_cfg(), "cpu", steps=2, batch=2, warmup=1, peak=1.0)
    assert r["device"].startswith("cpu") and r["precision"] == "float32" and r["batch_size"] == 2
    assert r["samples_per_s"] > 0 and r["step_time_s"] > 0
    assert r["ours"]["share_video_passes"] and r["ours"]["shared_action_kv"]
    assert not r["plain"]["share_video_passes"] and not r["plain"]["shared_action_kv"]
    assert r["speedup_vs_plain"] > 0
    assert r["model_flops_per_step"] > 0 and r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)


def test_bench_train_static_image_baseline():
    """The static-image baseline benches too (its encoder stands where the video DiT was)."""
    r = bench_train(tiny_cfg("encoder=static_image", "mode=action_only"), "cpu", steps=1, batch=2, warmup=0,
                    peak=1.0, plain=False)
    assert r["samples_per_s"] > 0 and r["model_flops_per_step"] > 0


def test_bench_train_video_only_reports_the_video_part_of_a_joint_step():
    r = bench_train(tiny_cfg("mode=video_only"), "cpu", steps=1, batch=2, warmup=0, peak=1.0)
    v = r["video_only_vs_joint"]
    assert "plain" not in r and v["timing"] == "interleaved"
    assert v["video_only_step_s"] > 0 and v["joint_step_s"] > 0 and v["action_only_step_s"] > 0
    assert v["video_part_of_joint_s"] == pytest.approx(v["joint_step_s"] - v["action_only_step_s"])


def test_step_flops_scale_with_the_batch_and_plain_loss_equals_ours():
    """Doubling the batch doubles the counted FLOPs; the plain step's per-draw K/V
    (`action.share_feature_kv=false`) gives the same loss as ours; FLOP counting leaves the
    model's activation checkpointing as it was."""
    from dit4dit.bench.train import count_step_flops
    from dit4dit.models.dit4dit import DiT4DiT

    cfg = tiny_cfg("repeated_diffusion_steps=3", "gradient_checkpointing=true")
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    samples = SyntheticSamples(cfg, num_samples=4)
    b2 = default_collate([samples[i] for i in range(2)])
    b4 = default_collate([samples[i] for i in range(4)])
    f2 = count_step_flops(model, b2, torch.Generator().manual_seed(0))
    f4 = count_step_flops(model, b4, torch.Generator().manual_seed(0))
    assert f2 > 0 and f4 == pytest.approx(2 * f2, rel=1e-6)
    assert model.video_dit.gradient_checkpointing
    plain = DiT4DiT.from_config(override(cfg, ["action.share_feature_kv=false"]), random_weights=True)
    plain.load_state_dict(model.state_dict())
    ours, _ = model.loss(b2, torch.Generator().manual_seed(5))
    theirs, _ = plain.loss(b2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 2 processes (gloo) == 1 process with the doubled batch
# ------------------------------------------------------------------------------------------

# The model's loss draws tau and noise from one generator per call, so two ranks cannot draw
# exactly what one process draws for the whole batch. The loss below gives every sample its own
# generator seeded by its dataset index (the trainer adds `sample_index` to every batch) and
# averages per-sample losses: the 2-rank gradient average then equals the 1-process gradient
# mathematically, and everything else (sharding, DDP/FSDP2 reduction, clipping, AdamW, EMA,
# checkpoint gathering) is the real code path.
_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from dit4dit.config import get_preset
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.train.trainer import train

    def per_sample_loss(model, batch, generator):
        idx = batch["sample_index"]
        total = 0.0
        for j in range(len(idx)):
            sub = {k: v[j:j + 1] for k, v in batch.items()}
            loss, _ = model.loss(sub, torch.Generator().manual_seed(1000 + int(idx[j])))
            total = total + loss
        total = total / len(idx)
        return total, {"loss": float(total.detach())}

    overrides, out, strategy = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    stop = int(sys.argv[4]) if len(sys.argv) > 4 else None
    cfg = get_preset("tiny", overrides + [f"train.distributed={strategy}"])
    data = SyntheticSamples(cfg, num_samples=16)
    s = train(cfg, data, out, progress=False, loss_fn=per_sample_loss, device="cpu", stop_at_step=stop)
    assert s["strategy"] == strategy, s["strategy"]
    if stop is not None:  # then resume to the end (FSDP2: gathered save, sharded load)
        s = train(cfg, data, out, progress=False, loss_fn=per_sample_loss, device="cpu", resume=True)
        assert s["start_step"] == stop
""")

DIST_OVERRIDES = SMALL + ["action.dropout=0.0", "train.steps=3", "train.batch_size=2", "train.ema_decay=0.9",
                          "train.grad_clip=0.5"]


def run_two_ranks(tmp_path, out, strategy, stop=None):
    """torchrun --nproc_per_node 2 (gloo) of _DIST_SCRIPT; returns nothing, asserts success."""
    script = tmp_path / "dist_train.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(DIST_OVERRIDES), str(out), strategy] + ([str(stop)] if stop is not None else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def single_process_reference(out):
    """The same training in this process with the doubled batch (batch 4, one rank)."""
    ns: dict = {}
    exec(compile(_DIST_SCRIPT.split("overrides, out")[0], "dist", "exec"), ns)  # defines per_sample_loss
    cfg = get_preset("tiny", DIST_OVERRIDES + ["train.batch_size=4"])
    summary = train(cfg, SyntheticSamples(cfg, num_samples=16), out, progress=False, loss_fn=ns["per_sample_loss"])
    return cfg, summary


def assert_same_training(ref_dir, got_dir, strategy, tol=1e-5):
    ref, got = ckpt.load_checkpoint(ref_dir), ckpt.load_checkpoint(got_dir)
    assert got.step == ref.step and got.state["world_size"] == 2 and got.state["strategy"] == strategy
    for get in (lambda c: c.model_state(), lambda c: c.ema_state(), lambda c: c.optimizer_state()[0]):
        a, b = get(ref), get(got)
        assert a.keys() == b.keys()
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert worst < tol, (strategy, worst)
    rng = got.rng_state()  # both ranks' RNG states are in the checkpoint
    assert train_state.rank_rng(rng, 0) is not None and train_state.rank_rng(rng, 1) is not None
    ref_rows, got_rows = read_metrics(ref_dir), read_metrics(got_dir)
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows]
    assert [r["loss"] for r in got_rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)


def test_two_gloo_ranks_ddp_equal_one_process_with_double_batch(tmp_path):
    run_two_ranks(tmp_path, tmp_path / "ddp", "ddp")
    cfg, single = single_process_reference(tmp_path / "single")
    init = ckpt.trainable_state_dict(build_model(cfg))
    trained = ckpt.load_checkpoint(tmp_path / "single").model_state()
    assert max((trained[k] - init[k]).abs().max().item() for k in init) > 1e-4  # weights really moved
    assert_same_training(tmp_path / "single", tmp_path / "ddp", "ddp")
    assert single["losses"] == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "single")])
