"""A policy = model + processor: raw observation in, action chunk in robot units out.

The same `Processor` that built the training samples turns a raw observation into model inputs
and model outputs back into robot actions, so training and serving cannot drift.

This module is the one place a checkpoint becomes a policy: :meth:`Policy.from_checkpoint`
(what serving, evaluation, the demo and the analysis use) rebuilds the model and its processor
from a run or checkpoint folder and records where the weights came from
(:class:`CheckpointSource`); :meth:`Policy.random` builds an untrained policy for an embodiment
schema (benchmarks, client development, tests).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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

# Overrides of the tiny preset for a random-weights policy that answers fast (serving benchmarks,
# client development): two video and two action layers, two feature blocks, no dropout.
TINY_RANDOM_OVERRIDES = ("video.num_layers=2", "feature_blocks=2", "action.num_layers=2", "action.dropout=0.0")


@dataclass(frozen=True)
class CheckpointSource:
    """Where a policy loaded by :meth:`Policy.from_checkpoint` came from.

    ``path``: the checkpoint folder (``RUN/checkpoints/step_000300`` or a lone checkpoint folder);
    ``step``: the training step ``trainer_state.json`` records (None when unreadable);
    ``weights``: the weight file loaded (``ema.safetensors`` when present and asked for, else
    ``model.safetensors``); ``recorded_sha256``: the content hash (hex) ``trainer_state.json``
    records for that file, if any; ``hashes_verified``: whether the weight files were checked
    against their recorded hashes at load time."""

    path: Path
    step: int | None
    weights: Path
    recorded_sha256: str | None
    hashes_verified: bool

    @property
    def in_run(self) -> bool:
        """True when the checkpoint sits in a run folder's ``checkpoints/``."""
        return self.path.parent.name == "checkpoints"

    @property
    def run_name(self) -> str:
        """``RUN/step_000300`` inside a run folder, else the checkpoint folder's own name (never an
        absolute path)."""
        return f"{self.path.parent.parent.name}/{self.path.name}" if self.in_run else self.path.name


class Policy:
    def __init__(self, model: DiT4DiT, processor: Any, *, seed: int | None = 0,
                 max_guidance: float = rtc.DEFAULT_MAX_GUIDANCE):
        self.model = model.eval()
        self.processor = processor
        self.seed = seed
        self.max_guidance = float(max_guidance)
        self._generator = torch.Generator(device=model.device)
        self.source: CheckpointSource | None = None  # set by `from_checkpoint`

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        backbone: str | None = None, use_ema: bool = True, video_dtype: torch.dtype | None = None,
                        text_cache_dir: str | None = None, load_text_encoder: bool | None = None,
                        verify_hashes: bool = True, seed: int | None = 0,
                        max_guidance: float = rtc.DEFAULT_MAX_GUIDANCE) -> "Policy":
        """The policy a run or checkpoint folder holds (a run folder: its newest complete
        checkpoint), on ``device``, with the checkpoint's processor.

        Weights are the EMA weights when present (``use_ema``), else the raw ones; they are checked
        against their recorded content hashes unless ``verify_hashes=False``. ``backbone``,
        ``video_dtype``, ``text_cache_dir`` and ``load_text_encoder`` are as in
        :func:`dit4dit.train.checkpoint.load_policy`. A checkpoint without ``processor.json`` (the
        schema, normalisation statistics and input protocol) cannot act and is refused with a
        ``CheckpointError``, like a missing, damaged or inconsistent one. ``policy.source`` records
        the checkpoint folder, step and weight file."""
        from .jsonio import read_json
        from .train.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, load_policy, resolve_checkpoint

        ck = resolve_checkpoint(path)
        model, processor, _cfg = load_policy(ck, device, backbone=backbone, use_ema=use_ema, video_dtype=video_dtype,
                                             text_cache_dir=text_cache_dir, load_text_encoder=load_text_encoder,
                                             verify_hashes=verify_hashes, require_processor=True)
        policy = cls(model, processor, seed=seed, max_guidance=max_guidance)
        try:  # already validated by load_policy; read again for the step and the recorded hashes
            state = read_json(ck / STATE_FILE, "trainer state")
        except ValueError:
            state = {}
        state = state if isinstance(state, dict) else {}
        weights = ck / EMA_FILE if use_ema and (ck / EMA_FILE).is_file() else ck / MODEL_FILE
        hashes = state.get("hashes")
        recorded = hashes.get(weights.name) if isinstance(hashes, dict) else None
        algo, _, digest = str(recorded or "").partition(":")
        step = state.get("step")
        policy.source = CheckpointSource(path=ck, step=None if step is None else int(step), weights=weights,
                                         recorded_sha256=digest if algo == "sha256" and digest else None,
                                         hashes_verified=bool(verify_hashes))
        return policy

    @classmethod
    def random(cls, schema: str = "toy_reach", *, preset: str = "tiny", overrides: Sequence[str] = (), seed: int = 0,
               camera_size: tuple[int, int] | None = None, device: str | torch.device = "cpu") -> "Policy":
        """A policy with random weights and unit statistics (min -1, max 1) for the embodiment
        ``schema``: for benchmarks, client development and tests. Every camera of the schema is an
        input (side by side when there are several). ``overrides``: config overrides of ``preset``
        (:data:`TINY_RANDOM_OVERRIDES` makes the tiny preset fast). ``camera_size`` (H, W): the
        client image size enforced for every camera (default: the model's input size per camera
        cell)."""
        from .config import get_preset
        from .data.normalize import Normalizer
        from .data.processor import Processor
        from .data.schema import get_schema

        cfg = get_preset(preset, [f"schema={schema}", *overrides])
        sch = get_schema(schema)
        inputs = cfg.inputs
        wanted = tuple(c.short for c in sch.cameras)
        if tuple(inputs.cameras) != wanted:
            # the preset's inputs name its own default camera: use every camera of the schema, side by side
            h, w = inputs.image_size
            layout = "single" if len(wanted) == 1 else "side_by_side"
            extra = [f"inputs.cameras={json.dumps(list(wanted))}", f"inputs.camera_layout={layout}"]
            if len(wanted) > 1 and not any(o.startswith("inputs.image_size=") for o in overrides):
                extra.append(f"inputs.image_size={json.dumps([h, w * len(wanted)])}")
            cfg = get_preset(preset, [f"schema={schema}", *extra, *overrides])
            inputs = cfg.inputs
        torch.manual_seed(seed)
        model = DiT4DiT.from_config(cfg, random_weights=True).to(device)
        unit = {"state": {"min": [-1.0] * sch.state_dim, "max": [1.0] * sch.state_dim},
                "action": {"min": [-1.0] * sch.action_dim, "max": [1.0] * sch.action_dim}}
        proc = Processor(sch, Normalizer.from_stats(unit, sch, mode="min_max"), inputs,
                         action_horizon=cfg.action.action_horizon)
        cell = proc.cell_size if camera_size is None else tuple(int(v) for v in camera_size)
        proc.camera_sizes = {k: cell for k in proc.camera_keys}
        return cls(model, proc, seed=seed)

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



def checkpoint_protocol(path: str | os.PathLike) -> dict[str, Any]:
    """The input protocol a checkpoint's ``processor.json`` states (cameras, camera sizes, frames,
    capture, ...), read without building the model; {} when the checkpoint has no processor.
    Raises ``CheckpointError`` for a missing or damaged checkpoint."""
    from .train.checkpoint import load_checkpoint

    proc = load_checkpoint(path).processor()
    return dict(proc.protocol()) if proc is not None else {}
