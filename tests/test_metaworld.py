"""MetaWorld plumbing: expert collection into a LeRobot v3.0 dataset, closed-loop evaluation,
the train/eval layout split, the CLI. Needs the `metaworld` extra (skipped without it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("metaworld")

from dit4dit.config import InputConfig  # noqa: E402
from dit4dit.data.lerobot import DatasetError, LeRobotDataset  # noqa: E402
from dit4dit.data.processor import Processor  # noqa: E402
from dit4dit.data.schema import get_schema  # noqa: E402
from dit4dit.envs import metaworld as mw  # noqa: E402
from dit4dit.eval.metaworld import episode_layouts, evaluate  # noqa: E402

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw") / "ds"
    r = mw.collect(TASK, 1, out, image_size=64, seed=3, workers=1)
    return out, r


def test_layout_split_is_disjoint():
    train = {mw.train_layout(i) for i in range(200)}
    held_out = {mw.eval_layout(i) for i in range(50)}
    assert not train & held_out
    assert train | held_out == set(range(250))  # five MT1 seeds, 40 + 10 layouts each
    assert mw.TRAIN_LAYOUTS == tuple(range(40)) and mw.EVAL_LAYOUTS == tuple(range(40, 50))
    assert all(mw.is_train_layout(v) for v in train) and not any(mw.is_train_layout(v) for v in held_out)
    for seed in (0, 7, 39, 123):
        attempts = [mw.layout_for_attempt(a, seed) for a in range(200)]
        assert set(attempts) <= {mw.train_layout(i) for i in range(400)} and len(set(attempts)) == 200
    # the layouts are a fixed function of LAYOUT_SEED, and distinct across seeds
    layouts = [*range(50), 50, 95, 140]
    vecs = mw.layout_vectors(TASK, layouts)
    assert vecs.shape[0] == len(layouts)
    assert len({v.round(6).tobytes() for v in vecs}) == len(layouts)
    fresh = mw._benchmark.__wrapped__(TASK, mw.LAYOUT_SEED + 1)  # a new MT1: same seed, same layouts
    env = fresh.train_classes[TASK]()
    env.set_task(fresh.train_tasks[45])
    np.testing.assert_array_equal(np.asarray(env._last_rand_vec), vecs[layouts.index(95)])
    env.close()
    with pytest.raises(mw.MetaWorldError, match="layout -1"):
        mw.layout_task(TASK, -1)


def test_collect_writes_a_schema_dataset(dataset):
    out, r = dataset
    assert r["episodes"] == 1 and r["tasks"][TASK]["kept"] == 1
    assert r["tasks"][TASK]["expert_success_rate"] == 1.0
    assert r["frames"] > 20 and r["frames_per_s"] > 0
    ds = LeRobotDataset(out)
    schema = get_schema("metaworld_sawyer").check(ds)  # raises on any mismatch
    assert schema.camera_keys == [mw.IMAGE_KEY]
    standard = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
    assert set(ds.features) - standard == {mw.IMAGE_KEY, mw.STATE_KEY, mw.ACTION_KEY}
    assert ds.num_episodes == 1 and ds.fps == mw.CONTROL_FPS
    assert ds.task(0) == "press the button from the top"
    d = ds.episode_data(0)
    assert d[mw.STATE_KEY].shape == (ds.num_frames, 4) and d[mw.ACTION_KEY].shape == (ds.num_frames, 4)
    assert np.all(np.abs(d[mw.ACTION_KEY]) <= 1.0)
    assert set(np.unique(d[mw.ACTION_KEY][:, 3])) <= {-1.0, 1.0}  # binary gripper, as the schema says
    frames = ds.frames(mw.IMAGE_KEY, 0, [0, ds.num_frames - 1])
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == np.uint8
    meta = json.loads((out / "meta" / "metaworld.json").read_text())
    assert all(e["layout"] in mw.TRAIN_LAYOUTS for e in meta["episodes"])
    assert meta["episodes"][0]["layout"] == 3  # seed 3 starts at training layout 3
    # the camera view travels dataset -> processor (checkpoint) -> evaluation protocol
    assert ds.capture == {"env": "metaworld", "cameras": {mw.IMAGE_KEY: "corner4"}}
    proc = Processor.for_dataset(ds, "metaworld_sawyer", InputConfig(image_size=(64, 64)), progress=False)
    assert proc.protocol()["capture"] == ds.capture
    assert Processor.from_dict(json.loads(json.dumps(proc.to_dict()))).protocol()["capture"] == ds.capture
    ds.close()


def test_a_malformed_capture_file_is_named(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset[0], copy)
    (copy / "meta" / "capture.json").write_text(json.dumps({"cameras": {mw.IMAGE_KEY: 4}}))
    with pytest.raises(DatasetError, match=r"capture\.json.*'cameras'"):
        LeRobotDataset(copy)


@pytest.mark.parametrize("name", sorted(mw.CAMERA_VIEWS))
def test_camera_views_look_at_their_target_upside_down(name):
    import mujoco

    view = mw.CAMERA_VIEWS[name]
    rot = np.zeros(9)
    mujoco.mju_quat2Mat(rot, view.quat())
    rot = rot.reshape(3, 3)  # columns: the camera's x, y, z axes in world coordinates
    to_target = np.subtract(view.lookat, view.pos) / np.linalg.norm(np.subtract(view.lookat, view.pos))
    np.testing.assert_allclose(-rot[:, 2], to_target, atol=1e-9)  # it looks at `lookat`
    assert abs(rot[2, 0]) < 1e-9  # image rows stay level
    assert rot[2, 1] < 0  # upside down like corner4, so the usual flip makes its frames upright


def test_camera_views_show_the_goal_larger():
    import mujoco

    def goal_pixels(camera):  # push's goal marker: a small pure-green sphere
        with mw.MetaWorldEnv("push", layout=41, camera=camera, image_size=64) as env:
            img = env.observation()[mw.IMAGE_KEY].astype(int)
            m = env._env.model
            fovy = m.cam_fovy[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, "corner4")]
        green = (img[..., 1] - np.maximum(img[..., 0], img[..., 2])) > 100
        return int(green.sum()), fovy

    plain, fovy_plain = goal_pixels("corner4")
    zoom, fovy_zoom = goal_pixels("corner4_zoom")
    close, fovy_close = goal_pixels("corner4_close")
    assert fovy_plain == 60 and fovy_zoom == mw.CAMERA_VIEWS["corner4_zoom"].fovy == fovy_close
    assert close > zoom > plain >= 1  # the goal is bigger through the narrower / nearer views
    with pytest.raises(mw.MetaWorldError, match="unknown camera 'corner5'.*corner4_close.*corner4_zoom"):
        mw.MetaWorldEnv("push", camera="corner5")


def test_observation_holds_only_what_the_policy_may_see():
    with mw.MetaWorldEnv("drawer-open", layout=41, image_size=32) as env:
        obs = env.observation()
        assert set(obs) == {mw.IMAGE_KEY, mw.STATE_KEY, "prompt"}
        assert obs[mw.IMAGE_KEY].shape == (32, 32, 3) and obs[mw.IMAGE_KEY].dtype == np.uint8
        assert obs[mw.STATE_KEY].shape == (4,) and obs["prompt"] == "open the drawer"
        first = obs[mw.STATE_KEY].copy()
        env.step(np.array([0.0, 0.0, 0.0, -1.0]))
        again = env.reset()  # reset keeps the layout
        np.testing.assert_allclose(again[mw.STATE_KEY], first, atol=1e-6)
        assert env.layout == 41


class TwoFrameOracle(mw.OracleExpertPolicy):
    """The oracle, declaring two conditioning frames 3 steps apart: checks what it is sent."""

    def metadata(self):
        return {**super().metadata(), "num_cond_frames": 2, "frame_stride": 3}

    def infer(self, obs):
        img = obs[mw.IMAGE_KEY]
        assert img.shape == (2, 64, 64, 3) and img.dtype == np.uint8
        assert set(obs) == {mw.IMAGE_KEY, mw.STATE_KEY, "prompt"} and obs["prompt"] == "press the button from the top"
        return super().infer(obs)


def test_evaluation_episodes_get_held_out_layouts_of_their_own():
    assert episode_layouts(20) == [*range(40, 50), *range(90, 100)]
    assert episode_layouts(3, seed=9) == [49, 90, 91]
    assert episode_layouts(5, seed=1, layouts=[3, 7]) == [7, 3, 7, 3, 7]  # a given list is cycled
    with pytest.raises(mw.MetaWorldError, match="layout numbers >= 0"):
        evaluate(mw.OracleExpertPolicy(), TASK, episodes=1, layouts=[-2])


def test_evaluate_oracle_chunked(tmp_path):
    policy = TwoFrameOracle(horizon=4, image_size=64)
    r = evaluate(policy, TASK, episodes=1, replan_every=2, seed=5, out=tmp_path, record_videos=1)
    t = r["per_task"][TASK]
    assert t["successes"] == 1 and r["success_rate"] == 1.0
    assert 0 < t["ci95"][0] < 1.0 and t["ci95"][1] == pytest.approx(1.0)
    assert t["mean_steps_to_success"] > 10
    assert t["layouts"] == [mw.EVAL_LAYOUTS[5]]
    assert r["protocol"]["replan_every"] == 2 and r["protocol"]["action_horizon"] == 4
    assert r["protocol"]["num_cond_frames"] == 2 and r["protocol"]["frame_stride"] == 3
    assert (tmp_path / "results.json").is_file()
    assert "| button-press-topdown-v3 |" in (tmp_path / "results.md").read_text()
    assert len(r["videos"]) == 1 and r["videos"][0].endswith("_success.gif")
    assert json.loads((tmp_path / "results.json").read_text())["episodes"] == 1


def test_the_first_frame_shows_the_new_layout_whatever_came_before():
    """MetaWorld's reset places the objects without recomputing positions: the first frame showed
    them where the previous episode left them, so a dataset's first frames depended on which
    episodes a worker had run before (and the policy's first query saw the wrong scene)."""
    import mujoco

    used = mw.MetaWorldEnv("push-v3", layout=3, image_size=64)
    for _ in range(40):
        used.step(used.expert_action())
    first = used.reset(5)[mw.IMAGE_KEY]
    fresh = mw.MetaWorldEnv("push-v3", layout=5, image_size=64)
    assert np.array_equal(first, fresh.observation()[mw.IMAGE_KEY])
    mujoco.mj_forward(used._env.model, used._env.data)
    assert np.array_equal(first, used.render())  # what the state shows, nothing stale
    used.close()
    fresh.close()


class SeeingPolicy:
    """Actions that depend on every pixel it is shown; keeps the frames it was shown."""

    def __init__(self):
        self.seen = []

    def infer(self, obs):
        image = obs[mw.IMAGE_KEY]
        self.seen.append(image.copy())
        rng = np.random.default_rng(int(image.astype(np.int64).sum()))
        return {"actions": rng.uniform(-1, 1, (4, 4)).astype(np.float32)}


def test_evaluation_renders_only_the_frames_the_policy_sees(tmp_path, monkeypatch):
    """Rendering is most of a step's cost: without a recording only the frame of each query is
    rendered, and the episode is the same as when every frame is (same frames, same outcome)."""
    render, renders = mw.MetaWorldEnv.render, []

    def counted(env):
        renders.append(1)
        return render(env)

    monkeypatch.setattr(mw.MetaWorldEnv, "render", counted)
    runs = []
    for record in (True, False):
        policy, before = SeeingPolicy(), len(renders)
        r = evaluate(policy, TASK, episodes=1, replan_every=3, max_steps=30, seed=2,
                     out=tmp_path / str(record) if record else None, record_videos=1 if record else 0)
        runs.append((policy.seen, r["per_task"][TASK], len(renders) - before))
    (seen_all, task_all, renders_all), (seen_lazy, task_lazy, renders_lazy) = runs
    assert len(seen_all) == len(seen_lazy) == 10 and all(np.array_equal(a, b) for a, b in zip(seen_all, seen_lazy))
    assert task_all["successes"] == task_lazy["successes"] and task_all["layouts"] == task_lazy["layouts"]
    # every step's frame and the reset's / the frame of each query, plus at most the one after the
    # last chunk and the one a new env renders when it is made
    assert renders_all >= 31 and renders_lazy <= len(seen_lazy) + 2


class CapturedOracle(mw.OracleExpertPolicy):
    """The oracle, declaring that its training frames came from the zoomed view."""

    def metadata(self):
        return {**super().metadata(), "capture": {"env": "metaworld", "cameras": {mw.IMAGE_KEY: "corner4_zoom"}}}


def test_evaluate_renders_the_checkpoints_camera():
    r = evaluate(CapturedOracle(horizon=4, image_size=64), TASK, episodes=1, max_steps=3)
    assert r["protocol"]["camera"] == "corner4_zoom"
    with pytest.warns(UserWarning, match="trained on 'corner4_zoom' frames"):
        r = evaluate(CapturedOracle(horizon=4, image_size=64), TASK, episodes=1, max_steps=3, camera="corner4")
    assert r["protocol"]["camera"] == "corner4"
    assert evaluate(mw.OracleExpertPolicy(horizon=4, image_size=64), TASK, episodes=1,
                    max_steps=3)["protocol"]["camera"] == mw.DEFAULT_CAMERA


def test_episode_counts_per_task(tmp_path):
    tasks = ["button-press-topdown-v3", "drawer-open-v3", "push-v3"]
    assert mw.episode_counts(tasks, 5) == dict.fromkeys(tasks, 5)
    assert mw.episode_counts(tasks, "5") == dict.fromkeys(tasks, 5)
    assert mw.episode_counts(tasks, "80,push=200") == {tasks[0]: 80, tasks[1]: 80, tasks[2]: 200}
    assert mw.episode_counts(tasks, "push=200,button-press-topdown=80,drawer_open=90") == \
        {tasks[0]: 80, tasks[1]: 90, tasks[2]: 200}
    assert mw.episode_counts(tasks, {"push": 2, "button-press-topdown": 1, "drawer-open": 1})[tasks[2]] == 2
    with pytest.raises(mw.MetaWorldError, match="every task needs a count >= 1.*drawer-open-v3: None"):
        mw.episode_counts(tasks, "push=200,button-press-topdown=80")
    with pytest.raises(mw.MetaWorldError, match="names reach-v3, which is not among the tasks"):
        mw.episode_counts(tasks, "10,reach=3")
    with pytest.raises(mw.MetaWorldError, match="'push=lots' must read N or TASK=N"):
        mw.episode_counts(tasks, "push=lots")
    with pytest.raises(mw.MetaWorldError, match="push-v3: 0"):
        mw.episode_counts(tasks, "3,push=0")
    # collect keeps each task's own count and records them
    r = mw.collect(["button-press-topdown", "reach"], "1,reach=2", tmp_path / "ds", image_size=32, seed=5)
    assert {t: s["kept"] for t, s in r["tasks"].items()} == {"button-press-topdown-v3": 1, "reach-v3": 2}
    assert r["episodes"] == 3 and not r["incomplete_tasks"]
    meta = json.loads((tmp_path / "ds" / "meta" / "metaworld.json").read_text())
    assert meta["settings"]["episodes_per_task"] == {"button-press-topdown-v3": 1, "reach-v3": 2}


def test_cli_parsers():
    from dit4dit.cli import build_parser

    p = build_parser()
    a = p.parse_args(["collect", "metaworld", "--tasks", "push,reach", "--episodes", "3", "--out", "x",
                      "--workers", "2", "--json"])
    assert a.tasks == "push,reach" and a.workers == 2 and a.image_size == 64 and a.camera == "corner4"
    assert a.episodes == "3"  # a count for every task, or per task (mw.episode_counts)
    a = p.parse_args(["eval", "metaworld", "--checkpoint", "run", "--tasks", "push", "--episodes", "4",
                      "--replan-every", "4"])
    assert a.replan_every == 4 and a.episodes == 4 and a.workers == 1
    assert mw.parse_tasks("push, push-v3,drawer_open") == ["push-v3", "drawer-open-v3"]
    with pytest.raises(mw.MetaWorldError):
        mw.task_name("fly-to-the-moon")


def test_gl_backend_choice(monkeypatch):
    mw.ensure_gl_backend()  # the real choice, made once per process
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)  # restored afterwards, like MUJOCO_GL
    try:
        monkeypatch.delenv("MUJOCO_GL", raising=False)
        mw.ensure_gl_backend.cache_clear()
        monkeypatch.setattr(mw, "_probe_backend", lambda b: (b == "osmesa", "" if b == "osmesa" else "no EGL"))
        assert mw.ensure_gl_backend() == "osmesa"
        monkeypatch.delenv("MUJOCO_GL", raising=False)
        mw.ensure_gl_backend.cache_clear()
        monkeypatch.setattr(mw, "_probe_backend", lambda b: (False, f"no {b}"))
        with pytest.raises(mw.MetaWorldError, match="libegl1.*libosmesa6"):
            mw.ensure_gl_backend()
        monkeypatch.setenv("MUJOCO_GL", "egl")
        mw.ensure_gl_backend.cache_clear()
        assert mw.ensure_gl_backend() == "egl"  # an explicit choice is not probed
    finally:
        mw.ensure_gl_backend.cache_clear()


