"""The action Diffusion Transformer of DiT4DiT (GR00T-N1 style; docs/design.md, section 4).

It predicts the flow-matching velocity of a noisy action chunk, conditioned on the action flow
time ``tau_a``, the robot state ``s`` and the video-DiT hidden states ``h`` (the "features").

Conventions (docs/design.md, section 2): ``tau_a`` in [0, 1] with 0 = data and 1 = noise; the noisy chunk is
``a_tau = (1 - tau_a) * a0 + tau_a * z`` and the model predicts ``v = z - a0``.

Layout, top to bottom::

    tau_a ──sinusoid(tau_a * 1000)──MLP──────────────────────────────► temb (B, width)
    state ──MLP(state_dim -> mlp_hidden -> width)──────────────────► 1 state token
    learnable future tokens ───────────────────────────────────────► K tokens
    noisy actions ──W1──┐
    temb ───────────────┴─concat─W2─SiLU─W3── + learned positions ──► H action tokens

    x = [state | future | actions]                           (B, 1 + K + H, width)
    for i, block in enumerate(blocks):                       width = heads * head_dim
        x = x + Attn(AdaLN(x, temb))   # even i: cross-attention to h (+ learned positions)
                                       # odd i:  self-attention over x
        x = x + FF(AdaLN(x, temb))     # GELU-tanh, 4x
    v = MLP(Linear(AdaLN(x, temb)))[:, -H:]                  (B, H, action_dim)

AdaLN is a LayerNorm without affine parameters whose scale and shift come from ``temb``; the
modulation layers are zero-initialised, so every block starts as a plain pre-LN block.

The forward has no data-dependent Python control flow (only shape checks), so it can be
wrapped in ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dit4dit.config import ActionDiTConfig

# tau_a in [0, 1] is multiplied by this before the sinusoidal embedding: the sinusoid barely
# varies over [0, 1] otherwise (measured on the prototype).
TIMESTEP_SCALE = 1000.0
# Number of sinusoid channels fed to the timestep MLP (as in DiT / GR00T).
TIMESTEP_FREQ_DIM = 256
INIT_STD = 0.02


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period ** (-k / (dim / 2))``; (B,) -> (B, dim).

    Computed in float32 whatever the dtype of ``t``.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``tau_a`` -> sinusoid of ``tau_a * 1000`` -> Linear -> SiLU -> Linear -> ``temb`` (B, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_FREQ_DIM, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, tau_a: Tensor) -> Tensor:
        freq = timestep_sinusoid(tau_a * TIMESTEP_SCALE).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(freq)))


class AdaLayerNorm(nn.Module):
    """``LayerNorm(x) * (1 + scale) + shift``, with ``(scale, shift) = Linear(SiLU(temb))``.

    The LayerNorm has no affine parameters; the modulation is zero-initialised (identity).
    """

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.modulation(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head attention from ``x`` (B, S, width) to ``context`` (B, N, kv_dim).

    ``context is x`` gives self-attention; ``kv_dim = cross_attention_dim`` and the video
    features as ``context`` give cross-attention. ``mask`` is a bool (B, N), True = attend.
    """

    def __init__(self, width: int, num_heads: int, kv_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(kv_dim, width)
        self.to_v = nn.Linear(kv_dim, width)
        self.to_out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, repeats: int = 1) -> Tensor:
        """``repeats > 1``: ``context`` (and ``mask``) hold B / repeats rows, each shared by
        ``repeats`` consecutive rows of ``x``; K and V are projected once per context row."""
        b, s, width = x.shape
        bc, n = context.shape[:2]
        q = self.to_q(x).view(b, s, self.num_heads, -1).transpose(1, 2)  # (B, heads, S, head_dim)
        k = self.to_k(context).view(bc, n, self.num_heads, -1).transpose(1, 2)
        v = self.to_v(context).view(bc, n, self.num_heads, -1).transpose(1, 2)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)
            if mask is not None:
                mask = mask.repeat_interleave(repeats, 0)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # A sample whose every feature token is masked out gets no cross-attention update
            # (instead of the NaN of a softmax over nothing): let it attend everywhere, then
            # zero its output. No Python branch on the data.
            has_any = mask.any(dim=-1)  # (B,)
            mask = mask | ~has_any[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            out = out * has_any[:, None, None, None].to(out.dtype)
        out = out.transpose(1, 2).reshape(b, s, width)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Linear(width -> 4 width) -> GELU(tanh) -> Linear(4 width -> width) -> dropout."""

    def __init__(self, width: int, dropout: float, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(width, mult * width)
        self.proj_out = nn.Linear(mult * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj_out(F.gelu(self.proj_in(x), approximate="tanh")))


class ActionDiTBlock(nn.Module):
    """Pre-AdaLN transformer block: cross-attention to the features, or self-attention."""

    def __init__(self, cfg: ActionDiTConfig, cross_attention: bool):
        super().__init__()
        width = cfg.width
        self.cross_attention = cross_attention
        self.norm1 = AdaLayerNorm(width)
        kv_dim = cfg.cross_attention_dim if cross_attention else width
        self.attn = Attention(width, cfg.num_attention_heads, kv_dim, cfg.dropout)
        self.norm2 = AdaLayerNorm(width)
        self.ff = FeedForward(width, cfg.dropout)

    def forward(self, x: Tensor, temb: Tensor, features: Tensor, feature_mask: Tensor | None,
                repeats: int = 1) -> Tensor:
        h = self.norm1(x, temb)
        if self.cross_attention:
            x = x + self.attn(h, features, feature_mask, repeats)
        else:
            x = x + self.attn(h, h)
        return x + self.ff(self.norm2(x, temb))


class MLP(nn.Module):
    """Linear -> SiLU -> Linear (state encoder, action decoder)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ActionEncoder(nn.Module):
    """Noisy action tokens mixed with the timestep: ``W3(SiLU(W2([W1 a, temb])))``."""

    def __init__(self, action_dim: int, width: int):
        super().__init__()
        self.W1 = nn.Linear(action_dim, width)
        self.W2 = nn.Linear(2 * width, width)
        self.W3 = nn.Linear(width, width)

    def forward(self, actions: Tensor, temb: Tensor) -> Tensor:
        a = self.W1(actions)  # (B, H, width)
        t = temb[:, None, :].expand(-1, actions.shape[1], -1)
        return self.W3(F.silu(self.W2(torch.cat([a, t], dim=-1))))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ActionDiT(nn.Module):
    """Predicts the action velocity ``v = noise - a0`` (see the module docstring for the layout)."""

    def __init__(self, cfg: ActionDiTConfig):
        super().__init__()
        if cfg.num_layers < 2:
            raise ValueError(
                f"ActionDiTConfig.num_layers={cfg.num_layers}: need >= 2 (block 0 cross-attends to the "
                "features, block 1 self-attends; without a self-attention block the state and future "
                "tokens never reach the action tokens)"
            )
        if cfg.action_horizon > cfg.max_seq_len:
            raise ValueError(
                f"ActionDiTConfig.action_horizon={cfg.action_horizon} exceeds max_seq_len={cfg.max_seq_len} "
                "(rows of the learned action position embedding)"
            )
        if cfg.num_future_tokens < 0:
            raise ValueError(f"ActionDiTConfig.num_future_tokens={cfg.num_future_tokens} must be >= 0")
        self.cfg = cfg
        width = cfg.width
        self.gradient_checkpointing = False

        # --- conditioning and input tokens ---
        self.timestep_embedding = TimestepEmbedding(width)
        self.state_encoder = MLP(cfg.state_dim, cfg.mlp_hidden, width)
        self.future_tokens = nn.Parameter(torch.empty(cfg.num_future_tokens, width)) if cfg.num_future_tokens else None
        self.action_encoder = ActionEncoder(cfg.action_dim, width)
        self.action_pos_embed = nn.Parameter(torch.empty(cfg.max_seq_len, width))
        self.feature_pos_embed = None
        if cfg.feature_pos_embed:
            self.feature_pos_embed = nn.Parameter(torch.empty(cfg.max_feature_tokens, cfg.cross_attention_dim))

        # --- transformer: even blocks cross-attend to the features, odd blocks self-attend ---
        self.blocks = nn.ModuleList(ActionDiTBlock(cfg, cross_attention=(i % 2 == 0)) for i in range(cfg.num_layers))

        # --- output head: AdaLN, Linear width -> mlp_hidden, MLP mlp_hidden -> action_dim ---
        self.norm_out = AdaLayerNorm(width)
        self.proj_out = nn.Linear(width, cfg.mlp_hidden)
        self.action_decoder = MLP(cfg.mlp_hidden, cfg.mlp_hidden, cfg.action_dim)

        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Trunc-normal(0.02) weights, zero biases, zero AdaLN modulation (blocks start as plain
        pre-LN blocks), residual output projections scaled by 1/sqrt(2 * num_layers)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
                nn.init.zeros_(m.bias)
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.num_layers)
        for block in self.blocks:
            for proj in (block.attn.to_out, block.ff.proj_out):
                nn.init.trunc_normal_(proj.weight, std=residual_std, a=-2 * residual_std, b=2 * residual_std)
        for norm in [*(b.norm1 for b in self.blocks), *(b.norm2 for b in self.blocks), self.norm_out]:
            nn.init.zeros_(norm.modulation.weight)
            nn.init.zeros_(norm.modulation.bias)
        for p in (self.future_tokens, self.action_pos_embed, self.feature_pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)

    def forward(
        self,
        noisy_actions: Tensor,
        tau_a: Tensor,
        state: Tensor,
        features: Tensor,
        feature_mask: Tensor | None = None,
        repeats: int = 1,
    ) -> Tensor:
        """
        Args:
            noisy_actions: (B, H, action_dim), H == cfg.action_horizon.
            tau_a: (B,) action flow time in [0, 1] (0 = data, 1 = noise).
            state: (B, state_dim), normalised and zero-padded.
            features: (B, N, cross_attention_dim) video-DiT hidden states.
            feature_mask: optional (B, N) bool, True = attend. None = attend to all.
            repeats: each row of ``features`` / ``feature_mask`` serves this many consecutive rows of
                the other inputs (which then have ``repeats`` times as many rows): the training loss
                draws several ``tau_a`` per sample, and the cross-attention K/V are computed once.

        Returns:
            (B, H, action_dim) predicted velocity ``noise - a0``.
        """
        self._check_inputs(noisy_actions, tau_a, state, features, feature_mask, repeats)
        if repeats > 1 and not self.cfg.share_feature_kv:  # one copy of the features per draw
            features = features.repeat_interleave(repeats, 0)
            feature_mask = None if feature_mask is None else feature_mask.repeat_interleave(repeats, 0)
            repeats = 1
        dtype = self.proj_out.weight.dtype
        noisy_actions, state, features = noisy_actions.to(dtype), state.to(dtype), features.to(dtype)
        b, horizon, _ = noisy_actions.shape

        temb = self.timestep_embedding(tau_a)  # (B, width)

        # Input sequence: [state token | K future tokens | H action tokens].
        state_token = self.state_encoder(state)[:, None, :]
        action_tokens = self.action_encoder(noisy_actions, temb) + self.action_pos_embed[:horizon]
        if self.future_tokens is not None:
            future = self.future_tokens[None].expand(b, -1, -1)
            x = torch.cat([state_token, future, action_tokens], dim=1)
        else:
            x = torch.cat([state_token, action_tokens], dim=1)

        # Video hidden states carry no absolute position (RoPE only): add learned positions.
        if self.feature_pos_embed is not None:
            features = features + self.feature_pos_embed[: features.shape[1]]

        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, temb, features, feature_mask, repeats, use_reentrant=False)
            else:
                x = block(x, temb, features, feature_mask, repeats)

        x = self.norm_out(x, temb)
        return self.action_decoder(self.proj_out(x[:, -horizon:]))

    def _check_inputs(self, noisy_actions, tau_a, state, features, feature_mask, repeats: int = 1) -> None:
        """Shape checks only (static under torch.compile); raise ValueError naming the argument."""
        cfg = self.cfg
        if noisy_actions.ndim != 3:
            raise ValueError(
                f"noisy_actions: expected shape (B, {cfg.action_horizon}, {cfg.action_dim}), "
                f"got {tuple(noisy_actions.shape)}"
            )
        b = noisy_actions.shape[0]
        want = {
            "noisy_actions": ((b, cfg.action_horizon, cfg.action_dim), noisy_actions),
            "tau_a": ((b,), tau_a),
            "state": ((b, cfg.state_dim), state),
        }
        for name, (shape, t) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if repeats < 1 or b % repeats:
            raise ValueError(f"repeats={repeats} must be >= 1 and divide the batch of noisy_actions ({b})")
        bf = b // repeats
        if features.ndim != 3 or features.shape[0] != bf or features.shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"features: expected shape ({bf}, N, {cfg.cross_attention_dim}), got {tuple(features.shape)}"
                + (f" (one row per {repeats} action rows)" if repeats > 1 else "")
            )
        n = features.shape[1]
        if n < 1:
            raise ValueError("features: need at least one feature token, got N = 0")
        if cfg.feature_pos_embed and n > cfg.max_feature_tokens:
            raise ValueError(
                f"features: {n} tokens exceed ActionDiTConfig.max_feature_tokens={cfg.max_feature_tokens} "
                "(rows of the learned feature position embedding); raise it in the config"
            )
        if feature_mask is not None:
            if tuple(feature_mask.shape) != (bf, n):
                raise ValueError(f"feature_mask: expected shape {(bf, n)}, got {tuple(feature_mask.shape)}")
            if feature_mask.dtype != torch.bool:
                raise ValueError(f"feature_mask: expected dtype torch.bool (True = attend), got {feature_mask.dtype}")
        for name, t in (("noisy_actions", noisy_actions), ("tau_a", tau_a), ("state", state), ("features", features)):
            if not t.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
