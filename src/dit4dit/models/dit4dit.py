"""DiT4DiT: the joint video-action model (the paper's Algorithms 1 and 2).

Training step (`loss`):
  1. encode the clip (conditioning + future frames) with the frozen codec;
  2. video loss: future latents at `tau_v ~ U[0, 1]`, predict the velocity, MSE on future frames;
  3. features (Algorithm 1, line 14): the clean conditioning latents and a pure-noise future
     latent `z_hat ~ N(0, I)` presented at flow time `tau_f`; run the video DiT up to
     `feature_blocks` and take the hidden states `h` (B, tokens, width) — in one batched forward
     with step 2 when possible. The ground-truth future never enters this pass, so training
     features are exactly what inference computes;
  4. action loss: `repeated_diffusion_steps` draws of `tau_a = Beta(1.5, 1) / 0.999` and noise per
     sample, the action DiT predicts the velocity from `h` and the state; masked MSE;
  5. total = L_action + lambda * L_video.

Rows without actions (action-free video, `has_actions` False) feed the video loss only: they are
never part of the feature pass, the action loss or its mask.

Inference (`predict_action`): encode the conditioning frame(s) alone, the same feature pass as
step 3, then `num_action_steps` Euler steps of the action DiT from noise (tau = 1) to the action
chunk (tau = 0). `predict_video` integrates the video DiT instead and decodes the predicted
future frames.

Static-image baseline (`encoder="static_image"`, the paper's Qwen3DiT at our scale): the video DiT
is replaced by `ImageEncoder`, a transformer of the same width and depth that reads the
conditioning frame(s) and the instruction only. The features come from it; future frames are
never encoded, there is no video loss (`loss` returns loss_action and loss) and `predict_video`
is an error. Its action-free pretraining objective (`mode="image_only"`, `CurrentFrameDenoiser`):
denoise the conditioning frame's own latents by flow matching (`loss` returns loss_image and
loss); the future frames, state and actions are never read.

Batch contract (what the data pipeline produces):
  video (B, 3, T, H, W) in [-1, 1], T = num_cond_frames + num_future_frames
  state (B, state_dim), state_mask (B, state_dim) bool
  actions (B, H, action_dim), action_mask (B, H, action_dim) bool
  instruction list[str]; optional future_mask (B, num_future_frames) bool
  optional has_actions (B,) bool: False for rows of action-free video (their state, actions and
    masks are ignored); absent = every row is labelled
  optional latents (B, C, T', h, w): the clip's normalised latents precomputed by
    `dit4dit cache-latents` (`dit4dit.data.latent_cache`); then `video` is not encoded
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import flow
from ..config import DiT4DiTConfig
from .action_dit import ActionDiT
from .codecs import LatentCodec, build_codec
from .image_encoder import CurrentFrameDenoiser, ImageEncoder
from .text import CosmosReason1TextEncoder, EmbeddingCache, TextEncoder, build_text_encoder
from .video_dit import VideoDiT
from . import rtc

if TYPE_CHECKING:
    from .backbone import Backbone


class DiT4DiT(nn.Module):
    def __init__(self, cfg: DiT4DiTConfig, video_dit: VideoDiT | None, action_dit: ActionDiT, codec: LatentCodec,
                 text_encoder: TextEncoder | None, text_cache: EmbeddingCache | None = None,
                 image_encoder: ImageEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        static = cfg.encoder == "static_image"
        if static != (image_encoder is not None) or static == (video_dit is not None):
            raise ValueError(f"encoder={cfg.encoder!r} takes " + ("an image_encoder and no video_dit" if static
                                                                  else "a video_dit and no image_encoder"))
        self.video_dit = video_dit
        if video_dit is not None:
            video_dit.generated_channels = cfg.codec.generated_channels
        self.image_encoder = image_encoder  # the static-image baseline's feature encoder
        # Its pretraining head (mode=image_only: denoise the current frame); absent otherwise.
        self.image_head = None
        if static and cfg.mode == "image_only":
            self.image_head = CurrentFrameDenoiser(cfg).to(next(image_encoder.parameters()).dtype)
        self.action_dit = action_dit
        self.codec = codec
        # A frozen text encoder (the 7B Cosmos-Reason1) is optional once its embeddings are cached.
        self.text_encoder = text_encoder
        self.text_cache = text_cache
        self.feature_encoder.gradient_checkpointing = cfg.gradient_checkpointing
        # Inference-time memo of text embeddings per prompt (weights are fixed while serving);
        # cleared whenever the model switches mode, so training never sees a stale embedding.
        self._text_memo: dict[str, torch.Tensor] = {}
        # Set by compile_for_inference(): compiled feature pass and action DiT (inference only).
        self._compiled_features = None
        self._compiled_action_dit = None

    def compile_for_inference(self, mode: str | None = None, dynamic: bool = False) -> "DiT4DiT":
        """`torch.compile` the truncated feature pass and the action DiT used by `predict_action`.

        `mode="reduce-overhead"` adds CUDA graphs on a GPU (static shapes). Training is unaffected.
        Compilation happens on the first call for each input shape.
        """
        blocks, pool = self.cfg.feature_blocks, self.cfg.feature_pool
        video = self.video_dit

        def feature_pass(x, timestep, condition_mask, text):
            return video.features(x, timestep, condition_mask, text, blocks, pool)

        # The static-image baseline's feature pass is its image encoder, called as (latents, text).
        target = self.image_encoder if video is None else feature_pass
        self._compiled_features = torch.compile(target, mode=mode, dynamic=dynamic)
        self._compiled_action_dit = torch.compile(self.action_dit, mode=mode, dynamic=dynamic)
        return self

    def train(self, mode: bool = True) -> "DiT4DiT":
        if mode:
            self._text_memo.clear()
        return super().train(mode)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DiT4DiTConfig, backbone: "str | os.PathLike | Backbone | None" = None, *,
                    text_cache_dir: str | None = None, load_text_encoder: bool = True,
                    video_dtype: torch.dtype | None = None, random_weights: bool = False,
                    load_video_weights: bool = True) -> "DiT4DiT":
        """Build a model. With `backbone`, the video DiT (and the VAE / text encoder, unless their
        configs name other folders) are loaded from that local Cosmos-Predict2.5 diffusers folder.

        The folder is validated first (`Backbone`: missing subfolders, configs that do not match
        the preset and corrupted safetensors files are named before any weight loads). The video
        DiT loads in `video_dtype` (default bfloat16 from a backbone, float32 otherwise), the VAE in
        float32, the frozen text encoder in bfloat16 — or not at all with `load_text_encoder=False`
        and `text_cache_dir`: text then comes from the embedding cache alone.

        `load_video_weights=False` builds the video DiT with the backbone's (or the config's)
        architecture but leaves its weights uninitialised (no init compute, no 4 GB read): for
        callers that overwrite them right away, e.g. from a checkpoint, which holds every trainable
        weight. `random_weights=True` (benchmarks) builds a frozen VAE with random weights when no
        folder is given, instead of failing, and gives a `pca` codec a random basis; otherwise a
        `pca` codec is unfitted until training fits it or a checkpoint fills it."""
        from .backbone import Backbone, needed_components

        cfg.validate()
        bb = None
        if backbone is not None:
            bb = Backbone.open(backbone, require=needed_components(
                cfg, load_text_encoder=load_text_encoder and cfg.text.kind != "tiny",
                text_cache=text_cache_dir is not None))
            bb.check_config(cfg)  # before any weight loads
            backbone = str(bb.root)
        image_encoder = None
        if cfg.encoder == "static_image":  # the baseline: no video DiT, an image encoder trained from scratch
            video = None
            image_encoder = ImageEncoder(cfg)
            if video_dtype is not None:
                image_encoder.to(video_dtype)
        elif not load_video_weights:
            video = _empty_video_dit(cfg, video_dtype or (torch.bfloat16 if bb is not None else torch.float32))
        elif bb is not None:
            video = VideoDiT.from_pretrained(bb.root, cfg.video, torch_dtype=video_dtype or torch.bfloat16)
        else:
            video = VideoDiT(cfg.video)
            if video_dtype is not None:
                video.to(video_dtype)
        action = ActionDiT(cfg.action)
        codec = build_codec(cfg.codec, backbone, random_weights=random_weights)
        text = None
        identity = None
        if cfg.text.kind == "tiny" or load_text_encoder:
            text = build_text_encoder(cfg.text, cfg.video.text_input_dim, backbone)
        elif text_cache_dir and (cfg.text.path or backbone):
            # Serve from the embedding cache alone: the cache key needs only the tokenizer side.
            identity = CosmosReason1TextEncoder.identity_for(cfg.text.path or backbone,
                                                             max_length=cfg.text.max_length)
        cache = EmbeddingCache(text_cache_dir) if text_cache_dir else None
        model = cls(cfg, video, action, codec, text, cache, image_encoder=image_encoder)
        model.text_identity = identity
        model.backbone = bb
        return model

    # ------------------------------------------------------------------ encoders
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embedding; frozen encoders go through the on-disk cache when one is set.

        In eval mode without autograd (serving), embeddings are memoised per prompt.
        """
        if not self.training and not torch.is_grad_enabled():
            missing = [p for p in dict.fromkeys(prompts) if p not in self._text_memo]
            if missing:
                for p, e in zip(missing, self._encode_text(missing)):
                    self._text_memo[p] = e
            return torch.stack([self._text_memo[p] for p in prompts])
        return self._encode_text(prompts)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        # A batch holds few distinct instructions: encode each once, then gather (gradients of a
        # trainable encoder add up over the repeats exactly as if each row were encoded).
        unique = list(dict.fromkeys(prompts))
        if len(unique) < len(prompts):
            emb = self._encode_unique_text(unique)
            where = {p: i for i, p in enumerate(unique)}
            return emb[torch.tensor([where[p] for p in prompts], device=emb.device)]
        return self._encode_unique_text(prompts)

    def _encode_unique_text(self, prompts: list[str]) -> torch.Tensor:
        enc = self.text_encoder
        if enc is not None and enc.trainable:
            return enc(prompts)
        if self.text_cache is not None and enc is None and getattr(self, "text_identity", None):
            try:
                out = self.text_cache.lookup(self.text_identity, prompts)
            except KeyError as e:
                raise KeyError(f"{e.args[0]}; the text encoder is not loaded: add them with `dit4dit embed-text "
                               f"--backbone PATH --cache {self.text_cache.root} --prompt TEXT`") from None
        elif self.text_cache is not None and enc is not None:
            out = self.text_cache.embed(enc, prompts)
        elif enc is not None:
            with torch.no_grad():
                out = enc(prompts)
        else:
            raise RuntimeError("no text encoder loaded and no embedding cache set: run `dit4dit embed-text` "
                               "or load the text encoder")
        return out.to(self.device)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, T', h, w) in the DiT's dtype."""
        return self.codec.encode(video).to(self.video_dtype)

    @property
    def num_cond_latents(self) -> int:
        return self.codec.num_latent_frames(self.cfg.inputs.num_cond_frames)

    @property
    def num_future_latents(self) -> int:
        return self.codec.num_latent_frames(self.cfg.inputs.num_frames) - self.num_cond_latents

    @property
    def device(self) -> torch.device:
        return next(self.action_dit.parameters()).device

    @property
    def feature_encoder(self) -> nn.Module:
        """The module the action DiT's features come from: the video DiT or the static image encoder."""
        return self.video_dit if self.video_dit is not None else self.image_encoder

    @property
    def video_dtype(self) -> torch.dtype:
        """Dtype of the latents and text fed to the feature encoder."""
        return next(self.feature_encoder.parameters()).dtype

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Dual flow-matching loss. Returns (total, {"loss", "loss_action", "loss_video"})."""
        cfg = self.cfg
        if cfg.mode == "image_only":
            return self._image_denoising_loss(batch, generator)
        if cfg.encoder == "static_image":
            return self._static_image_loss(batch, generator)
        if "latents" in batch:  # precomputed (`dit4dit cache-latents`): the VAE is skipped
            latents = self._cached_latents(batch["latents"])
        else:
            latents = self.encode_video(batch["video"].to(self.device))
        b = latents.shape[0]
        n_cond = self.num_cond_latents
        text = self.encode_text(list(batch["instruction"]))
        dev = latents.device
        rows = _Rows.of(batch, b, dev)

        need_action = cfg.mode != "video_only"
        need_video = cfg.mode == "video_only" or (cfg.mode == "joint" and cfg.lambda_video > 0)
        if need_action and rows.num_labelled == 0:
            raise ValueError(f"mode={cfg.mode} needs labelled rows, but every row of this batch is action-free "
                             f"video (has_actions all False)")
        if rows.num_free and not need_video:
            raise ValueError(f"this batch holds {rows.num_free} rows of action-free video, which only the video "
                             f"loss uses, but mode={cfg.mode} with lambda_video={cfg.lambda_video} has none")
        parts: dict[str, torch.Tensor] = {}

        # Video-loss rows (tau_v): every action-free row, then the first share of the labelled rows.
        if need_video:
            n_lab = max(1, math.ceil(cfg.video_loss_fraction * rows.num_labelled)) if need_action else rows.num_labelled
            vrows = rows.video_rows(n_lab)
            latents_v, text_v = rows.take(latents, vrows), rows.take(text, vrows)
            nv = latents_v.shape[0]
            tau_v = flow.sample_tau_v(nv, generator=generator, device=dev)
            noise_v = torch.randn(latents_v.shape, generator=generator, device=dev, dtype=latents.dtype)
            xv, tsv, cmv = self.video_dit.video2world_inputs(latents_v, noise_v, tau_v, n_cond)
        # Feature rows (tau_f): the labelled rows; the future frames are never read (Algorithm 1, line 14).
        if need_action:
            arows = rows.labelled
            text_a = rows.take(text, arows)
            na = text_a.shape[0]
            tau_f = flow.sample_tau_f(na, cfg.tau_f, cfg.tau_f_buckets, generator=generator, device=dev)
            xf, tsf, cmf = self._feature_inputs(rows.take(latents, arows)[:, :, :n_cond], text_a, tau_f, generator)

        features = velocity = None
        shared = need_video and need_action and cfg.share_video_passes and cfg.feature_grad == "end_to_end"
        if shared:
            features, velocity = self.video_dit.features_and_velocity(
                torch.cat([xv, xf]), torch.cat([tsv, tsf]), torch.cat([cmv, cmf]), torch.cat([text_v, text_a]),
                num_blocks=cfg.feature_blocks, num_velocity=nv, pool=cfg.feature_pool)
        else:
            if need_video:
                velocity = self.video_dit(xv, tsv, cmv, text_v)
            if need_action:
                grad = contextlib.nullcontext() if cfg.feature_grad == "end_to_end" else torch.no_grad()
                with grad:
                    features = self.video_dit.features(xf, tsf, cmf, text_a, cfg.feature_blocks, cfg.feature_pool)
        if features is not None and cfg.feature_grad == "detached":
            features = features.detach()

        if need_video:
            g = self.video_dit.generated_channels or latents.shape[1]  # channels the future frames carry
            velocity = velocity[:, :g, n_cond:]
            target = flow.target_velocity(latents_v[:, :g, n_cond:], noise_v[:, :g, n_cond:])
            fm = batch.get("future_mask")
            fm = None if fm is None else rows.take(fm.to(dev), vrows)
            parts["loss_video"] = flow.masked_mse(velocity, target, self._future_latent_mask(fm, velocity))
        if need_action:
            labelled = {k: rows.take(batch[k].to(dev), arows) for k in ("actions", "action_mask", "state")}
            parts["loss_action"] = self._action_loss(features.float(), labelled, generator)

        if cfg.mode == "video_only":
            total = parts["loss_video"]
        elif cfg.mode == "action_only" or not need_video:
            total = parts["loss_action"]
        else:
            total = parts["loss_action"] + cfg.lambda_video * parts["loss_video"]
        logs = {k: float(v.detach()) for k, v in parts.items()}
        logs["loss"] = float(total.detach())
        return total, logs

    def _static_image_loss(self, batch: dict[str, Any], generator: torch.Generator | None
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """The static-image baseline: features of the conditioning frame(s) and the instruction only,
        action loss only."""
        n_cond = self.num_cond_latents
        if _Rows.of(batch, len(batch["instruction"]), self.device).num_free:
            raise ValueError("encoder=static_image trains on labelled rows only; this batch holds action-free video")
        if "latents" in batch:
            cond = self._cached_latents(batch["latents"])[:, :, :n_cond]
        else:
            cond = self.encode_video(batch["video"][:, :, : self.cfg.inputs.num_cond_frames].to(self.device))
        text = self.encode_text(list(batch["instruction"])).to(self.video_dtype)
        features = self.image_encoder(cond, text)
        loss = self._action_loss(features.float(), batch, generator)
        value = float(loss.detach())
        return loss, {"loss_action": value, "loss": value}

    def _image_denoising_loss(self, batch: dict[str, Any], generator: torch.Generator | None
                              ) -> tuple[torch.Tensor, dict[str, float]]:
        """The static image encoder's pretraining objective (`mode=image_only`, `CurrentFrameDenoiser`):
        flow matching on the conditioning frame's own latents. Only the conditioning frames are
        encoded; the future frames of the clip are never read, and neither are state nor actions
        (every row counts, labelled or action-free)."""
        n_cond = self.num_cond_latents
        if "latents" in batch:
            x0 = self._cached_latents(batch["latents"])[:, :, :n_cond]
        else:
            x0 = self.encode_video(batch["video"][:, :, : self.cfg.inputs.num_cond_frames].to(self.device))
        x0 = x0.to(self.video_dtype)
        text = self.encode_text(list(batch["instruction"])).to(self.video_dtype)
        tau = flow.sample_tau_v(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noisy = flow.interpolate(x0, noise, tau)
        tokens = self.image_encoder(noisy, text, extra_cond=self.image_head.time_embedding(tau))
        velocity = self.image_head(tokens, x0.shape)
        loss = flow.masked_mse(velocity.float(), flow.target_velocity(x0, noise).float())
        value = float(loss.detach())
        return loss, {"loss_image": value, "loss": value}

    def _cached_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised clip latents from a latent cache, checked against what `encode_video` gives."""
        c = self.cfg.inputs
        f = self.codec.spatial_factor
        want = (self.codec.latent_channels, self.codec.num_latent_frames(c.num_frames), c.image_size[0] // f,
                c.image_size[1] // f)
        if latents.ndim != 5 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"batch['latents'] has shape {tuple(latents.shape)}, the model expects (B, *{want}) "
                             f"(normalised clip latents of {c.num_frames} frames at {c.image_size}); rebuild the "
                             f"latent cache for this config")
        return latents.to(device=self.device, dtype=self.video_dtype)

    def _feature_inputs(self, cond: torch.Tensor, text: torch.Tensor, tau_f: torch.Tensor,
                        generator: torch.Generator | None):
        """Video DiT input of the feature pass, the same in training and at inference.

        The conditioning latents `cond` (B, C, Tc, h, w) stay clean; the future latents are pure
        noise `z_hat ~ N(0, I)` presented at flow time `tau_f` (B,) (the paper's Algorithm 1, line
        14, and Algorithm 2). Nothing of the true future is read.

        `feature_denoise_steps = k > 1` (the denoising-steps ablation, the paper's Fig. 8b): a
        k-step Euler schedule runs from `tau_f` towards 0, `tau_i = tau_f * (1 - i / k)`; the video
        DiT integrates the first k - 1 steps (no gradient) and the features are taken at the k-th
        point, `tau_f / k`. With `tau_f` = 0.995 and k = 3 the points are 0.995, 0.663 and 0.332.
        """
        b, c, _, h, w = cond.shape
        future = torch.randn((b, c, self.num_future_latents, h, w), generator=generator, device=cond.device,
                             dtype=cond.dtype)
        tau = tau_f.to(device=cond.device, dtype=torch.float32)
        k = self.cfg.feature_denoise_steps
        if k > 1:
            future = self._denoise_future(cond, future, text, tau, k)
            tau = tau * (1.0 / k)
        return self.video_dit.assemble(cond, future, tau)

    @torch.no_grad()
    def _denoise_future(self, cond: torch.Tensor, future: torch.Tensor, text: torch.Tensor,
                        tau_start: torch.Tensor, k: int) -> torch.Tensor:
        """The first `k - 1` Euler steps of the video DiT on the schedule `tau_start * (1 - i / k)`,
        i = 0..k (from `tau_start` to 0); returns the future latents at point k - 1."""
        n_cond = cond.shape[2]
        for i in range(k - 1):
            t = tau_start * (1.0 - i / k)
            t_next = tau_start * (1.0 - (i + 1) / k)
            x, ts, cm = self.video_dit.assemble(cond, future, t)
            v = self.video_dit(x, ts, cm, text)[:, :, n_cond:]
            future = future - (t - t_next).view(-1, 1, 1, 1, 1).to(future.dtype) * v
        return future

    def _future_latent_mask(self, fm: torch.Tensor | None, velocity: torch.Tensor) -> torch.Tensor | None:
        """Per-latent-frame mask of real (not end-of-episode padding) future frames (`fm`: the video
        rows' future_mask), where the codec maps frames to latent frames one to one; None otherwise
        (padding repeats the last frame)."""
        if fm is None or self.codec.temporal_factor != 1:
            return None
        nv, c, h, w = velocity.shape[0], velocity.shape[1], velocity.shape[3], velocity.shape[4]
        m = fm.to(velocity.device).bool().view(nv, 1, -1, 1, 1)
        return m.expand(nv, c, m.shape[2], h, w)

    def _action_loss(self, features: torch.Tensor, batch: dict[str, Any], generator) -> torch.Tensor:
        cfg = self.cfg
        r = cfg.repeated_diffusion_steps
        dev = features.device
        mask = batch["action_mask"].to(dev).repeat_interleave(r, 0)
        # Padded dimensions and steps carry no data: zero them so they cannot reach the inputs.
        actions = batch["actions"].to(dev).float().repeat_interleave(r, 0) * mask
        state = batch["state"].to(dev).float().repeat_interleave(r, 0)
        n = actions.shape[0]
        tau_a = flow.sample_tau_a(n, cfg.tau_a_alpha, cfg.tau_a_beta, cfg.tau_a_scale, generator=generator, device=dev)
        noise = torch.randn(actions.shape, generator=generator, device=dev)
        noisy = flow.interpolate(actions, noise, tau_a)
        # Each sample's features serve its r draws: the cross-attention K/V are computed once.
        pred = self.action_dit(noisy, tau_a, state, features, repeats=r)
        return flow.masked_mse(pred, flow.target_velocity(actions, noise), mask)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def extract_features(self, cond_video: torch.Tensor, text: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Features (B, tokens, width) for conditioning frames (B, 3, Tc, H, W): one future noise
        latent, optional denoising steps, one truncated pass at `tau_f` (`_feature_inputs`)."""
        cfg = self.cfg
        cond = self.encode_video(cond_video)
        if self.image_encoder is not None:  # static-image baseline: no future, no flow time
            encoder = self.image_encoder if self._compiled_features is None else self._compiled_features
            return encoder(cond, text)
        tau_f = torch.full((cond.shape[0],), cfg.tau_f, device=cond.device)
        x, ts, cm = self._feature_inputs(cond, text, tau_f, generator)
        if self._compiled_features is not None:
            return self._compiled_features(x, ts, cm, text)
        return self.video_dit.features(x, ts, cm, text, cfg.feature_blocks, cfg.feature_pool)

    @torch.no_grad()
    def predict_action(self, cond_video: torch.Tensor, state: torch.Tensor, instruction: list[str] | None = None,
                       *, text: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       num_steps: int | None = None, prefix: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None,
                       max_guidance: float = rtc.DEFAULT_MAX_GUIDANCE) -> torch.Tensor:
        """Normalised action chunk (B, H, action_dim) from conditioning frames and state.

        Real-time chunking (``dit4dit.models.rtc``): ``prefix`` (B, H, action_dim), normalised
        actions the chunk must continue, and ``prefix_weights`` (H,) or broadcastable to the chunk
        (the soft mask, ``rtc.prefix_weights``), guide the sampler towards the prefix; without them
        the sampling is the plain Euler integration."""
        if (prefix is None) != (prefix_weights is None):
            raise ValueError("predict_action: give both `prefix` and `prefix_weights`, or neither")
        if text is None:
            if instruction is None:
                raise ValueError("predict_action needs `instruction` or a precomputed `text` embedding")
            text = self.encode_text(list(instruction))
        cond_video = cond_video.to(self.device)
        state = state.to(self.device).float()
        feats = self.extract_features(cond_video, text.to(self.video_dtype), generator).float()
        b = feats.shape[0]
        noise = torch.randn((b, self.cfg.action.action_horizon, self.cfg.action.action_dim), generator=generator,
                            device=feats.device)
        action_dit = self.action_dit if self._compiled_action_dit is None else self._compiled_action_dit
        if prefix is not None:
            return rtc.guided_euler_sample(lambda x, tau: action_dit(x, tau, state, feats), noise,
                                           num_steps or self.cfg.num_action_steps, prefix, prefix_weights,
                                           max_guidance)
        return flow.euler_sample(lambda x, tau: action_dit(x, tau, state, feats), noise,
                                 num_steps or self.cfg.num_action_steps)

    @torch.no_grad()
    def predict_video(self, cond_video: torch.Tensor, instruction: list[str] | None = None, *,
                      text: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      num_steps: int | None = None) -> torch.Tensor:
        """Predicted future frames (B, 3, num_future_frames, H, W) in [-1, 1] by Euler sampling."""
        if self.video_dit is None:
            raise RuntimeError("predict_video: this model has no video DiT (encoder=static_image, the static-image "
                               "baseline); it predicts actions only")
        if text is None:
            text = self.encode_text(list(instruction or []))
        cond = self.encode_video(cond_video.to(self.device))
        b, c, n_cond, h, w = cond.shape
        text = text.to(self.video_dtype)
        noise = torch.randn((b, c, self.num_future_latents, h, w), generator=generator, device=cond.device,
                            dtype=cond.dtype)

        def velocity(future, tau):
            x, ts, cm = self.video_dit.assemble(cond, future, tau)
            return self.video_dit(x, ts, cm, text)[:, :, n_cond:]

        future = self.video_dit.generated(flow.euler_sample(velocity, noise, num_steps or self.cfg.num_video_steps))
        frames = self.codec.decode(torch.cat([cond, future], dim=2).float())
        return frames[:, :, self.cfg.inputs.num_cond_frames:].clamp(-1, 1)

    # ------------------------------------------------------------------ bookkeeping
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts that carry trainable weights (the codec and a frozen text encoder never do)."""
        out: dict[str, nn.Module] = ({"video_dit": self.video_dit} if self.video_dit is not None
                                     else {"image_encoder": self.image_encoder})
        if self.image_head is not None:
            out["image_head"] = self.image_head
        out["action_dit"] = self.action_dit
        if self.text_encoder is not None and self.text_encoder.trainable:
            out["text_encoder"] = self.text_encoder
        return out

    def saved_modules(self) -> dict[str, nn.Module]:
        """What a checkpoint's model.safetensors holds: the trainable parts, plus the codec when it
        carries state fitted on the data (the `pca` codec's basis); the Wan VAE comes from its folder."""
        out = self.trainable_modules()
        if self.codec.learns_from_data:
            out["codec"] = self.codec
        return out

    def fit_codec(self, frames: torch.Tensor) -> dict[str, Any] | None:
        """Fit a codec that learns from the data (`pca`) on frames (B, 3, T, H, W) in [-1, 1].
        None for codecs that need no fitting."""
        if not self.codec.learns_from_data:
            return None
        explained = self.codec.fit(frames.to(self.codec.mean.device))
        return {"kind": self.cfg.codec.kind, "channels": self.codec.latent_channels, "explained_variance": explained,
                "frames": int(frames.shape[0] * frames.shape[2])}


def _empty_video_dit(cfg: DiT4DiTConfig, dtype: torch.dtype) -> VideoDiT:
    """The video DiT of `cfg` with uninitialised weights in `dtype` on the CPU: built on the meta
    device (no init compute), then given storage. Every tensor of the module is in its
    state_dict, so loading a state_dict fills it completely (checked here)."""
    with torch.device("meta"):
        video = VideoDiT(cfg.video)
    names = set(video.state_dict())
    extra = [n for n, _ in video.named_buffers() if n not in names]
    if extra:  # non-persistent buffers would stay garbage: build it the ordinary way
        video = VideoDiT(cfg.video)
        return video.to(dtype)
    video.to(dtype)
    return video.to_empty(device="cpu")


def parameter_counts(cfg: DiT4DiTConfig) -> dict[str, int]:
    """Parameter counts per part, computed on the meta device (no weights allocated)."""
    with torch.device("meta"):
        video = VideoDiT(cfg.video)
        action = ActionDiT(cfg.action)
        text = build_text_encoder(cfg.text, cfg.video.text_input_dim, None) if cfg.text.kind == "tiny" else None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tr = video.transformer
    proj = n(tr.crossattn_proj) if cfg.video.use_crossattn_projection else 0
    counts = {
        "video_dit": n(video),
        "video_dit_blocks": n(tr.transformer_blocks),
        "video_dit_per_block": n(tr.transformer_blocks[0]),
        "video_dit_feature_path": n(video) - n(tr.transformer_blocks) + n(tr.transformer_blocks[: cfg.feature_blocks])
        - n(tr.norm_out) - n(tr.proj_out),
        "text_projection": proj,
        "action_dit": n(action),
        "text_encoder_trainable": n(text) if text is not None else 0,
        "codec_frozen": _frozen_codec_params(cfg),
    }
    encoder = counts["video_dit"]
    if cfg.encoder == "static_image":
        # The baseline trains the image encoder instead; the video DiT's counts stay for comparison.
        with torch.device("meta"):
            counts["image_encoder"] = encoder = n(ImageEncoder(cfg))
    counts["trainable_total"] = encoder + counts["action_dit"] + counts["text_encoder_trainable"]
    return counts


def _frozen_codec_params(cfg: DiT4DiTConfig) -> int:
    """The pixel and pca codecs have no weights; the Wan2.1 VAE's default diffusers config is the released one."""
    if cfg.codec.per_frame:
        return 0
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKLWan().parameters())