def test_evaluate_under_simulated_inference_delay():
    sent = []

    class Recording(mw.OracleExpertPolicy):
        def infer(self, obs):
            sent.append(sorted(obs))
            return super().infer(obs)

    base = dict(episodes=1, replan_every=4, max_steps=30)
    sync = evaluate(Recording(horizon=8, image_size=64), TASK, execution="sync", delay=2, **base)
    lat = sync["latency"]
    assert lat["execution"] == "sync" and lat["delay"] == 2
    d = sync["episodes_detail"][0]
    # 30 steps = 5 x (2 held while waiting + 4 executed); the first chunk has no boundary before it
    assert (d["steps"], d["hold_steps"], d["policy_calls"], lat["boundaries"]) == (30, 10, 5, 4)
    assert lat["mean_abs_boundary_change"] > lat["mean_abs_action_change"] > 0.0
    sent.clear()
    r = evaluate(Recording(horizon=8, image_size=64), TASK, execution="rtc", delay=2, **base)
    assert r["episodes_detail"][0]["hold_steps"] == 2  # only before the first chunk
    assert "action_prefix" not in sent[0] and {"action_prefix", "inference_delay"} <= set(sent[1])
    assert r["latency"]["mean_abs_action_change"] is not None
    with pytest.raises(mw.MetaWorldError, match="execution"):
        evaluate(mw.OracleExpertPolicy(), TASK, episodes=1, execution="fast")
    with pytest.raises(mw.MetaWorldError, match="delay needs"):
        evaluate(mw.OracleExpertPolicy(), TASK, episodes=1, delay=2)
