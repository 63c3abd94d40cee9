"""Open-loop evaluation on a dataset (`dit4dit eval offline`, `dit4dit.eval.offline`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lerobot_fixtures, test_train's tiny config

from lerobot_fixtures import make_v30_dataset  # noqa: E402
from test_train import tiny_cfg  # noqa: E402

from dit4dit.cli import main  # noqa: E402
from dit4dit.eval.offline import OfflineEvalError, evaluate_offline, parse_episodes  # noqa: E402
from dit4dit.models.dit4dit import DiT4DiT  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step joint run and a 2-step video-only run on a 4-episode dataset (2 tasks)."""
    tmp = tmp_path_factory.mktemp("offline")
    ds = make_v30_dataset(tmp / "ds", episodes=4, length=14, size=(32, 32))
    torch.manual_seed(0)
    train(tiny_cfg("train.episodes_per_task=1"), ds, tmp / "joint", progress=False)
    train(tiny_cfg("mode=video_only", "train.steps=2"), ds, tmp / "video", progress=False)
    return ds, tmp / "joint", tmp / "video"


def test_parse_episodes():
    assert parse_episodes("3,0-2,2") == [0, 1, 2, 3]
    assert parse_episodes(None) is None and parse_episodes("") is None
    with pytest.raises(OfflineEvalError, match="backwards"):
        parse_episodes("5-3")
    with pytest.raises(OfflineEvalError, match="'x'"):
        parse_episodes("1,x")


def test_offline_evaluation_of_a_joint_checkpoint(trained):
    ds, joint, _ = trained
    r = evaluate_offline(joint, ds, episodes=[2, 3], samples=10, batch_size=4, seed=0)
    assert r["episodes"] == [2, 3] and r["samples"] == 10 and r["step"] == 4
    assert set(r["losses"]) == {"loss", "loss_action", "loss_video"}
    a = r["actions"]
    assert list(a["mae_per_dim"]) == ["dx", "dy", "dz", "gripper"]  # the schema's names (metaworld_sawyer)
    assert len(a["mae_per_chunk_step"]) == 8  # the tiny preset's action horizon
    assert sum(t["samples"] for t in a["per_task"].values()) == 10
    assert all(np.isfinite(v) and v > 0 for v in (a["mae"], a["rmse"], a["first_action_mae"], a["center_baseline_mae"]))
    assert a["rmse"] >= a["mae"]
    # the same seed gives the same numbers; another seed other draws
    again = evaluate_offline(joint, ds, episodes=[2, 3], samples=10, batch_size=4, seed=0)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in r.items() if k != "seconds"}
    other = evaluate_offline(joint, ds, episodes=[2, 3], samples=10, batch_size=4, seed=1)
    assert other["losses"]["loss_action"] != r["losses"]["loss_action"]


def test_a_policy_that_outputs_the_normaliser_centre_scores_the_centre_baseline(trained, monkeypatch):
    """Checks the unnormalisation and the masking of padded steps: a chunk of normalised zeros
    must score exactly the centre baseline, dimension by dimension."""
    ds, joint, _ = trained

    def centre(self, cond_video, state, instruction=None, **kw):
        return torch.zeros(cond_video.shape[0], self.cfg.action.action_horizon, self.cfg.action.action_dim)

    monkeypatch.setattr(DiT4DiT, "predict_action", centre)
    a = evaluate_offline(joint, ds, samples=0, batch_size=8)["actions"]
    assert a["mae"] == pytest.approx(a["center_baseline_mae"], rel=1e-6)
    assert a["mae_per_dim"] == pytest.approx(a["center_baseline_mae_per_dim"], rel=1e-6)
    # by hand from the recorded actions: every sample (episode, t) scores actions t .. t + 7 that
    # exist (the padding past the episode end is not scored)
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.policy import Policy

    proc = Policy.from_checkpoint(joint).processor
    c = proc.unnormalize_actions(np.zeros((1, 1, proc.action_dim), np.float32))[0, 0].astype(np.float64)
    data = LeRobotDataset(ds)
    errs = []
    for ep in data.episodes:
        act = data.episode_data(ep.index)["action"].astype(np.float64)
        for t in range(len(act)):
            errs.append(np.abs(c - act[t:t + 8]))
    assert a["center_baseline_mae"] == pytest.approx(float(np.concatenate(errs).mean()), rel=1e-5)


def test_trace_figures(trained, tmp_path):
    ds, joint, _ = trained
    r = evaluate_offline(joint, ds, episodes=[1, 2, 3], samples=4, plot_episodes=2, plot_dir=tmp_path / "plots")
    assert [Path(p).name for p in r["plots"]] == ["episode_1.png", "episode_2.png"]
    assert all(Path(p).stat().st_size > 1000 for p in r["plots"])
    with pytest.raises(OfflineEvalError, match="plot_dir"):
        evaluate_offline(joint, ds, samples=4, plot_episodes=1)


def test_video_only_checkpoint_reports_its_video_loss_only(trained):
    ds, _, video = trained
    r = evaluate_offline(video, ds, samples=6, batch_size=3)
    assert set(r["losses"]) == {"loss", "loss_video"} and "actions" not in r
    assert np.isfinite(r["losses"]["loss_video"])


def test_missing_episodes_are_named(trained):
    ds, joint, _ = trained
    with pytest.raises(OfflineEvalError, match=r"no episode \[7, 9\].*4 episodes, indices 0-3"):
        evaluate_offline(joint, ds, episodes=[1, 7, 9])


def test_cli_json_and_out_file(trained, tmp_path, capsys):
    ds, joint, _ = trained
    out = tmp_path / "offline.json"
    assert main(["eval", "offline", "--checkpoint", str(joint), "--dataset", str(ds), "--episodes", "0-1",
                 "--samples", "4", "--threads", "1", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 4 and printed["episodes"] == [0, 1]
    assert json.loads(out.read_text())["actions"]["mae"] == printed["actions"]["mae"]
    assert main(["eval", "offline", "--checkpoint", str(joint), "--dataset", str(ds), "--episodes", "12"]) == 2
