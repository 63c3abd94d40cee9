"""GPU memory needed to train a config, estimated before anything is loaded (docs/memory.md).

What the trainer really allocates (``trainer.py``): trainable weights in float32 (master
weights; no separate bf16 copy), bf16 autocast on CUDA, float32 gradients, AdamW with two float32
moments per trainable weight that gets a gradient (fused on CUDA: no full-size temporaries), an
optional float32 EMA, the frozen VAE in float32, the frozen text encoder in bfloat16 unless its
embeddings come from the cache, and the activations autograd saves.

Activations are counted per row (a row is one sample in one pass of the video DiT: with
``share_video_passes`` a training step runs ``nv + B`` rows through blocks ``0..L-1`` and ``nv``
rows through blocks ``L..K-1`` and the head, ``nv = ceil(video_loss_fraction * B)``) from
constants measured once on the real 2B block (width 2048, 16 x 128 heads, 512 text tokens) and
the real action DiT, under bf16 autocast, by summing the bytes of every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, weight casts excluded). ``N`` = video tokens per
sample, ``d`` = video width, ``L`` = text tokens, ``D`` = text-embedding width::

    one block, one row            BLOCK_TOKEN_BYTES * N * d + BLOCK_TEXT_BYTES * L * d
    one block, checkpointed       CKPT_TOKEN_BYTES * N * d   (its bf16 input; recomputed in backward)
    embedding stage, one row      EMBED_TOKEN_BYTES * N * d + 2 * L * D  (bf16 input of the text projection)
    action DiT, one row           n_cross * ACTION_CROSS_BYTES * N * d + layers * ACTION_TOKEN_BYTES * S * w
                                  (rows = B * repeated_diffusion_steps, S = 1 + future tokens + horizon)

The peak is the largest of three phases (each plus a reserve of 1 GiB for the CUDA context and
workspaces and 5% for allocator fragmentation):

- end of forward: states + bf16 casts of the weights (autocast's cache) + every saved activation
  + the float32 text batch and feature copies;
- end of backward (what dominates with checkpointing): states + all gradients + the embedding
  stage's activations + one block recomputed;
- optimiser step: states + all gradients.

"states" = weights + AdamW moments + EMA + frozen VAE + text encoder (0 when cached). The
constants are estimates (about +-20%); they were measured on CPU, where attention saves what
flash attention saves on the GPU (output and log-sum-exp, no N x N matrix).
"""

from __future__ import annotations

import math
import os
from typing import Any

from ..config import ConfigError, DiT4DiTConfig

GiB = 1 << 30

# Saved bytes, measured under bf16 autocast (see the module docstring and docs/memory.md).
BLOCK_TOKEN_BYTES = 117.0  # per video token x width, one Cosmos block, one row
BLOCK_TEXT_BYTES = 14.0  # per text token x width, one Cosmos block (cross-attention K/V), one row
CKPT_TOKEN_BYTES = 2.0  # per video token x width, one checkpointed block (its bf16 input)
EMBED_TOKEN_BYTES = 16.0  # per video token x width, embedding stage + head, one row
ACTION_CROSS_BYTES = 5.5  # per feature token x feature width, one cross-attention layer, one row
ACTION_TOKEN_BYTES = 49.0  # per action-sequence token x width, one action-DiT layer, one row
RESERVE_BYTES = 1 * GiB  # CUDA context, cuBLAS / attention workspaces
FRAGMENTATION = 0.05  # caching-allocator slack on top of everything
SKIP_ENV = "DIT4DIT_SKIP_MEMORY_CHECK"

# Cosmos-Reason1-7B language model (the part the text encoder loads): Qwen2.5-7B dimensions.
_REASON1_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064)


class InsufficientMemoryError(ConfigError):
    """The estimated training memory exceeds what the GPU has free (checked before loading)."""


