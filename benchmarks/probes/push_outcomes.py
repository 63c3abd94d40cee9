"""How a MetaWorld push-v3 checkpoint fails: closed-loop episodes with the puck's story.

For each held-out layout (episode ``e`` on ``eval_layout(e)``, as `dit4dit eval` assigns them) this
probe runs the policy closed loop (``--replan-every`` actions of each chunk, the sampler seeded
with the episode number) and records, from MetaWorld's full observation (never shown to the
policy): success, the closest the hand came to the puck, how far the puck moved, and the puck's
distance to the goal at the start and at the end. A policy that has not located the puck never
comes near it; one that has located it only roughly hovers a few centimetres away; one that
reaches it but does not read the goal moves the puck the wrong way.

    python benchmarks/probes/push_outcomes.py RUN [--episodes 20] [--replan-every 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

from dit4dit.envs import metaworld as mw
from dit4dit.eval.metaworld import load_checkpoint_scene

# Slices of MetaWorld's 39-dim observation: hand xyz, puck xyz, goal xyz (the last 3).
HAND, PUCK, GOAL = slice(0, 3), slice(4, 7), slice(36, 39)


def episode(policy, env: mw.MetaWorldEnv, layout: int, replan_every: int) -> dict:
    obs = env.reset(layout)
    start = env.raw_obs.copy()
    closest = float("inf")
    success = done = False
    while not (success or done):
        chunk = policy.infer({mw.IMAGE_KEY: obs[mw.IMAGE_KEY][None], mw.STATE_KEY: obs[mw.STATE_KEY],
                              "prompt": obs["prompt"]})["actions"]
        for action in chunk[:replan_every]:
            obs, success, done = env.step(action)
            closest = min(closest, float(np.linalg.norm(env.raw_obs[HAND] - env.raw_obs[PUCK])))
            if success or done:
                break
    end = env.raw_obs
    goal = start[GOAL][:2]
    return {"layout": layout, "success": bool(success), "steps": env.steps, "closest_hand_puck_m": round(closest, 4),
            "puck_moved_m": round(float(np.linalg.norm(end[PUCK][:2] - start[PUCK][:2])), 4),
            "goal_distance_start_m": round(float(np.linalg.norm(start[PUCK][:2] - goal)), 4),
            "goal_distance_end_m": round(float(np.linalg.norm(end[PUCK][:2] - goal)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run or checkpoint folder")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--replan-every", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, camera, size = load_checkpoint_scene(args.run)
    rows = []
    with mw.MetaWorldEnv("push", mw.eval_layout(0), camera=camera, image_size=size) as env:
        for e in range(args.episodes):
            policy.seed = e
            rows.append(episode(policy, env, mw.eval_layout(e), args.replan_every))
            r = rows[-1]
            print(f"episode {e:2d} layout {r['layout']:3d} success={int(r['success'])} "
                  f"closest hand-puck {r['closest_hand_puck_m']:.3f} m, puck moved {r['puck_moved_m']:.3f} m, "
                  f"goal distance {r['goal_distance_start_m']:.3f} -> {r['goal_distance_end_m']:.3f} m", flush=True)
    failed = [r for r in rows if not r["success"]]
    summary = {"episodes": len(rows), "successes": len(rows) - len(failed), "failures": len(failed),
               "failures_puck_not_moved": sum(r["puck_moved_m"] < 0.04 for r in failed),
               "failures_closest_hand_puck_m": [min((r["closest_hand_puck_m"] for r in failed), default=None),
                                                max((r["closest_hand_puck_m"] for r in failed), default=None)]}
    print(summary)
    if args.json:
        result = {"run": args.run, "camera": camera, "replan_every": args.replan_every, "summary": summary,
                  "episodes": rows, "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
