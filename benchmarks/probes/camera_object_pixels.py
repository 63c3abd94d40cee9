"""How large MetaWorld push's puck and goal marker appear through each camera view.

For every held-out layout (40-49) of push-v3 this probe renders the first frame through a camera
and counts the puck's pixels (those that change when the puck's geoms are made invisible) and the
goal marker's (green exceeding the larger of red and blue by more than 80 levels of 255).

    python benchmarks/probes/camera_object_pixels.py [--cameras corner4,corner4_zoom,corner4_close]
        [--size 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np

from dit4dit.envs import metaworld as mw


def object_pixels(env: mw.MetaWorldEnv, layout: int) -> tuple[int, int]:
    """(puck pixels, goal-marker pixels) in the first frame of ``layout``."""
    img = env.reset(layout)[mw.IMAGE_KEY].astype(int)
    goal = int(((img[..., 1] - np.maximum(img[..., 0], img[..., 2])) > 80).sum())
    m = env._env.model
    puck = m.geom_bodyid == m.body("obj").id
    rgba = m.geom_rgba[puck].copy()
    m.geom_rgba[puck, 3] = 0.0
    try:
        hidden = env.render().astype(int)
    finally:
        m.geom_rgba[puck] = rgba
    return int((np.abs(hidden - img).sum(-1) > 30).sum()), goal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", default="corner4,corner4_zoom,corner4_close")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"task": "push-v3", "layouts": list(mw.EVAL_LAYOUTS), "image_size": args.size,
              "machine": platform.processor() or platform.machine(), "cameras": {}}
    for camera in args.cameras.split(","):
        with mw.MetaWorldEnv("push", mw.EVAL_LAYOUTS[0], camera=camera, image_size=args.size) as env:
            counts = np.array([object_pixels(env, layout) for layout in mw.EVAL_LAYOUTS], dtype=float)
        puck, goal = counts.mean(0).round(2).tolist()
        result["cameras"][camera] = {"puck_pixels": puck, "goal_pixels": goal}
        print(f"{camera:14s} puck {puck:6.1f} px   goal marker {goal:5.1f} px")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
