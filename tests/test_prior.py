"""The video-prior study: the static encoder's pretraining objective (mode=image_only), loading only
some parts of --init (train.init_parts), the study's cells and pretraining runs (dry run), the
paired bootstrap, and a tiny pilot of `analyze --study prior` on toy_reach."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_analyze import TOY  # noqa: E402
from test_train import tiny_cfg  # noqa: E402

from dit4dit.config import ConfigError  # noqa: E402
from dit4dit.models.dit4dit import DiT4DiT  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import init_from  # noqa: E402
from dit4dit.train.optim import param_groups  # noqa: E402
from dit4dit.bench.synthetic import SyntheticSamples  # noqa: E402
from dit4dit.data.samples import collate as default_collate  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def _batch(cfg, n=4, seed=0):
    data = SyntheticSamples(cfg, num_samples=n, seed=seed)
    return default_collate([data[i] for i in range(n)])


# ------------------------------------------------------------------------------------------
# the static encoder's pretraining objective
# ------------------------------------------------------------------------------------------


def test_image_only_denoises_the_current_frame_and_never_reads_the_future():
    torch.set_num_threads(1)
    cfg = tiny_cfg("encoder=static_image", "mode=image_only")
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    assert set(model.trainable_modules()) == {"image_encoder", "image_head", "action_dit", "text_encoder"}
    batch = _batch(cfg)
    nc = cfg.inputs.num_cond_frames
    total, logs = model.loss(batch, torch.Generator().manual_seed(0))
    assert set(logs) == {"loss", "loss_image"} and np.isfinite(logs["loss"]) and logs["loss"] > 0
    total.backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.image_head.parameters())
    assert all(p.grad is None for p in model.action_dit.parameters())  # no action loss

    # future frames full of NaN: the same finite loss (they are never encoded)
    poisoned = dict(batch, video=batch["video"].clone())
    poisoned["video"][:, :, nc:] = float("nan")
    _, logs2 = model.loss(poisoned, torch.Generator().manual_seed(0))
    assert logs2["loss"] == logs["loss"]
    # the same from precomputed clip latents whose future latent frames are NaN
    with torch.no_grad():
        latents = model.encode_video(batch["video"])
    latents[:, :, model.num_cond_latents:] = float("nan")
    _, logs3 = model.loss(dict(batch, latents=latents), torch.Generator().manual_seed(0))
    assert np.isfinite(logs3["loss"]) and abs(logs3["loss"] - logs["loss"]) < 1e-4
    # ... while the current frame matters: another conditioning frame, another loss
    other = dict(batch, video=batch["video"].clone())
    other["video"][:, :, :nc] = -other["video"][:, :, :nc]
    assert model.loss(other, torch.Generator().manual_seed(0))[1]["loss"] != logs["loss"]
    # state, actions and their masks are not read either (action-free rows count like labelled ones)
    free = dict(batch, actions=torch.full_like(batch["actions"], float("nan")),
                has_actions=torch.zeros(4, dtype=torch.bool))
    assert model.loss(free, torch.Generator().manual_seed(0))[1]["loss"] == logs["loss"]
    # the head trains with the encoder, at the video DiT's learning rate
    groups = {g.name: g for g in param_groups(model, cfg.train)}
    assert any(n.startswith("image_head.") for g in ("video_dit", "video_dit.no_decay") for n in groups[g].names)


def test_image_only_needs_the_static_encoder_and_action_only_has_no_head():
    with pytest.raises(ConfigError, match="mode=image_only pretrains the static image encoder"):
        tiny_cfg("mode=image_only")
    model = DiT4DiT.from_config(tiny_cfg("encoder=static_image", "mode=action_only"), random_weights=True)
    assert model.image_head is None and "image_head" not in model.trainable_modules()


def test_init_parts_takes_the_pretrained_encoder_and_leaves_the_action_dit_fresh(tmp_path):
    torch.set_num_threads(1)
    pre = tiny_cfg("encoder=static_image", "mode=image_only", "train.steps=2")
    train(pre, SyntheticSamples(pre, num_samples=8), tmp_path / "pre", progress=False)
    saved = ckpt.load_checkpoint(tmp_path / "pre")
    weights = saved.ema_state() or saved.model_state()
    assert any(k.startswith("image_head.") for k in weights)

    cfg = tiny_cfg("encoder=static_image", "mode=action_only", "train.seed=3")
    torch.manual_seed(3)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    fresh = {k: v.clone() for k, v in model.action_dit.state_dict().items()}
    report = init_from.init_weights_from(model, tmp_path / "pre", config=cfg, parts=["image_encoder", "text_encoder"])
    assert report["not_taken"] == ["action_dit"] and set(report["loaded"]) >= {"image_encoder", "text_encoder"}
    assert all(torch.equal(v, weights[f"image_encoder.{k}"]) for k, v in model.image_encoder.state_dict().items())
    assert all(torch.equal(v, fresh[k]) for k, v in model.action_dit.state_dict().items())
    assert not all(torch.equal(fresh[k], weights[f"action_dit.{k}"]) for k in fresh)  # another init (seed 3)
    # the pretraining head has no place in the fine-tuning model: reported unused, never an error
    assert report["unused"] and all(n.startswith("image_head.") for n in report["unused"])
    assert any("not taken" in line for line in init_from.describe_init(report))
    with pytest.raises(ckpt.CheckpointError, match="unknown part"):
        init_from.init_weights_from(model, tmp_path / "pre", config=cfg, parts=["encoder"])


# ------------------------------------------------------------------------------------------
# cells and pretraining runs
# ------------------------------------------------------------------------------------------


def _parser():
    from dit4dit.cli.analyze import register

    parser = argparse.ArgumentParser(prog="dit4dit")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_prior_study_dry_run_lists_the_pretraining_runs_and_every_arm(tmp_path, capsys):
    from dit4dit.analyze.grid import AnalysisError
    from dit4dit.analyze.prior import (CANDIDATE_TASKS, PRETRAIN_TASKS, SIMILAR_TO_TARGETS, TARGET_TASKS)

    parser = _parser()
    out, pre = tmp_path / "study", tmp_path / "mw_pretrain"
    argv = ["analyze", "--study", "prior", "--dataset", str(tmp_path / "mw_targets"), "--pretrain-dataset", str(pre),
            "--out", str(out), "--seeds", "0,1,2,3,4", "--steps", "40", "--pretrain-steps", "60", "--dry-run", "--json",
            "--set", "schema=metaworld_sawyer"]
    args = parser.parse_args(argv)
    plan = args.func(args)
    assert json.loads(capsys.readouterr().out) == plan
    assert [p["pretrain"] for p in plan["pretrain"]] == ["video", "static"]
    assert all(p["train_steps"] == 60 for p in plan["pretrain"])
    assert "mode=video_only" in plan["pretrain"][0]["overrides"]
    assert {"encoder=static_image", "mode=image_only"} <= set(plan["pretrain"][1]["overrides"])
    cells = {c["cell"]: c for c in plan["cells"]}
    assert list(cells) == ["prior/video_prior_5", "prior/video_prior_10", "prior/video_prior_20", "prior/scratch_5",
                           "prior/scratch_10", "prior/scratch_20", "prior/static_prior_5", "prior/static_prior_10",
                           "prior/static_prior_20", "prior/decoupled_10", "prior/cotrain_10"]
    assert plan["runs"] == 55 and plan["seeds"] == [0, 1, 2, 3, 4]  # no variants with --study prior
    video, static = (str((out / "pretrain" / n / "train").resolve()) for n in ("video", "static"))
    for name, c in cells.items():
        assert len(c["stages"]) == 1 and c["train_steps"] == [40]  # the same fine-tuning steps for every arm
        demos = int(name.rsplit("_", 1)[1])
        assert f"train.episodes_per_task={demos}" in c["stages"][0]
        arm = name.split("/")[1].rsplit("_", 1)[0]
        assert c["init_from"] == {"video_prior": video, "decoupled": video, "static_prior": static}.get(arm)
        assert c["features"] == (arm in ("video_prior", "scratch", "static_prior"))
    assert "train.freeze_video=true" in cells["prior/decoupled_10"]["stages"][0]
    assert "encoder=static_image" in cells["prior/static_prior_5"]["stages"][0]
    assert f"train.video_datasets={json.dumps([str(pre.resolve())])}" in cells["prior/cotrain_10"]["stages"][0]
    assert 'train.init_parts=["video_dit","text_encoder"]' in cells["prior/video_prior_5"]["stages"][0]

    # the text form names every pretraining run once
    args = parser.parse_args([a for a in argv if a != "--json"] + ["--arms", "video_prior,cotrain", "--demos", "3"])
    args.func(args)
    text = capsys.readouterr().out
    assert "pretrain/video" in text and "pretrain/static" not in text
    assert "10 runs (2 cells x 5 seeds) after 1 pretraining run(s)" in text
    assert "stored" not in text

    # runs with a stored result, in OUT or in the results copy, are listed as such
    copy = tmp_path / "committed"
    for home, cell, seed in ((out, "video_prior_5", 1), (copy, "video_prior_5", 0), (copy, "cotrain_10", 4)):
        (home / "runs" / "prior" / cell / f"seed_{seed}").mkdir(parents=True)
        (home / "runs" / "prior" / cell / f"seed_{seed}" / "result.json").write_text("{}")
    args = parser.parse_args(argv + ["--results-copy", str(copy)])
    plan = args.func(args)
    capsys.readouterr()
    stored = {c["cell"]: c["stored_seeds"] for c in plan["cells"] if c["stored_seeds"]}
    assert stored == {"prior/video_prior_5": [0, 1], "prior/cotrain_10": [4]} and plan["stored_runs"] == 3

    with pytest.raises(AnalysisError, match="--pretrain-dataset"):
        args = parser.parse_args([a for a in argv if a not in ("--pretrain-dataset", str(pre))])
        args.func(args)
    with pytest.raises(AnalysisError, match="unknown arm"):
        args = parser.parse_args(argv + ["--arms", "video_prior,imagenet"])
        args.func(args)
    with pytest.raises(AnalysisError, match="belong to --study prior"):
        args = parser.parse_args([a for a in argv if a not in ("--study", "prior")])
        args.func(args)

    # the task lists: targets and the tasks like them stay out of the pretraining video
    assert len(PRETRAIN_TASKS) >= 30 and set(PRETRAIN_TASKS) <= set(CANDIDATE_TASKS)
    assert not set(PRETRAIN_TASKS) & (set(TARGET_TASKS) | set(SIMILAR_TO_TARGETS))
    assert {t for t, _ in SIMILAR_TO_TARGETS.values()} <= set(TARGET_TASKS) and len(TARGET_TASKS) == 5
    from dit4dit.envs.metaworld import INSTRUCTIONS

    assert set(CANDIDATE_TASKS) | set(SIMILAR_TO_TARGETS) | set(TARGET_TASKS) == set(INSTRUCTIONS)


# ------------------------------------------------------------------------------------------
# the paired bootstrap
# ------------------------------------------------------------------------------------------


def test_claim_verdicts_follow_the_intervals():
    from dit4dit.analyze.prior import claim_verdicts

    def row(a, b, lo, hi, n=5):
        return {"a": a, "b": b, "demos_a": n, "demos_b": n, "difference": (lo + hi) / 2, "ci": [lo, hi], "seeds": 5}

    v = {x["claim"]: x["verdict"] for x in claim_verdicts([
        row("video_prior", "scratch", 0.02, 0.2), row("video_prior", "scratch", -0.1, 0.1, 10),  # for, neutral
        row("video_prior", "static_prior", -0.3, -0.05), row("video_prior", "static_prior", 0.01, 0.1, 10),
        row("video_prior", "decoupled", -0.2, -0.01, 10)])}
    assert v == {"a video prior raises success": "supported",
                 "a video prior is more sample-efficient than a static one (paper: more than 10x)": "mixed",
                 "joint fine-tuning beats frozen features": "contradicted"}
    assert {x["verdict"] for x in claim_verdicts([row("video_prior", "scratch", -0.1, 0.1)])} == \
        {"not shown", "not measured"}


def test_verdicts_are_marked_interim_until_every_planned_run_has_a_result():
    from dit4dit.analyze.prior import markdown_section, runs_finished

    rows = [{"group": "prior", "seeds": [0, 1, 2]}, {"group": "prior", "seeds": [0, 1]},
            {"group": "baseline", "seeds": [0, 1, 2]}]  # another study's rows do not count
    assert runs_finished(rows, [0, 1, 2]) == {"finished": 5, "planned": 6}
    comparisons = [{"a": "video_prior", "b": "scratch", "demos_a": 5, "demos_b": 5, "difference": 0.1,
                    "ci": [0.02, 0.2], "pairs": 100, "seeds": 3, "excludes_zero": True}]
    text = "\n".join(markdown_section({}, comparisons, {}, runs_finished(rows, [0, 1, 2])))
    assert "INTERIM: 5 of 6 planned runs have finished" in text and "the study's verdicts" not in text
    rows[1]["seeds"].append(2)
    text = "\n".join(markdown_section({}, comparisons, {}, runs_finished(rows, [0, 1, 2])))
    assert "All 6 planned runs have finished: these are the study's verdicts." in text and "INTERIM" not in text


def test_paired_bootstrap_on_synthetic_outcomes():
    from dit4dit.analyze.prior import paired_bootstrap, paired_differences

    rng = np.random.default_rng(0)
    same = {s: {"push": rng.integers(0, 2, 20).tolist(), "reach": rng.integers(0, 2, 20).tolist()} for s in range(5)}
    # identical arms: every difference is 0, so is the interval
    b = paired_bootstrap(paired_differences(same, same), resamples=2000)
    assert b["difference"] == 0 and b["ci"] == [0.0, 0.0] and not b["excludes_zero"]
    assert b["pairs"] == 200 and b["seeds"] == 5
    # two arms with the same success rate, drawn independently: the interval holds 0
    other = {s: {t: rng.binomial(1, 0.5, 20).tolist() for t in ("push", "reach")} for s in range(5)}
    b = paired_bootstrap(paired_differences(same, other), resamples=2000)
    assert b["ci"][0] < 0 < b["ci"][1] and not b["excludes_zero"]
    # a clear difference (90% vs 30%) excludes 0, with the sign of A - B
    good = {s: {t: rng.binomial(1, 0.9, 20).tolist() for t in ("push", "reach")} for s in range(5)}
    bad = {s: {t: rng.binomial(1, 0.3, 20).tolist() for t in ("push", "reach")} for s in range(5)}
    b = paired_bootstrap(paired_differences(good, bad), resamples=2000)
    assert b["excludes_zero"] and 0.3 < b["ci"][0] < b["difference"] < b["ci"][1] < 0.9
    b = paired_bootstrap(paired_differences(bad, good), resamples=2000)
    assert b["excludes_zero"] and b["ci"][1] < 0
    # pairing: the same seed, task and episode index; unmatched seeds and tasks are left out
    d = paired_differences({0: {"a": [1, 1, 0], "b": [1]}, 1: {"a": [1]}}, {0: {"a": [0, 1], "c": [0]}, 2: {"a": [0]}})
    assert list(d) == [0] and d[0].tolist() == [1.0, 0.0]
    assert paired_bootstrap({}) is None
    # outcomes from a MetaWorld evaluation's per-episode detail (episode order, not result order)
    from dit4dit.analyze.prior import episode_outcomes
    from dit4dit.analyze.runner import _normalise

    mw = {"per_task": {"push-v3": {"successes": 1, "episodes": 2, "success_rate": 0.5}}, "ci95": [0, 1],
          "episodes_detail": [{"task": "push-v3", "episode": 1, "success": True},
                              {"task": "push-v3", "episode": 0, "success": False}]}
    assert episode_outcomes(_normalise(mw)) == {"push-v3": [0, 1]}
    del mw["episodes_detail"]
    assert episode_outcomes(_normalise(mw)) is None  # no per-episode detail: no pairs
    # deterministic for a given seed
    assert paired_bootstrap(paired_differences(good, bad), resamples=500) == \
        paired_bootstrap(paired_differences(good, bad), resamples=500)


# ------------------------------------------------------------------------------------------
# a tiny pilot of the whole study on toy_reach
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from dit4dit.envs.toy import collect

    root = tmp_path_factory.mktemp("toy") / "data"
    collect(str(root), 6, seed=0, size=64)  # 6 successful episodes, both tasks
    return root


def test_prior_study_pilot_end_to_end_resume_and_report(toy_data, tmp_path, monkeypatch):
    from dit4dit.analyze.runner import Study, run_analysis

    torch.set_num_threads(1)
    out = tmp_path / "study"
    # the toy dataset stands in for both the demonstrations and the pretraining video
    study = Study(dataset=str(toy_data), out=str(out), overrides=tuple(TOY), variants=(), study="prior",
                  pretrain_dataset=str(toy_data), pretrain_steps=2, steps=2, demos=(1, 2), demos_de=(1,),
                  seeds=(0, 1), eval_episodes=2, feature_points=24)
    logs: list[str] = []
    report = run_analysis(study, progress=False, log=logs.append)

    for name in ("video", "static"):  # each pretraining run once, shared by every cell and seed
        assert (out / "pretrain" / name / "train" / "checkpoints").is_dir()
    assert sum("pretraining video" in m and "training to step 2" in m for m in logs) == 1
    pre_static = json.loads((out / "pretrain" / "static" / "config.json").read_text())
    assert pre_static["mode"] == "image_only" and pre_static["train"]["steps"] == 2
    rows = {r["cell"]: r for r in report["cells"]}
    assert set(rows) == {"video_prior_1", "video_prior_2", "scratch_1", "scratch_2", "static_prior_1",
                         "static_prior_2", "decoupled_1", "cotrain_1"}
    for r in rows.values():
        assert r["seeds"] == [0, 1] and r["episodes"] == 8 and r["arm"] in r["cell"]
    for arm in ("video_prior", "scratch", "static_prior"):  # the feature analysis on arms a, b, c
        assert rows[f"{arm}_1"]["silhouette_phase_within_task"] is not None
    assert rows["decoupled_1"]["silhouette_phase"] is None
    runs = out / "runs" / "prior"
    init = json.loads((runs / "video_prior_1" / "seed_1" / "train" / "init.json").read_text())
    assert init["checkpoint"].startswith(str((out / "pretrain" / "video" / "train").resolve()))
    assert init["loaded"]["video_dit"] > 0 and init["not_taken"] == ["action_dit"]
    init = json.loads((runs / "static_prior_2" / "seed_0" / "train" / "init.json").read_text())
    assert init["loaded"]["image_encoder"] > 0 and init["not_taken"] == ["action_dit"]
    assert not (runs / "scratch_1" / "seed_0" / "train" / "init.json").exists()
    result = json.loads((runs / "cotrain_1" / "seed_0" / "result.json").read_text())
    assert result["configs"][0]["train"]["video_datasets"] == [str(toy_data.resolve())]
    # per-episode outcomes are stored, and the paired differences use them
    outcomes = result["eval"]["per_task"]
    assert all(len(v["outcomes"]) == 2 and sum(v["outcomes"]) == v["successes"] for v in outcomes.values())
    comps = {(c["a"], c["demos_a"], c["b"], c["demos_b"]): c for c in report["comparisons"]}
    assert set(comps) == {("video_prior", n, b, n) for b in ("static_prior", "scratch") for n in (1, 2)} | {
        ("video_prior", 1, "decoupled", 1), ("video_prior", 1, "cotrain", 1),  # d and e at their one count
        ("video_prior", 1, "static_prior", 2), ("video_prior", 1, "scratch", 2)}  # fewest against most
    for c in comps.values():
        assert c["pairs"] == 8 and c["seeds"] == 2 and c["ci"][0] <= c["difference"] <= c["ci"][1]
    claims = {v["claim"]: v for v in report["claims"]}
    assert len(claims) == 3 and all(v["verdict"] in ("supported", "contradicted", "mixed", "not shown")
                                    for v in claims.values())
    assert len(claims["a video prior raises success"]["differences"]) == 2
    md = (out / "results.md").read_text()
    assert "## Video prior vs static prior" in md and "(a) − (c)" in md and "(a) − (b)" in md
    assert "| 1 vs 2 |" in md and "| joint fine-tuning beats frozen features |" in md
    assert "--study prior" in md and "--pretrain-dataset" in md and "--demos 1,2" in md
    assert (out / "plots" / "prior_curve.png").is_file()

    # rerun: nothing trains again (pretraining included), nothing is evaluated again
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("dit4dit.train.trainer.train", no_training)
    logs.clear()
    run_analysis(study, progress=False, log=logs.append, evaluator=lambda p: pytest.fail("evaluated again"))
    assert sum("trained already" in m for m in logs) == 2 and sum("done already" in m for m in logs) == 16
    monkeypatch.undo()

    # a fresh machine: only the runs' result.json files are carried over (`results_copy`, a folder a
    # study spanning sessions commits); the pretraining runs are rebuilt by the same command (the
    # same tensors), so no cell trains or evaluates again
    copy = tmp_path / "committed"
    keep = Study(**{**study.__dict__, "results_copy": str(copy)})
    run_analysis(keep, train=False, log=logs.append)  # a report-only pass fills the copy
    assert len(list(copy.glob("runs/prior/*/seed_*/result.json"))) == 16 and (copy / "results.md").is_file()
    assert f"--results-copy {copy}" in (copy / "results.md").read_text()
    elsewhere = Study(**{**keep.__dict__, "out": str(tmp_path / "second_machine")})
    monkeypatch.setattr("dit4dit.analyze.runner._train_stages", no_training)
    logs.clear()
    run_analysis(elsewhere, progress=False, log=logs.append, evaluator=lambda p: pytest.fail("evaluated again"))
    assert "took 16 finished run(s) from " + str(copy) in logs
    assert sum("training to step 2" in m for m in logs) == 2 and sum("done already" in m for m in logs) == 16
    monkeypatch.undo()

    # the video prior trains further: the cells that start from it train anew, the others stay
    small = Study(**{**study.__dict__, "pretrain_steps": 3, "arms": ("video_prior", "scratch"), "demos": (1,),
                     "seeds": (0,)})
    logs.clear()
    run_analysis(small, progress=False, log=logs.append)
    assert any("pretraining video" in m and "resuming at step 2" in m for m in logs)
    assert any("video_prior_1 seed 0: its pretraining run changed" in m for m in logs)
    assert any("scratch_1 seed 0: done already" in m for m in logs)
    assert list((runs / "video_prior_1" / "seed_0").glob("stale-*/train"))
    init = json.loads((runs / "video_prior_1" / "seed_0" / "train" / "init.json").read_text())
    assert init["step"] == 3


def test_tensor_content_hash_ignores_the_header_order(tmp_path):
    """A prior rebuilt by the same command holds the same tensors, but the safetensors writer orders
    its header differently from run to run: the identity runs compare is the content's."""
    from safetensors.torch import save_file

    from dit4dit.filehash import file_sha256
    from dit4dit.safetensors_header import tensors_sha256

    a = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, str(a), metadata={"x": "1", "y": "2"})
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    reordered = json.dumps({k: header[k] for k in reversed(list(header))}, separators=(",", ":")).encode()
    reordered += b" " * (n - len(reordered))  # same length: the data offsets stay valid
    b = tmp_path / "b.safetensors"
    b.write_bytes(raw[:8] + reordered + raw[8 + n:])
    assert file_sha256(a) != file_sha256(b) and tensors_sha256(a) == tensors_sha256(b)
    c = tmp_path / "c.safetensors"
    c.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # one bit of one tensor
    assert tensors_sha256(c) != tensors_sha256(a)
