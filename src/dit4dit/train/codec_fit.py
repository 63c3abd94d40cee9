"""A codec that learns from the data (``codec.kind=pca``), fitted and checked on training clips.

Both draws of training clips, the one a codec is fitted on (:func:`fit_codec`) and the one its
latents are measured on (:func:`codec_latent_rms`), come from :func:`codec_clips`: up to
``max_samples`` samples drawn with the run's seed (the same on every rank), one stream of the
seed per purpose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .distributed import seed_for

CODEC_FIT_SAMPLES = 256  # training samples whose clips fit a data-fitted codec (pca)
CODEC_CHECK_SAMPLES = 32  # training samples whose clips measure the latents of a loaded codec

FIT_DRAW, CHECK_DRAW = 0, 1  # the seed streams of the two draws


def codec_clips(samples: Dataset, seed: int, draw: int, max_samples: int, *, in_index_order: bool) -> torch.Tensor:
    """The float ``video`` clips of up to ``max_samples`` samples drawn without replacement with
    ``(seed, draw)``, stacked; ``in_index_order`` reads them sorted by index, else in draw order."""
    g = torch.Generator().manual_seed(seed_for(seed, 6, draw))
    idx = torch.randperm(len(samples), generator=g)[:max_samples]  # type: ignore[arg-type]
    if in_index_order:
        idx = idx.sort().values
    return torch.stack([samples[i]["video"] for i in idx.tolist()]).float()


def fit_codec(model, samples: Dataset, seed: int, max_samples: int = CODEC_FIT_SAMPLES) -> dict[str, Any] | None:
    """Fit the model's codec when it learns from the data and is not fitted yet (e.g. loaded by
    ``train.init_from``): on the clips of up to ``max_samples`` samples drawn with ``seed``, the
    same on every rank. Returns what was fitted, or None."""
    codec = getattr(model, "codec", None)
    if codec is None or not codec.learns_from_data or codec.fitted:
        return None
    return model.fit_codec(codec_clips(samples, seed, FIT_DRAW, max_samples, in_index_order=True))


@torch.no_grad()
def codec_latent_rms(model, samples: Dataset, seed: int, max_samples: int = CODEC_CHECK_SAMPLES) -> float | None:
    """RMS of the normalised latents of up to ``max_samples`` training clips (about 1 on the data a
    codec was fitted on); None for a codec that learns nothing from the data."""
    codec = getattr(model, "codec", None)
    if codec is None or not codec.learns_from_data or not codec.fitted:
        return None
    frames = codec_clips(samples, seed, CHECK_DRAW, max_samples, in_index_order=False)
    return float(codec.encode(frames.to(codec.mean.device)).float().pow(2).mean().sqrt())
