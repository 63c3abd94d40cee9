"""How strongly RTC's guidance makes a new chunk continue the previous one, by guidance clip beta.

For 2 tasks x 3 held-out layouts x 3 chunks: sample a chunk A, execute its first 4 actions, then
sample the next chunk B from the new observation with the remaining 4 actions of A as the prefix
(`action_prefix`) and delay d, for beta in 0, 1, 2, 5, 10 (`Policy.max_guidance`; 0 is plain
sampling, the steps below d are frozen in every case). Prints, per d and beta, the mean absolute
gap on the end-effector dimensions between B and the prefix over the non-frozen overlap
(steps d..3; none at d = 4) and the boundary jump |B[d] - A[4 + d - 1]|, the change the robot
sees when it switches to B.

    python benchmarks/probes/rtc_guidance.py demo_out/run
"""

import sys

import numpy as np
import torch

from dit4dit.envs.metaworld import cached_env, eval_layout
from dit4dit.eval.metaworld import load_checkpoint_scene

torch.set_num_threads(1)
ck = sys.argv[1]
policy, camera, size = load_checkpoint_scene(ck)
rows = []
for task in ["push-v3", "drawer-open-v3"]:
    env = cached_env(task, camera, tuple(size), 500)
    for ep in range(3):
        obs = env.reset(eval_layout(ep))
        for _ in range(3):
            policy.seed = 100 + ep
            A = policy.infer(obs)["actions"]
            for a in A[:4]:
                obs, s, d = env.step(a)
            for d in (1, 2, 4):
                prefix = A[4:]
                for beta in (0.0, 1.0, 2.0, 5.0, 10.0):
                    policy.max_guidance = beta
                    policy.seed = 999 + ep
                    B = policy.infer({**obs, "action_prefix": prefix, "inference_delay": d})["actions"]
                    err = np.abs(B[d:4, :3] - prefix[d:4, :3]).mean() if d < 4 else np.nan
                    jump = np.abs(B[d, :3] - prefix[d - 1, :3]).mean()
                    rows.append((d, beta, err, jump))
rows = np.array(rows)
for d in (1, 2, 4):
    for beta in (0.0, 1.0, 2.0, 5.0, 10.0):
        m = (rows[:, 0] == d) & (rows[:, 1] == beta)
        print(f"d={d} beta={beta:4}: overlap gap {rows[m, 2].mean():.4f}  boundary jump {rows[m, 3].mean():.4f}")
