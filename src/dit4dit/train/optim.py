"""Optimisation: AdamW parameter groups, the warm-up + cosine schedule, gradient clipping, EMA.

Parameter groups (one optimiser, several learning rates):

- ``video_dit``  / ``video_dit.no_decay``  at ``train.lr_video`` (the video DiT, or the static-image
  baseline's image encoder in its place);
- ``action_dit`` / ``action_dit.no_decay`` at ``train.lr_action``;
- ``other``      / ``other.no_decay``      at ``train.lr_other`` (a trainable text encoder and any
  other trainable part of ``model.trainable_modules()``).

``*.no_decay`` groups hold biases, normalisation weights, embeddings and learned tokens or
positions, which get no weight decay. Frozen parts (the VAE codec, a frozen text encoder, any
parameter with ``requires_grad=False``) are in no group, so the optimiser never sees them and they
never reach a checkpoint.

Schedule (per group, with ``k`` = the 1-based number of the update about to be made, ``W`` the
warm-up steps, ``N`` the total steps, ``peak`` the group's learning rate)::

    k <= W:  lr = peak * k / W                                       (linear warm-up)
    k >  W:  lr = m + (peak - m) * (1 + cos(pi * (k - W) / (N - W))) / 2,  m = min(min_lr, peak)

so the first update already moves the weights, update ``W`` runs at the peak and update ``N`` (the
last one) at ``min_lr``.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..config import TrainConfig

# Which learning rate each part of `trainable_modules()` trains at.
GROUP_LR_FIELD = {"video_dit": "lr_video", "action_dit": "lr_action", "other": "lr_other"}

_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)
# Learned tokens / positions / embedding tables (by parameter name) carry no weight decay.
_NO_DECAY_NAME = re.compile(r"(pos_embed|position|tokens?$)", re.IGNORECASE)


def group_of(part: str) -> str:
    """The parameter-group family of a part of ``trainable_modules()``. The static-image
    baseline's ``image_encoder`` (and its pretraining head ``image_head``, ``mode=image_only``)
    stands in for the video DiT and trains at ``lr_video``."""
    if part in ("image_encoder", "image_head"):
        return "video_dit"
    return part if part in ("video_dit", "action_dit") else "other"


def _is_no_decay(name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    if param.ndim < 2:
        return True  # biases, norm scales, scalars
    if isinstance(owner, (nn.Embedding, *_NORM_TYPES)):
        return True
    leaf = name.rsplit(".", 1)[-1]
    owner_name = type(owner).__name__.lower()
    return bool(_NO_DECAY_NAME.search(leaf)) or "norm" in owner_name


def named_trainable_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter, nn.Module]]:
    """Yield ``(part, full_name, param, owner_module)`` for every parameter that trains.

    ``full_name`` is prefixed by the part name (``video_dit.transformer...``), the key used in
    ``model.safetensors``. A parameter shared by two parts is yielded once.
    """
    seen: set[int] = set()
    for part, module in model.trainable_modules().items():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{part}.{mod_name}.{p_name}" if mod_name else f"{part}.{p_name}"
                yield part, full, p, mod


@dataclass
class ParamGroupSpec:
    """One optimiser parameter group before it is handed to AdamW."""

    name: str  # e.g. "video_dit" or "video_dit.no_decay"
    family: str  # video_dit | action_dit | other
    lr: float  # peak learning rate
    weight_decay: float
    names: list[str]
    params: list[nn.Parameter]

    def as_torch(self) -> dict[str, Any]:
        return {"params": self.params, "lr": self.lr, "weight_decay": self.weight_decay, "name": self.name,
                "family": self.family, "peak_lr": self.lr, "param_names": list(self.names)}


def param_groups(model: nn.Module, tcfg: TrainConfig) -> list[ParamGroupSpec]:
    """The optimiser's parameter groups (empty groups left out), in a fixed order."""
    buckets: dict[tuple[str, bool], ParamGroupSpec] = {}
    for family in ("video_dit", "action_dit", "other"):
        lr = float(getattr(tcfg, GROUP_LR_FIELD[family]))
        for no_decay in (False, True):
            name = family + (".no_decay" if no_decay else "")
            wd = 0.0 if no_decay else float(tcfg.weight_decay)
            buckets[(family, no_decay)] = ParamGroupSpec(name, family, lr, wd, [], [])
    for part, full, p, owner in named_trainable_parameters(model):
        spec = buckets[(group_of(part), _is_no_decay(full, p, owner))]
        spec.names.append(full)
        spec.params.append(p)
    groups = [g for g in buckets.values() if g.params]
    if not groups:
        raise ValueError("the model has no trainable parameters (every trainable module is frozen)")
    return groups


