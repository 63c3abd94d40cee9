"""The static image-text encoder: the paper's parameter-matched Qwen3DiT baseline at our scale.

DiT4DiT conditions the action DiT on hidden states of a video DiT that is denoising the future.
The baseline replaces that video model by a transformer that sees what a vision-language model
sees: the conditioning frame(s) and the instruction, never the future, with no video loss. It is
trained from scratch through the action loss alone (`encoder=static_image`).

To make the comparison about the representation and not about size, it is built like the video
DiT it replaces:

- input: the same normalised codec latents of the conditioning frame(s), cut into the video DiT's
  spatial patches (tokens ordered t, h, w) plus learned absolute positions;
- `video.num_layers` pre-norm blocks of self-attention, cross-attention to the text embedding
  and a GELU MLP, `video.num_attention_heads` x `video.attention_head_dim` wide with
  `video.mlp_ratio` (the width equals the video DiT's, so the action DiT is unchanged);
- the text goes through the same kind of projection as in the video DiT (`crossattn_proj`
  when `video.use_crossattn_projection`), keys/values from `video.text_embed_dim` channels;
- AdaLN-LoRA modulation (shift, scale, gate; rank `video.adaln_lora_dim`) of every norm, as in
  the video DiT; there it is driven by the flow time, here (nothing is denoised) by the
  instruction mean-pooled over its tokens.

It has no output head. Its trainable parameter count is close to the video DiT's (within about
1% for the 2B preset, about 9% smaller for `tiny`, where the video DiT's output head weighs more);
`dit4dit info --set encoder=static_image` prints both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DiT4DiTConfig


def latent_grid(cfg: DiT4DiTConfig) -> tuple[int, int]:
    """(rows, cols) of patch tokens per latent frame for the config's image size and codec."""
    factor = cfg.codec.spatial_factor
    _, ph, pw = cfg.video.patch_size
    h, w = cfg.inputs.image_size
    return h // (factor * ph), w // (factor * pw)


