"""`dit4dit bench train`: training throughput of our step and of the plain step, side by side.

- ours: the step the trainer runs — the tau_v and tau_f video passes share their common blocks in
  one batched forward, the action DiT projects each sample's cross-attention K/V once for its
  `repeated_diffusion_steps` draws, fused AdamW on CUDA, the config's activation checkpointing
  and precision.
- plain: the same model and data with the two video passes run separately and the K/V projected
  for every repeated draw (`share_video_passes=False`, `action.share_feature_kv=False`), unfused
  AdamW.

Both are measured in one process on synthetic batches (the real loss, backward, clipping, AdamW,
schedule and EMA), each on its own model built from the same seed: on CPU step by step in
alternation, on a GPU (where one 2B model and its optimizer state fill most of the memory) one
after the other. Model FLOPs per step are counted with `torch.utils.flop_counter` on the
forward and backward of our loss, without activation checkpointing (recomputation is not model
work), and MFU divides the achieved rate by the device's dense peak for the precision used.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from ..config import DiT4DiTConfig, override
from ..data.samples import collate
from ..train.distributed import DistInfo, wrap
from ..train.optim import EMA, WarmupCosine, build_optimizer
from ..train.step import LossModule, StepRunner, autocast, check_train_config, freeze_frozen_parts, resolve_precision
from . import device_name, sync
from .synthetic import SyntheticSamples

# Dense peak TFLOP/s by (device-name fragment, precision) — vendor datasheet values (no sparsity).
# Matched in order, so the more specific fragments come first.
PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "bfloat16", 756.0), ("H100 PCIe", "float32", 378.0),
    ("H100", "bfloat16", 989.4), ("H100", "float32", 494.7),  # SXM / HBM3; float32 = TF32 tensor cores
    ("H200", "bfloat16", 989.4), ("H200", "float32", 494.7),
    ("A100", "bfloat16", 312.0), ("A100", "float32", 156.0),
    ("L40S", "bfloat16", 362.1), ("L40S", "float32", 183.0),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    for fragment, prec, tflops in PEAK_TFLOPS:
        if fragment in device_name and prec == precision:
            return tflops
    return None


def count_step_flops(model: torch.nn.Module, batch: dict, generator: torch.Generator) -> float:
    """Model FLOPs of one forward + backward of the loss on ``batch`` (checkpointing off)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with model.gradient_checkpointing_disabled(), FlopCounterMode(display=False) as counter:
            loss, _ = model.loss(batch, generator)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class _Step:
    """One configured training step (model, optimizer, EMA, fixed synthetic batch) to time."""

    def __init__(self, cfg: DiT4DiTConfig, dev: torch.device, precision: str, backbone: str | None, plain: bool,
                 flops_batch: int | None):
        from ..models.dit4dit import DiT4DiT

        tc = cfg.train
        self.cfg, self.dev, self.plain = cfg, dev, plain
        torch.manual_seed(tc.seed)
        model = DiT4DiT.from_config(cfg, backbone, video_dtype=torch.float32, random_weights=backbone is None)
        self.counts = freeze_frozen_parts(model)
        model.to(dev).train()
        optimizer = build_optimizer(model, tc, dev)
        self.fused = bool(optimizer.defaults.get("fused"))
        scheduler = WarmupCosine.from_config(optimizer, tc)
        ema = None
        if tc.ema_decay is not None:
            ema = EMA([(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])],
                      tc.ema_decay)
        generator = torch.Generator(device=dev).manual_seed(tc.seed)
        self.runner = StepRunner(wrap(LossModule(model), model, "single", DistInfo(device=dev)), optimizer,
                                 scheduler, ema, generator, dev, precision, tc.grad_clip, tc.grad_accum)
        samples = SyntheticSamples(cfg, num_samples=tc.batch_size, seed=tc.seed)
        fixed = collate([samples[i] for i in range(tc.batch_size)])
        self.batch = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                      for k, v in fixed.items()}
        self.flops = None
        if flops_batch is not None:  # counted on a slice of the batch and scaled (FLOPs are linear in it)
            part = {k: v[:flops_batch] for k, v in self.batch.items()}
            with autocast(dev, precision):
                flops = count_step_flops(model, part, torch.Generator(device=dev).manual_seed(0))
            self.flops = flops * tc.batch_size / flops_batch * tc.grad_accum
        self.times: list[float] = []
        self.n = 0

    def step(self, record: bool) -> None:
        self.n += 1
        t0 = time.perf_counter()
        self.runner.step(self.n, lambda: self.batch)
        sync(self.dev)
        if record:
            self.times.append(time.perf_counter() - t0)

    def result(self) -> dict[str, Any]:
        tc = self.cfg.train
        med = float(np.median(self.times)) if self.times else float("nan")
        out: dict[str, Any] = {
            "step_time_s": med,
            "step_time_mean_s": float(np.mean(self.times)) if self.times else float("nan"),
            "samples_per_s": tc.batch_size * tc.grad_accum / med if med > 0 else float("nan"),
            "share_video_passes": self.cfg.share_video_passes,
            "shared_action_kv": self.cfg.action.share_feature_kv,
            "fused_adam": self.fused,
            "params": self.counts,
        }
        if self.flops is not None:
            out["model_flops_per_step"] = self.flops
        return out

    def close(self) -> None:
        del self.runner, self.batch
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def _run_alone(step: _Step, steps: int, warmup: int) -> dict[str, Any]:
    for _ in range(max(0, warmup)):
        step.step(record=False)
    sync(step.dev)
    if step.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.dev)
    for _ in range(steps):
        step.step(record=True)
    out = step.result()
    if step.dev.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(step.dev) / 2**30
    return out