def build_optimizer(model: nn.Module, tcfg: TrainConfig, device: torch.device | str = "cpu"
                    ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused (one pass over all weights instead of one per weight
    tensor) on CUDA and CPU when ``train.fused_adam``.

    Group dicts carry ``name``, ``family``, ``peak_lr`` and ``param_names`` besides AdamW's own keys.
    """
    groups = [g.as_torch() for g in param_groups(model, tcfg)]
    kwargs: dict[str, Any] = {"betas": tuple(tcfg.betas), "eps": 1e-8}
    if torch.device(device).type in ("cuda", "cpu") and tcfg.fused_adam:
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. fused unsupported for some parameter type
        if not kwargs.pop("fused", False):
            raise
        import warnings

        warnings.warn(f"fused AdamW unavailable ({e}); using the default implementation")
        return torch.optim.AdamW(groups, **kwargs)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Learning rate of the ``step``-th update (1-based): linear warm-up then cosine to ``min_lr``."""
    if peak <= 0.0:
        return 0.0
    k = max(int(step), 1)
    floor = min(float(min_lr), float(peak))
    if warmup_steps > 0 and k <= warmup_steps:
        return peak * k / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0:
        return float(peak)
    progress = min(max((k - warmup_steps) / span, 0.0), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every group's ``lr`` from its ``peak_lr`` (see :func:`lr_at`). State is plain JSON."""

    kind = "warmup_cosine"

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float):
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        self.last_step = 0

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> "WarmupCosine":
        return cls(optimizer, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr)

    def set_step(self, step: int) -> dict[str, float]:
        """Set the learning rates for update number ``step`` (1-based); returns ``{group: lr}``."""
        self.last_step = int(step)
        out = {}
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, g["peak_lr"], self.warmup_steps, self.total_steps, self.min_lr)
            out[g.get("name", str(len(out)))] = g["lr"]
        return out

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr": self.min_lr, "last_step": self.last_step,
                "peak_lr": {g["name"]: g["peak_lr"] for g in self.optimizer.param_groups}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position only: warm-up, total steps and peaks come from the current config
        (a resumed run may extend `train.steps`)."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"scheduler state of kind {state.get('kind')!r}, expected {self.kind!r}")
        self.set_step(int(state.get("last_step", 0)))


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded_1d(t: torch.Tensor) -> bool:
    if not hasattr(t, "device_mesh"):
        return False
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and all(isinstance(pl, Shard) for pl in t.placements)


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm`` (no clipping when <= 0) and return
    the norm before clipping.

    FSDP2 gradients (DTensors sharded on a 1-D mesh) are handled on their local shards: one
    all-reduce of the squared norm, no per-tensor DTensor dispatch.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    grads = [p.grad for p in with_grad]
    limit = float(max_norm) if max_norm and max_norm > 0 else float("inf")
    if not any(hasattr(g, "device_mesh") for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(with_grad, limit))
    if not all(_sharded_1d(g) for g in grads):
        norm = torch.nn.utils.clip_grad_norm_(with_grad, limit)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    import torch.distributed as dist

    local = [_local(g) for g in grads]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in local:
        by_device.setdefault(t.device, []).append(t)
    sq = sum(torch.stack([n.float() for n in torch._foreach_norm(ts, 2.0)]).pow(2).sum().to(local[0].device)
             for ts in by_device.values())
    dist.all_reduce(sq, group=grads[0].device_mesh.get_group())
    total = sq.sqrt()
    coef = (limit / (total + 1e-6)).clamp(max=1.0)
    for ts in by_device.values():
        torch._foreach_mul_(ts, coef.to(ts[0].device))
    return float(total)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the trainable weights: ``s <- d * s + (1 - d) * p``.

    Shadows are float32 copies keyed by the checkpoint names (``video_dit.…``), laid out like the
    parameters (DTensor shards under FSDP2), so saving them gathers exactly like the weights.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = float(decay)
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        # Shadows live on the local shards (plain tensors): updates never pay DTensor dispatch.
        self.shadows = [_local(p.detach()).clone().float() for p in self.params]
        self._specs = [(p.device_mesh, p.placements, p.shape, p.stride()) if hasattr(p, "device_mesh") else None
                       for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        src = [_local(p.detach()) for p in self.params]
        src = [t.float() if t.dtype != torch.float32 else t for t in src]
        try:
            torch._foreach_lerp_(self.shadows, src, weight)
        except (RuntimeError, NotImplementedError, TypeError):
            for s, p in zip(self.shadows, src):
                s.lerp_(p, weight)
        self.num_updates += 1

    def named_shadows(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, shadow)`` with shadows of sharded parameters as DTensors (gather with ``full_tensor``)."""
        out = []
        for n, s, spec in zip(self.names, self.shadows, self._specs):
            if spec is not None:
                from torch.distributed.tensor import DTensor

                mesh, placements, shape, stride = spec
                s = DTensor.from_local(s, mesh, placements, run_check=False, shape=shape, stride=stride)
            out.append((n, s))
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], place) -> None:
        """Copy full tensors into the shadows; ``place(full, like)`` lays a full tensor out like ``like``."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weight(s), e.g. {missing[:3]}")
        for n, s, p in zip(self.names, self.shadows, self.params):
            t = tensors[n]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"EMA weight {n}: checkpoint shape {tuple(t.shape)} vs model {tuple(p.shape)}")
            s.copy_(_local(place(t, p)).float())

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for evaluation hooks)."""
        with torch.no_grad():
            locals_ = [_local(p.detach()) for p in self.params]
            backup = [t.clone() for t in locals_]
            for t, s in zip(locals_, self.shadows):
                t.copy_(s.to(t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(locals_, backup):
                    t.copy_(b)
