"""How well a MetaWorld checkpoint reads the scene: its first action against the expert's.

At the start of an episode the scripted expert's action points at the object (for push: dx, dy
toward the puck), so a policy that locates the object from the image matches it, and one that has
not learned to sample from the marginal of its training actions instead. For every held-out
layout (40-49) and 10 training layouts (0-9) this probe resets the task, asks the policy for its
first action chunk under several sampler seeds, and reports per axis (dx, dy, dz) the mean
absolute error of the first action against the expert's and the spread of that action across
seeds. The camera is the one the checkpoint was trained on.

    python benchmarks/probes/first_action_error.py RUN [--task push] [--seeds 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

from dit4dit.envs import metaworld as mw
from dit4dit.eval.metaworld import load_checkpoint_scene


def first_actions(policy, env: mw.MetaWorldEnv, layout: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, 3) first policy actions and the expert's (3,) at the start of ``layout``."""
    obs = env.reset(layout)
    expert = env.expert_action()[:3]
    out = []
    for k in range(seeds):
        policy.seed = k
        chunk = policy.infer({mw.IMAGE_KEY: obs[mw.IMAGE_KEY][None], mw.STATE_KEY: obs[mw.STATE_KEY],
                              "prompt": obs["prompt"]})["actions"]
        out.append(chunk[0, :3])
    return np.asarray(out), expert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run or checkpoint folder")
    ap.add_argument("--task", default="push")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, camera, size = load_checkpoint_scene(args.run)
    result = {"run": args.run, "task": mw.task_name(args.task), "camera": camera, "seeds": args.seeds,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    with mw.MetaWorldEnv(args.task, mw.EVAL_LAYOUTS[0], camera=camera, image_size=size) as env:
        for name, layouts in (("held_out", mw.EVAL_LAYOUTS), ("training", mw.TRAIN_LAYOUTS[:10])):
            err, spread = [], []
            for layout in layouts:
                acts, expert = first_actions(policy, env, layout, args.seeds)
                err.append(np.abs(acts - expert).mean(0))
                spread.append(acts.std(0))
            result[name] = {"layouts": list(layouts),
                            "abs_error": dict(zip(("dx", "dy", "dz"), np.mean(err, 0).round(4).tolist())),
                            "seed_spread": dict(zip(("dx", "dy", "dz"), np.mean(spread, 0).round(4).tolist()))}
            print(f"{name:9s} |first action - expert| {result[name]['abs_error']}  "
                  f"spread over seeds {result[name]['seed_spread']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
