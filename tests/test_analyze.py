"""Baselines and ablations: the static-image encoder, staged (decoupled) training, episode subsets,
feature pooling, the silhouette score / t-SNE, and the `analyze` runner end to end on toy_reach."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import tiny_cfg  # noqa: E402

from dit4dit.config import ConfigError, get_preset  # noqa: E402
from dit4dit.models.dit4dit import DiT4DiT, parameter_counts  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import init_from  # noqa: E402
from dit4dit.train.optim import param_groups  # noqa: E402
from dit4dit.bench.synthetic import SyntheticSamples  # noqa: E402
from dit4dit.data.samples import collate as default_collate  # noqa: E402
from dit4dit.train.step import freeze_frozen_parts  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# the toy dataset's model: the shrunken tiny preset on 32 px frames of the 64 px toy camera
TOY = ["schema=toy_reach", "video.num_layers=2", "feature_blocks=1", "action.num_layers=2",
       "inputs.image_size=[32,32]", "video.num_attention_heads=2", "video.attention_head_dim=16",
       "video.adaln_lora_dim=16", "action.num_attention_heads=2", "action.attention_head_dim=16",
       "action.cross_attention_dim=32", "action.mlp_hidden=64", "train.batch_size=4", "train.num_workers=0",
       "train.log_every=1", "train.warmup_steps=1", "train.tensorboard=false", "num_action_steps=2"]


def _batch(cfg, n=4, seed=0):
    data = SyntheticSamples(cfg, num_samples=n, seed=seed)
    return default_collate([data[i] for i in range(n)])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from dit4dit.envs.toy import collect

    root = tmp_path_factory.mktemp("toy") / "data"
    collect(str(root), 6, seed=0, size=64)  # 6 successful episodes, both tasks
    return root


# ------------------------------------------------------------------------------------------
# static-image encoder
# ------------------------------------------------------------------------------------------


def test_static_encoder_shapes_loss_and_conditioning_frames_only():
    cfg = tiny_cfg("encoder=static_image", "mode=action_only", "action.dropout=0.0")
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    assert model.video_dit is None and set(model.trainable_modules()) == {"image_encoder", "action_dit",
                                                                          "text_encoder"}
    batch = _batch(cfg)
    total, logs = model.loss(batch, torch.Generator().manual_seed(0))
    assert set(logs) == {"loss", "loss_action"} and logs["loss"] == logs["loss_action"]
    total.backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.action_dit.blocks[0].parameters())

    # the future frames never reach the features: other future frames, the same loss
    other = dict(batch, video=batch["video"].clone())
    other["video"][:, :, cfg.inputs.num_cond_frames:] = 0.5
    _, logs2 = model.loss(other, torch.Generator().manual_seed(0))
    assert logs2["loss"] == logs["loss"]

    model.eval()
    nc = cfg.inputs.num_cond_frames
    text = model.encode_text(list(batch["instruction"]))
    feats = model.extract_features(batch["video"][:, :, :nc], text)
    rows, cols = (s // (8 * 2) for s in cfg.inputs.image_size)  # pixel factor 8, patch 2
    assert feats.shape == (4, nc * rows * cols, cfg.video.width)
    acts = model.predict_action(batch["video"][:, :, :nc], batch["state"], list(batch["instruction"]))
    assert acts.shape == (4, cfg.action.action_horizon, cfg.action.action_dim)
    with pytest.raises(RuntimeError, match="static_image"):
        model.predict_video(batch["video"][:, :, :nc], list(batch["instruction"]))
    # the encoder trains at the video DiT's learning rate
    groups = {g.name: g for g in param_groups(model, cfg.train)}
    assert all(n.startswith("image_encoder.") for n in groups["video_dit"].names)
    assert "image_encoder.pos_embed" in groups["video_dit.no_decay"].names


def test_static_encoder_token_grid_follows_the_pca_pixel_factor():
    """A pca codec with pixel factor 4 gives 4x the tokens of factor 8 (not the VAE's fixed 8)."""
    from dit4dit.models.image_encoder import latent_grid

    cfg = tiny_cfg("encoder=static_image", "mode=action_only", "codec.pixel_factor=4")
    assert cfg.codec.kind == "pca" and cfg.codec.spatial_factor == 4
    model = DiT4DiT.from_config(cfg, random_weights=True).eval()
    batch = _batch(cfg, n=2)
    nc = cfg.inputs.num_cond_frames
    feats = model.extract_features(batch["video"][:, :, :nc], model.encode_text(list(batch["instruction"])))
    rows, cols = latent_grid(cfg)
    assert (rows, cols) == (cfg.inputs.image_size[0] // 8, cfg.inputs.image_size[1] // 8)  # factor 4, patch 2
    assert feats.shape[1] == nc * rows * cols


def test_static_encoder_parameter_count_matches_the_video_dit():
    from dit4dit.models.image_encoder import ImageEncoder
    from dit4dit.models.video_dit import VideoDiT

    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    cfg = get_preset("cosmos-2b", ["encoder=static_image", "mode=action_only"])
    with torch.device("meta"):  # the 2B model (parameter_counts would also build the VAE: slow)
        assert abs(n(ImageEncoder(cfg)) / n(VideoDiT(cfg.video)) - 1) < 0.02
    c = parameter_counts(get_preset("tiny", ["encoder=static_image", "mode=action_only"]))
    assert abs(c["image_encoder"] / c["video_dit"] - 1) < 0.12, c
    assert c["trainable_total"] == c["image_encoder"] + c["action_dit"] + c["text_encoder_trainable"]
    assert "image_encoder" not in parameter_counts(get_preset("tiny"))


def test_static_encoder_config_errors():
    with pytest.raises(ConfigError, match="encoder=static_image has no video model"):
        tiny_cfg("encoder=static_image", "mode=video_only")
    with pytest.raises(ConfigError, match="feature_grad must be end_to_end"):
        tiny_cfg("encoder=static_image", "feature_grad=detached")
    with pytest.raises(ConfigError, match="encoder"):
        tiny_cfg("encoder=qwen")


def test_static_encoder_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg("encoder=static_image", "mode=action_only", "train.steps=2")
    train(cfg, SyntheticSamples(cfg, num_samples=8), tmp_path / "run", progress=False)
    found = ckpt.load_checkpoint(tmp_path / "run")
    keys = set(found.model_state())
    assert any(k.startswith("image_encoder.") for k in keys) and not any(k.startswith("video_dit.") for k in keys)
    model, _, loaded_cfg = ckpt.load_policy(tmp_path / "run")
    assert loaded_cfg.encoder == "static_image"
    weights = found.ema_state() or found.model_state()
    state = model.image_encoder.state_dict()
    assert all(torch.equal(state[k], weights[f"image_encoder.{k}"]) for k in state)
    batch = _batch(cfg, n=2)
    nc = cfg.inputs.num_cond_frames
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = model.predict_action(batch["video"][:, :, :nc], batch["state"], list(batch["instruction"]), generator=g())
    b = model.predict_action(batch["video"][:, :, :nc], batch["state"], list(batch["instruction"]), generator=g())
    assert torch.equal(a, b) and torch.isfinite(a).all()


# ------------------------------------------------------------------------------------------
# feature pooling
# ------------------------------------------------------------------------------------------


def test_feature_pool_mean_is_the_mean_of_the_block_outputs():
    cfg = tiny_cfg("video.num_layers=3", "feature_blocks=3")
    torch.manual_seed(0)
    video = DiT4DiT.from_config(cfg, random_weights=True).video_dit.eval()
    g = torch.Generator().manual_seed(0)
    c = cfg.video.latent_channels
    lat, noise = torch.randn(4, c, 2, 4, 4, generator=g), torch.randn(4, c, 2, 4, 4, generator=g)
    text = torch.randn(4, 5, cfg.video.text_input_dim, generator=g)
    x, ts, cm = video.video2world_inputs(lat, noise, torch.rand(4, generator=g), 1)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out))
             for b in video.transformer.transformer_blocks]
    last = video.features(x, ts, cm, text, 3)
    for h in hooks:
        h.remove()
    mean = video.features(x, ts, cm, text, 3, pool="mean")
    torch.testing.assert_close(mean, torch.stack(outs).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(last, outs[-1])
    feats, _ = video.features_and_velocity(x, ts, cm, text, num_blocks=2, num_velocity=2, pool="mean")
    torch.testing.assert_close(feats, video.features(x[2:], ts[2:], cm[2:], text[2:], 2, pool="mean"),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="feature_pool"):
        tiny_cfg("feature_pool=max")


# ------------------------------------------------------------------------------------------
# decoupled: freeze_video + init_from
# ------------------------------------------------------------------------------------------


def test_decoupled_stage_two_freezes_the_video_dit(tmp_path):
    base = ["train.steps=2", "train.ema_decay=0.9"]
    stage1 = tiny_cfg(*base, "mode=video_only")
    data = SyntheticSamples(stage1, num_samples=8)
    train(stage1, data, tmp_path / "s1", progress=False)
    stage2 = tiny_cfg(*base, "mode=action_only", "feature_grad=detached", "train.freeze_video=true",
                      f"train.init_from={tmp_path / 's1'}")
    summary = train(stage2, data, tmp_path / "s2", progress=False)
    assert set(summary["params"]) == {"action_dit", "frozen"}

    s1, s2 = ckpt.load_checkpoint(tmp_path / "s1"), ckpt.load_checkpoint(tmp_path / "s2")
    init = s1.ema_state()  # init_from takes the EMA weights when saved
    raw2, ema2 = s2.model_state(), s2.ema_state()
    video = [k for k in init if k.startswith(("video_dit.", "text_encoder."))]
    assert video and all(torch.equal(raw2[k], init[k]) and torch.equal(ema2[k], init[k]) for k in video)
    action = [k for k in init if k.startswith("action_dit.") and k.endswith("weight")]
    assert any(not torch.equal(raw2[k], init[k]) for k in action)  # the action DiT trained
    opt_tensors, opt_meta = s2.optimizer_state()
    assert not any(k.startswith(("video_dit.", "text_encoder.")) for k in opt_tensors)
    names = [n for g in opt_meta["param_groups"] for n in g["param_names"]]
    assert names and all(n.startswith("action_dit.") for n in names)
    model, _, _ = ckpt.load_policy(tmp_path / "s2")  # EMA holds the frozen weights too
    assert torch.equal(model.video_dit.state_dict()["transformer.proj_out.weight"],
                       init["video_dit.transformer.proj_out.weight"])

    # the freeze itself: no gradient, no optimiser group
    m = DiT4DiT.from_config(stage2, random_weights=True)
    counts = freeze_frozen_parts(m, freeze_video=True)
    assert "video_dit" not in counts and not any(p.requires_grad for p in m.video_dit.parameters())
    assert {g.family for g in param_groups(m, stage2.train)} == {"action_dit"}


def test_freeze_video_and_init_from_errors(tmp_path):
    with pytest.raises(ConfigError, match="freeze_video"):
        tiny_cfg("train.freeze_video=true")  # mode joint
    with pytest.raises(ConfigError, match="freeze_video"):
        tiny_cfg("train.freeze_video=true", "mode=action_only", "encoder=static_image")
    cfg = tiny_cfg("train.steps=1", f"train.init_from={tmp_path / 'nope'}")
    with pytest.raises(ckpt.CheckpointError):
        train(cfg, SyntheticSamples(cfg, num_samples=4), tmp_path / "run", progress=False)
    # a checkpoint of another architecture loads where names and shapes match, and names the rest
    small = tiny_cfg("train.steps=1")
    train(small, SyntheticSamples(small, num_samples=4), tmp_path / "small", progress=False)
    other = tiny_cfg("action.num_layers=3")
    report = init_from.init_weights_from(DiT4DiT.from_config(other, random_weights=True), tmp_path / "small")
    assert report["missing"] and all(n.startswith("action_dit.blocks.2.") or n.startswith("action_dit.")
                                     for n in report["missing"])
    assert report["loaded"]["video_dit"] > 0 and not report["mismatched"]
    # ... but a frozen video DiT (the decoupled baseline's second stage) must load whole
    frozen = tiny_cfg("train.steps=1", "video.num_layers=3", "mode=action_only", "feature_grad=detached",
                      "train.freeze_video=true", f"train.init_from={tmp_path / 'small'}")
    with pytest.raises(ckpt.CheckpointError, match="freeze_video.*video_dit"):
        train(frozen, SyntheticSamples(frozen, num_samples=4), tmp_path / "frozen", progress=False)
    # resuming a checkpoint whose config predates the new fields: they count at their defaults
    cfg_file = tmp_path / "small" / "checkpoints" / "step_000001" / "config.json"
    d = json.loads(cfg_file.read_text())
    for k in ("encoder", "feature_pool"):
        d.pop(k)
    for k in ("init_from", "freeze_video", "episodes_per_task"):
        d["train"].pop(k)
    cfg_file.write_text(json.dumps(d))
    ckpt.check_resume_config(ckpt.load_checkpoint(tmp_path / "small"), tiny_cfg("train.steps=2"))


# ------------------------------------------------------------------------------------------
# episode subsets (the demonstrations ablation)
# ------------------------------------------------------------------------------------------


def test_episodes_per_task_selects_the_first_episodes_of_each_task(toy_data):
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.samples import episodes_per_task
    from dit4dit.data.training_data import build_training_data

    ds = LeRobotDataset(toy_data)
    by_task: dict[str, list[int]] = {}
    for e in sorted(ds.episodes, key=lambda e: e.index):
        by_task.setdefault(e.tasks[0], []).append(e.index)
    assert len(by_task) == 2
    assert episodes_per_task(ds, 1) == sorted(v[0] for v in by_task.values())
    assert episodes_per_task(ds, 100) == sorted(e.index for e in ds.episodes)
    cfg = get_preset("tiny", TOY + ["train.episodes_per_task=1"])
    samples, proc = build_training_data(cfg, toy_data, progress=False)
    lengths = {e.index: e.length for e in ds.episodes}
    assert len(samples) == sum(lengths[i] for i in episodes_per_task(ds, 1))
    full, proc_all = build_training_data(get_preset("tiny", TOY), toy_data, progress=False)
    assert len(full) == sum(lengths.values())
    with pytest.raises(ConfigError, match="episodes_per_task"):
        get_preset("tiny", TOY + ["train.episodes_per_task=0"])


def test_task_episodes_limit_the_demonstrations_of_one_task(toy_data):
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.samples import ProcessorError, episodes_per_task
    from dit4dit.data.training_data import build_training_data

    ds = LeRobotDataset(toy_data)
    by_task: dict[str, list[int]] = {}
    for e in sorted(ds.episodes, key=lambda e: e.index):
        by_task.setdefault(e.tasks[0], []).append(e.index)
    first, second = sorted(by_task, key=lambda t: -len(by_task[t]))  # the task with more episodes first
    assert len(by_task[first]) > 2 and len(by_task[second]) > 1
    word = next(w for w in first.split() if w not in second.split()).upper()  # any case
    # the matched task gets 2 episodes, the other every one of its episodes (n None) or n of them
    assert episodes_per_task(ds, None, [f"{word}=2"]) == sorted(by_task[first][:2] + by_task[second])
    assert episodes_per_task(ds, 1, [f"{word}=2"]) == sorted(by_task[first][:2] + by_task[second][:1])
    assert episodes_per_task(ds, 1, [f"{word}=1000"]) == sorted(by_task[first] + by_task[second][:1])
    lengths = {e.index: e.length for e in ds.episodes}
    cfg = get_preset("tiny", TOY + [f'train.task_episodes=["{word}=2"]', f'train.task_repeats=["{word}=3"]'])
    samples, proc = build_training_data(cfg, toy_data, progress=False)
    assert len(samples) == 3 * sum(lengths[i] for i in by_task[first][:2]) + sum(lengths[i] for i in by_task[second])
    _, proc_all = build_training_data(get_preset("tiny", TOY), toy_data, progress=False)
    assert proc.normalizer.to_dict() != proc_all.normalizer.to_dict()  # statistics of the subset
    with pytest.raises(ProcessorError, match="train.task_episodes: 'fly' matches none of the tasks"):
        episodes_per_task(ds, None, ["fly=2"])
    with pytest.raises(ConfigError, match="train.task_episodes entry 'push=0'"):
        get_preset("tiny", TOY + ['train.task_episodes=["push=0"]'])


def test_task_repeats_oversample_a_task(toy_data):
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.samples import ProcessorError, repeat_tasks
    from dit4dit.data.training_data import build_training_data

    ds = LeRobotDataset(toy_data)
    lengths = {e.index: e.length for e in ds.episodes}
    tasks = {e.index: e.tasks[0] for e in ds.episodes}
    first = sorted(set(tasks.values()))[0]
    word = next(w for w in first.split() if sum(w in t for t in set(tasks.values())) == 1).upper()  # any case
    reps = repeat_tasks(ds, None, [f"{word}=3"])
    assert sorted(set(reps)) == sorted(lengths)
    assert all(reps.count(i) == (3 if tasks[i] == first else 1) for i in lengths)
    assert repeat_tasks(ds, None, []) is None
    cfg = get_preset("tiny", TOY + [f'train.task_repeats=["{word}=3"]'])
    samples, proc = build_training_data(cfg, toy_data, progress=False)
    assert len(samples) == sum(lengths[i] * (3 if tasks[i] == first else 1) for i in lengths)
    _, proc_plain = build_training_data(get_preset("tiny", TOY), toy_data, progress=False)
    assert proc.normalizer.to_dict() == proc_plain.normalizer.to_dict()  # statistics ignore the repeats
    # with a subset, only the subset's episodes are repeated
    one = [min(i for i in lengths if tasks[i] == first)]
    assert repeat_tasks(ds, one, [f"{word}=2"]) == one * 2
    with pytest.raises(ProcessorError, match="'fly' matches none of the tasks"):
        repeat_tasks(ds, None, ["fly=2"])
    with pytest.raises(ConfigError, match="TEXT=K"):
        get_preset("tiny", TOY + ['train.task_repeats=["push=0"]'])


# ------------------------------------------------------------------------------------------
# silhouette and t-SNE
# ------------------------------------------------------------------------------------------


def test_silhouette_against_a_hand_computed_example():
    from dit4dit.analyze.features import silhouette_samples, silhouette_score

    # clusters {0, 1} and {4, 5} on a line: for 0, a = 1, b = (4 + 5) / 2 = 4.5 -> s = 3.5 / 4.5 = 7/9;
    # for 1, a = 1, b = (3 + 4) / 2 = 3.5 -> s = 2.5 / 3.5 = 5/7; symmetric for 5 and 4.
    x = np.array([[0.0], [1.0], [4.0], [5.0]])
    s = silhouette_samples(x, ["a", "a", "b", "b"])
    np.testing.assert_allclose(s, [7 / 9, 5 / 7, 5 / 7, 7 / 9])
    assert silhouette_score(x, [0, 0, 1, 1]) == pytest.approx((7 / 9 + 5 / 7) / 2)
    # a point alone in its cluster scores 0 (Rousseeuw's convention, as scikit-learn)
    s = silhouette_samples(np.array([[0.0], [1.0], [4.0], [5.0], [20.0]]), [0, 0, 1, 1, 2])
    assert s[4] == 0.0
    # for 4 now: a = 1, b = min((4 + 3) / 2, 16) = 3.5 -> 5/7 (unchanged)
    assert s[2] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="clusters"):
        silhouette_score(x, [0, 0, 0, 0])


