"""Unitree G1 (two 7-DoF arms + two Dex1 grippers, 16-D) example client, with a mock robot.

The loop below is what a real deployment runs on the robot's computer: read the head camera and
the 16 joint positions, ask the policy server for a chunk, execute it at the control rate with
safety limits (the client episode loop of :mod:`dit4dit.serve.rollout`, with :class:`G1Episode`
as its robot-specific half). :class:`MockG1Robot` stands in for the robot SDK (``unitree_sdk2py`` on a real
G1), so the loop can be exercised anywhere; replace it with a class offering the same three
methods (``observe``, ``command``, ``stop``) to drive the real robot.

    python -m dit4dit.envs.g1_mock --server 127.0.0.1:8000 --steps 90 --prompt "pick up the cup"

Safety in the loop (on top of the server's checks): every action must be finite and 16-D,
targets are clipped to the joint limits, and each control step moves a joint by at most
``max_joint_step`` radians (rate limiting); any server error stops the robot (``stop()``:
hold position) and re-raises.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..serve.executor import FrameHistory
from ..serve.rollout import ClientEpisode, chunk_executor, resize_image, run_episode

G1_DIM = 16
CAMERA_KEY = "observation.images.cam_left_high"
STATE_KEY = "observation.state"
# Coarse joint limits (radians) for the 7 arm joints (ShoulderPitch, ShoulderRoll, ShoulderYaw,
# Elbow, WristRoll, WristPitch, WristYaw) from the G1 joint table; the right arm mirrors the
# roll / yaw limits of the left one. The Dex1 gripper units depend on the recording setup, so
# grippers are not clipped by default (pass your own limits to SafetyFilter).
_ARM_LOW = np.array([-3.09, -1.59, -2.62, -1.05, -1.97, -1.61, -1.61])
_ARM_HIGH = np.array([2.67, 2.25, 2.62, 2.09, 1.97, 1.61, 1.61])
MIRROR = np.array([1, -1, -1, 1, -1, 1, -1], dtype=np.float64)
JOINT_LOW = np.concatenate([_ARM_LOW, np.minimum(_ARM_LOW * MIRROR, _ARM_HIGH * MIRROR), [-np.inf, -np.inf]])
JOINT_HIGH = np.concatenate([_ARM_HIGH, np.maximum(_ARM_LOW * MIRROR, _ARM_HIGH * MIRROR), [np.inf, np.inf]])


@dataclass
class MockG1Robot:
    """A kinematic stand-in for the G1 upper body: position targets, first-order tracking, a
    synthetic head-camera image (a gradient with a marker per hand) and a command log."""

    image_size: tuple[int, int] = (480, 640)
    tracking: float = 0.5  # fraction of the target error closed per step
    seed: int = 0
    q: np.ndarray = field(default_factory=lambda: np.zeros(G1_DIM))
    commands: list[np.ndarray] = field(default_factory=list)
    stopped: bool = False

    def observe(self) -> dict[str, Any]:
        h, w = self.image_size
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = np.linspace(40, 200, w, dtype=np.uint8)[None]
        img[..., 1] = np.linspace(60, 160, h, dtype=np.uint8)[:, None]
        img[..., 2] = 90
        for i, color in ((0, (230, 40, 40)), (7, (40, 80, 230))):
            x = int((np.tanh(self.q[i]) + 1) / 2 * (w - 20)) + 10
            y = int((np.tanh(self.q[i + 3]) + 1) / 2 * (h - 20)) + 10
            img[max(0, y - 6):y + 6, max(0, x - 6):x + 6] = color
        return {CAMERA_KEY: img, STATE_KEY: self.q.astype(np.float32).copy()}

    def command(self, target: np.ndarray) -> None:
        target = np.asarray(target, np.float64)
        self.commands.append(target.copy())
        self.q = self.q + self.tracking * (target - self.q)

    def stop(self) -> None:
        self.stopped = True


class SafetyFilter:
    """Clip to joint limits and limit the per-step joint change (rad / step, grippers per step)."""

    def __init__(self, low: np.ndarray = JOINT_LOW, high: np.ndarray = JOINT_HIGH, max_joint_step: float = 0.05,
                 max_gripper_step: float = np.inf) -> None:
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.max_step = np.full(G1_DIM, float(max_joint_step))
        self.max_step[14:] = max_gripper_step
        self.clipped = 0

    def __call__(self, action: np.ndarray, current: np.ndarray) -> np.ndarray:
        a = np.asarray(action, np.float64)
        if a.shape != (G1_DIM,):
            raise ValueError(f"expected a {G1_DIM}-D G1 action, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("non-finite G1 action")
        target = np.clip(a, self.low, self.high)
        cur = np.asarray(current, np.float64)
        step = np.clip(target - cur, -self.max_step, self.max_step)
        out = cur + step
        if not np.allclose(out, a, equal_nan=False):
            self.clipped += 1
        return out


class G1Episode(ClientEpisode):
    """The G1 control loop's half of :func:`~dit4dit.serve.rollout.run_episode`: read the head
    camera and the joint positions, send the frames, state and prompt, execute each action through
    the safety filter, at ``control_hz`` when ``realtime``."""

    def __init__(self, robot: Any, prompt: str, camera: str, camera_size: Any, history: FrameHistory,
                 safety: SafetyFilter, *, control_hz: float = 30.0, realtime: bool = False,
                 on_step: Callable[[int, np.ndarray], None] | None = None) -> None:
        self.robot, self.prompt, self.camera, self.size = robot, prompt, camera, camera_size
        self.history, self.safety, self.realtime, self.on_step = history, safety, realtime, on_step
        self.period = 1.0 / control_hz
        self.raw: dict[str, Any] = {}
        self.steps_done = 0
        self.late = 0
        self._t_next = 0.0

    def reset(self) -> None:
        self.history.reset()
        self.steps_done = self.late = 0
        self._t_next = time.perf_counter()

    def observe(self) -> dict[str, Any]:
        self.raw = raw = self.robot.observe()
        img = raw[CAMERA_KEY]
        if self.size is not None and tuple(img.shape[:2]) != tuple(self.size):
            img = resize_image(img, self.size)
        self.history.push(img)
        return raw

    def request(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {self.camera: self.history.frames(), STATE_KEY: raw[STATE_KEY], "prompt": self.prompt}

    def act(self, action: np.ndarray) -> tuple[bool, bool]:
        target = self.safety(action, self.raw[STATE_KEY])
        self.robot.command(target)
        if self.on_step:
            self.on_step(self.steps_done, target)
        self.steps_done += 1
        self._t_next += self.period
        if self.realtime:
            delay = self._t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                self.late += 1
        return False, False


def run_g1(policy: Any, robot: Any, prompt: str, *, steps: int = 90, control_hz: float = 30.0,
           execute_steps: int | None = 8, ensemble_decay: float | None = None, realtime: bool = False,
           safety: SafetyFilter | None = None, metadata: Mapping[str, Any] | None = None,
           on_step: Callable[[int, np.ndarray], None] | None = None) -> dict[str, Any]:
    """The control loop: ``steps`` control steps at ``control_hz`` (sleeping only if ``realtime``).
    Any error (a server error, a non-finite or malformed action) stops the robot and re-raises."""
    meta = dict(metadata or (policy.get_server_metadata() if hasattr(policy, "get_server_metadata") else {}))
    dim = meta.get("action_dim")
    if dim is not None and int(dim) != G1_DIM:
        raise ValueError(f"the server's policy outputs {dim}-D actions; the G1 client needs {G1_DIM}")
    cams = list(meta.get("cameras") or [CAMERA_KEY])
    size = (meta.get("camera_sizes") or {}).get(cams[0])
    history = FrameHistory(int(meta.get("num_cond_frames") or 1), int(meta.get("frame_stride") or 1))
    executor = chunk_executor(policy, execute_steps, ensemble_decay=ensemble_decay)
    safety = safety or SafetyFilter()
    episode = G1Episode(robot, prompt, cams[0], size, history, safety, control_hz=control_hz, realtime=realtime,
                        on_step=on_step)
    try:
        r = run_episode(episode, executor, steps)
    except BaseException:
        robot.stop()
        raise
    lat = r.query_ms
    return {"steps": r.steps, "queries": r.queries, "clipped_steps": safety.clipped,
            "late_steps": episode.late if realtime else None,
            "query_latency_ms_p50": float(np.median(lat)) if lat else None,
            "query_latency_ms_max": float(np.max(lat)) if lat else None}


def main(argv: list[str] | None = None) -> int:
    from ..serve.client import WebsocketClientPolicy, parse_address

    p = argparse.ArgumentParser(prog="python -m dit4dit.envs.g1_mock", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="127.0.0.1:8000")
    p.add_argument("--token", default=None)
    p.add_argument("--prompt", default="pick up the cup")
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--execute-steps", type=int, default=8)
    p.add_argument("--ensemble-decay", type=float, default=None)
    p.add_argument("--realtime", action="store_true")
    args = p.parse_args(argv)
    host, port = parse_address(args.server)
    with WebsocketClientPolicy(host, port, token=args.token, wait_for_server=10) as client:
        r = run_g1(client, MockG1Robot(), args.prompt, steps=args.steps, control_hz=args.hz,
                   execute_steps=args.execute_steps, ensemble_decay=args.ensemble_decay, realtime=args.realtime)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
