"""Checkpoints: round trip, atomic save + keep_last, clear errors, load_policy, kill -9 during a
save then resume, FSDP2 gathered save + sharded resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import (SMALL, assert_same_training, build_model, read_metrics, run_two_ranks,  # noqa: E402
                        single_process_reference, tiny_cfg)

from dit4dit.config import get_preset  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import tensor_files, train_state  # noqa: E402
from dit4dit.train.distributed import DistInfo, gather_tensors  # noqa: E402
from dit4dit.train.optim import EMA, build_optimizer  # noqa: E402
from dit4dit.bench.synthetic import SyntheticSamples  # noqa: E402
from dit4dit.data.samples import collate as default_collate  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402


def _batch(cfg, n=2, seed=0):
    data = SyntheticSamples(cfg, num_samples=n, seed=seed)
    return default_collate([data[i] for i in range(n)])


def _step(model, opt, ema, batch, gen):
    loss, _ = model.loss(batch, gen)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()
    return float(loss.detach())


def _fake_state(step: int) -> dict:
    return {"video_dit.w": torch.full((2, 3), float(step)), "action_dit.b": torch.arange(4.0)}


# ------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------


def test_round_trip_weights_optimizer_ema_rng(tmp_path):
    cfg = tiny_cfg("train.ema_decay=0.9", "action.dropout=0.0")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    named = [(n, p) for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])]
    ema = EMA(named, 0.9)
    gen = torch.Generator().manual_seed(7)
    batch = _batch(cfg)
    _step(model, opt, ema, batch, gen)

    rng = gather_tensors(train_state.capture_rng(gen), DistInfo())
    path = ckpt.save_checkpoint(tmp_path / "run", 1, config=cfg, model_state=ckpt.trainable_state_dict(model),
                                trainer_state={"epoch": 0, "batch_in_epoch": 1},
                                ema_state=dict(ema.named_shadows()),
                                optimizer_state=train_state.optimizer_state_tensors(opt), rng_state=rng)
    assert path == tmp_path / "run" / "checkpoints" / "step_000001"
    expected_draws = (torch.rand(3), np.random.rand(2), random.random(), torch.rand(2, generator=gen))
    train_state.restore_rng(train_state.rank_rng(tensor_files.read_safetensors(path / "rng.safetensors"), 0), gen)
    ref_loss = _step(model, opt, ema, batch, gen)  # the continuation we must reproduce

    # a stranger rebuilds everything from the folder
    loaded = ckpt.load_checkpoint(tmp_path / "run")
    assert loaded.path == path and loaded.step == 1 and loaded.config == cfg
    weights = loaded.model_state()
    assert all(k.startswith(("video_dit.", "action_dit.", "text_encoder.", "codec.")) for k in weights)
    # the pca codec's basis travels with the weights (model2 below starts unfitted)
    assert {k for k in weights if k.startswith("codec.")} == {"codec.mean", "codec.components", "codec.scale",
                                                              "codec.explained"}
    torch.manual_seed(123)
    from dit4dit.models.dit4dit import DiT4DiT

    model2 = DiT4DiT.from_config(cfg)
    ckpt.load_weights(model2, weights)
    opt2 = build_optimizer(model2, cfg.train)
    train_state.load_optimizer_state(opt2, *loaded.optimizer_state())
    ema2 = EMA([(n, p) for g in opt2.param_groups for n, p in zip(g["param_names"], g["params"])], 0.9)
    from dit4dit.train.distributed import place_like

    ema2.load(loaded.ema_state(), place_like)
    gen2 = torch.Generator()
    # scramble every RNG, then restore from the checkpoint
    torch.manual_seed(999), np.random.seed(999), random.seed(999), gen2.manual_seed(999)
    train_state.restore_rng(train_state.rank_rng(loaded.rng_state(), 0), gen2)
    draws = (torch.rand(3), np.random.rand(2), random.random(), torch.rand(2, generator=gen2))
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2] and torch.equal(draws[3], expected_draws[3])
    train_state.restore_rng(train_state.rank_rng(loaded.rng_state(), 0), gen2)

    # the optimiser state is complete: the next step matches bit for bit
    g_state = {k: v for k, v in opt2.state[opt2.param_groups[0]["params"][0]].items()}
    assert set(g_state) >= {"step", "exp_avg", "exp_avg_sq"} and float(g_state["step"]) == 1.0
    loss2 = _step(model2, opt2, ema2, batch, gen2)
    assert loss2 == ref_loss
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(ema.shadows, ema2.shadows):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# atomic save, keep_last, failure during a save
# ------------------------------------------------------------------------------------------


class _BrokenProcessor:
    def save(self, directory):
        (Path(directory) / "processor.json").write_text("{")
        raise OSError("disk full")


def test_atomic_save_keep_last_and_failed_save(tmp_path):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in range(1, 6):
        ckpt.save_checkpoint(run, step, config=cfg, model_state=_fake_state(step), trainer_state={}, keep_last=2)
        assert (root / "latest").read_text().strip() == f"step_{step:06d}"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 5]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    # a save that fails half-way leaves the previous checkpoints and the pointer untouched
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(run, 6, config=cfg, model_state=_fake_state(6), trainer_state={}, keep_last=2,
                             processor=_BrokenProcessor())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert ckpt.load_checkpoint(run).step == 5
    # leftovers of a killed save are cleaned by the next save; re-saving a step replaces it
    (root / ".tmp-step_000006-123-abc").mkdir()
    (root / ".tmp-step_000006-123-abc" / "model.safetensors").write_bytes(b"partial")
    ckpt.save_checkpoint(run, 5, config=cfg, model_state=_fake_state(50), trainer_state={}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert torch.equal(ckpt.load_checkpoint(run).model_state()["video_dit.w"], torch.full((2, 3), 50.0))
    # a dangling `latest` falls back to the newest complete checkpoint
    (root / "latest").write_text("step_000077\n")
    assert ckpt.resolve_checkpoint(run).name == "step_000005"
    # every accepted spelling resolves to the same folder
    assert ckpt.resolve_checkpoint(root) == ckpt.resolve_checkpoint(root / "step_000005")


# ------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------


def test_missing_and_corrupted_files_are_clear_errors(tmp_path):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    path = ckpt.save_checkpoint(run, 3, config=cfg, model_state=_fake_state(3), trainer_state={})
    model_file = path / "model.safetensors"
    good = model_file.read_bytes()

    model_file.write_bytes(good[: len(good) - 5])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(run, validate=False).model_state()

    model_file.write_bytes(b"\xff" * len(good))  # garbage of the right size
    with pytest.raises(ckpt.CheckpointError, match="corrupted safetensors"):
        ckpt.load_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match="corrupted safetensors"):
        tensor_files.read_safetensors(model_file)

    model_file.write_bytes(good)
    assert ckpt.load_checkpoint(run).model_state().keys() == _fake_state(0).keys()
    (path / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="config.json"):
        ckpt.load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**json.loads(cfg.to_json()), "feature_blocks": 99}))
    with pytest.raises(ckpt.CheckpointError, match="feature_blocks"):
        ckpt.load_checkpoint(path)
    (path / "trainer_state.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['trainer_state.json'\]"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        ckpt.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint folder"):
        ckpt.load_checkpoint(tmp_path / "other")


# ------------------------------------------------------------------------------------------
# load_policy: what a stranger does with a checkpoint folder
# ------------------------------------------------------------------------------------------


def test_train_from_dataset_then_load_policy(tmp_path):
    from lerobot_fixtures import make_v30_dataset

    from dit4dit.data.processor import Processor

    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32))
    cfg = tiny_cfg("train.steps=2", "train.ema_decay=0.9")
    s = train(cfg, root, tmp_path / "run", progress=False)
    folder = Path(s["checkpoint"])
    assert (folder / "processor.json").is_file() and (folder / "ema.safetensors").is_file()

    model, processor, loaded_cfg = ckpt.load_policy(folder, "cpu")
    assert loaded_cfg == cfg and isinstance(processor, Processor) and not model.training
    assert processor.inputs == cfg.inputs and processor.action_horizon == cfg.action.action_horizon
    ema = tensor_files.read_safetensors(folder / "ema.safetensors")
    assert all(torch.equal(v, ema[f"action_dit.{k}"]) for k, v in model.action_dit.state_dict().items())
    raw_model, _, _ = ckpt.load_policy(tmp_path / "run", use_ema=False)
    raw = tensor_files.read_safetensors(folder / "model.safetensors")
    assert all(torch.equal(v, raw[f"video_dit.{k}"]) for k, v in raw_model.video_dit.state_dict().items())
    h, w = cfg.inputs.image_size
    out = model.predict_action(torch.zeros(1, 3, cfg.inputs.num_cond_frames, h, w), torch.zeros(1, 64), ["push"])
    assert out.shape == (1, cfg.action.action_horizon, cfg.action.action_dim)


def test_weights_that_do_not_match_the_config(tmp_path):
    cfg = tiny_cfg("train.steps=1")
    s = train(cfg, SyntheticSamples(cfg, num_samples=4), tmp_path / "run", progress=False)
    folder = Path(s["checkpoint"])
    d = json.loads((folder / "config.json").read_text())
    d["action"]["mlp_hidden"] = 48  # config edited: the weights no longer fit
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_policy(folder)
    msg = str(e.value)
    assert "ema.safetensors" in msg  # the tiny preset keeps an EMA: load_policy loads it
    assert "action_dit.state_encoder" in msg and "checkpoint shape (64," in msg and "model shape (48," in msg


# ------------------------------------------------------------------------------------------
# kill -9 in the middle of a save, then resume
# ------------------------------------------------------------------------------------------

_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from dit4dit.config import get_preset
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.train.trainer import train
    cfg = get_preset("tiny", json.loads(sys.argv[1]))
    train(cfg, SyntheticSamples(cfg, num_samples=8), sys.argv[2], progress=False)
""")


