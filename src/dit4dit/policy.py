"""A policy = model + processor: raw observation in, action chunk in robot units out.

The same `Processor` that built the training samples turns a raw observation into model inputs
and model outputs back into robot actions, so training and serving cannot drift.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .models.dit4dit import DiT4DiT


class Policy:
    def __init__(self, model: DiT4DiT, processor: Any, *, seed: int | None = 0):
        self.model = model.eval()
        self.processor = processor
        self.seed = seed
        self._generator = torch.Generator(device=model.device)

    @property
    def cfg(self):
        return self.model.cfg

    def metadata(self) -> dict[str, Any]:
        """What a client must send and will receive (the checkpoint's evaluation protocol)."""
        return {**self.processor.protocol(), "preset": self.cfg.name,
                "num_action_steps": self.cfg.num_action_steps, "embodiment": self.processor.schema.name}

    @torch.no_grad()
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """`obs`: camera keys -> uint8 images, `observation.state`, `prompt`. Returns
        {"actions": float32 (H, action_dim) in robot units, "policy_timing": {...}}."""
        t0 = time.perf_counter()
        inputs = self.processor.observation(obs)
        t1 = time.perf_counter()
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        norm = self.model.predict_action(inputs["video"], inputs["state"], inputs["instruction"],
                                         generator=self._generator if self.seed is not None else None)
        if norm.device.type == "cuda":
            torch.cuda.synchronize(norm.device)
        t2 = time.perf_counter()
        actions = self.processor.unnormalize_actions(norm[0].cpu().numpy())
        return {"actions": np.asarray(actions, dtype=np.float32),
                "policy_timing": {"preprocess_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3}}
