"""Closed-loop evaluation on the built-in `toy_reach` task (held-out layouts)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..envs.toy import TASKS, ToyReachEnv
from ..stats import wilson_interval

EVAL_SEED_OFFSET = 1_000_000  # evaluation layouts never overlap the collection seeds


def evaluate(policy, episodes: int, *, replan_every: int | None = None, seed: int = 0, size: int = 64,
             progress: Callable[[int, int], None] | None = None, record: int = 0) -> dict[str, Any]:
    """Run `episodes` rollouts per task; execute `replan_every` actions of each chunk (default: all)."""
    env = ToyReachEnv(size=size)
    per_task: dict[str, dict[str, Any]] = {}
    videos: list[np.ndarray] = []
    done_count, total = 0, episodes * len(TASKS)
    for ti, goal in enumerate(TASKS):
        succ, steps_to_success, outcomes = 0, [], []
        for ep in range(episodes):
            obs = env.reset(EVAL_SEED_OFFSET + seed * 10_000 + ti * 1_000 + ep, task=goal)
            frames = [obs["observation.images.image"]]
            success = done = False
            while not (success or done):
                chunk = policy.infer(obs)["actions"]
                n = len(chunk) if replan_every is None else min(replan_every, len(chunk))
                for a in chunk[:n]:
                    obs, success, done = env.step(a)
                    frames.append(obs["observation.images.image"])
                    if success or done:
                        break
            succ += int(success)
            outcomes.append(int(success))
            if success:
                steps_to_success.append(env.steps)
            if len(videos) < record:
                videos.append(np.stack(frames))
            done_count += 1
            if progress:
                progress(done_count, total)
        lo, hi = wilson_interval(succ, episodes)
        per_task[TASKS[goal]] = {"successes": succ, "episodes": episodes, "success_rate": succ / episodes,
                                 "ci95": [lo, hi], "outcomes": outcomes,  # per episode, in order (same layouts per seed)
                                 "mean_steps_to_success": float(np.mean(steps_to_success)) if steps_to_success else None}
    n_s = sum(t["successes"] for t in per_task.values())
    n = sum(t["episodes"] for t in per_task.values())
    return {"task_suite": "toy_reach", "per_task": per_task, "success_rate": n_s / n,
            "ci95": list(wilson_interval(n_s, n)), "episodes": n, "replan_every": replan_every,
            "videos": videos}