def bench_train(cfg: DiT4DiTConfig, device: str | torch.device | None = None, steps: int = 10,
                batch: int | None = None, warmup: int = 2, backbone: str | None = None, plain: bool = True,
                count_flops: bool = True, peak: float | None = None) -> dict[str, Any]:
    """Our training step (and, with ``plain``, the plain step) on synthetic batches.

    Returns step time, samples/s, peak memory (CUDA), model FLOPs per step, achieved TFLOP/s and
    MFU (against ``peak`` TFLOP/s, or the device's datasheet peak when known), and the plain/ours
    ratio."""
    if batch is not None:
        cfg = override(cfg, [f"train.batch_size={int(batch)}"])
    cfg = check_train_config(cfg)
    tc = cfg.train
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(tc.precision, dev)
    # FLOPs are linear in the batch when every sample carries the video loss: count one sample.
    flops_batch = None
    if count_flops:
        flops_batch = 1 if cfg.video_loss_fraction >= 1.0 else tc.batch_size

    label = device_name(dev)
    if cfg.mode == "video_only":  # compared with the video part of a joint step instead of a plain step
        plain = False
    plain_cfg = override(cfg, ["share_video_passes=false", "action.share_feature_kv=false", "train.fused_adam=false"])
    # Side by side: on CPU both steps are built and timed alternately, so load drift hits both
    # alike; on a GPU one 2B model with its optimizer state fills most of the memory, so they run
    # one after the other (each with its own peak memory).
    interleaved = plain and dev.type == "cpu"
    ours_step = _Step(cfg, dev, precision, backbone, plain=False, flops_batch=flops_batch)
    plain_result = None
    if interleaved:
        plain_step = _Step(plain_cfg, dev, precision, backbone, plain=True, flops_batch=None)
        for _ in range(max(0, warmup)):
            ours_step.step(record=False)
            plain_step.step(record=False)
        for _ in range(steps):
            ours_step.step(record=True)
            plain_step.step(record=True)
        ours, plain_result = ours_step.result(), plain_step.result()
        plain_step.close()
    else:
        ours = _run_alone(ours_step, steps, warmup)
    ours_step.close()
    if plain and not interleaved:
        plain_step = _Step(plain_cfg, dev, precision, backbone, plain=True, flops_batch=None)
        plain_result = _run_alone(plain_step, steps, warmup)
        plain_step.close()
    out: dict[str, Any] = {
        "benchmark": "train",
        "preset": cfg.name,
        "device": label,
        "precision": precision,
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "steps": steps,
        "warmup_steps": warmup,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "timing": "interleaved" if interleaved else "sequential",
        # the headline numbers are ours (kept at the top level for scripts reading older files)
        "step_time_s": ours["step_time_s"],
        "step_time_mean_s": ours["step_time_mean_s"],
        "samples_per_s": ours["samples_per_s"],
        "params": ours["params"],
        "ours": ours,
    }
    peak = peak if peak is not None else peak_tflops(label, precision)
    if "model_flops_per_step" in ours:
        achieved = ours["model_flops_per_step"] / ours["step_time_s"] / 1e12
        out["model_flops_per_step"] = ours["model_flops_per_step"]
        out["achieved_tflops"] = achieved
        out["peak_tflops"] = peak
        out["mfu"] = achieved / peak if peak else None
    if "peak_memory_gb" in ours:
        out["peak_memory_gb"] = ours["peak_memory_gb"]
    if plain_result is not None:
        out["plain"] = plain_result
        out["speedup_vs_plain"] = plain_result["step_time_s"] / ours["step_time_s"]
    if cfg.mode == "video_only":
        out["video_only_vs_joint"] = video_part_of_joint(cfg, dev, precision, backbone, steps, warmup)
    out.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "host": platform.node()})
    if dev.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["driver"] = _driver_version()
    return out


def video_part_of_joint(cfg: DiT4DiTConfig, dev: torch.device, precision: str, backbone: str | None, steps: int,
                        warmup: int) -> dict[str, Any]:
    """A video-only step against the video part of a joint step, side by side (interleaved on CPU).

    The joint step runs the video loss on every row (``video_loss_fraction=1``, the rows a
    video-only step trains on) plus the feature pass and the action loss; the action-only step runs
    the feature pass and the action loss alone. The video part of the joint step is their
    difference: what adding the video loss costs a policy step. A video-only step (action-free
    training) should cost no more than that."""
    variants = {
        "video_only": cfg,
        "joint": override(cfg, ["mode=joint", "video_loss_fraction=1.0"]),
        "action_only": override(cfg, ["mode=action_only"]),
    }
    built = {k: _Step(c, dev, precision, backbone, plain=False, flops_batch=None) for k, c in variants.items()}
    interleaved = dev.type == "cpu"
    if interleaved:
        for _ in range(max(0, warmup)):
            for st in built.values():
                st.step(record=False)
        for _ in range(steps):
            for st in built.values():
                st.step(record=True)
        times = {k: st.result()["step_time_s"] for k, st in built.items()}
    else:
        times = {k: _run_alone(st, steps, warmup)["step_time_s"] for k, st in built.items()}
    for st in built.values():
        st.close()
    part = times["joint"] - times["action_only"]
    return {
        "timing": "interleaved" if interleaved else "sequential",
        "video_only_step_s": times["video_only"],
        "joint_step_s": times["joint"],
        "action_only_step_s": times["action_only"],
        "video_part_of_joint_s": part,
        "video_only_over_video_part": times["video_only"] / part if part > 0 else None,
        "batch_size": cfg.train.batch_size,
    }


def _driver_version() -> str | None:
    try:
        import subprocess

        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