class _Rows:
    """Which rows of a batch are labelled (state and actions) and which are action-free video
    (`batch["has_actions"]` False). Without that key, or when every row is labelled, the row sets
    are plain slices, so the loss computes exactly what it did before action-free rows existed."""

    def __init__(self, labelled: torch.Tensor | slice, free: torch.Tensor | None, num_labelled: int):
        self.labelled = labelled
        self.free = free
        self.num_labelled = num_labelled
        self.num_free = 0 if free is None else int(free.numel())

    @classmethod
    def of(cls, batch: dict[str, Any], b: int, device: torch.device) -> "_Rows":
        has = batch.get("has_actions")
        if has is None:
            return cls(slice(0, b), None, b)
        has = torch.as_tensor(has).to(device=device, dtype=torch.bool).reshape(-1)
        if has.numel() != b:
            raise ValueError(f"batch['has_actions'] has {has.numel()} entries for a batch of {b} rows")
        if bool(has.all()):
            return cls(slice(0, b), None, b)
        lab = torch.nonzero(has).flatten()
        return cls(lab, torch.nonzero(~has).flatten(), int(lab.numel()))

    def video_rows(self, num_labelled: int) -> torch.Tensor | slice:
        """Every action-free row, then the first `num_labelled` labelled rows."""
        if self.free is None:
            return slice(0, num_labelled)
        return torch.cat([self.free, self.labelled[:num_labelled]])

    @staticmethod
    def take(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