def test_tsne_keeps_separated_clusters_apart_and_is_deterministic():
    from dit4dit.analyze.features import silhouette_score, tsne

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 1.0, size=(20, 10)) for c in (0.0, 8.0, -8.0)])
    labels = np.repeat([0, 1, 2], 20)
    y = tsne(x, iterations=500, seed=1)
    assert y.shape == (60, 2) and np.isfinite(y).all()
    assert silhouette_score(y, labels) > 0.8
    np.testing.assert_array_equal(y, tsne(x, iterations=500, seed=1))


# ------------------------------------------------------------------------------------------
# the grid and the command line
# ------------------------------------------------------------------------------------------


def test_grid_cells_and_value_parsing():
    from dit4dit.cli.analyze import parse_ablations, parse_variants
    from dit4dit.analyze.grid import VARIANTS, AnalysisError, ablation_cells, variant_cells

    assert parse_variants("all") == tuple(VARIANTS) and parse_variants("none") == ()
    names, values = parse_ablations(["feature_blocks,demos", "tau_f=0.5,buckets:10"])
    assert names == ("feature_blocks", "demos", "tau_f") and values == {"tau_f": ("0.5", "buckets:10")}
    assert parse_ablations(["all"])[0] == ("feature_blocks", "feature_denoise_steps", "tau_f", "demos")
    with pytest.raises(AnalysisError, match="unknown variant"):
        parse_variants("joint,qwen")
    with pytest.raises(AnalysisError, match="unknown ablation"):
        parse_ablations(["layers"])

    decoupled = variant_cells(["decoupled"])[0]
    assert len(decoupled.stages) == 2 and "train.freeze_video=true" in decoupled.stages[1]
    cfg = get_preset("cosmos-2b")
    assert [c.name for c in ablation_cells("feature_blocks", cfg)] == ["block_7", "block_18", "block_28", "mean"]
    mean = ablation_cells("feature_blocks", cfg, ["mean"])[0]
    assert "feature_pool=mean" in mean.stages[0] and "feature_blocks=28" in mean.stages[0]
    tau = ablation_cells("tau_f", cfg, ["0.5", "buckets:10"])
    assert [c.name for c in tau] == ["tau_0.5", "buckets_10"] and "tau_f_buckets=10" in tau[1].stages[0]
    assert [c.x for c in ablation_cells("demos", cfg)] == [5, 10, 25, 50]
    with pytest.raises(AnalysisError, match="tau_f: bad value '1.5'"):
        ablation_cells("tau_f", cfg, ["1.5"])
    with pytest.raises(AnalysisError, match="feature_blocks: bad value '29'"):
        ablation_cells("feature_blocks", cfg, ["29"])


