"""`dit4dit demo` end to end on CPU: a few-episode collect, a few training steps, a short
closed-loop evaluation and the report (MetaWorld suite; the toy suite needs no simulator)."""

from __future__ import annotations

import json

import pytest

from dit4dit.cli import main


def _run(tmp_path, env, *extra):
    out = tmp_path / env
    rc = main(["demo", "--env", env, "--out", str(out), "--steps", "2", "--eval-episodes", "1", "--workers", "1",
               "--threads", "1", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1", *extra])
    assert rc in (None, 0)
    report = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    return out, report, md


@pytest.mark.slow
def test_demo_metaworld_end_to_end(tmp_path):
    pytest.importorskip("metaworld")
    from dit4dit.demo import METAWORLD_TASKS, SUITES, run_demo

    out, report, md = _run(tmp_path, "metaworld", "--episodes", "1,push=2", "--eval-max-steps", "40",
                           "--minutes", "7.5")
    assert report["task_suite"] == "metaworld" and report["train"]["step"] == 2
    # training gets the budget that collection left, less the suite's evaluation reserve
    reserve = SUITES["metaworld"].eval_minutes
    assert report["minutes"] == 7.5 and 0 < reserve < 7.5
    assert report["train_minutes"] == pytest.approx(7.5 - reserve - report["timings"]["collect_s"] / 60, abs=1e-6)
    assert report["train"]["time_budget"]["seconds"] == pytest.approx(0.95 * 60 * report["train_minutes"], rel=1e-3)
    assert set(report["eval"]["per_task"]) == set(METAWORLD_TASKS)
    assert all(t["episodes"] == 1 for t in report["eval"]["per_task"].values())
    assert report["collect"]["episodes"] == len(METAWORLD_TASKS) + 1  # push's own count
    assert {t: c["kept"] for t, c in report["collect"]["tasks"].items()} == \
        {"button-press-topdown-v3": 1, "drawer-open-v3": 1, "push-v3": 2}
    for name in ("training_curves.png", "predicted_vs_real.png"):
        assert (out / "media" / name).is_file()
    assert "| push-v3 |" in md and "Expert demonstrations" in md and "![rollout](media/eval/videos/" in md
    assert report["overrides"][: len(SUITES["metaworld"].overrides)] == list(SUITES["metaworld"].overrides)
    # the trained checkpoint tells the probes which view and size to render for it
    from dit4dit.eval.metaworld import load_checkpoint_scene

    _, camera, size = load_checkpoint_scene(out / "run")
    assert camera == SUITES["metaworld"].camera == report["camera"] and tuple(size) == (64, 64)
    # a second run reuses the dataset and the finished run (no new training step)
    again = run_demo(out, env="metaworld", steps=2, eval_episodes=1, workers=1, eval_max_steps=5,
                     overrides=["train.batch_size=4", "train.warmup_steps=1"])
    assert again["train"]["steps_run"] == 0 and again["eval"]["protocol"]["max_steps"] == 5


def test_demo_episode_counts_are_checked_before_any_work(tmp_path):
    from dit4dit.demo import SUITES, run_demo
    from dit4dit.envs.metaworld import MetaWorldError

    assert SUITES["metaworld"].count(SUITES["metaworld"].episodes) == 360  # the default: 200 of push, 80 of each other task
    with pytest.raises(ValueError, match="the toy suite takes one number"):
        run_demo(tmp_path / "toy", env="toy", episodes="80,push=200")
    with pytest.raises(MetaWorldError, match="names reach-v3"):
        run_demo(tmp_path / "mw", env="metaworld", episodes="80,reach=3")
    assert not (tmp_path / "toy").exists() and not (tmp_path / "mw").exists()


def test_demo_toy_time_limit_stops_training_with_a_checkpoint(tmp_path):
    out, report, md = _run(tmp_path, "toy", "--episodes", "6", "--steps", "100000", "--train-minutes", "0.05")
    tr = report["train"]
    assert 0 < tr["step"] < 100000 and (out / "run" / "checkpoints").is_dir()
    assert tr["time_budget"]["seconds"] == pytest.approx(0.95 * 0.05 * 60)
    # the run plans the steps that fit in 95% of the limit; the limit stops it if setup ate that time
    if tr["interrupted"]:
        assert "stopped by the 0.05-minute training limit" in md
    else:
        assert tr["step"] == tr["time_budget"]["planned_steps"]
        assert f"Trained {tr['step']} of 100000 steps (as many as fit in the 0.05-minute training limit)" in md


def test_demo_rejects_unknown_suite(tmp_path):
    from dit4dit.demo import run_demo

    with pytest.raises(ValueError, match="unknown demo suite 'mujoco'"):
        run_demo(tmp_path, env="mujoco")
