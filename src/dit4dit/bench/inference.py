"""`dit4dit bench inference`: latency of one policy step, our path against the naive one, side by side.

- naive: what the reference does each call — run the text encoder, run the full video DiT (all
  blocks and the output head) and take block L's output with a forward hook, then the action DiT.
  With `plain_model` it runs on that model instead: the CLI gives it a float32-weight copy run
  under bf16 autocast when our path has bf16 weights (the reference's mixed precision).
- ours: cached text embedding, truncated feature pass (blocks 0..L-1 only), action DiT.

Both run in the same process on the same random weights and inputs, interleaved, so the
ratio is a side-by-side measurement. A policy step = observation (conditioning frames, state,
instruction) in, action chunk out. The static-image baseline (`encoder=static_image`) has no video
DiT and so no naive path: only its own policy step is timed (`naive` is null).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

from .. import flow
from ..config import DiT4DiTConfig
from ..models.dit4dit import DiT4DiT
from . import device_name, sync


def naive_policy_step(model: DiT4DiT, cond_video: torch.Tensor, state: torch.Tensor, prompts: list[str],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference approach: text encoder every call, all video blocks, features by a forward hook."""
    cfg = model.cfg
    enc = model.text_encoder
    if enc is not None:
        text = enc(prompts).to(model.device, model.video_dtype)
    else:
        text = model.encode_text(prompts).to(model.video_dtype)
    cond = model.encode_video(cond_video)
    b, c, _, h, w = cond.shape
    future = torch.randn((b, c, model.num_future_latents, h, w), generator=generator, device=cond.device,
                         dtype=cond.dtype)
    tau_f = torch.full((b,), cfg.tau_f, device=cond.device)
    x, ts, cm = model.video_dit.assemble(cond, future, tau_f)
    captured: dict[str, torch.Tensor] = {}
    block = model.video_dit.transformer.transformer_blocks[cfg.feature_blocks - 1]
    handle = block.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o))
    try:
        model.video_dit(x, ts, cm, text)
    finally:
        handle.remove()
    feats = captured["h"].float()
    noise = torch.randn((b, cfg.action.action_horizon, cfg.action.action_dim), generator=generator,
                        device=feats.device)
    return flow.euler_sample(lambda a, tau: model.action_dit(a, tau, state, feats), noise, cfg.num_action_steps)


def plain_copy(model: DiT4DiT) -> DiT4DiT:
    """The plain path's model: the same weights with the video DiT in float32 (run under autocast)."""
    plain = copy.deepcopy(model)
    plain.video_dit.float()
    return plain


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _summary(ts: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in ts)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    med = statistics.median(ms)
    return {"median_ms": med, "p99_ms": p99, "min_ms": ms[0], "hz": 1e3 / med, "n": len(ms)}