class _Attention(nn.Module):
    """Multi-head attention; `context_dim` != width for cross-attention."""

    def __init__(self, width: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(context_dim or width, inner, bias=False)
        self.to_v = nn.Linear(context_dim or width, inner, bias=False)
        self.to_out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (B, heads, N, d)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _AdaLNLoRA(nn.Module):
    """LayerNorm (no affine) modulated by a conditioning vector through a rank-`rank` bottleneck:
    returns (modulated x, gate), as the video DiT's AdaLN-LoRA norms."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, rank, bias=False),
                                        nn.Linear(rank, 3 * width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.modulation(cond)[:, None].chunk(3, dim=-1)
        return self.norm(x) * (1 + scale) + shift, gate


class ImageEncoderBlock(nn.Module):
    """Self-attention over the image tokens, cross-attention to the text, GELU MLP; each behind an
    AdaLN-LoRA norm driven by the pooled instruction and gated."""

    def __init__(self, width: int, heads: int, head_dim: int, text_dim: int, mlp_ratio: float, lora_rank: int):
        super().__init__()
        self.norm1 = _AdaLNLoRA(width, lora_rank)
        self.self_attn = _Attention(width, heads, head_dim)
        self.norm2 = _AdaLNLoRA(width, lora_rank)
        self.cross_attn = _Attention(width, heads, head_dim, context_dim=text_dim)
        self.norm3 = _AdaLNLoRA(width, lora_rank)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, gate = self.norm1(x, cond)
        x = x + gate * self.self_attn(h, h)
        h, gate = self.norm2(x, cond)
        x = x + gate * self.cross_attn(h, text)
        h, gate = self.norm3(x, cond)
        return x + gate * self.mlp(h)


class ImageEncoder(nn.Module):
    """Conditioning latents (B, C, Tc, h, w) + text embedding (B, L, D) -> features (B, Tc*h/p*w/p, width)."""

    def __init__(self, cfg: DiT4DiTConfig):
        super().__init__()
        v = cfg.video
        _, self.ph, self.pw = v.patch_size
        self.latent_channels = v.latent_channels
        self.width = v.width
        rows, cols = latent_grid(cfg)
        # Conditioning latent frames never exceed the conditioning frames (causal codecs have fewer).
        self.max_tokens = max(1, cfg.inputs.num_cond_frames * rows * cols)
        self.patch_embed = nn.Linear(self.latent_channels * self.ph * self.pw, self.width)
        self.pos_embed = nn.Parameter(torch.randn(self.max_tokens, self.width) * 0.02)
        self.text_proj = (nn.Linear(v.crossattn_proj_in_channels, v.text_embed_dim, bias=False)
                          if v.use_crossattn_projection else nn.Identity())
        # The pooled instruction drives the modulation (the video DiT's time embedding's place).
        self.text_pool = nn.Sequential(nn.Linear(v.text_embed_dim, self.width), nn.SiLU(),
                                       nn.Linear(self.width, self.width))
        self.blocks = nn.ModuleList(
            ImageEncoderBlock(self.width, v.num_attention_heads, v.attention_head_dim, v.text_embed_dim, v.mlp_ratio,
                              v.adaln_lora_dim)
            for _ in range(v.num_layers))
        self.norm_out = nn.LayerNorm(self.width)
        self.gradient_checkpointing = cfg.gradient_checkpointing  # a public switch, also settable later

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, T * h/ph * w/pw, C * ph * pw), tokens ordered t, h, w (as in Cosmos)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"image encoder: expected conditioning latents (B, {self.latent_channels}, T, h, w), "
                             f"got {tuple(latents.shape)}")
        b, c, t, h, w = latents.shape
        if h % self.ph or w % self.pw:
            raise ValueError(f"image encoder: latent size {h}x{w} is not divisible by the patch "
                             f"{self.ph}x{self.pw}")
        x = latents.reshape(b, c, t, h // self.ph, self.ph, w // self.pw, self.pw)
        x = x.permute(0, 2, 3, 5, 1, 4, 6)  # (B, T, h', w', C, ph, pw)
        return x.reshape(b, t * (h // self.ph) * (w // self.pw), c * self.ph * self.pw)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, extra_cond: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`extra_cond` (B, width), added to the pooled instruction that drives the modulation: the
        flow-time embedding of the pretraining objective (`CurrentFrameDenoiser`); None otherwise."""
        tokens = self.patchify(latents)
        n = tokens.shape[1]
        if n > self.max_tokens:
            raise ValueError(f"image encoder: {n} tokens but {self.max_tokens} learned positions (the config's "
                             f"inputs.num_cond_frames x image size / (codec factor x patch)); the conditioning "
                             f"latents do not fit the config")
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(tokens.to(dtype)) + self.pos_embed[:n]
        text = self.text_proj(text.to(dtype))
        cond = self.text_pool(text.mean(dim=1))
        if extra_cond is not None:
            cond = cond + extra_cond.to(cond.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, text, cond, use_reentrant=False)
            else:
                x = block(x, text, cond)
        return self.norm_out(x)


class CurrentFrameDenoiser(nn.Module):
    """The static image encoder's pretraining objective (`mode=image_only`): denoise the current frame.

    The counterpart of the video DiT's action-free objective (`mode=video_only`, predict the future
    frames) that never sees the future: the conditioning frame's own latents `x0` are noised along
    the flow-matching path, `x_tau = (1 - tau) x0 + tau eps` with `tau ~ U[0, 1]` (the video
    loss's distribution), the encoder reads `x_tau` with the instruction and the flow time, and
    this head maps its tokens back to latent patches to predict the velocity `eps - x0`.

    The flow time enters the encoder through its modulation (a sinusoidal embedding and an MLP,
    added to the pooled instruction), as the flow time drives the video DiT's. The head is only
    built for `mode=image_only`: fine-tuning (`--init` from such a run) takes the encoder's weights
    and leaves the head's unused, and the policy then reads clean frames with no flow time, as
    the static-image baseline always does.
    """

    def __init__(self, cfg: DiT4DiTConfig, frequencies: int = 128):
        super().__init__()
        v = cfg.video
        self.frequencies = frequencies
        self.latent_channels = v.latent_channels
        _, self.ph, self.pw = v.patch_size
        self.time_embed = nn.Sequential(nn.Linear(2 * frequencies, v.width), nn.SiLU(), nn.Linear(v.width, v.width))
        self.norm = nn.LayerNorm(v.width)
        self.proj = nn.Linear(v.width, v.latent_channels * self.ph * self.pw)

    def time_embedding(self, tau: torch.Tensor) -> torch.Tensor:
        """(B,) flow times in [0, 1] -> (B, width)."""
        half = torch.arange(self.frequencies, device=tau.device, dtype=torch.float32)
        freqs = torch.exp(-torch.log(torch.tensor(10_000.0, device=tau.device)) * half / self.frequencies)
        angles = 1000.0 * tau.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.time_embed(emb.to(self.proj.weight.dtype))

    def forward(self, tokens: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Encoder tokens (B, T*h'*w', width) -> predicted velocity (B, C, T, h, w) of latents of `shape`."""
        b, c, t, h, w = shape
        x = self.proj(self.norm(tokens))  # (B, T*h'*w', C*ph*pw)
        x = x.reshape(b, t, h // self.ph, w // self.pw, c, self.ph, self.pw)
        x = x.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, T, h', ph, w', pw)
        return x.reshape(b, c, t, h, w)