def test_runner_end_to_end_resume_and_report(toy_data, tmp_path, monkeypatch, capsys):
    from dit4dit.cli.analyze import register, study_from_args
    from dit4dit.analyze.runner import Study, run_analysis

    out = tmp_path / "study"
    parser = argparse.ArgumentParser(prog="dit4dit")
    register(parser.add_subparsers(dest="command", required=True))
    assert "--variants" in parser._subparsers._group_actions[0].choices["analyze"].format_help()
    argv = ["analyze", "--dataset", str(toy_data), "--out", str(out), "--variants", "decoupled,static_image",
            "--ablation", "tau_f=0.995", "--ablation", "feature_denoise_steps=1",  # the same config twice
            "--seeds", "0", "--steps", "2", "--episodes", "1", "--feature-samples", "24", "--no-progress"]
    for o in TOY:
        argv += ["--set", o]
    args = parser.parse_args(argv)
    logs: list[str] = []
    study = study_from_args(args)
    report = run_analysis(study, progress=False, log=logs.append)

    rows = {r["cell"]: r for r in report["cells"]}
    assert set(rows) == {"decoupled", "static_image", "tau_0.995", "steps_1"}
    for r in rows.values():
        assert r["seeds"] == [0] and r["episodes"] == 2 and 0.0 <= r["success_mean"] <= 1.0
        assert r["ci95"][0] <= r["success_mean"] <= r["ci95"][1]
    for name in ("decoupled", "static_image"):  # the feature analysis runs on the variants
        assert rows[name]["silhouette_phase"] is not None and -1 <= rows[name]["silhouette_phase"] <= 1
    # an ablation cell with the same config as an earlier one takes its result
    assert rows["steps_1"]["same_as"] == "tau_f/tau_0.995" and rows["tau_0.995"]["same_as"] is None
    assert rows["steps_1"]["success_per_seed"] == rows["tau_0.995"]["success_per_seed"]
    assert not (out / "runs" / "feature_denoise_steps" / "steps_1" / "seed_0" / "train").exists()
    runs = out / "runs" / "variants"
    assert (runs / "decoupled" / "seed_0" / "stage1_video_only" / "checkpoints").is_dir()
    assert (runs / "decoupled" / "seed_0" / "stage2_action_only" / "checkpoints").is_dir()
    res = json.loads((runs / "decoupled" / "seed_0" / "result.json").read_text())
    assert [s["step"] for s in res["stages"]] == [2, 2]
    assert res["configs"][1]["train"]["freeze_video"] is True
    stage1 = (runs / "decoupled" / "seed_0" / "stage1_video_only").resolve()
    assert res["configs"][1]["train"]["init_from"] == str(stage1)
    md = (out / "results.md").read_text()
    assert "`decoupled`" in md and "`static_image`" in md and "95% CI" in md and "silhouette" in md
    assert "dit4dit analyze" in md and (out / "plots" / "variants.png").is_file()
    assert (out / "plots" / "tsne.png").is_file()

    # rerun: every run is skipped; nothing trains or evaluates again
    def no_training(*a, **k):
        raise AssertionError("trained again")

    def no_evaluation(policy):
        raise AssertionError("evaluated again")

    monkeypatch.setattr("dit4dit.train.trainer.train", no_training)
    logs.clear()
    again = run_analysis(study, progress=False, log=logs.append, evaluator=no_evaluation)
    assert sum("skipped" in m for m in logs) == 4
    assert [r["success_mean"] for r in again["cells"]] == [r["success_mean"] for r in report["cells"]]
    # an interrupted run (no result.json yet) reuses its trained stages and its evaluation
    (runs / "static_image" / "seed_0" / "result.json").unlink()
    logs.clear()
    run_analysis(study, progress=False, log=logs.append, evaluator=no_evaluation)
    assert any("trained already" in m for m in logs) and (runs / "static_image" / "seed_0" / "result.json").is_file()
    # another config in the same folder is an error, not a silent mix
    other = Study(**{**study.__dict__, "overrides": study.overrides + ("lambda_video=0.5",)})
    with pytest.raises(ConfigError, match="another config"):
        run_analysis(other, progress=False, log=logs.append)

    # the command: --report-only aggregates; --json prints it
    args = parser.parse_args(argv + ["--report-only", "--json"])
    capsys.readouterr()
    args.func(args)
    printed = json.loads(capsys.readouterr().out)
    assert {r["cell"] for r in printed["cells"]} == {"decoupled", "static_image", "tau_0.995", "steps_1"}


