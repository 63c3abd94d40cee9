"""A tiny Cosmos-Predict2.5 backbone folder in the official diffusers layout, and a matching config.

The folder is written by `dit4dit.models.backbone.write_tiny_backbone` with diffusers' and
transformers' own `save_pretrained`: `model_index.json` (Cosmos2_5_PredictBasePipeline),
`transformer/` (CosmosTransformer3DModel, 4 blocks of 2 x 16), `vae/` (AutoencoderKLWan, base_dim 8,
non-trivial latent statistics), `scheduler/` (UniPCMultistepScheduler), `text_encoder/` (a 3-layer
Qwen2.5-VL of width 32) and `tokenizer/` (a byte-level BPE trained offline).

    from backbone_fixtures import make_backbone, tiny_cfg, TINY_SETS
    root = make_backbone(tmp_path / "bb")
    cfg = tiny_cfg("train.steps=2")           # cosmos-2b + TINY_OVERRIDES (+ extra overrides)
    main(["train", "--preset", "cosmos-2b", *TINY_SETS, ...])
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F

from dit4dit.config import get_preset
from dit4dit.models.backbone import TINY_OVERRIDES, tiny_qwen, tiny_tokenizer, write_tiny_backbone

__all__ = ["TINY_OVERRIDES", "TINY_SETS", "TRAIN_OVERRIDES", "make_backbone", "nearest_resize_shim", "tiny_cfg",
           "tiny_qwen", "tiny_tokenizer"]

# Small, fast training settings for the tiny backbone config.
TRAIN_OVERRIDES = ("train.steps=1", "train.batch_size=2", "train.num_workers=0", "train.log_every=1",
                   "train.warmup_steps=1", "train.save_every=1", "train.tensorboard=false")
# The same overrides as `--set` arguments of the command line.
TINY_SETS = [a for o in TINY_OVERRIDES for a in ("--set", o)]


def tiny_cfg(*extra: str):
    """`cosmos-2b` with `TINY_OVERRIDES` (matches `make_backbone`) and `extra` overrides."""
    return get_preset("cosmos-2b", list(TINY_OVERRIDES) + list(extra))


def make_backbone(root: str | Path, *, seed: int = 0, corpus=(), **kwargs) -> Path:
    """Write the tiny backbone folder to `root` (see the module docstring)."""
    return write_tiny_backbone(root, seed=seed, corpus=corpus, **kwargs)


def nearest_resize_shim():
    """The diffusers Cosmos forward resizes `padding_mask` with torchvision, which has no CPU wheel
    for our torch; an equivalent nearest-neighbour resize lets the reference forward run."""

    def resize(img, size, interpolation=None):
        return F.interpolate(img, size=tuple(size), mode="nearest")

    functional = types.SimpleNamespace(resize=resize)
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
