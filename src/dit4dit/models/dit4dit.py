"""DiT4DiT: the joint video-action model (the paper's Algorithms 1 and 2).

The action DiT's features come from a feature encoder (`dit4dit.models.features`): the video DiT
(DiT4DiT), or the static image encoder of the static-image baseline (`encoder=static_image`, the
paper's Qwen3DiT at our scale: it reads the conditioning frame(s) and the instruction only, never
the future, and has no video loss). Both implement one interface; the model reads the same for both.

Training step (`loss`, Algorithm 1):
  1. encode the clip with the frozen codec (only the conditioning frames when the encoder never
     reads the future) — lines 4-5;
  2. the encoder's own generative loss: for the video DiT, future latents at `tau_v ~ U[0, 1]`,
     the predicted velocity, MSE on the future frames (lines 6-11); for the static image encoder's
     pretraining (`mode=image_only`), the same on the conditioning frame's own latents;
  3. features (lines 13-15): the clean conditioning latents and a pure-noise future latent
     `z_hat ~ N(0, I)` presented at flow time `tau_f`; the video DiT runs up to `feature_blocks`
     and its hidden states `h` (B, tokens, width) are the features — in one batched forward with
     step 2 when possible. The ground-truth future never enters this pass, so training features
     are exactly what inference computes;
  4. action loss (lines 17-22): `repeated_diffusion_steps` draws of `tau_a = Beta(1.5, 1) / 0.999`
     and noise per sample, the action DiT predicts the velocity from `h` and the state; masked MSE;
  5. total = L_action + lambda * L_video (line 24).
Which of these losses run is `cfg.losses()` (`dit4dit.config.Losses`): mode=video_only and
image_only train the encoder's loss alone, mode=action_only the action loss alone.

Rows without actions (action-free video, `has_actions` False) feed the encoder's generative loss
only: they are never part of the feature pass, the action loss or its mask.

Inference (`predict_action`, Algorithm 2): encode the conditioning frame(s) alone, the same
feature pass as step 3, then `num_action_steps` Euler steps of the action DiT from noise
(tau = 1) to the action chunk (tau = 0). `predict_video` integrates the video DiT instead and
decodes the predicted future frames (an error for the static-image baseline).

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
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .. import flow
from ..config import DiT4DiTConfig, Losses
from .action_dit import ActionDiT
from .codecs import LatentCodec, build_codec
from .features import FeatureEncoder, FeatureInputs, StaticImageFeatures, VideoDiTFeatures
from .image_encoder import CurrentFrameDenoiser, ImageEncoder
from .text import CosmosReason1TextEncoder, EmbeddingCache, TextEncoder, build_text_encoder
from .video_dit import VideoDiT
from . import rtc

if TYPE_CHECKING:
    from .backbone import Backbone


class DiT4DiT(nn.Module):
    """The joint model. Exactly one feature encoder is given: `video_dit` (encoder=video_dit), or
    `image_encoder` (encoder=static_image). `text_identity`: the cache key of a frozen text encoder
    that is not loaded (text then comes from `text_cache` alone); `backbone`: the validated folder
    the model was built from (None without one)."""

    def __init__(self, cfg: DiT4DiTConfig, video_dit: VideoDiT | None, action_dit: ActionDiT, codec: LatentCodec,
                 text_encoder: TextEncoder | None, text_cache: EmbeddingCache | None = None,
                 image_encoder: ImageEncoder | None = None, *, text_identity: str | None = None,
                 backbone: "Backbone | None" = None):
        super().__init__()
        self.cfg = cfg
        static = cfg.encoder == "static_image"
        if static != (image_encoder is not None) or static == (video_dit is not None):
            raise ValueError(f"encoder={cfg.encoder!r} takes " + ("an image_encoder and no video_dit" if static
                                                                  else "a video_dit and no image_encoder"))
        if video_dit is not None and video_dit.generated_channels != cfg.codec.generated_channels:
            raise ValueError(f"the video DiT generates {video_dit.generated_channels} future channels, the config "
                             f"codec.generated_channels={cfg.codec.generated_channels}: build it with "
                             f"VideoDiT(..., generated_channels=cfg.codec.generated_channels)")
        self.video_dit = video_dit
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
        self.text_identity = text_identity
        self.backbone = backbone
        n_cond = codec.num_latent_frames(cfg.inputs.num_cond_frames)
        if static:
            self._features: FeatureEncoder = StaticImageFeatures(image_encoder, self.image_head)
        else:
            self._features = VideoDiTFeatures(video_dit, cfg, n_cond, codec.num_latent_frames(cfg.inputs.num_frames)
                                              - n_cond, codec.temporal_factor == 1)
        # Inference-time memo of text embeddings per prompt (weights are fixed while serving);
        # cleared whenever the model switches mode, so training never sees a stale embedding.
        self._text_memo: dict[str, torch.Tensor] = {}
        # Set by compile_for_inference(): compiled feature pass and action DiT (inference only).
        self._compiled_features = None
        self._compiled_action_dit = None

    def compile_for_inference(self, mode: str | None = None, dynamic: bool = False) -> "DiT4DiT":
        """`torch.compile` the feature pass and the action DiT used by `predict_action`.

        `mode="reduce-overhead"` adds CUDA graphs on a GPU (static shapes). Training is unaffected.
        Compilation happens on the first call for each input shape. The compiled feature pass is
        called as `(*feature_inputs, text)`.
        """
        encoder = self.feature_encoder

        def feature_pass(*inputs_and_text):
            return encoder.feature_pass(inputs_and_text[:-1], inputs_and_text[-1])

        self._compiled_features = torch.compile(feature_pass, mode=mode, dynamic=dynamic)
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
        generated, ckpt = cfg.codec.generated_channels, cfg.gradient_checkpointing
        if cfg.encoder == "static_image":  # the baseline: no video DiT, an image encoder trained from scratch
            video = None
            image_encoder = ImageEncoder(cfg)
            if video_dtype is not None:
                image_encoder.to(video_dtype)
        elif not load_video_weights:
            video = _empty_video_dit(cfg, video_dtype or (torch.bfloat16 if bb is not None else torch.float32))
        elif bb is not None:
            video = VideoDiT.from_pretrained(bb.root, cfg.video, torch_dtype=video_dtype or torch.bfloat16,
                                             generated_channels=generated, gradient_checkpointing=ckpt)
        else:
            video = VideoDiT(cfg.video, generated_channels=generated, gradient_checkpointing=ckpt)
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
        return cls(cfg, video, action, codec, text, cache, image_encoder=image_encoder, text_identity=identity,
                   backbone=bb)

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

    @contextlib.contextmanager
    def gradient_checkpointing_disabled(self) -> Iterator[None]:
        """Run the block without activation recomputation (e.g. to count a step's FLOPs once)."""
        parts = [m for m in (self.video_dit, self.image_encoder, self.action_dit)
                 if m is not None and hasattr(m, "gradient_checkpointing")]
        saved = [m.gradient_checkpointing for m in parts]
        for m in parts:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m, flag in zip(parts, saved):
                m.gradient_checkpointing = flag

    def remember_text_embedding(self, prompt: str, embedding: torch.Tensor) -> None:
        """Serve `prompt` with `embedding` (L, D) at inference (eval mode, no autograd) without
        encoding it; forgotten, like every memoised embedding, when the model switches to training."""
        self._text_memo[prompt] = embedding

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
        if self.text_cache is not None and enc is None and self.text_identity:
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
    def feature_encoder(self) -> FeatureEncoder:
        """Where the action DiT's features come from (`dit4dit.models.features`): the video DiT or
        the static image encoder; `.module` is its trainable module."""
        return self._features

    @property
    def video_dtype(self) -> torch.dtype:
        """Dtype of the latents and text fed to the feature encoder."""
        return self.feature_encoder.dtype

    @property
    def losses(self) -> Losses:
        """Which losses a training step computes (`DiT4DiTConfig.losses`)."""
        return self.cfg.losses()

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step of Algorithm 1 (the dual flow-matching loss). Returns (total, logs):
        logs hold "loss" and each term that runs (`losses.names`: "loss_action", "loss_video",
        "loss_image")."""
        cfg, which, encoder = self.cfg, self.losses, self.feature_encoder
        latents = self._batch_latents(batch, encoder.reads_future)  # lines 4-5: z_t^0 (and z_{t+1}^0)
        b, n_cond, dev = latents.shape[0], self.num_cond_latents, latents.device
        text = self.encode_text(list(batch["instruction"]))
        # Action-free rows feed the encoder's own loss only; the image loss reads every row in batch order.
        rows = _Rows.of(batch, b, dev) if which.action or which.video else _Rows.every(b)
        which.check_rows(rows.num_labelled, rows.num_free)

        # Lines 6-8: the encoder's generative loss draws its flow time (tau_v) and noise (z) for its
        # rows: every action-free row, then the first share of the labelled rows.
        loss_in = None
        if which.generative:
            n_lab = (max(1, math.ceil(cfg.video_loss_fraction * rows.num_labelled)) if which.action
                     else rows.num_labelled)
            grows = rows.video_rows(n_lab)
            fm = batch.get("future_mask") if encoder.reads_future else None
            loss_in = encoder.loss_inputs(rows.take(latents, grows), rows.take(text, grows), generator,
                                          None if fm is None else rows.take(fm.to(dev), grows))
        # Lines 13-14: tau_f and the pure-noise future z_hat for the labelled rows (the true future
        # is never read).
        feature_in = text_a = None
        if which.action:
            text_a = rows.take(text, rows.labelled)
            tau_f = encoder.sample_tau_f(text_a.shape[0], generator, dev)
            feature_in = self._feature_inputs(rows.take(latents, rows.labelled)[:, :, :n_cond], text_a, tau_f,
                                              generator)
        # Lines 9-11 and 15: the forward passes (one batched forward where the encoder can).
        encoder_loss, features = encoder.loss_and_features(loss_in, feature_in, text_a,
                                                           detach_features=cfg.feature_grad == "detached")
        parts: dict[str, torch.Tensor] = {}
        if encoder_loss is not None:
            parts[encoder.loss_name] = encoder_loss
        # Lines 17-22: the action flow-matching loss on h and the state.
        if which.action:
            labelled = {k: rows.take(batch[k].to(dev), rows.labelled) for k in ("actions", "action_mask", "state")}
            parts["loss_action"] = self._action_loss(features.float(), labelled, generator)
        total = which.total(parts)  # line 24
        logs = {k: float(v.detach()) for k, v in parts.items()}
        logs["loss"] = float(total.detach())
        return total, logs

    def _batch_latents(self, batch: dict[str, Any], future: bool) -> torch.Tensor:
        """The batch's normalised latents: of the whole clip (`future`), else of the conditioning
        frames only (the future frames are then never encoded)."""
        if "latents" in batch:  # precomputed (`dit4dit cache-latents`): the VAE is skipped
            latents = self._cached_latents(batch["latents"])
            return latents if future else latents[:, :, : self.num_cond_latents]
        video = batch["video"] if future else batch["video"][:, :, : self.cfg.inputs.num_cond_frames]
        return self.encode_video(video.to(self.device))

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

    def _feature_inputs(self, cond: torch.Tensor, text: torch.Tensor, tau_f: torch.Tensor | None,
                        generator: torch.Generator | None) -> FeatureInputs:
        """Input of the feature pass, the same in training and at inference (Algorithm 1, line 14;
        Algorithm 2): for the video DiT, the clean conditioning latents `cond` and a pure-noise
        future at flow time `tau_f` (`VideoDiTFeatures.feature_inputs`)."""
        return self.feature_encoder.feature_inputs(cond, text, tau_f, generator)

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
        """Features (B, tokens, width) for conditioning frames (B, 3, Tc, H, W) at `tau_f`: for the
        video DiT one future noise latent, optional denoising steps, one truncated pass
        (`_feature_inputs`); for the static image encoder one pass on the frames."""
        cond = self.encode_video(cond_video)
        tau_f = torch.full((cond.shape[0],), self.cfg.tau_f, device=cond.device)
        inputs = self._feature_inputs(cond, text, tau_f, generator)
        if self._compiled_features is not None:
            return self._compiled_features(*inputs, text)
        return self.feature_encoder.feature_pass(inputs, text)

    @torch.no_grad()
    def predict_action(self, cond_video: torch.Tensor, state: torch.Tensor, instruction: list[str] | None = None,
                       *, text: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       num_steps: int | None = None, prefix: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None,
                       max_guidance: float = rtc.DEFAULT_MAX_GUIDANCE) -> torch.Tensor:
        """Normalised action chunk (B, H, action_dim) from conditioning frames and state (Algorithm 2,
        action branch): encode the conditioning frames, one feature pass at `tau_f` on a fresh noise
        future (`extract_features`), then `num_steps` Euler steps of the action DiT from
        `a ~ N(0, I)` at tau = 1 to the chunk at tau = 0, conditioned on the features and the state.

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
        feats = self.extract_features(cond_video, text.to(self.video_dtype), generator).float()  # h_t^{tau_f}
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
    kw = dict(generated_channels=cfg.codec.generated_channels, gradient_checkpointing=cfg.gradient_checkpointing)
    with torch.device("meta"):
        video = VideoDiT(cfg.video, **kw)
    names = set(video.state_dict())
    extra = [n for n, _ in video.named_buffers() if n not in names]
    if extra:  # non-persistent buffers would stay garbage: build it the ordinary way
        return VideoDiT(cfg.video, **kw).to(dtype)
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
    def every(cls, b: int) -> "_Rows":
        """Every row, in batch order, counted as labelled (`has_actions` not read)."""
        return cls(slice(0, b), None, b)

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
