"""The training state a resume restores beyond the weights: the optimiser's moments and step
counts as tensors plus JSON (checked against the current parameter groups on load), and the RNG
states of every process (torch CPU and CUDA, numpy, python ``random``, the loss-noise generator)
as tensors, keyed by rank."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from ..jsonio import to_jsonable
from .checkpoint import FORMAT, FORMAT_VERSION
from .tensor_files import CheckpointError, tensor_shape

log = logging.getLogger("dit4dit.train")


# --------------------------------------------------------------------------------------------
# Optimiser state <-> tensors + JSON
# --------------------------------------------------------------------------------------------


def optimizer_state_tensors(optimizer: torch.optim.Optimizer,
                            to_cpu: Callable[[torch.Tensor], torch.Tensor] | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``({"<weight>/<key>": tensor}, json_meta)`` for an optimiser built by ``optim.build_optimizer``.

    Collective under FSDP2 (every rank calls it; gathers shards in a fixed order).
    """
    from .distributed import to_full_cpu

    conv = to_cpu or to_full_cpu
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for g in optimizer.param_groups:
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise ValueError("optimizer groups must carry 'param_names' (build it with optim.build_optimizer)")
        for name, p in zip(names, g["params"]):
            st = optimizer.state.get(p, {})
            for k in sorted(st):
                v = st[k]
                if isinstance(v, torch.Tensor):
                    tensors[f"{name}/{k}"] = conv(v)
                else:
                    scalars.setdefault(name, {})[k] = to_jsonable(v)
        groups.append({k: to_jsonable(v) for k, v in g.items() if k != "params"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(optimizer).__name__,
            "param_groups": groups, "scalar_state": scalars}
    return tensors, meta


@torch.no_grad()
def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any],
                         source: str = "optimizer") -> None:
    """Restore moments and step counts saved by :func:`optimizer_state_tensors` (DTensor-aware).

    Hyper-parameters stay those of the current optimiser (the resumed config is checked to
    match); the groups and the weights in each group must be the same.
    """
    from .distributed import place_like

    saved = meta.get("param_groups", [])
    cur_names = [g.get("name") for g in optimizer.param_groups]
    saved_names = [g.get("name") for g in saved]
    if cur_names != saved_names:
        raise CheckpointError(f"{source}: parameter groups {saved_names} in the checkpoint, {cur_names} in the "
                              f"optimiser")
    for g, s in zip(optimizer.param_groups, saved):
        a, b = list(g["param_names"]), list(s.get("param_names", []))
        if a != b:
            only_ckpt = sorted(set(b) - set(a))[:5]
            only_model = sorted(set(a) - set(b))[:5]
            raise CheckpointError(f"{source}: group {g['name']!r} holds different weights (checkpoint only: "
                                  f"{only_ckpt}, model only: {only_model}, or a different order)")
    keys_by_param: dict[str, list[tuple[str, str]]] = {}
    for key in tensors.keys():
        name, _, k = key.rpartition("/")
        keys_by_param.setdefault(name, []).append((k, key))
    scalars = meta.get("scalar_state", {})
    for g in optimizer.param_groups:
        on_device = bool(g.get("fused") or g.get("capturable"))
        for name, p in zip(g["param_names"], g["params"]):
            saved_keys = keys_by_param.get(name)
            if not saved_keys:
                optimizer.state.pop(p, None)
                continue
            st: dict[str, Any] = {}
            for k, key in saved_keys:
                t = tensors[key]  # read one tensor at a time (lazy files)
                if k == "step":
                    dev = (p.to_local().device if hasattr(p, "to_local") else p.device) if on_device else "cpu"
                    st[k] = t.to(device=dev, dtype=torch.float32).clone()
                else:
                    if tensor_shape(t) != tensor_shape(p):
                        raise CheckpointError(f"{source}: state {k!r} of {name}: checkpoint shape {tensor_shape(t)} vs "
                                              f"parameter shape {tensor_shape(p)}")
                    st[k] = place_like(t, p).clone() if t.dtype == p.dtype else place_like(t.to(p.dtype), p).clone()
            st.update(scalars.get(name, {}))
            optimizer.state[p] = st


# --------------------------------------------------------------------------------------------
# RNG states as tensors
# --------------------------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU (+ CUDA), numpy, python ``random`` and
    the loss-noise generator."""
    out: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state().clone()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    out["numpy_meta"] = torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([float(cached)], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python_state"] = torch.tensor(list(internal), dtype=torch.int64)
    out["python_meta"] = torch.tensor([int(version), int(gauss_next is not None)], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([0.0 if gauss_next is None else float(gauss_next)], dtype=torch.float64)
    if generator is not None:
        out["loss_generator"] = generator.get_state().clone()
    return out


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng` (a CUDA state is skipped, with a warning, on a CPU-only host)."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8))
        else:
            log.warning("the checkpoint holds a CUDA RNG state but CUDA is not available: not restored")
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(x) for x in state["numpy_meta"].tolist())
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    version, has_next = (int(x) for x in state["python_meta"].tolist())
    gauss = float(state["python_gauss"][0]) if has_next else None
    random.setstate((version, tuple(int(x) for x in state["python_state"].tolist()), gauss))
    if generator is not None:
        if "loss_generator" not in state:
            raise CheckpointError("the checkpoint holds no loss-noise generator state")
        generator.set_state(state["loss_generator"].to(torch.uint8))


def rank_rng(all_states: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor] | None:
    """The ``rank{r}/...`` entries of a gathered RNG dict, without the prefix (None if absent)."""
    prefix = f"rank{rank}/"
    out = {k[len(prefix):]: v for k, v in all_states.items() if k.startswith(prefix)}
    return out or None
