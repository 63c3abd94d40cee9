"""Flow matching, with one convention everywhere (video and actions).

- flow time ``tau`` in [0, 1]: ``tau = 0`` is data, ``tau = 1`` is noise;
- interpolation ``x_tau = (1 - tau) * x0 + tau * z``;
- target velocity ``v* = z - x0``;
- Euler sampling from 1 to 0: ``x <- x - dtau * v(x, tau)``.

Timestep samplers: ``tau_v ~ U[0, 1]`` (video loss), ``tau_f`` fixed or drawn from the discrete
buckets {0/T, ..., T/T} (the paper's Algorithm 1), ``tau_a = Beta(alpha, beta) / scale`` clamped
to [0, 1] (alpha=1.5, beta=1.0, scale=0.999: mass near the noisy end).
"""

from __future__ import annotations

from typing import Callable

import torch


def _expand(tau: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) or (B, 1, T, 1, 1)-style tau against ``like``."""
    if tau.ndim == 1:
        return tau.reshape(-1, *([1] * (like.ndim - 1)))
    return tau


def interpolate(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``x_tau = (1 - tau) * x0 + tau * noise``."""
    t = _expand(tau, x0).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v* = noise - x0`` (the derivative of the linear path in tau)."""
    return noise - x0


def sample_tau_v(batch: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``tau_v ~ U[0, 1]``."""
    return torch.rand(batch, generator=generator, device=device)


def sample_tau_f(batch: int, tau_f: float, buckets: int | None = None, *,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Fixed ``tau_f`` (default) or one of ``{0/T, 1/T, ..., T/T}`` uniformly (Algorithm 1)."""
    if buckets is None:
        return torch.full((batch,), float(tau_f), device=device)
    k = torch.randint(0, buckets + 1, (batch,), generator=generator, device=device)
    return k.float() / float(buckets)


def sample_tau_a(batch: int, alpha: float = 1.5, beta: float = 1.0, scale: float = 0.999, *,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``tau_a = s / scale`` with ``s ~ Beta(alpha, beta)``, clamped to [0, 1].

    Drawn by inverse CDF-free sampling from two Gamma variables so that a ``torch.Generator``
    controls it (``torch.distributions`` does not take generators).
    """
    ga = _sample_gamma(batch, alpha, generator, device)
    gb = _sample_gamma(batch, beta, generator, device)
    s = ga / (ga + gb)
    return (s / scale).clamp(0.0, 1.0)


def _sample_gamma(n: int, shape: float, generator, device) -> torch.Tensor:
    """Gamma(shape, 1) by Marsaglia-Tsang, vectorised with rejection, driven by ``generator``."""
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, device=device)
    filled = 0
    while filled < n:
        m = max(2 * (n - filled), 16)
        x = torch.randn(m, generator=generator, device=device)
        u = torch.rand(m, generator=generator, device=device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        acc = (d * v)[ok][: n - filled]
        out[filled: filled + acc.numel()] = acc
        filled += acc.numel()
    if boost:
        u = torch.rand(n, generator=generator, device=device)
        out = out * u.pow(1.0 / shape)
    return out


def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 num_steps: int, tau_start: float = 1.0, tau_end: float = 0.0) -> torch.Tensor:
    """Integrate ``dx/dtau = v(x, tau)`` from ``tau_start`` (noise) down to ``tau_end`` in equal steps.

    ``velocity(x, tau)`` receives ``tau`` as a (B,) tensor.
    """
    x = noise
    taus = euler_schedule(num_steps, tau_start, tau_end)
    b = noise.shape[0]
    for i in range(num_steps):
        t, t_next = taus[i], taus[i + 1]
        tau = torch.full((b,), t, device=noise.device, dtype=torch.float32)
        x = x - (t - t_next) * velocity(x, tau)
    return x


def euler_schedule(num_steps: int, tau_start: float = 1.0, tau_end: float = 0.0) -> list[float]:
    """The ``num_steps + 1`` flow times visited by :func:`euler_sample`, from start to end."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [tau_start + (tau_end - tau_start) * i / num_steps for i in range(num_steps + 1)]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(((pred - target) * M)^2) / sum(M)``; plain mean when ``mask`` is None."""
    diff = (pred.float() - target.float()) ** 2
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).expand_as(diff)
    return (diff * m).sum() / m.sum().clamp_min(1.0)
