"""The `dit4dit` command end to end on CPU: collect -> train a few steps -> evaluate -> bench."""

import json
import subprocess
import sys

import pytest

from dit4dit.cli import main

SMALL = ["--set", "video.num_layers=2", "--set", "feature_blocks=1", "--set", "action.num_layers=2",
         "--set", "train.batch_size=4", "--set", "train.num_workers=0", "--set", "train.log_every=1",
         "--set", "train.warmup_steps=1"]


def run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_help_of_every_command():
    out = subprocess.run([sys.executable, "-m", "dit4dit.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("info", "bench", "collect", "train", "demo", "dataset", "stats"):
        assert cmd in out.stdout


def test_info_json(capsys):
    r = run_json(capsys, ["info", "--preset", "cosmos-2b", "--json"])
    assert 2.0e9 < r["parameters"]["video_dit"] < 2.1e9
    assert r["config"]["feature_blocks"] == 18


def test_bad_override_is_a_clear_error(capsys):
    assert main(["info", "--preset", "tiny", "--set", "feature_blocks=99"]) == 2
    assert "feature_blocks=99" in capsys.readouterr().err


@pytest.mark.slow
def test_collect_train_eval_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    r = run_json(capsys, ["collect", "toy", "--episodes", "4", "--out", str(data), "--json"])
    assert r["episodes"] == 4 and r["expert_success_rate"] > 0
    info = run_json(capsys, ["dataset", "info", str(data), "--json"])
    assert info["version"] == "v3.0" and info["episodes"] == 4
    run = tmp_path / "run"
    r = run_json(capsys, ["train", "--preset", "tiny", "--dataset", str(data), "--out", str(run),
                          "--set", "schema=toy_reach", "--set", "train.steps=3", "--set", "train.eval_every=3",
                          "--eval-episodes", "1", "--replan-every", "4", *SMALL, "--json"])
    assert r["step"] == 3
    assert (run / "config.json").is_file()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and 0.0 <= evals[-1]["success_rate"] <= 1.0  # closed-loop evaluation ran during training

    from dit4dit.eval.toy import evaluate
    from dit4dit.policy import Policy
    from dit4dit.train.checkpoint import load_policy

    model, processor, cfg = load_policy(run, "cpu")
    res = evaluate(Policy(model, processor), 1, replan_every=4)
    assert res["episodes"] == 2 and 0.0 <= res["success_rate"] <= 1.0
    assert set(res["per_task"]) == {"move to the red square", "move to the blue square"}


def test_bench_inference_tiny(capsys):
    r = run_json(capsys, ["bench", "inference", "--preset", "tiny", "--iters", "2", "--warmup", "1",
                          "--threads", "1", "--json"])
    assert r["max_abs_diff_ours_vs_naive"] < 1e-5  # the early exit computes the same actions
    assert r["ours"]["median_ms"] > 0 and r["naive"]["median_ms"] > 0
    assert "cpu" in r["device"] and r["precision"] == "float32"


def test_bench_inference_static_image_baseline(capsys):
    """The static-image baseline has no video DiT: its own policy step is timed, without a naive path."""
    r = run_json(capsys, ["bench", "inference", "--preset", "tiny", "--set", "encoder=static_image", "--set",
                          "mode=action_only", "--iters", "2", "--warmup", "1", "--threads", "1", "--json"])
    assert r["encoder"] == "static_image" and r["ours"]["median_ms"] > 0 and r["ours"]["n"] == 2
    assert r["naive"] is None and r["speedup_median"] is None and r["max_abs_diff_ours_vs_naive"] is None
    assert set(r["breakdown_ms"]) == {"encode", "features", "action_steps"} and r["breakdown_ms"]["features"] > 0


def test_missing_dataset_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["dataset", "info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope" in err and "Traceback" not in err


def test_progress_bars_start_no_monitor_thread():
    """Progress bars start no background thread (tqdm's monitor is turned off by the package), so
    data-loader workers fork from a process without one."""
    import threading

    from dit4dit.cli.output import progress_bar

    update = progress_bar(3, "t")
    update(1, 3)  # an open bar: tqdm would have started its monitor thread by now
    assert "TMonitor" not in {type(t).__name__ for t in threading.enumerate()}
    update(3, 3)


def test_train_with_action_free_video_and_init_from_the_command_line(tmp_path, capsys):
    """`train --set mode=video_only` on a folder of video files, then `train --video-dataset ...
    --init RUN`: the flags become train.video_datasets / train.init_from in the run's config."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_action_free import write_video

    videos = tmp_path / "videos"
    write_video(videos / "a.mp4", 16)
    write_video(videos / "b.webm", 16, shade=90)
    data = tmp_path / "data"
    run_json(capsys, ["collect", "toy", "--episodes", "3", "--out", str(data), "--json"])
    small = [*SMALL, "--set", "inputs.image_size=[32,32]", "--set", "train.steps=2"]
    prior = tmp_path / "prior"
    r = run_json(capsys, ["train", "--preset", "tiny", "--dataset", str(videos), "--out", str(prior),
                          "--set", "mode=video_only", "--default-instruction", "reach the target", *small, "--json"])
    assert r["step"] == 2
    ft = tmp_path / "ft"
    r = run_json(capsys, ["train", "--preset", "tiny", "--dataset", str(data), "--out", str(ft),
                          "--set", "schema=toy_reach", "--video-dataset", str(videos), "--init", str(prior),
                          "--default-instruction", "reach the target", *small, "--json"])
    assert r["step"] == 2 and r["init"]["loaded"]["video_dit"] > 0
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["train"]["video_datasets"] == [str(videos.resolve())]
    assert cfg["train"]["init_from"] == str(prior.resolve())
    # a folder without videos is an error that names it
    (tmp_path / "empty").mkdir()
    assert main(["train", "--preset", "tiny", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "x"),
                 "--set", "mode=video_only", *small]) == 2
    assert "no video files" in capsys.readouterr().err