def test_runner_parallel_jobs_match_sequential(toy_data, tmp_path):
    """--jobs 2: distinct runs train in worker processes, a same-config cell waits for its twin,
    and every stored result equals the one-process run's."""
    from dit4dit.analyze.grid import AnalysisError
    from dit4dit.analyze.runner import Study, run_analysis

    common = dict(dataset=str(toy_data), overrides=tuple(TOY), variants=("joint",), ablations=("tau_f",),
                  values={"tau_f": ("0.995",)}, seeds=(0, 1), steps=2, eval_episodes=1, features="none",
                  frame_cache=True)
    logs: list[str] = []
    par = run_analysis(Study(out=str(tmp_path / "par"), **common), progress=False, log=logs.append, jobs=2,
                       threads=1)
    assert any("2 distinct runs of 4, 2 at a time" in m for m in logs)
    # the same-config cell's results are stored as soon as their first run is done
    reused = [i for i, m in enumerate(logs) if "its result is reused" in m]
    skipped = [i for i, m in enumerate(logs) if "done already" in m]  # the sequential pass after the pool
    assert len(reused) == 2 and len(skipped) == 4 and max(reused) < min(skipped)
    seq = run_analysis(Study(out=str(tmp_path / "seq"), **common), progress=False, log=lambda m: None, threads=1)
    rows = {r["cell"]: r for r in par["cells"]}
    assert rows["tau_0.995"]["same_as"] == "variants/joint" and rows["joint"]["seeds"] == [0, 1]
    assert not (tmp_path / "par" / "runs" / "tau_f" / "tau_0.995" / "seed_0" / "train").exists()
    for cell in ("variants/joint", "tau_f/tau_0.995"):
        for seed in (0, 1):
            a, b = (json.loads((tmp_path / d / "runs" / cell / f"seed_{seed}" / "result.json").read_text())
                    for d in ("par", "seq"))
            assert isinstance(a["stages"][0]["final_loss"], float) and a["eval"]["episodes"] == 2
            assert a["eval"] == b["eval"] and a["stages"][0]["final_loss"] == b["stages"][0]["final_loss"]
    with pytest.raises(AnalysisError, match="custom evaluator"):
        run_analysis(Study(out=str(tmp_path / "x"), **common), evaluator=lambda p: {}, jobs=2)


