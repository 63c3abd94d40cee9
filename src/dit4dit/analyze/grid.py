"""The cells of the study: the paper's baselines (named variants) and its ablation grids.

A cell is a list of training stages, each a list of config overrides (`KEY=VALUE`, as `--set`)
applied on top of the study's base config. Every stage after the first starts from the weights of
the stage before (`train.init_from`, filled in by the runner).

Variants (Section 5 and the ablation "joint vs decoupled" of the paper):

| variant | what trains | overrides |
|---|---|---|
| `joint` | DiT4DiT: video + action loss, action gradient reaches the video DiT | mode=joint, feature_grad=end_to_end |
| `joint_detached` | both losses, features detached (the reference code's behaviour) | mode=joint, feature_grad=detached |
| `action_only` | the video DiT trained by the action loss only (no video loss) | mode=action_only |
| `decoupled` | stage 1 video loss only; stage 2 the action DiT on the frozen video DiT | mode=video_only; then mode=action_only, feature_grad=detached, train.freeze_video=true |
| `static_image` | a static image-text encoder of the same size instead of the video DiT (Qwen3DiT analogue) | encoder=static_image, mode=action_only, feature_grad=end_to_end |

Ablations (Figure 8 and the data-efficiency claim), each on top of `joint`:

| ablation | cells (defaults; `--values` replaces them) |
|---|---|
| `feature_blocks` | early / middle / late block (L/4, the paper's 18/28 position, L of L = video.num_layers) and `mean` (the mean over all L blocks) |
| `feature_denoise_steps` | 1, 2, 4 Euler steps of the video DiT before the feature pass |
| `tau_f` | fixed 0.25, 0.5, 0.75, 0.995, and `buckets:10` (Algorithm 1's discrete buckets) |
| `demos` | 5, 10, 25, 50 demonstrations per task (`train.episodes_per_task`) |
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, DiT4DiTConfig


class AnalysisError(ConfigError):
    """A bad request to the analysis runner (unknown variant, bad value, stale run folder ...)."""


@dataclass(frozen=True)
class Cell:
    group: str  # "variants" or the ablation's name
    name: str  # unique within the group; the run folder's name
    label: str  # for tables and plots
    stages: tuple[tuple[str, ...], ...]  # config overrides of each training stage
    x: float | None = None  # numeric position on a curve (demos: episodes per task)
    arm: str | None = None  # the video-prior study's arm (analyze/prior.py); None elsewhere
    init: str | None = None  # a shared pretraining run the first stage starts from (analyze/prior.py)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


JOINT = ("mode=joint", "feature_grad=end_to_end")

VARIANTS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "joint": ("DiT4DiT, joint training (end to end)", (JOINT,)),
    "joint_detached": ("joint training, features detached", (("mode=joint", "feature_grad=detached"),)),
    "action_only": ("action loss only (no video loss)", (("mode=action_only", "feature_grad=end_to_end"),)),
    "decoupled": ("decoupled: video DiT, then action DiT on it frozen",
                  (("mode=video_only",),
                   ("mode=action_only", "feature_grad=detached", "train.freeze_video=true"))),
    "static_image": ("static image encoder (Qwen3DiT analogue)",
                     (("encoder=static_image", "mode=action_only", "feature_grad=end_to_end"),)),
}

ABLATIONS = ("feature_blocks", "feature_denoise_steps", "tau_f", "demos")

DEFAULT_VALUES = {
    "feature_denoise_steps": ("1", "2", "4"),
    "tau_f": ("0.25", "0.5", "0.75", "0.995", "buckets:10"),
    "demos": ("5", "10", "25", "50"),
}


def variant_cells(names: list[str] | tuple[str, ...]) -> list[Cell]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise AnalysisError(f"unknown variant(s) {unknown}; available: {', '.join(VARIANTS)}")
    return [Cell("variants", n, VARIANTS[n][0], VARIANTS[n][1]) for n in dict.fromkeys(names)]


def default_values(ablation: str, cfg: DiT4DiTConfig) -> tuple[str, ...]:
    if ablation == "feature_blocks":
        n = cfg.video.num_layers
        picks = sorted({max(1, n // 4), min(n, max(1, round(n * 18 / 28))), n})
        return tuple(str(b) for b in picks) + ("mean",)
    return DEFAULT_VALUES[ablation]


def ablation_cells(ablation: str, cfg: DiT4DiTConfig, values: list[str] | tuple[str, ...] | None = None
                   ) -> list[Cell]:
    """The cells of one ablation grid on top of the `joint` variant (`values`: strings as on the
    command line; None = the defaults for `cfg`)."""
    if ablation not in ABLATIONS:
        raise AnalysisError(f"unknown ablation {ablation!r}; available: {', '.join(ABLATIONS)}")
    values = tuple(values) if values else default_values(ablation, cfg)
    cells = []
    for v in values:
        try:
            cells.append(_ablation_cell(ablation, str(v).strip(), cfg))
        except ValueError:
            raise AnalysisError(f"ablation {ablation}: bad value {v!r} ({_VALUE_HELP[ablation]})") from None
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise AnalysisError(f"ablation {ablation}: repeated values {list(values)}")
    return cells


_VALUE_HELP = {
    "feature_blocks": "a block count 1..video.num_layers, or 'mean' for the mean over all blocks",
    "feature_denoise_steps": "a number of steps >= 1",
    "tau_f": "a flow time in [0, 1], or 'buckets:N' for Algorithm 1's N + 1 discrete buckets",
    "demos": "a number of episodes per task >= 1",
}


def _joint(ablation: str, name: str, label: str, *overrides: str, x: float | None = None) -> Cell:
    """A one-stage cell: the `joint` variant plus `overrides`."""
    return Cell(ablation, name, label, (JOINT + overrides,), x=x)


def _count(text: str) -> int:
    """An int >= 1 (ValueError otherwise; the caller names the ablation and its allowed values)."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


def _ablation_cell(ablation: str, v: str, cfg: DiT4DiTConfig) -> Cell:
    if ablation == "feature_blocks":
        n = cfg.video.num_layers
        if v in ("mean", "all"):
            return _joint(ablation, "mean", f"mean of all {n} blocks", f"feature_blocks={n}", "feature_pool=mean")
        b = int(v)
        if not 1 <= b <= n:
            raise ValueError(v)
        return _joint(ablation, f"block_{b}", f"block {b} of {n}", f"feature_blocks={b}", "feature_pool=last", x=b)
    if ablation == "feature_denoise_steps":
        k = _count(v)
        return _joint(ablation, f"steps_{k}", f"{k} step{'s' if k > 1 else ''}", f"feature_denoise_steps={k}", x=k)
    if ablation == "tau_f":
        if v.startswith("buckets:"):
            t = _count(v.split(":", 1)[1])
            return _joint(ablation, f"buckets_{t}", f"buckets {{0/{t}..{t}/{t}}}", f"tau_f_buckets={t}")
        tau = float(v)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(v)
        return _joint(ablation, f"tau_{tau:g}", f"tau_f = {tau:g}", f"tau_f={tau!r}", "tau_f_buckets=null", x=tau)
    if ablation == "demos":
        n = _count(v)
        return _joint(ablation, f"demos_{n}", f"{n} demo{'s' if n != 1 else ''} per task",
                      f"train.episodes_per_task={n}", x=n)
    raise AnalysisError(f"unknown ablation {ablation!r}")  # pragma: no cover - checked by the caller
