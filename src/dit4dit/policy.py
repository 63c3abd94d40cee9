"""A policy = model + processor: raw observation in, action chunk in robot units out.

The same `Processor` that built the training samples turns a raw observation into model inputs
and model outputs back into robot actions, so training and serving cannot drift.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .data.processor import ProcessorError
from .models import rtc
from .models.dit4dit import DiT4DiT


# Real-time chunking inputs (optional; `dit4dit.models.rtc`): the actions, in robot units, that the
# robot will still execute from its current chunk, aligned with the new chunk's first steps
# (K, action_dim) with 1 <= K <= action_horizon, and how many of them run before the new chunk
# arrives (the inference delay in control steps, 0 <= d <= K).
PREFIX_KEY = "action_prefix"
DELAY_KEY = "inference_delay"
MAX_PREFIX_ABS = 1e4  # robot-unit magnitude beyond which a prefix is rejected as garbage


class Policy:
    def __init__(self, model: DiT4DiT, processor: Any, *, seed: int | None = 0,
                 max_guidance: float = rtc.DEFAULT_MAX_GUIDANCE):
        self.model = model.eval()
        self.processor = processor
        self.seed = seed
        self.max_guidance = float(max_guidance)
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
        guide = self.realtime_inputs(obs)
        t1 = time.perf_counter()
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        norm = self.model.predict_action(inputs["video"], inputs["state"], inputs["instruction"],
                                         generator=self._generator if self.seed is not None else None,
                                         **guide)
        if norm.device.type == "cuda":
            torch.cuda.synchronize(norm.device)
        t2 = time.perf_counter()
        actions = self.processor.unnormalize_actions(norm[0].cpu().numpy())
        return {"actions": np.asarray(actions, dtype=np.float32),
                "policy_timing": {"preprocess_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3}}

    def realtime_inputs(self, obs: Any) -> dict[str, Any]:
        """``predict_action``'s RTC arguments from the optional ``action_prefix`` and
        ``inference_delay`` keys of an observation (validated like any network input: a
        ``ProcessorError`` names the key and what is wrong); {} when the observation has neither."""
        if not isinstance(obs, dict) or (PREFIX_KEY not in obs and DELAY_KEY not in obs):
            return {}
        cfg = self.cfg.action
        horizon, a = cfg.action_horizon, self.processor.schema.action_dim
        if PREFIX_KEY not in obs:
            raise ProcessorError(f"{DELAY_KEY!r} given without {PREFIX_KEY!r}: real-time chunking needs the "
                                 f"actions still to be executed, ({horizon} or fewer, {a})")
        raw = obs[PREFIX_KEY]
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().numpy()
        arr = np.asarray(raw)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ProcessorError(f"{PREFIX_KEY!r}: expected numbers, got dtype {arr.dtype}")
        if arr.ndim != 2 or not 1 <= arr.shape[0] <= horizon or arr.shape[1] != a:
            raise ProcessorError(f"{PREFIX_KEY!r}: expected shape (K, {a}) with 1 <= K <= {horizon} (the chunk "
                                 f"horizon), got {arr.shape}")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise ProcessorError(f"{PREFIX_KEY!r} contains NaN/inf (first at [step, dim] {bad})")
        if np.abs(arr).max() > MAX_PREFIX_ABS:
            bad = np.unravel_index(int(np.abs(arr).argmax()), arr.shape)
            raise ProcessorError(f"{PREFIX_KEY!r}: value {arr[bad]:.4g} at [step, dim] {list(map(int, bad))} is "
                                 f"beyond +-{MAX_PREFIX_ABS:g}")
        k = arr.shape[0]
        delay = obs.get(DELAY_KEY, 0)
        if isinstance(delay, np.ndarray) and delay.ndim == 0:
            delay = delay.item()
        if isinstance(delay, (bool, np.bool_)) or not isinstance(delay, (int, np.integer)):
            raise ProcessorError(f"{DELAY_KEY!r}: expected an integer number of control steps, got {delay!r}")
        if not 0 <= int(delay) <= k:
            raise ProcessorError(f"{DELAY_KEY!r}={int(delay)} must be in [0, {k}] (the length of {PREFIX_KEY!r})")
        # normalised like the training targets; the model's own outputs lie in [-1, 1] after
        # normalisation, so a prefix is clipped to that range
        norm, _ = self.processor.actions(arr)
        prefix = torch.zeros((1, horizon, cfg.action_dim), dtype=torch.float32)
        prefix[0, :k] = norm.clamp(-1.0, 1.0)
        weights = torch.zeros((1, horizon, cfg.action_dim), dtype=torch.float32)
        weights[0, :, :a] = rtc.prefix_weights(horizon, k, int(delay))[:, None]
        return {"prefix": prefix.to(self.model.device), "prefix_weights": weights.to(self.model.device),
                "max_guidance": self.max_guidance}