def _qwen_text_params(d: dict[str, Any]) -> int:
    """Parameters of a Qwen2.5 language model (no vision tower, no LM head) from its text config."""
    h = int(d["hidden_size"])
    inter = int(d["intermediate_size"])
    layers = int(d["num_hidden_layers"])
    heads = int(d["num_attention_heads"])
    kv = int(d.get("num_key_value_heads", heads))
    hd = h // heads
    attn = h * h + h + 2 * (h * kv * hd + kv * hd) + h * h  # q (+bias), k, v (+bias), o
    per_layer = attn + 3 * h * inter + 2 * h
    return int(d["vocab_size"]) * h + layers * per_layer + h


def _vae_params(config: dict[str, Any] | None) -> int:
    from diffusers import AutoencoderKLWan
    import torch

    kwargs = {}
    if config:
        import inspect

        names = set(inspect.signature(AutoencoderKLWan.__init__).parameters)
        kwargs = {k: v for k, v in config.items() if k in names}
    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLWan(**kwargs).parameters())


def _latent_grid(cfg: DiT4DiTConfig, vae_config: dict[str, Any] | None, frames: int | None = None
                 ) -> tuple[int, int, int]:
    """(T', h, w) of the latents of one training clip (of its first `frames` frames when given)."""
    h, w = cfg.inputs.image_size
    t = cfg.inputs.num_frames if frames is None else frames
    if cfg.codec.per_frame:
        f = cfg.codec.spatial_factor
        return t, h // f, w // f
    down = list((vae_config or {}).get("temperal_downsample") or [False, True, True])
    patch = int((vae_config or {}).get("patch_size") or 1)
    f = (2 ** len(down)) * patch
    tf = 2 ** sum(bool(x) for x in down)
    if (t - 1) % tf:
        raise ConfigError(f"the causal Wan VAE needs 1 + {tf}*k frames; the config has {t} "
                          f"(inputs.num_cond_frames + inputs.num_future_frames)")
    return 1 + (t - 1) // tf, h // f, w // f


