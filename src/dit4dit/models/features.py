"""Where the action DiT's features come from: the feature-encoder interface and its two implementations.

`DiT4DiT` conditions its action DiT on hidden states `h` (B, tokens, width) of a feature encoder,
and trains that encoder with a generative objective of its own. Two encoders implement the
interface (`DiT4DiT.feature_encoder`):

- `VideoDiTFeatures` (DiT4DiT): the video DiT. Its features are the hidden states after
  `feature_blocks` blocks of a pass on the clean conditioning latents and a pure-noise future
  `z_hat ~ N(0, I)` at flow time `tau_f` (the paper's Algorithm 1, lines 13-15, and Algorithm 2);
  its objective is the video flow-matching loss on the future frames at `tau_v ~ U[0, 1]`
  (Algorithm 1, lines 6-11). Both passes of a training step run as one batched forward when they
  can (`share_video_passes`).
- `StaticImageFeatures` (the static-image baseline, `encoder=static_image`): `ImageEncoder` reads
  the conditioning frame(s) and the instruction only; it has no flow time and never reads the
  future. Its objective (mode=image_only) denoises the current frame (`CurrentFrameDenoiser`).

A training step (`DiT4DiT.loss`) calls, in the order of Algorithm 1 (the order of random draws):
`loss_inputs` (tau_v and z: its generative objective's noisy input), `sample_tau_f`,
`feature_inputs` (z_hat), then `loss_and_features` (the forward passes). Inference calls
`feature_inputs` and `feature_pass` (what `features` does in one call).

These objects hold no weights: the modules they run are `DiT4DiT`'s own (`video_dit`,
`image_encoder`, `image_head`), so checkpoints and state dicts are unchanged by them.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import flow
from ..config import DiT4DiTConfig
from .image_encoder import CurrentFrameDenoiser, ImageEncoder
from .video_dit import VideoDiT

# The input of a feature pass: (x, timestep, condition_mask) for the video DiT, (cond,) for the image encoder.
FeatureInputs = tuple[torch.Tensor, ...]


class FeatureEncoder(abc.ABC):
    """The module the action DiT's features come from, with its own generative objective."""

    #: Name of its generative loss in `DiT4DiT.loss`'s logs.
    loss_name: str
    #: Whether its training step reads the clip's future frames (else only the conditioning frames are encoded).
    reads_future: bool

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The trainable module that computes the features."""

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the latents and text it takes."""
        return next(self.module.parameters()).dtype

    def parameters(self, recurse: bool = True):
        """The parameters of `module`."""
        return self.module.parameters(recurse)

    # ------------------------------------------------------------------ features (tau_f)
    @abc.abstractmethod
    def sample_tau_f(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
        """Training flow times of the feature pass (Algorithm 1, line 13); None when it has none."""

    @abc.abstractmethod
    def feature_inputs(self, cond: torch.Tensor, text: torch.Tensor, tau_f: torch.Tensor | None,
                       generator: torch.Generator | None) -> FeatureInputs:
        """The input of the feature pass for clean conditioning latents `cond` (B, C, Tc, h, w), the
        same in training and at inference (Algorithm 1, line 14; Algorithm 2)."""

    @abc.abstractmethod
    def feature_pass(self, inputs: FeatureInputs, text: torch.Tensor) -> torch.Tensor:
        """Features (B, tokens, width) from `feature_inputs` (Algorithm 1, line 15)."""

    def features(self, cond: torch.Tensor, text: torch.Tensor, tau_f: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Features (B, tokens, width) of conditioning latents `cond` at flow time `tau_f` (B,)."""
        return self.feature_pass(self.feature_inputs(cond, text, tau_f, generator), text)

    # ------------------------------------------------------------------ its own generative loss
    @abc.abstractmethod
    def loss_inputs(self, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None,
                    future_mask: torch.Tensor | None = None) -> Any:
        """Draw the flow time and noise of its generative loss for the rows `latents` (the clip's
        latents when `reads_future`, else the conditioning latents) and build the noisy input."""

    @abc.abstractmethod
    def loss_and_features(self, loss_inputs: Any | None, feature_inputs: FeatureInputs | None,
                          text: torch.Tensor | None, detach_features: bool = False
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the passes of one training step: (its generative loss from `loss_inputs`, features from
        `feature_inputs` with the text `text` of their rows); either side may be None (not computed).
        `detach_features`: the features carry no gradient back into the encoder."""


# ----------------------------------------------------------------------------------------------
# The video DiT (DiT4DiT)
# ----------------------------------------------------------------------------------------------


@dataclass
class _VideoLossInputs:
    latents: torch.Tensor  # clean clip latents of the video-loss rows
    noise: torch.Tensor
    x: torch.Tensor  # Video2World input: clean conditioning frames, future frames at tau_v
    timestep: torch.Tensor
    condition_mask: torch.Tensor
    text: torch.Tensor
    future_mask: torch.Tensor | None  # (rows, num_future_frames) real (not padding) future frames


class VideoDiTFeatures(FeatureEncoder):
    """The video DiT as feature encoder: features at `tau_f` from a pure-noise future, the video
    flow-matching loss at `tau_v` on the future frames.

    `num_cond_latents` / `num_future_latents`: latent frames of the conditioning frames / of the
    future; `latent_per_frame`: the codec maps frames to latent frames one to one (then
    end-of-episode padding frames are masked out of the video loss).
    """

    loss_name = "loss_video"
    reads_future = True

    def __init__(self, video_dit: VideoDiT, cfg: DiT4DiTConfig, num_cond_latents: int, num_future_latents: int,
                 latent_per_frame: bool):
        self.video_dit = video_dit
        self.cfg = cfg
        self.num_cond_latents = num_cond_latents
        self.num_future_latents = num_future_latents
        self.latent_per_frame = latent_per_frame

    @property
    def module(self) -> nn.Module:
        return self.video_dit

    def sample_tau_f(self, n, generator, device):
        return flow.sample_tau_f(n, self.cfg.tau_f, self.cfg.tau_f_buckets, generator=generator, device=device)

    def feature_inputs(self, cond, text, tau_f, generator):
        """The conditioning latents `cond` (B, C, Tc, h, w) stay clean; the future latents are pure
        noise `z_hat ~ N(0, I)` presented at flow time `tau_f` (B,). Nothing of the true future is read.

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

    def feature_pass(self, inputs, text):
        x, ts, cm = inputs
        return self.video_dit.features(x, ts, cm, text, self.cfg.feature_blocks, self.cfg.feature_pool)

    def loss_inputs(self, latents, text, generator, future_mask=None):
        """Algorithm 1, lines 6-8: `tau_v ~ U[0, 1]`, `z ~ N(0, I)`, the future latents at `tau_v`."""
        tau_v = flow.sample_tau_v(latents.shape[0], generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        x, ts, cm = self.video_dit.video2world_inputs(latents, noise, tau_v, self.num_cond_latents)
        return _VideoLossInputs(latents, noise, x, ts, cm, text, future_mask)

    def loss_and_features(self, loss_inputs, feature_inputs, text, detach_features=False):
        cfg = self.cfg
        v = loss_inputs
        features = velocity = None
        if v is not None and feature_inputs is not None and cfg.share_video_passes and not detach_features:
            # The tau_v and tau_f passes share blocks 0..feature_blocks-1: one batched forward.
            xf, tsf, cmf = feature_inputs
            features, velocity = self.video_dit.features_and_velocity(
                torch.cat([v.x, xf]), torch.cat([v.timestep, tsf]), torch.cat([v.condition_mask, cmf]),
                torch.cat([v.text, text]), num_blocks=cfg.feature_blocks, num_velocity=v.x.shape[0],
                pool=cfg.feature_pool)
        else:
            if v is not None:
                velocity = self.video_dit(v.x, v.timestep, v.condition_mask, v.text)
            if feature_inputs is not None:
                with torch.no_grad() if detach_features else contextlib.nullcontext():
                    features = self.feature_pass(feature_inputs, text)
        if features is not None and detach_features:
            features = features.detach()
        loss = None if v is None else self._video_loss(v, velocity)
        return loss, features

    def _video_loss(self, v: _VideoLossInputs, velocity: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, lines 10-11: MSE to `z - z0` on the future frames, on the channels the future
        frames carry (`codec.generated_channels`) and their real (not padding) frames."""
        n_cond = self.num_cond_latents
        g = self.video_dit.generated_channels or v.latents.shape[1]
        velocity = velocity[:, :g, n_cond:]
        target = flow.target_velocity(v.latents[:, :g, n_cond:], v.noise[:, :g, n_cond:])
        return flow.masked_mse(velocity, target, self._future_latent_mask(v.future_mask, velocity))

    def _future_latent_mask(self, fm: torch.Tensor | None, velocity: torch.Tensor) -> torch.Tensor | None:
        """Per-latent-frame mask of real (not end-of-episode padding) future frames (`fm`: the video
        rows' future_mask), where the codec maps frames to latent frames one to one; None otherwise
        (padding repeats the last frame)."""
        if fm is None or not self.latent_per_frame:
            return None
        nv, c, h, w = velocity.shape[0], velocity.shape[1], velocity.shape[3], velocity.shape[4]
        m = fm.to(velocity.device).bool().view(nv, 1, -1, 1, 1)
        return m.expand(nv, c, m.shape[2], h, w)


# ----------------------------------------------------------------------------------------------
# The static image encoder (the static-image baseline)
# ----------------------------------------------------------------------------------------------


@dataclass
class _ImageLossInputs:
    latents: torch.Tensor  # clean conditioning latents x0
    noise: torch.Tensor
    tau: torch.Tensor
    noisy: torch.Tensor
    text: torch.Tensor


class StaticImageFeatures(FeatureEncoder):
    """The static image encoder as feature encoder: features of the clean conditioning frame(s) and
    the instruction (no flow time, no future); its objective (mode=image_only, with `head`) denoises
    the current frame by flow matching at `tau ~ U[0, 1]`."""

    loss_name = "loss_image"
    reads_future = False

    def __init__(self, image_encoder: ImageEncoder, head: CurrentFrameDenoiser | None = None):
        self.image_encoder = image_encoder
        self.head = head

    @property
    def module(self) -> nn.Module:
        return self.image_encoder

    def sample_tau_f(self, n, generator, device):
        return None  # clean frames, no flow time: nothing drawn

    def feature_inputs(self, cond, text, tau_f, generator):
        return (cond,)

    def feature_pass(self, inputs, text):
        (cond,) = inputs
        return self.image_encoder(cond, text)

    def loss_inputs(self, latents, text, generator, future_mask=None):
        """`tau ~ U[0, 1]`, `eps ~ N(0, I)`, the conditioning latents at `tau`."""
        if self.head is None:
            raise RuntimeError("the static image encoder's denoising loss needs its head (mode=image_only)")
        tau = flow.sample_tau_v(latents.shape[0], generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return _ImageLossInputs(latents, noise, tau, flow.interpolate(latents, noise, tau), text)

    def loss_and_features(self, loss_inputs, feature_inputs, text, detach_features=False):
        loss = features = None
        if loss_inputs is not None:
            i = loss_inputs
            tokens = self.image_encoder(i.noisy, i.text, extra_cond=self.head.time_embedding(i.tau))
            velocity = self.head(tokens, i.latents.shape)
            loss = flow.masked_mse(velocity.float(), flow.target_velocity(i.latents, i.noise).float())
        if feature_inputs is not None:
            with torch.no_grad() if detach_features else contextlib.nullcontext():
                features = self.feature_pass(feature_inputs, text)
            if detach_features:
                features = features.detach()
        return loss, features
