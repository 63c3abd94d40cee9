"""`toy_reach`: a tiny pixel-based reaching task with a language goal, used by the synthetic demo
and the end-to-end tests (no simulator dependency, renders in microseconds).

A square arena holds a red and a blue target and a white agent. The instruction names one
target ("move to the red square" / "move to the blue square"); the agent moves by a velocity
action (dx, dy) in [-1, 1] scaled by `speed`. The policy sees the rendered image, the agent
position (the state) and the instruction — never the target positions — so it must read the
image and the instruction to succeed. Success: the agent within `radius` of the named target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.schema import get_schema

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 230)}
TASKS = {name: f"move to the {name} square" for name in COLORS}
IMAGE_KEY = "observation.images.image"


@dataclass
class ToyReachEnv:
    size: int = 64
    speed: float = 0.05
    radius: float = 0.1
    max_steps: int = 60

    def reset(self, seed: int, task: str | None = None) -> dict:
        rng = np.random.default_rng(seed)
        while True:
            pts = rng.uniform(-0.8, 0.8, size=(3, 2))
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(3)
            if d.min() > 0.45:
                break
        self.agent, self.targets = pts[0], {"red": pts[1], "blue": pts[2]}
        self.goal = task or ("red" if rng.random() < 0.5 else "blue")
        self.instruction = TASKS[self.goal]
        self.steps = 0
        return self.observation()

    def observation(self) -> dict:
        return {IMAGE_KEY: self.render(), "observation.state": self.agent.astype(np.float32).copy(),
                "prompt": self.instruction}

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        a = np.clip(np.asarray(action, dtype=np.float64)[:2], -1.0, 1.0)
        self.agent = np.clip(self.agent + self.speed * a, -1.0, 1.0)
        self.steps += 1
        success = bool(np.linalg.norm(self.agent - self.targets[self.goal]) < self.radius)
        return self.observation(), success, self.steps >= self.max_steps

    def expert_action(self, rng: np.random.Generator | None = None) -> np.ndarray:
        delta = (self.targets[self.goal] - self.agent) / self.speed
        a = np.clip(delta, -1.0, 1.0)
        if rng is not None:
            a = np.clip(a + rng.normal(0, 0.05, size=2), -1.0, 1.0)
        return a.astype(np.float32)

    def render(self) -> np.ndarray:
        s = self.size
        img = np.full((s, s, 3), 90, dtype=np.uint8)
        yy, xx = np.mgrid[0:s, 0:s]

        def to_px(p):
            return (p + 1.0) * 0.5 * (s - 1)

        half = max(2, s // 16)
        for name, p in self.targets.items():
            cx, cy = to_px(p)
            img[(np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)] = COLORS[name]
        ax, ay = to_px(self.agent)
        img[(xx - ax) ** 2 + (yy - ay) ** 2 <= (half * 0.9) ** 2] = (245, 245, 245)
        return img


SCHEMA = get_schema("toy_reach")  # registered with the built-in embodiments (dit4dit.data.schema)


def features(size: int) -> dict[str, dict]:
    return {
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        IMAGE_KEY: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]},
    }


def rollout_expert(env: ToyReachEnv, seed: int) -> tuple[dict[str, np.ndarray], str, bool]:
    """One expert episode: arrays per key (frames, states, actions) and its instruction."""
    rng = np.random.default_rng(seed + 10_000)
    obs = env.reset(seed)
    images, states, actions = [], [], []
    success = False
    for _ in range(env.max_steps):
        a = env.expert_action(rng)
        images.append(obs[IMAGE_KEY])
        states.append(obs["observation.state"])
        actions.append(a)
        obs, success, done = env.step(a)
        if success or done:
            break
    data = {IMAGE_KEY: np.stack(images), "observation.state": np.stack(states), "action": np.stack(actions)}
    return data, env.instruction, success


def collect(out: str, episodes: int, *, seed: int = 0, size: int = 64, fps: int = 10, overwrite: bool = False,
            progress=None) -> dict:
    """Write `episodes` successful expert episodes as a LeRobot v3.0 dataset at `out`."""
    from ..data.writer import LeRobotWriter

    env = ToyReachEnv(size=size)
    tried = kept = 0
    frames = 0
    with LeRobotWriter(out, fps=fps, features=features(size), robot_type="toy_reach", overwrite=overwrite) as w:
        s = seed
        while kept < episodes:
            data, task, ok = rollout_expert(env, s)
            s += 1
            tried += 1
            if not ok:
                continue
            w.add_episode(data, task)
            kept += 1
            frames += len(data["action"])
            if progress:
                progress(kept, episodes)
        w.finalize()
    return {"dataset": str(out), "episodes": kept, "frames": frames, "expert_success_rate": kept / tried,
            "seeds": [seed, s - 1]}