def test_kill_during_save_keeps_previous_checkpoint_and_resume_finishes(tmp_path):
    overrides = SMALL + ["train.steps=6", "train.save_every=2", "train.keep_last=3", "train.ema_decay=0.9",
                         "action.dropout=0.1"]
    cfg = get_preset("tiny", overrides)
    run = tmp_path / "run"
    script = tmp_path / "kill_train.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, ckpt.SAVE_PAUSE_ENV: "4:300", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list((run / "checkpoints").glob(".tmp-step_000004-*/_paused")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the save of step 4 never started"
            time.sleep(0.1)
        partial = next((run / "checkpoints").glob(".tmp-step_000004-*"))
        assert (partial / "model.safetensors").is_file()  # killed with part of the files written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert ckpt.load_checkpoint(run).step == 2
    killed_losses = [r["loss"] for r in read_metrics(run)]
    assert len(killed_losses) == 4

    data = SyntheticSamples(cfg, num_samples=8)
    resumed = train(cfg, data, run, progress=False, resume=True)
    assert resumed["start_step"] == 2 and resumed["step"] == 6
    assert not list((run / "checkpoints").glob(".*")), "leftovers of the killed save remain"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]

    reference = train(cfg, data, tmp_path / "ref", progress=False)
    assert killed_losses == reference["losses"][:4]  # the subprocess ran the same computation
    assert resumed["losses"] == reference["losses"][2:]  # and the resume continued it exactly
    a, b = ckpt.load_checkpoint(run).model_state(), ckpt.load_checkpoint(tmp_path / "ref").model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks: gathered save at step 2, sharded resume to step 3
# ------------------------------------------------------------------------------------------


def test_fsdp_two_ranks_save_resume_equals_single_process(tmp_path):
    run_two_ranks(tmp_path, tmp_path / "fsdp", "fsdp", stop=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "fsdp")] == [2, 3]
    single_process_reference(tmp_path / "single")
    assert_same_training(tmp_path / "single", tmp_path / "fsdp", "fsdp")