def test_sample_efficiency_curve_ends_at_the_whole_dataset(toy_data):
    from dit4dit.analyze.report import demos_per_task, full_data_point
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.samples import episodes_per_task

    ds = LeRobotDataset(toy_data, check_videos=False)
    n = demos_per_task(str(toy_data))
    # the smallest episodes_per_task that keeps every episode
    assert len(episodes_per_task(ds, n)) == len(ds.episodes) > len(episodes_per_task(ds, n - 1))
    joint = {"group": "variants", "cell": "joint", "success_mean": 0.5, "label": "joint", "x": None}
    assert full_data_point([joint], str(toy_data)) == {**joint, "x": n, "label": f"{n} (all, = joint)"}
    assert full_data_point([{**joint, "success_mean": None}], str(toy_data)) is None
    assert demos_per_task(str(toy_data) + "-missing") is None


def test_per_task_table_pools_each_task_over_the_seeds():
    from dit4dit.analyze.report import _per_task_table

    rows = [{"cell": "a", "per_task": {"push-v3": {"successes": 3, "episodes": 40, "success_rate": 3 / 40},
                                       "drawer-open-v3": {"successes": 40, "episodes": 40, "success_rate": 1.0}}},
            {"cell": "b", "per_task": {"drawer-open-v3": {"successes": 0, "episodes": 20, "success_rate": 0.0}}}]
    lines = _per_task_table(rows)
    assert lines[2] == "| cell | push | drawer-open |"
    assert lines[4] == "| `a` | 3/40 (7.5%) | 40/40 (100.0%) |"
    assert lines[5] == "| `b` | - | 0/20 (0.0%) |"
    assert _per_task_table([{"cell": "c", "per_task": {}}]) == []
