"""Synthetic training samples shaped for a config: for benchmarks and tests (no dataset needed)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import DiT4DiTConfig
from ..train.distributed import seed_for


class SyntheticSamples(Dataset):
    """Random samples shaped for ``cfg`` (deterministic per index): for benchmarks and tests.

    The first ``real_state_dims`` state dimensions and ``real_action_dims`` action dimensions are
    "real" (mask True), the rest padding, as with a real embodiment; actions depend on the
    state so that there is something to learn.
    """

    INSTRUCTIONS = ("push the block", "open the drawer", "press the button", "close the window")

    def __init__(self, cfg: DiT4DiTConfig, num_samples: int = 64, seed: int = 0, real_state_dims: int = 4,
                 real_action_dims: int = 4):
        self.cfg = cfg
        self.n = int(num_samples)
        self.seed = int(seed)
        self.real_state = min(real_state_dims, cfg.action.state_dim)
        self.real_action = min(real_action_dims, cfg.action.action_dim)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(seed_for(self.seed, i))
        c = self.cfg
        t = c.inputs.num_frames
        h, w = c.inputs.image_size
        a = c.action
        video = torch.rand((3, t, h, w), generator=g) * 2 - 1
        state = torch.zeros(a.state_dim)
        state[: self.real_state] = torch.rand(self.real_state, generator=g) * 2 - 1
        state_mask = torch.zeros(a.state_dim, dtype=torch.bool)
        state_mask[: self.real_state] = True
        steps = torch.linspace(0, 1, a.action_horizon)[:, None]
        actions = torch.zeros(a.action_horizon, a.action_dim)
        base = state[: self.real_action] if self.real_action <= self.real_state else torch.rand(self.real_action, generator=g)
        actions[:, : self.real_action] = (base[None, :] * (1 - steps) + 0.1 * torch.randn((a.action_horizon, self.real_action),
                                                                                          generator=g)).clamp(-1, 1)
        action_mask = torch.zeros(a.action_horizon, a.action_dim, dtype=torch.bool)
        action_mask[:, : self.real_action] = True
        return {
            "video": video,
            "future_mask": torch.ones(c.inputs.num_future_frames, dtype=torch.bool),
            "state": state,
            "state_mask": state_mask,
            "actions": actions,
            "action_mask": action_mask,
            "instruction": self.INSTRUCTIONS[i % len(self.INSTRUCTIONS)],
        }