def make_inputs(cfg: DiT4DiTConfig, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.inputs.image_size
    cond = torch.rand((batch, 3, cfg.inputs.num_cond_frames, h, w), generator=g) * 2 - 1
    state = torch.randn((batch, cfg.action.state_dim), generator=g)
    prompts = ["pick up the red block and place it in the bowl"] * batch
    return cond.to(device), state.to(device), prompts


@torch.no_grad()
def bench_inference(model: DiT4DiT, *, batch: int = 1, warmup: int = 2, iters: int = 10,
                    seed: int = 0, progress: Callable[[str], None] | None = None,
                    plain_model: DiT4DiT | None = None, plain_autocast: torch.dtype | None = None) -> dict[str, Any]:
    """``plain_model`` (default ``model``) runs the naive path, under ``torch.autocast`` to
    ``plain_autocast`` when given."""
    cfg = model.cfg
    model.eval()
    plain = (plain_model or model).eval()
    device = model.device
    load_before = os.getloadavg()
    cond, state, prompts = make_inputs(cfg, batch, device, seed)
    g = torch.Generator(device=device)

    def ours():
        g.manual_seed(seed)
        return model.predict_action(cond, state, prompts, generator=g)

    def naive():
        g.manual_seed(seed)
        ctx = (torch.autocast(device.type, dtype=plain_autocast) if plain_autocast is not None
               else contextlib.nullcontext())
        with ctx:
            return naive_policy_step(plain, cond, state, prompts, generator=g)

    # The two paths compute the same action chunk (same noise, same blocks up to the exit): exactly
    # on one model, within the precision of the lower one with different weight dtypes.
    static = model.video_dit is None
    agree = agree_rel = None
    if not static:
        a_ours, a_naive = ours().float(), naive().float()
        agree = (a_ours - a_naive).abs().max().item()
        agree_rel = agree / max(a_naive.abs().max().item(), 1e-12)

    for _ in range(warmup):
        ours(), None if static else naive()
    t_ours, t_naive = [], []
    for i in range(iters):  # interleaved, so drift in machine load hits both alike
        t_ours.append(_time(ours, device))
        if not static:
            t_naive.append(_time(naive, device))
        if progress:
            progress(f"iter {i + 1}/{iters}: ours {t_ours[-1] * 1e3:.1f} ms"
                     + ("" if static else f", naive {t_naive[-1] * 1e3:.1f} ms"))

    # Breakdown of our path, stage by stage.
    text = model.encode_text(prompts).to(model.video_dtype)
    stages: dict[str, list[float]] = {"encode": [], "features": [], "action_steps": []}
    for _ in range(max(3, iters // 2)):
        box: dict[str, Any] = {}
        stages["encode"].append(_time(lambda: box.__setitem__("cond", model.encode_video(cond)), device))
        c = box["cond"]
        b = c.shape[0]
        # The same functions predict_action uses (compiled ones when compile_for_inference was called).
        if static:
            inputs, features = (c,), model._compiled_features or model.image_encoder
        else:
            fut = torch.randn((b, c.shape[1], model.num_future_latents, *c.shape[3:]), device=device, dtype=c.dtype)
            inputs = model.video_dit.assemble(c, fut, torch.full((b,), cfg.tau_f, device=device))
            features = model._compiled_features or (lambda *a: model.video_dit.features(*a, cfg.feature_blocks))
        action_dit = model.action_dit if model._compiled_action_dit is None else model._compiled_action_dit
        stages["features"].append(_time(lambda: box.__setitem__("f", features(*inputs, text).float()), device))
        noise = torch.randn((b, cfg.action.action_horizon, cfg.action.action_dim), device=device)
        stages["action_steps"].append(_time(
            lambda: flow.euler_sample(lambda a, tau: action_dit(a, tau, state, box["f"]), noise,
                                      cfg.num_action_steps), device))

    ours_s, naive_s = _summary(t_ours), _summary(t_naive) if t_naive else None
    text_enc = model.text_encoder
    return {
        "benchmark": "inference",
        "preset": cfg.name,
        "encoder": cfg.encoder,
        "device": device_name(device),
        "precision": str(model.video_dtype).replace("torch.", ""),
        "batch": batch,
        "feature_blocks": cfg.feature_blocks,
        "num_layers": cfg.video.num_layers,
        "num_action_steps": cfg.num_action_steps,
        "tokens": int(model.num_cond_latents + (0 if static else model.num_future_latents))
        * (cfg.inputs.image_size[0] // model.codec.spatial_factor // cfg.video.patch_size[1])
        * (cfg.inputs.image_size[1] // model.codec.spatial_factor // cfg.video.patch_size[2]),
        "ours": ours_s,
        "naive": naive_s,
        "speedup_median": naive_s["median_ms"] / ours_s["median_ms"] if naive_s else None,
        "breakdown_ms": {k: statistics.median(v) * 1e3 for k, v in stages.items()},
        "max_abs_diff_ours_vs_naive": agree,
        "max_rel_diff_ours_vs_naive": agree_rel,
        "naive_precision": None if static else (
            str(plain.video_dtype).replace("torch.", "")
            + (f" weights under {str(plain_autocast).replace('torch.', '')} autocast" if plain_autocast is not None
               else "")),
        "naive_text_encoder": ("run each call: " + type(text_enc).__name__) if text_enc is not None
        else "not loaded (embedding taken from the cache in both paths)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine inflates absolute times; the interleaved ratio is robust to it.
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "host": platform.node(),
    }
