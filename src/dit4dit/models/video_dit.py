"""The video DiT: `diffusers.CosmosTransformer3DModel` at every size, run by a forward of our own.

Why our own forward: the diffusers forward always runs all blocks, resizes `padding_mask` with
torchvision (no CPU build on PyPI for our torch) and wants it with batch 1. Ours calls the same
sub-modules in the same order, so its outputs equal the diffusers forward bit for bit, and it can

- stop after `num_blocks` blocks (`features`): the action DiT needs blocks 0..L-1 only;
- run a batch whose halves stop at different depths (`features_and_velocity`): the tau_f and tau_v
  passes of a training step share their common blocks in one batched forward;
- checkpoint activations per block.

Video2World conditioning (Cosmos-Predict2.5): latents (B, C, T, h, w); the first `num_cond`
latent frames hold clean conditioning latents, a mask channel marks them, and the timestep is
given per frame as (B, 1, T, 1, 1): `1e-4` on conditioning frames, `tau` elsewhere. The output is
the flow velocity `noise - x0`; losses count future frames only. With `generated_channels` set,
future frames hold only the leading latent channels (the rest are zero) while the conditioning
frames keep all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VideoDiTConfig
from .. import flow

COND_TIMESTEP = 1e-4  # flow time given to clean conditioning frames


@dataclass
class _Stream:
    """What every block needs besides the hidden states (computed once per forward)."""

    hidden: torch.Tensor  # (B, N, width)
    text: torch.Tensor  # (B, L, text_embed_dim) after the cross-attention projection
    embedded_timestep: torch.Tensor  # (B, N, width)
    temb: torch.Tensor  # (B, N, 3 * width)
    rotary: tuple[torch.Tensor, torch.Tensor]
    extra_pos: torch.Tensor | None
    grid: tuple[int, int, int]  # (T, h/p, w/p) tokens


class VideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig, transformer: nn.Module | None = None, *,
                 generated_channels: int | None = None, gradient_checkpointing: bool = False):
        """`generated_channels`: the leading latent channels generated for future frames (None =
        all); the rest stay zero in future frames (`CodecConfig.generated_channels`).
        `gradient_checkpointing`: recompute each block's activations in the backward pass (a
        public switch, also settable later)."""
        super().__init__()
        from diffusers import CosmosTransformer3DModel

        self.cfg = cfg
        self.transformer = transformer if transformer is not None else CosmosTransformer3DModel(**cfg.diffusers_kwargs())
        self.gradient_checkpointing = gradient_checkpointing
        self.generated_channels = generated_channels

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: VideoDiTConfig, subfolder: str | None = "transformer",
                        torch_dtype: torch.dtype = torch.bfloat16, generated_channels: int | None = None,
                        gradient_checkpointing: bool = False) -> "VideoDiT":
        """Load a local diffusers checkpoint folder (`<path>/<subfolder>/config.json` + safetensors).

        The checkpoint's architecture must match `cfg` (apart from the fields that are ours only).
        `generated_channels` and `gradient_checkpointing` as in the constructor.
        """
        from diffusers import CosmosTransformer3DModel

        folder = Path(path) / subfolder if subfolder else Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no transformer config at {folder / 'config.json'} (expected the diffusers "
                                    f"layout: <backbone>/transformer/config.json + *.safetensors)")
        transformer = CosmosTransformer3DModel.from_pretrained(str(folder), torch_dtype=torch_dtype,
                                                               local_files_only=True)
        mismatch = {k: (v, transformer.config.get(k)) for k, v in cfg.diffusers_kwargs().items()
                    if _norm(transformer.config.get(k)) != _norm(v)}
        if mismatch:
            lines = ", ".join(f"{k}: preset {a!r} vs checkpoint {b!r}" for k, (a, b) in sorted(mismatch.items()))
            raise ValueError(f"transformer at {folder} does not match the preset: {lines}")
        return cls(cfg, transformer, generated_channels=generated_channels,
                   gradient_checkpointing=gradient_checkpointing)

    # ------------------------------------------------------------------ inputs
    def video2world_inputs(self, latents: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor,
                           num_cond: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy Video2World input for training: clean conditioning frames, future frames at `tau`.

        latents, noise: (B, C, T, h, w); tau: (B,). Returns (x, timestep (B,1,T,1,1), condition_mask (B,1,T,h,w)).
        """
        future = flow.interpolate(latents[:, :, num_cond:], noise[:, :, num_cond:], tau)
        return self.assemble(latents[:, :, :num_cond], future, tau)

    def generated(self, future: torch.Tensor) -> torch.Tensor:
        """Future latents or velocities (B, C, T, h, w) with the channels this DiT does not generate
        set to zero (unchanged when it generates all of them)."""
        g = self.generated_channels
        if g is None or g >= future.shape[1]:
            return future
        return torch.cat([future[:, :g], future.new_zeros((future.shape[0], future.shape[1] - g, *future.shape[2:]))], 1)

    def assemble(self, cond: torch.Tensor, future: torch.Tensor, tau: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate clean conditioning latents (B, C, Tc, h, w) and future latents at flow time
        `tau` (B,) along time; build the per-frame timestep and the condition-mask channel."""
        b, _, tc, h, w = cond.shape
        t = tc + future.shape[2]
        x = torch.cat([cond, self.generated(future).to(cond.dtype)], dim=2)
        timestep = tau.to(torch.float32).view(b, 1, 1, 1, 1).repeat(1, 1, t, 1, 1)
        timestep[:, :, :tc] = COND_TIMESTEP
        cond_mask = torch.zeros(b, 1, t, h, w, dtype=cond.dtype, device=cond.device)
        cond_mask[:, :, :tc] = 1
        return x, timestep, cond_mask

    # ------------------------------------------------------------------ forward pieces
    def _embed(self, x: torch.Tensor, timestep: torch.Tensor, condition_mask: torch.Tensor,
               text: torch.Tensor) -> _Stream:
        """Everything before block 0 (mirrors steps 1-5 of the diffusers forward)."""
        tr = self.transformer
        c = tr.config
        b, _, t, h, w = x.shape
        if timestep.shape != (b, 1, t, 1, 1):
            raise ValueError(f"timestep must have shape {(b, 1, t, 1, 1)}, got {tuple(timestep.shape)}")
        if x.shape[1] + 1 != c.in_channels:
            raise ValueError(f"latents have {x.shape[1]} channels; this video DiT takes {c.in_channels - 1} "
                             f"(+1 condition mask)")
        hs = torch.cat([x, condition_mask.to(x.dtype)], dim=1)
        if c.concat_padding_mask:
            # No padding in our inputs: the resized padding mask is all zeros.
            hs = torch.cat([hs, hs.new_zeros(b, 1, t, h, w)], dim=1)
        rotary = tr.rope(hs, fps=self.cfg.rope_fps)
        extra_pos = tr.learnable_pos_embed(hs) if c.extra_pos_embed_type else None
        p_t, p_h, p_w = c.patch_size
        grid = (t // p_t, h // p_h, w // p_w)
        hidden = tr.patch_embed(hs).flatten(1, 3)
        ts = timestep.flatten() * self.cfg.timestep_scale
        temb, embedded = tr.time_embed(hidden, ts)
        temb, embedded = (v.view(b, grid[0], 1, 1, -1).expand(-1, -1, grid[1], grid[2], -1).flatten(1, 3)
                          for v in (temb, embedded))
        if c.use_crossattn_projection:
            text = tr.crossattn_proj(text)
        return _Stream(hidden, text, embedded, temb, rotary, extra_pos, grid)

    def _blocks(self, s: _Stream, start: int, stop: int) -> torch.Tensor:
        hidden = s.hidden
        for block in self.transformer.transformer_blocks[start:stop]:
            args = (hidden, s.text, s.embedded_timestep, s.temb, s.rotary, s.extra_pos)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden = block(*args)
        return hidden

    def _feature_blocks(self, s: _Stream, num_blocks: int, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [0, num_blocks): (hidden states after the last of them, the features). The
        features are those hidden states (`pool="last"`) or their mean over the blocks run
        (`pool="mean"`)."""
        if pool == "last":
            hidden = self._blocks(s, 0, num_blocks)
            return hidden, hidden
        if pool != "mean":
            raise ValueError(f"feature pool {pool!r} must be last | mean")
        hidden, total = s.hidden, None
        for i in range(num_blocks):
            hidden = self._blocks(replace(s, hidden=hidden), i, i + 1)
            total = hidden if total is None else total + hidden
        return hidden, total / num_blocks

    def _head(self, hidden: torch.Tensor, s: _Stream) -> torch.Tensor:
        """Output norm, projection and unpatchify (step 8 of the diffusers forward)."""
        tr = self.transformer
        p_t, p_h, p_w = tr.config.patch_size
        t, h, w = s.grid
        out = tr.norm_out(hidden, s.embedded_timestep, s.temb)
        out = tr.proj_out(out)
        out = out.unflatten(2, (p_h, p_w, p_t, -1)).unflatten(1, (t, h, w))
        out = out.permute(0, 7, 1, 6, 2, 4, 3, 5)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    @staticmethod
    def _slice(s: _Stream, rows: slice) -> _Stream:
        return _Stream(s.hidden[rows], s.text[rows], s.embedded_timestep[rows], s.temb[rows], s.rotary,
                       None if s.extra_pos is None else s.extra_pos[rows], s.grid)

    # ------------------------------------------------------------------ public forwards
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, condition_mask: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        """Full forward: the velocity (B, C, T, h, w) for every latent frame."""
        s = self._embed(x, timestep, condition_mask, text)
        hidden = self._blocks(s, 0, self.num_layers)
        return self._head(hidden, s)

    def features(self, x: torch.Tensor, timestep: torch.Tensor, condition_mask: torch.Tensor,
                 text: torch.Tensor, num_blocks: int, pool: str = "last") -> torch.Tensor:
        """Truncated forward: hidden states (B, T*h/p*w/p, width) after `num_blocks` blocks.

        Equals the output of `transformer_blocks[num_blocks - 1]` in the full forward; blocks from
        `num_blocks` on are never run (so they get no gradient). `pool="mean"`: the mean of the
        outputs of blocks 0..num_blocks-1 instead.
        """
        self._check_blocks(num_blocks)
        s = self._embed(x, timestep, condition_mask, text)
        return self._feature_blocks(s, num_blocks, pool)[1]

    def features_and_velocity(self, x: torch.Tensor, timestep: torch.Tensor, condition_mask: torch.Tensor,
                              text: torch.Tensor, num_blocks: int, num_velocity: int, pool: str = "last"
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched forward for two kinds of rows.

        Rows [0, num_velocity) are run through every block and the head (the tau_v pass of the
        video loss); all rows are run through blocks [0, num_blocks). Returns
        (features of rows [num_velocity, B) after `num_blocks` blocks, velocity of rows [0, num_velocity));
        features pooled as in :meth:`features`.
        """
        self._check_blocks(num_blocks)
        s = self._embed(x, timestep, condition_mask, text)
        hidden, pooled = self._feature_blocks(s, num_blocks, pool)
        feats = pooled[num_velocity:]
        head = slice(0, num_velocity)
        sv = self._slice(s, head)
        sv.hidden = hidden[head]
        hv = self._blocks(sv, num_blocks, self.num_layers)
        return feats, self._head(hv, sv)

    # ------------------------------------------------------------------ helpers
    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def width(self) -> int:
        return self.cfg.width

    def _check_blocks(self, num_blocks: int) -> None:
        if not 1 <= num_blocks <= self.num_layers:
            raise ValueError(f"num_blocks={num_blocks} must be in [1, {self.num_layers}]")

    def set_attention_backend(self, backend: str) -> None:
        self.transformer.set_attention_backend(backend)


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