def estimate_training_memory(cfg: DiT4DiTConfig, batch: int | None = None, *, backbone: Any = None,
                             text_encoder_loaded: bool | None = None, latents_cached: bool = False,
                             gpu_memory_gb: float = 80.0, precision: str = "bfloat16", world_size: int = 1,
                             strategy: str = "single") -> dict[str, Any]:
    """Estimated peak GPU memory of one training process, with and without activation checkpointing.

    Nothing is loaded: parameter counts come from the meta device, the backbone's configs (when
    given) from its JSON files. ``batch`` defaults to ``train.batch_size`` (per process).
    ``text_encoder_loaded`` None: loaded unless the text encoder is the tiny trainable one (which
    is counted as trainable). ``precision``: ``bfloat16`` (autocast, what CUDA training uses) or
    ``float32``. ``strategy``: ``single`` | ``ddp`` (+ gradient buckets) | ``fsdp`` (weights,
    gradients, optimiser and EMA sharded over ``world_size``) | ``auto`` (what the trainer picks
    from ``train.distributed`` and ``world_size``).
    """
    from ..models.dit4dit import parameter_counts

    b = int(batch if batch is not None else cfg.train.batch_size)
    if b < 1:
        raise ConfigError(f"batch must be >= 1, got {b}")
    vae_config = text_config = None
    if backbone is not None:
        from ..models.backbone import Backbone

        bb = Backbone.open(backbone)
        bb.check_config(cfg, ["transformer"])
        if bb.has("vae"):
            vae_config = bb.component_config("vae")
        if bb.has("text_encoder"):
            d = bb.component_config("text_encoder")
            text_config = d.get("text_config") or d
    counts = dict(parameter_counts(cfg))
    if cfg.codec.kind == "wan_vae" and vae_config is not None:
        counts["codec_frozen"] = _vae_params(vae_config)
    v, a = cfg.video, cfg.action
    static = cfg.encoder == "static_image"
    if static:  # the image encoder takes the video DiT's place: all its blocks train, on the conditioning frames
        counts["video_dit"] = counts["video_dit_feature_path"] = counts["image_encoder"]

    # ---- which parts run with gradients -------------------------------------------------------
    # The rule the model's loss follows (`cfg.losses()`): nv rows of the encoder's own generative loss
    # (the video loss, or the image encoder's denoising loss) through every block and the head, nf
    # feature rows through the first L_f blocks.
    which = cfg.losses()
    need_action = which.action
    nv = (max(1, math.ceil(cfg.video_loss_fraction * b)) if need_action else b) if which.generative else 0
    nf = b if need_action else 0
    feat_grad = need_action and cfg.feature_grad == "end_to_end"
    K, L_f = v.num_layers, (v.num_layers if static else cfg.feature_blocks)
    if which.generative:
        video_grad_params = counts["video_dit"]
    elif feat_grad:
        video_grad_params = counts["video_dit_feature_path"]
    else:
        video_grad_params = 0
    action_params = counts["action_dit"] if need_action else 0
    tiny_text = counts["text_encoder_trainable"]
    trainable = counts["video_dit"] + counts["action_dit"] + tiny_text
    with_grad = video_grad_params + action_params + tiny_text
    if strategy == "auto":  # what the trainer picks (train.distributed)
        from .distributed import choose_strategy

        strategy = choose_strategy(cfg.train.distributed, world_size, trainable)

    # ---- states ------------------------------------------------------------------------------
    shard = world_size if strategy == "fsdp" else 1
    weights = 4 * trainable / shard
    grads = 4 * with_grad / shard
    optimizer = 8 * with_grad / shard
    ema = 4 * trainable / shard if cfg.train.ema_decay is not None else 0
    ddp_buckets = 4 * with_grad if strategy == "ddp" else 0
    vae = 4 * counts["codec_frozen"]
    if text_encoder_loaded is None:
        text_encoder_loaded = cfg.text.kind == "cosmos_reason1"
    text_params = 0
    if cfg.text.kind == "cosmos_reason1" and text_encoder_loaded:
        text_params = _qwen_text_params(text_config or _REASON1_TEXT)
    text_encoder = 2 * text_params
    bf16 = precision == "bfloat16"
    if strategy == "fsdp":  # gathered bf16 (or fp32) blocks: the current one and the prefetched one
        casts = 2 * (2 if bf16 else 4) * counts["video_dit_per_block"]
    else:
        casts = 2 * (trainable + counts["codec_frozen"]) if bf16 else 0
    states = weights + optimizer + ema + vae + text_encoder + ddp_buckets

    # ---- activations -------------------------------------------------------------------------
    lat_t, lat_h, lat_w = _latent_grid(cfg, vae_config, cfg.inputs.num_cond_frames if static else None)
    p_t, p_h, p_w = v.patch_size
    n_tok = (lat_t // p_t) * (lat_h // p_h) * (lat_w // p_w)
    d = v.width
    l_txt = cfg.text.max_length
    d_txt = v.text_input_dim
    scale = 1.0 if bf16 else 2.0  # the constants are bf16 measurements; float32 roughly doubles them
    block_row = scale * (BLOCK_TOKEN_BYTES * n_tok * d + BLOCK_TEXT_BYTES * l_txt * d)
    ckpt_row = scale * CKPT_TOKEN_BYTES * n_tok * d
    shared = which.video and need_action and cfg.share_video_passes and cfg.feature_grad == "end_to_end"
    if shared:
        embed_rows = nv + nf
        block_rows = (nv + nf) * L_f + nv * (K - L_f)
        widest = nv + nf
    else:
        embed_rows = nv + (nf if feat_grad else 0)
        block_rows = nv * K + (nf * L_f if feat_grad else 0)
        widest = max(nv, nf if feat_grad else 0)
    proj_in = (2 if bf16 else 4) * l_txt * d_txt if v.use_crossattn_projection else 0
    embed_row = scale * EMBED_TOKEN_BYTES * n_tok * d + proj_in
    act_embed = embed_rows * embed_row
    act_blocks = {False: block_rows * block_row, True: block_rows * ckpt_row}
    recompute = widest * block_row
    rows_a = nf * cfg.repeated_diffusion_steps
    seq = 1 + a.num_future_tokens + a.action_horizon
    n_cross = (a.num_layers + 1) // 2
    act_action = rows_a * scale * (n_cross * ACTION_CROSS_BYTES * n_tok * a.cross_attention_dim
                                   + a.num_layers * ACTION_TOKEN_BYTES * seq * a.width)
    features_f32 = 4 * n_tok * d * (nf + rows_a) if need_action else 0
    text_batch = 4 * b * l_txt * d_txt  # the float32 embeddings of the batch (from the cache / encoder)
    vae_encode = 0
    if cfg.codec.kind == "wan_vae" and not latents_cached:
        # rough: input clip + the widest first-stage feature maps of the causal encoder (96 ch, <= 6 frames)
        h, w = cfg.inputs.image_size
        base = int((vae_config or {}).get("base_dim") or 96)
        t = cfg.inputs.num_frames
        vae_encode = 4 * b * 3 * t * h * w + 6 * 2 * b * base * min(6, t) * h * w

    def total(ckpt: bool) -> dict[str, float]:
        fwd = states + casts + act_embed + act_blocks[ckpt] + act_action + features_f32 + text_batch
        if cfg.train.grad_accum > 1:  # gradients of the previous micro-batches stay allocated
            fwd += grads
        bwd = states + grads + act_embed + (recompute if ckpt else 0) + casts * (counts["video_dit_per_block"]
                                                                               / max(trainable, 1))
        opt = states + grads
        enc = states + casts + text_batch + vae_encode
        phases = {"forward_end": fwd, "backward_end": bwd, "optimizer_step": opt, "vae_encode": enc}
        peak = max(phases.values())
        return {"phases": phases, "peak": peak, "total": peak * (1 + FRAGMENTATION) + RESERVE_BYTES}

    with_ckpt, without_ckpt = total(True), total(False)
    config_ckpt = bool(cfg.gradient_checkpointing)
    gpu = float(gpu_memory_gb) * GiB
    chosen = with_ckpt if config_ckpt else without_ckpt
    return {
        "preset": cfg.name,
        "batch": b,
        "precision": ("bf16 autocast, float32 master weights / gradients / AdamW" if bf16 else "float32"),
        "strategy": strategy,
        "world_size": world_size,
        "tokens_per_sample": n_tok,
        "text_tokens": l_txt,
        "rows": {"video_loss": nv, "features": nf, "action": rows_a, "shared_pass": shared},
        "params": {"trainable": trainable, "with_gradient": with_grad, "video_dit": counts["video_dit"],
                   "action_dit": counts["action_dit"], "frozen_vae": counts["codec_frozen"],
                   "text_encoder": text_params},
        "bytes": {
            "weights": weights, "gradients": grads, "optimizer": optimizer, "ema": ema, "ddp_buckets": ddp_buckets,
            "frozen_vae": vae, "text_encoder": text_encoder, "weight_casts": casts,
            "text_batch": text_batch, "features_f32": features_f32,
            "activations_embedding": act_embed,
            "activations_blocks_no_checkpointing": act_blocks[False],
            "activations_blocks_checkpointing": act_blocks[True],
            "recompute_one_block": recompute,
            "activations_action_dit": act_action,
            "vae_encode_transient": vae_encode,
        },
        "phases": {"checkpointing": with_ckpt["phases"], "no_checkpointing": without_ckpt["phases"]},
        "total_bytes": {"checkpointing": with_ckpt["total"], "no_checkpointing": without_ckpt["total"]},
        "gradient_checkpointing": config_ckpt,
        "estimate_bytes": chosen["total"],
        "gpu_memory_bytes": gpu,
        "fits": {"checkpointing": with_ckpt["total"] <= gpu, "no_checkpointing": without_ckpt["total"] <= gpu,
                 "config": chosen["total"] <= gpu},
        "text_encoder_loaded": bool(text_encoder_loaded and cfg.text.kind == "cosmos_reason1"),
        "latents_cached": bool(latents_cached),
    }


def format_estimate(est: dict[str, Any]) -> str:
    """A human-readable table of `estimate_training_memory`'s result."""
    g = lambda x: f"{x / GiB:7.2f} GiB"  # noqa: E731
    by = est["bytes"]
    p = est["params"]
    dist = "" if est["strategy"] == "single" else f", {est['strategy']} x {est['world_size']}"
    lines = [
        f"training memory estimate: preset {est['preset']}, batch {est['batch']} per GPU, {est['precision']}{dist}",
        f"  tokens per sample {est['tokens_per_sample']}, rows: video loss {est['rows']['video_loss']}, "
        f"features {est['rows']['features']}, action {est['rows']['action']}"
        f"{' (tau_v and tau_f in one pass)' if est['rows']['shared_pass'] else ''}",
        f"  trainable params {p['trainable'] / 1e9:.3f} B ({p['with_gradient'] / 1e9:.3f} B with gradients), "
        f"frozen VAE {p['frozen_vae'] / 1e6:.0f} M, text encoder {p['text_encoder'] / 1e9:.2f} B"
        f"{'' if est['text_encoder_loaded'] else ' (embeddings cached: not loaded)'}",
        f"  weights (fp32)          {g(by['weights'])}",
        f"  gradients (fp32)        {g(by['gradients'])}",
        f"  AdamW moments (2x fp32) {g(by['optimizer'])}",
    ]
    if by["ema"]:
        lines.append(f"  EMA (fp32)              {g(by['ema'])}")
    if by["ddp_buckets"]:
        lines.append(f"  DDP gradient buckets    {g(by['ddp_buckets'])}")
    lines += [
        f"  frozen VAE (fp32)       {g(by['frozen_vae'])}",
        f"  text encoder (bf16)     {g(by['text_encoder'])}",
        f"  autocast weight casts   {g(by['weight_casts'])}",
        f"  text batch + features   {g(by['text_batch'] + by['features_f32'])}",
        f"  activations: embedding  {g(by['activations_embedding'])}, action DiT {g(by['activations_action_dit'])}",
        f"  activations: video blocks {g(by['activations_blocks_no_checkpointing'])} without checkpointing, "
        f"{g(by['activations_blocks_checkpointing'])} with (+ {g(by['recompute_one_block'])} recompute)",
    ]
    gpu = est["gpu_memory_bytes"]
    for key, label in (("checkpointing", "with checkpointing   "), ("no_checkpointing", "without checkpointing")):
        t = est["total_bytes"][key]
        mark = "fits" if t <= gpu else "does NOT fit"
        chosen = " <- config" if (key == "checkpointing") == est["gradient_checkpointing"] else ""
        lines.append(f"  total {label} {g(t)}  {mark} in {gpu / GiB:.0f} GiB{chosen}")
    return "\n".join(lines)


def check_training_memory(cfg: DiT4DiTConfig, device: Any, *, batch: int | None = None, backbone: Any = None,
                          text_encoder_loaded: bool | None = None, latents_cached: bool = False,
                          precision: str = "bfloat16", world_size: int = 1, strategy: str = "single"
                          ) -> dict[str, Any] | None:
    """Refuse to start (InsufficientMemoryError, with the estimate) when the estimate for ``cfg``
    exceeds the memory free on the CUDA ``device``. Nothing is checked on other devices, or when
    ``$DIT4DIT_SKIP_MEMORY_CHECK`` is set. Returns the estimate (None when not checked)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return None
    free, total = torch.cuda.mem_get_info(dev)
    est = estimate_training_memory(cfg, batch, backbone=backbone, text_encoder_loaded=text_encoder_loaded,
                                   latents_cached=latents_cached, gpu_memory_gb=free / GiB, precision=precision,
                                   world_size=world_size, strategy=strategy)
    if not est["fits"]["config"]:
        hint = ("set gradient_checkpointing=true (--set gradient_checkpointing=true), "
                if not cfg.gradient_checkpointing and est["fits"]["checkpointing"] else "")
        raise InsufficientMemoryError(
            f"not enough GPU memory to train {cfg.name!r} at batch {est['batch']} on {dev}: estimated "
            f"{est['estimate_bytes'] / GiB:.1f} GiB, {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB "
            f"(checked before loading).\n{format_estimate(est)}\nFixes: {hint}lower train.batch_size and raise "
            f"train.grad_accum, lower video_loss_fraction, cache the text embeddings (dit4dit embed-text, "
            f"--text-cache), or set {SKIP_ENV}=1 to start anyway")
    return est
