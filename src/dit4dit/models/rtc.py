"""Real-time chunking (RTC): sampling an action chunk that continues the actions still to run.

When the next chunk is computed while the robot executes the current one, the first ``d`` actions
of the new chunk (``d`` = the inference delay in control steps) are executed from the *previous*
chunk before the new one arrives, and the new chunk should continue the previous one smoothly.
RTC (Black, Galliker and Levine 2025, "Real-Time Execution of Action Chunking Flow Policies")
samples the new chunk by inpainting: the remaining actions of the previous chunk ``Y`` (the
"prefix", aligned with the new chunk's first steps) guide the flow-matching sampler through a
pseudoinverse (PiGDM-style) correction with a soft mask.

In this project's flow convention (``dit4dit.flow``: ``tau = 0`` data, ``tau = 1`` noise,
``x_tau = (1 - tau) x0 + tau z``, velocity ``v = z - x0``, Euler steps from 1 down to 0), one
guided step at flow time ``tau`` is:

- the clean-chunk estimate ``x0_hat = x - tau * v(x, tau)``;
- the weighted error ``e = W * (Y - x0_hat)`` (``W`` per step of the chunk, below);
- the vector-Jacobian product ``g = e^T d x0_hat / d x`` (one backward pass through the action DiT);
- the guidance weight ``w(tau) = min(beta, ((1 - tau)^2 + tau^2) / (tau * (1 - tau)))``, the
  paper's ``min(beta, (1 - t) / (t * r_t^2))`` with ``r_t^2 = (1 - t)^2 / (t^2 + (1 - t)^2)``
  written for ``t = 1 - tau`` (infinite at pure noise, so clipped to ``beta`` there);
- the step ``x <- x - dtau * (v - w(tau) * g)``: the plain Euler step plus ``w * g``, which moves
  the clean estimate towards ``Y`` where ``W > 0``.

Soft mask over the chunk of ``H`` steps with a prefix of ``K`` actions (``K = H - s`` when ``s``
actions of the previous chunk ran before the new inference started) and delay ``d``:

- ``W_i = 1`` for ``i < d`` (executed while the new chunk is computed: frozen);
- ``W_i = c_i * (exp(c_i) - 1) / (e - 1)`` with ``c_i = (K - i) / (K - d + 1)`` for ``d <= i < K``
  (exponential decay over the rest of the overlap);
- ``W_i = 0`` for ``i >= K`` (no previous action to follow).

The steps with ``W_i = 1`` are returned exactly as given: the robot executes them from the
previous chunk whatever the new one says. ``beta = 0`` (or an all-zero mask) is plain Euler
sampling, step for step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import flow

DEFAULT_MAX_GUIDANCE = 5.0  # the paper's beta


def prefix_weights(horizon: int, prefix_len: int, delay: int) -> torch.Tensor:
    """The soft mask ``W`` (horizon,) of the module docstring, float32 in [0, 1]."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not 0 <= prefix_len <= horizon:
        raise ValueError(f"prefix_len={prefix_len} must be in [0, {horizon}]")
    if not 0 <= delay <= prefix_len:
        raise ValueError(f"delay={delay} must be in [0, prefix_len={prefix_len}]")
    w = torch.zeros(horizon, dtype=torch.float32)
    w[:delay] = 1.0
    for i in range(delay, prefix_len):
        c = (prefix_len - i) / (prefix_len - delay + 1)
        w[i] = c * (math.exp(c) - 1.0) / (math.e - 1.0)
    return w


def guidance_weight(tau: float, max_guidance: float) -> float:
    """``min(beta, ((1 - tau)^2 + tau^2) / (tau * (1 - tau)))`` (module docstring); ``beta`` at the
    ends, where the unclipped weight is infinite."""
    if max_guidance <= 0.0:
        return 0.0
    denom = tau * (1.0 - tau)
    if denom <= 0.0:
        return float(max_guidance)
    return float(min(max_guidance, ((1.0 - tau) ** 2 + tau ** 2) / denom))


def guided_euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                        num_steps: int, target: torch.Tensor, weights: torch.Tensor,
                        max_guidance: float = DEFAULT_MAX_GUIDANCE) -> torch.Tensor:
    """Euler sampling of :func:`dit4dit.flow.euler_sample` with RTC's guidance towards ``target``.

    ``noise``, ``target``: (B, H, A); ``weights``: the soft mask, (H,) or (B, H) (or broadcastable
    to (B, H, A), e.g. zero on padded action dimensions). ``velocity(x, tau)`` must be
    differentiable in ``x``; the gradient is enabled here even under ``torch.no_grad``.
    """
    if max_guidance < 0 or not math.isfinite(max_guidance):
        raise ValueError(f"max_guidance must be finite and >= 0, got {max_guidance}")
    target = target.to(noise.device, noise.dtype)
    w = weights.to(noise.device, noise.dtype)
    if w.ndim == 1:
        w = w[None, :, None]
    elif w.ndim == 2:
        w = w[:, :, None]
    w = w.expand_as(noise)
    frozen = w >= 1.0
    taus = flow.euler_schedule(num_steps)
    b = noise.shape[0]
    x = noise
    for i in range(num_steps):
        t, t_next = taus[i], taus[i + 1]
        tau = torch.full((b,), t, device=noise.device, dtype=torch.float32)
        gw = guidance_weight(t, max_guidance)
        if gw == 0.0 or not bool((w > 0).any()):
            with torch.no_grad():
                v = velocity(x, tau)
        else:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                v = velocity(xg, tau)
                x0_hat = xg - t * v
                err = (w * (target - x0_hat)).detach()
                (g,) = torch.autograd.grad(x0_hat, xg, grad_outputs=err)
            v = v.detach() - gw * g
        x = (x - (t - t_next) * v).detach()
    return torch.where(frozen, target, x)
