"""Run a grid of cells x seeds: train every stage, evaluate closed loop, analyse the features,
store one ``result.json`` per run folder, then aggregate (``report.py``).

Layout of the output folder::

    OUT/
      plan.json                          # the request: cells, their overrides, seeds, settings
      runs/<group>/<cell>/seed_<s>/
        configs.json                     # the full config of every stage
        train/ | stage1_video_only/ stage2_action_only/   # trainer run folders (checkpoints, metrics)
        eval.json                        # closed-loop evaluation of the final stage
        features.json                    # phase silhouettes + t-SNE (variants, or all cells)
        pretrain.json                    # a cell that starts from a shared pretraining run: which
        result.json                      # written last: the run is done
      pretrain/<name>/                   # the video-prior study (--study prior, analyze/prior.py):
        config.json  train/              # a pretraining run shared by every cell and seed that --init from it
      results.json  results.md  plots/   # the aggregate (report.py)

Runs go seed by seed (every cell at seed 0, then every cell at seed 1, ...), so a study cut short
has every cell at the same seeds. Resumable: a run whose ``result.json`` exists for the same configs
and settings (its data and prior compared by content, :func:`run_settings`) is skipped; a
stage whose newest checkpoint is at ``train.steps`` is not trained again, one with an older
checkpoint resumes from it (so raising ``--steps`` continues runs; a later stage whose earlier
stage trained further is moved aside to ``<stage>.stale-<time>`` and trained anew); evaluation
and feature results are reused when their settings and checkpoint step match. A run folder
holding runs of another config is an error (choose another ``--out``), never silently mixed in.

The video-prior study (``study="prior"``) first trains its shared pretraining runs (one per
objective, ``OUT/pretrain/<name>/train``, on ``pretrain_dataset``; resumable the same way), then
every cell, whose first stage starts from its pretraining run (``train.init_from``). When a
pretraining run trains further (a larger ``pretrain_steps``), the cells that start from it are
trained anew (their old first stage, evaluation and features are moved aside).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import DiT4DiTConfig, get_preset, override
from ..safetensors_header import tensors_sha256
from .common import data_identity, pretrain_dir, read_record, run_dir, write_record  # noqa: F401 - run_dir, pretrain_dir: public
from .grid import ABLATIONS, VARIANTS, AnalysisError, Cell, ablation_cells, variant_cells
from .prior import ARMS, DEMOS, DEMOS_DE, FEATURE_ARMS, PRETRAIN, PRETRAIN_COMMON, prior_cells

Evaluator = Callable[[Any], dict]  # Policy -> normalised evaluation result
Log = Callable[[str], None]

# Config fields that may differ between a stored run and the request: logging and checkpoint
# cadence, and train.steps (more steps resume the stored training; the result is then recomputed).
MAY_DIFFER = frozenset({"train.steps", "train.log_every", "train.save_every", "train.keep_last",
                        "train.image_every", "train.eval_every", "train.tensorboard", "train.wandb",
                        "train.wandb_project", "train.num_workers"})

# ... and between a finished run and the request: not train.steps (a finished run trained exactly
# these), but the paths its weights and video came from, which the run's settings hold by content
# (a study carried to another folder or machine, `Study.results_copy`)
RESULT_MAY_DIFFER = (MAY_DIFFER - {"train.steps"}) | {"train.init_from", "train.video_datasets"}


def _stderr(msg: str) -> None:
    print(f"[analyze] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@dataclass
class Study:
    """What `run_analysis` was asked for (also the content of plan.json)."""

    dataset: str
    out: str
    preset: str = "tiny"
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] = tuple(VARIANTS)
    ablations: tuple[str, ...] = ()
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None
    eval_episodes: int = 10
    replan_every: int | None = None
    eval_seed: int = 0
    tasks: tuple[str, ...] = ()
    features: str = "variants"  # variants | all | none
    feature_points: int = 512
    device: str | None = None
    frame_cache: bool = False  # train from the dataset's frame cache (built once, before any run)
    # the video-prior study (analyze/prior.py): study="prior" adds its arms' cells and pretraining runs
    study: str = "grid"  # grid | prior
    pretrain_dataset: str | None = None  # the action-free pretraining video (a LeRobot dataset or video folder)
    pretrain_steps: int | None = None  # steps of each pretraining run (default: the cells' steps)
    arms: tuple[str, ...] = tuple(ARMS)
    demos: tuple[int, ...] = DEMOS  # demonstrations per task of the curve arms (a, b, c)
    demos_de: tuple[int, ...] = DEMOS_DE  # of the arms d and e
    # a second home for the finished runs' result.json and the report (e.g. a repository folder):
    # runs it holds and OUT lacks are taken at the start; a study resumes on another machine from it
    results_copy: str | None = None

    def base_config(self) -> DiT4DiTConfig:
        extra = [f"train.steps={self.steps}"] if self.steps is not None else []
        return get_preset(self.preset, list(self.overrides) + extra)

    def cells(self) -> list[Cell]:
        base = self.base_config()
        cells = variant_cells(self.variants)
        for a in self.ablations:
            cells += ablation_cells(a, base, self.values.get(a))
        if self.study not in ("grid", "prior"):
            raise AnalysisError(f"study={self.study!r} must be grid | prior")
        if self.study == "prior":
            if not self.pretrain_dataset:
                raise AnalysisError("the prior study needs the pretraining video: --pretrain-dataset PATH")
            cells += prior_cells(self.pretrain_dataset, self.arms, self.demos, self.demos_de)
        if not cells:
            raise AnalysisError("nothing to run: no variants and no ablations were requested")
        return cells

    def eval_settings(self) -> dict[str, Any]:
        return {"episodes_per_task": self.eval_episodes, "replan_every": self.replan_every, "seed": self.eval_seed,
                "tasks": list(self.tasks)}

    def feature_settings(self) -> dict[str, Any]:
        return {"points": self.feature_points}

    def wants_features(self, cell: Cell) -> bool:
        if cell.group == "prior" and self.features == "variants":
            return cell.arm in FEATURE_ARMS
        return self.features == "all" or (self.features == "variants" and cell.group == "variants")

    def pretrain_config(self, name: str) -> DiT4DiTConfig:
        """The config of the shared pretraining run `name` (analyze/prior.py PRETRAIN)."""
        if name not in PRETRAIN:
            raise AnalysisError(f"unknown pretraining run {name!r}; available: {', '.join(PRETRAIN)}")
        extra = [f"train.steps={self.pretrain_steps}"] if self.pretrain_steps is not None else []
        try:
            return override(self.base_config(), list(PRETRAIN_COMMON) + list(PRETRAIN[name][1]) + extra).validate()
        except Exception as e:  # noqa: BLE001 - name the run in the message
            raise AnalysisError(f"pretraining run {name}: {e}") from e


def pretrain_names(cells: Sequence[Cell]) -> list[str]:
    """The shared pretraining runs the cells start from, in order."""
    return list(dict.fromkeys(c.init for c in cells if c.init))


def stage_dirs(root: Path, cell: Cell, configs: Sequence[DiT4DiTConfig]) -> list[Path]:
    if len(configs) == 1:
        return [root / "train"]
    return [root / f"stage{i + 1}_{c.mode}" for i, c in enumerate(configs)]


def stage_configs(study: Study, cell: Cell, seed: int) -> list[DiT4DiTConfig]:
    """The full config of every training stage of a run (validated; errors name the cell). A
    stage after the first starts from the previous stage's weights (`train.init_from`), the first
    stage of a cell with `init` from that shared pretraining run's."""
    base = study.base_config()
    configs: list[DiT4DiTConfig] = []
    for i, stage in enumerate(cell.stages):
        try:
            configs.append(override(base, list(stage) + [f"train.seed={seed}"]).validate())
        except Exception as e:  # noqa: BLE001 - name the cell in the message
            raise AnalysisError(f"cell {cell.key}, stage {i + 1}: {e}") from e
    dirs = stage_dirs(run_dir(study.out, cell, seed), cell, configs)
    # where each stage starts from: the shared pretraining run (a cell with `init`), the stage before
    first = (pretrain_dir(study.out, cell.init) / "train").resolve() if cell.init else None
    sources = [first] + [d.resolve() for d in dirs[:-1]]
    return [c if src is None else override(c, [f"train.init_from={json.dumps(str(src))}"])
            for c, src in zip(configs, sources)]


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def make_evaluator(cfg: DiT4DiTConfig, dataset: str, study: Study, threads: int | None = None
                   ) -> tuple[Evaluator, list[str]]:
    """Closed-loop evaluation for the dataset's embodiment: the built-in `toy_reach` task or
    MetaWorld (tasks: `study.tasks`, else those whose instructions the dataset holds)."""
    episodes, replan, seed = study.eval_episodes, study.replan_every, study.eval_seed
    if cfg.schema == "toy_reach":
        from ..envs.toy import TASKS

        def toy(policy) -> dict:
            from ..eval.toy import evaluate

            return _normalise(evaluate(policy, episodes, replan_every=replan, seed=seed))

        return toy, list(TASKS.values())
    if cfg.schema == "metaworld_sawyer":
        from ..envs.metaworld import INSTRUCTIONS

        tasks = list(study.tasks)
        if not tasks:
            from ..data.lerobot import LeRobotDataset

            ds = LeRobotDataset(dataset, check_videos=False)
            by_instruction = {v: k for k, v in INSTRUCTIONS.items()}
            tasks = [by_instruction[t] for t in ds.tasks if t in by_instruction]
            if not tasks:
                raise AnalysisError(f"{dataset}: no MetaWorld task instruction found among its tasks {ds.tasks}; "
                                    f"pass --tasks")

        def metaworld(policy) -> dict:
            from ..eval.metaworld import evaluate

            return _normalise(evaluate(policy, tasks, episodes, replan_every=replan, seed=seed, threads=threads))

        return metaworld, tasks
    raise AnalysisError(f"no built-in closed-loop evaluation for schema {cfg.schema!r} (toy_reach, "
                        f"metaworld_sawyer); pass evaluator= from Python")


def _outcomes(r: dict) -> dict[str, list[int]]:
    """{task: [1/0 per episode, in episode order]} from an evaluation result: its per-task
    `outcomes`, or its `episodes_detail` (MetaWorld); tasks with neither are left out."""
    out = {t: [int(bool(x)) for x in v["outcomes"]] for t, v in r["per_task"].items() if v.get("outcomes") is not None}
    detail: dict[str, list[tuple[int, int]]] = {}
    for d in r.get("episodes_detail") or []:
        detail.setdefault(d["task"], []).append((int(d["episode"]), int(bool(d["success"]))))
    for t, eps in detail.items():
        out.setdefault(t, [s for _, s in sorted(eps)])
    return out


def _normalise(r: dict) -> dict:
    """The fields of an evaluation result the aggregate needs (no videos; per episode only its
    success, `per_task[t]["outcomes"]`, for the paired comparisons of the prior study)."""
    outcomes = _outcomes(r)
    per_task = {t: {"successes": int(v["successes"]), "episodes": int(v["episodes"]),
                    "success_rate": float(v["success_rate"]),
                    **({"outcomes": outcomes[t]} if t in outcomes else {})} for t, v in r["per_task"].items()}
    successes = sum(v["successes"] for v in per_task.values())
    episodes = sum(v["episodes"] for v in per_task.values())
    return {"success_rate": successes / max(1, episodes), "successes": successes, "episodes": episodes,
            "ci95": list(r["ci95"]), "per_task": per_task, "replan_every": r.get("replan_every")
            if "replan_every" in r else r.get("protocol", {}).get("replan_every")}


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------


def _config_mismatch(saved: list[dict], configs: list[DiT4DiTConfig], ignore=MAY_DIFFER) -> list[str]:
    """Differences (beyond `ignore`) between stored stage configs and the requested ones."""
    from ..train.checkpoint import config_differences

    if len(saved) != len(configs):
        return [f"{len(saved)} stage(s) stored, {len(configs)} requested"]
    out = []
    for i, (s, c) in enumerate(zip(saved, configs)):
        full = DiT4DiTConfig.from_dict(s).to_dict()  # fields added since count at their defaults
        out += [f"stage {i + 1} {k}: stored {a!r}, requested {b!r}" for k, a, b in config_differences(full, c, ignore)]
    return out


def ckpt_exists(folder: Path) -> bool:
    from ..train.checkpoint import latest_checkpoint

    return latest_checkpoint(folder) is not None


def _train_stage(cfg: DiT4DiTConfig, dataset: str, folder: Path, study: Study, progress: bool, log: Log,
                 what: str) -> dict[str, Any]:
    """Train one stage to `cfg.train.steps` (resuming a shorter checkpoint; skipping a done one)."""
    from ..train import checkpoint as ckpt
    from ..train.trainer import train

    latest = ckpt.latest_checkpoint(folder)
    step = ckpt.parse_step(latest.name) if latest is not None else 0
    if latest is not None and step == cfg.train.steps:
        log(f"{what}: trained already (step {step})")
        summary = read_record(folder / "summary.json") or {}
        return {**summary, "reused": True}
    if latest is not None and step > cfg.train.steps:
        raise AnalysisError(f"{folder} holds a checkpoint at step {step}, beyond the requested {cfg.train.steps} "
                            f"steps: use --steps {step} or another --out")
    log(f"{what}: {'resuming at step ' + str(step) if latest else 'training'} to step {cfg.train.steps}")
    summary = train(cfg, dataset, folder, resume=latest is not None, progress=progress, device=study.device,
                    frame_cache=True if study.frame_cache else None)
    summary.pop("losses", None)
    if summary.get("interrupted") or summary.get("step") != cfg.train.steps:
        raise AnalysisError(f"{what}: training stopped at step {summary.get('step')} of {cfg.train.steps} (a stop "
                            f"was requested); rerun the same command to resume")
    return summary


def _twin_key(configs: list[DiT4DiTConfig], settings: dict[str, Any]) -> str:
    """Runs with equal keys train and evaluate exactly the same thing (e.g. `tau_f=0.995` and `joint`)."""
    return json.dumps([[c.to_dict() for c in configs], settings["eval"], settings["dataset"]], sort_keys=True,
                      default=str)


def run_settings(study: Study, cell: Cell, seed: int) -> tuple[list[DiT4DiTConfig], dict[str, Any], str]:
    """(stage configs, evaluation / feature / dataset settings, twin key) of one cell x seed."""
    configs = stage_configs(study, cell, seed)
    settings = {"eval": study.eval_settings(), "features": study.feature_settings() if study.wants_features(cell)
                else None, "dataset": data_identity(study.dataset)}
    videos = list(dict.fromkeys(v for c in configs for v in c.train.video_datasets))
    if videos:  # co-training video, by content (the configs hold its paths)
        settings["video_datasets"] = [data_identity(v) for v in videos]
    if cell.init:  # the shared pretraining run the first stage starts from (a new one retrains the cell)
        settings["pretrain"] = json.loads(json.dumps({  # as stored (lists, not tuples), so equal records compare equal
            "name": cell.init, "config": study.pretrain_config(cell.init).to_dict(),
            "dataset": data_identity(study.pretrain_dataset),
            "weights": pretrain_weights(study, cell.init)}, default=str))
    return configs, settings, _twin_key(configs, settings)


def pretrain_weights(study: Study, name: str) -> dict[str, Any] | None:
    """The identity of a shared pretraining run's newest checkpoint: its step and the content hash
    of each of its tensor files (:func:`~dit4dit.safetensors_header.tensors_sha256`); None before it
    has one. Stored with every run that starts from it: a run is reused only when its prior holds
    the same tensors, e.g. one rebuilt by the same command on another machine."""
    from ..train.checkpoint import latest_checkpoint, parse_step

    ckpt = latest_checkpoint(pretrain_dir(study.out, name) / "train")
    if ckpt is None:
        return None
    files = sorted(ckpt.glob("*.safetensors"))
    return {"step": parse_step(ckpt.name),
            "tensors_sha256": {p.name: _tensors_sha256(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files}}


@functools.lru_cache(maxsize=64)
def _tensors_sha256(path: str, size: int, mtime_ns: int) -> str:  # once per file and process while it is unchanged
    return tensors_sha256(path, AnalysisError)


def _cached(path: Path, settings: dict[str, Any], step: int | None, compute: Callable[[], Any]) -> Any:
    """The result stored at `path` for these settings and checkpoint step, else `compute()` (stored)."""
    stored = read_record(path)
    if stored is not None and stored.get("settings") == settings and stored.get("checkpoint_step") == step:
        return stored["result"]
    result = compute()
    write_record(path, {"settings": settings, "checkpoint_step": step, "result": result})
    return result


def _twin_result(twin: dict[str, Any], cell: Cell, settings: dict[str, Any]) -> dict[str, Any]:
    """`twin`'s result, relabelled as `cell`'s (same configs: nothing to train or evaluate again)."""
    return {**twin, "cell": cell.name, "group": cell.group, "label": cell.label, "x": cell.x,
            "overrides": [list(st) for st in cell.stages], "settings": settings,
            "same_as": twin.get("same_as") or f"{twin['group']}/{twin['cell']}",
            "features": twin["features"] if settings["features"] is not None else None}


def _train_stages(root: Path, cell: Cell, configs: list[DiT4DiTConfig], study: Study, progress: bool, log: Log,
                  what: str) -> tuple[list[dict[str, Any]], Path]:
    """Train every stage in order; returns (stage summaries, the final stage's run folder)."""
    dirs = stage_dirs(root, cell, configs)
    stages: list[dict[str, Any]] = []
    for i, (cfg, folder) in enumerate(zip(configs, dirs)):
        label = f"{what} stage {i + 1}/{len(configs)} ({cfg.mode})" if len(configs) > 1 else what
        if i > 0 and not stages[-1].get("reused") and ckpt_exists(folder):
            # The previous stage has just (re)trained: this stage's old run started from other weights.
            stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(stale)
            log(f"{label}: the previous stage changed; its old run moved to {stale.name}, training anew")
        stages.append(_train_stage(cfg, study.dataset, folder, study, progress, log, label))
    return stages, dirs[-1]


def run_one(study: Study, cell: Cell, seed: int, evaluator: Evaluator, *, progress: bool = True,
            log: Log = _stderr, prefix: str = "", twins: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train, evaluate and analyse one cell x seed (see the module docstring); returns its result.

    `twins` maps `_twin_key` to finished results of this study: a cell whose configs equal an
    earlier cell's (an ablation value that is the default) takes that run's result instead of
    training again (marked `same_as`)."""
    import torch

    from ..policy import Policy
    from ..train.checkpoint import latest_checkpoint, parse_step
    from .features import extract_phase_features, phase_analysis

    root = run_dir(study.out, cell, seed)
    configs, settings, key = run_settings(study, cell, seed)
    what = f"{prefix}{cell.key} seed {seed}"

    def finish(result: dict[str, Any]) -> dict[str, Any]:
        if twins is not None:
            twins.setdefault(key, result)
        _copy_result(study, cell, seed, result)
        return result

    # 1. what the folder holds already
    stored = read_record(root / "configs.json")
    diffs = _config_mismatch(stored, configs) if stored is not None else []
    if diffs:
        raise AnalysisError(f"{root} holds runs of another config ({'; '.join(diffs[:5])}); use another --out, "
                            f"or delete that folder to rerun it")
    done = read_record(root / "result.json")
    if (done is not None and done.get("settings") == settings
            and not _config_mismatch(done.get("configs", []), configs, ignore=RESULT_MAY_DIFFER)):
        log(f"{what}: done already (success {done['eval']['success_rate']:.0%}), skipped")
        return finish(done)
    write_record(root / "configs.json", [c.to_dict() for c in configs])
    twin = (twins or {}).get(key)
    if twin is not None and settings["features"] in (None, twin["settings"]["features"]):
        result = _twin_result(twin, cell, settings)
        write_record(root / "result.json", result)
        log(f"{what}: the same configs as {result['same_as']}: its result is reused")
        return finish(result)

    if cell.init:
        _check_pretrain_record(root, stage_dirs(root, cell, configs)[0], settings["pretrain"], log, what)

    # 2. train, 3. evaluate, 4. analyse the features (each reused when already done)
    t0 = time.perf_counter()
    stages, final = _train_stages(root, cell, configs, study, progress, log, what)
    t1 = time.perf_counter()
    checkpoint = latest_checkpoint(final)
    step = parse_step(checkpoint.name) if checkpoint is not None else None
    policy = Policy.from_checkpoint(final, device=study.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                    seed=study.eval_seed)
    model, processor = policy.model, policy.processor

    def evaluate() -> dict:
        log(f"{what}: evaluating {study.eval_episodes} episodes per task")
        return evaluator(policy)

    evaluation = _cached(root / "eval.json", settings["eval"], step, evaluate)
    t2 = time.perf_counter()

    def analyse() -> dict:
        log(f"{what}: feature analysis on {study.feature_points} frames")
        return phase_analysis(extract_phase_features(model, processor, study.dataset, study.feature_points,
                                                     seed=seed), seed=seed)

    feats = _cached(root / "features.json", settings["features"], step, analyse) if settings["features"] else None
    t3 = time.perf_counter()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = {"feature_encoder": count(model.feature_encoder), "action_dit": count(model.action_dit),
              "trainable_total": sum(count(m) for m in model.trainable_modules().values())}

    result = {
        "cell": cell.name, "group": cell.group, "label": cell.label, "x": cell.x, "seed": seed,
        "overrides": [list(st) for st in cell.stages], "configs": [c.to_dict() for c in configs],
        "settings": settings, "checkpoint": str(checkpoint) if checkpoint is not None else None, "step": step,
        "eval": evaluation, "features": {k: v for k, v in feats.items() if k != "tsne"} if feats else None,
        "params": params, "train_episodes": _train_episodes(study.dataset, configs[-1]),
        "stages": [{k: v for k, v in st.items() if k in ("step", "final_loss", "last_metrics", "samples_per_s",
                                                         "wall_time_s", "device", "reused")} for st in stages],
        "timing": {"train_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), "features_s": round(t3 - t2, 2)},
    }
    write_record(root / "result.json", result)
    sil = feats.get("silhouette_phase") if feats else None
    log(f"{what}: success {evaluation['success_rate']:.0%} ({evaluation['successes']}/{evaluation['episodes']})"
        + (f", phase silhouette {sil:.3f}" if sil is not None else ""))
    return finish(result)


def _check_pretrain_record(root: Path, first: Path, record: dict[str, Any], log: Log, what: str) -> None:
    """A run whose first stage started from another state of its pretraining run (it trained
    further since) is trained anew: its first stage, evaluation and features are moved aside."""
    stored = read_record(root / "pretrain.json")
    if stored is not None and stored != record and ckpt_exists(first):
        stale = root / f"stale-{time.strftime('%Y%m%d-%H%M%S')}"
        stale.mkdir(parents=True, exist_ok=True)
        for p in [first, root / "eval.json", root / "features.json"]:
            if p.exists():
                p.rename(stale / p.name)
        log(f"{what}: its pretraining run changed; the old training moved to {stale.name}, training anew")
    write_record(root / "pretrain.json", record)


def _pretrain_one(study: Study, name: str, progress: bool, log: Log) -> dict[str, Any]:
    """Train (or resume, or skip) the shared pretraining run `name`; returns its summary."""
    cfg = study.pretrain_config(name)
    root = pretrain_dir(study.out, name)
    stored = read_record(root / "config.json")
    diffs = _config_mismatch([stored], [cfg]) if stored is not None else []
    if diffs:
        raise AnalysisError(f"{root} holds a pretraining run of another config ({'; '.join(diffs[:5])}); use "
                            f"another --out, or delete that folder to rerun it")
    write_record(root / "config.json", cfg.to_dict())
    summary = _train_stage(cfg, str(study.pretrain_dataset), root / "train", study, progress, log,
                           f"pretraining {name} ({PRETRAIN[name][0]})")
    write_record(root / "summary.json", {k: v for k, v in summary.items() if k in (
        "step", "final_loss", "last_metrics", "samples_per_s", "wall_time_s", "device", "reused")})
    return summary


def _pretrain_worker(study: Study, name: str, threads: int) -> dict[str, Any]:
    import torch

    if _STOP is not None and _STOP.is_set():
        raise AnalysisError(f"pretraining {name}: not started, the study was interrupted")
    torch.set_num_threads(threads)
    return _pretrain_one(study, name, False, _stderr)


def run_pretraining(study: Study, names: Sequence[str], *, jobs: int = 1, threads: int | None = None,
                    progress: bool = True, log: Log = _stderr) -> dict[str, dict[str, Any]]:
    """Every shared pretraining run (`jobs` at a time in spawned processes when > 1)."""
    if study.frame_cache:  # built once here, so parallel runs only read it
        for name in names:
            _build_frame_cache(study.pretrain_config(name), str(study.pretrain_dataset), progress)
    if jobs <= 1 or len(names) <= 1:
        return {n: _pretrain_one(study, n, progress, log) for n in names}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    ctx = get_context("spawn")
    stop = ctx.Event()
    out: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=ctx, initializer=_init_worker,
                             initargs=(stop,)) as pool:
        futures = {n: pool.submit(_pretrain_worker, study, n, threads or 1) for n in names}
        try:
            for n, f in futures.items():
                out[n] = f.result()
        except BaseException:
            stop.set()
            raise
    return out


def _train_episodes(dataset: str, cfg: DiT4DiTConfig) -> int | None:
    """Episodes the run trained on (all, or the `train.episodes_per_task` subset)."""
    try:
        from ..data.lerobot import LeRobotDataset
        from ..data.samples import episodes_per_task

        ds = LeRobotDataset(dataset, check_videos=False)
        n = cfg.train.episodes_per_task
        return len(ds.episodes) if n is None else len(episodes_per_task(ds, n))
    except Exception:  # noqa: BLE001 - informative only
        return None


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------


def run_analysis(study: Study, *, evaluator: Evaluator | None = None, progress: bool = True, log: Log = _stderr,
                 threads: int | None = None, train: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Run every cell x seed of `study` (skipping finished runs), then aggregate.

    `evaluator(policy) -> result` replaces the built-in closed-loop evaluation (tests, other
    simulators); its result needs `per_task: {task: {successes, episodes, success_rate}}` and
    `ci95`. `train=False` only aggregates what the output folder already holds. `jobs > 1` runs
    that many runs at once in worker processes (`threads` torch threads each, default 1; the
    built-in evaluation only); a cell whose configs equal an earlier cell's still waits for
    that cell's result instead of training again.
    """
    from .report import write_report

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    unknown = [a for a in study.ablations if a not in ABLATIONS]
    if unknown:
        raise AnalysisError(f"unknown ablation(s) {unknown}; available: {', '.join(ABLATIONS)}")
    if study.features not in ("variants", "all", "none"):
        raise AnalysisError(f"features={study.features!r} must be variants | all | none")
    if not study.seeds:
        raise AnalysisError("no seeds given")
    if jobs < 1:
        raise AnalysisError(f"jobs={jobs}: at least 1")
    if jobs > 1 and evaluator is not None:
        raise AnalysisError("jobs > 1 runs the built-in evaluation in worker processes; a custom evaluator "
                            "needs jobs=1")
    dataset = Path(study.dataset).expanduser()
    if train and not (dataset / "meta" / "info.json").is_file():
        raise AnalysisError(f"dataset {dataset} is not a LeRobot dataset folder (no meta/info.json)")
    study.dataset = str(dataset)
    if study.pretrain_dataset:
        study.pretrain_dataset = str(Path(study.pretrain_dataset).expanduser().resolve())
        if train and study.study == "prior" and not Path(study.pretrain_dataset).exists():
            raise AnalysisError(f"pretraining video {study.pretrain_dataset} does not exist")
    out = Path(study.out).expanduser()
    study.out = str(out)
    base = study.base_config()
    cells = study.cells()
    pretrain = pretrain_names(cells)
    for name in pretrain:
        study.pretrain_config(name)
    for cell in cells:  # every config is checked before anything trains
        for seed in study.seeds:
            stage_configs(study, cell, seed)
    tasks: list[str] = list(study.tasks)
    if evaluator is None and train:
        evaluator, tasks = make_evaluator(base, study.dataset, study, threads)
    elif not train and not tasks:  # report only: keep what the last run evaluated
        tasks = (read_record(out / "plan.json") or {}).get("eval_tasks", [])
    plan = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in study.__dict__.items()},
            "eval_tasks": tasks, "train_steps": base.train.steps,
            "cells": [{"group": c.group, "name": c.name, "label": c.label, "x": c.x,
                       "stages": [list(s) for s in c.stages], "arm": c.arm, "init": c.init} for c in cells],
            "pretrain": {n: {"label": PRETRAIN[n][0], "overrides": list(PRETRAIN_COMMON) + list(PRETRAIN[n][1]),
                             "folder": str(pretrain_dir(out, n) / "train"),
                             "steps": study.pretrain_config(n).train.steps} for n in pretrain}}
    out.mkdir(parents=True, exist_ok=True)
    write_record(out / "plan.json", plan)

    # seed by seed: a study cut short (or spanning sessions) has every cell at the same seeds so far
    runs = [(c, s) for s in study.seeds for c in cells]
    total = len(runs)
    if study.results_copy:
        _take_results_copy(study, runs, log)
    t0 = time.perf_counter()
    twins: dict[str, dict[str, Any]] = {}  # cells with the same configs share one run
    if train:
        if pretrain:
            run_pretraining(study, pretrain, jobs=jobs, threads=threads, progress=progress and jobs == 1, log=log)
        if study.frame_cache:  # built once here, so parallel runs only read it
            _build_frame_cache(base, study.dataset, progress)
        if jobs > 1:
            _run_parallel(study, runs, jobs, threads, log, twins, evaluator)
        for k, (cell, seed) in enumerate(runs):
            run_one(study, cell, seed, evaluator, progress=progress and jobs == 1, log=log,
                    prefix=f"[{k + 1}/{total}] ", twins=twins)
    report = write_report(out, plan, cells, study.seeds)
    report["wall_time_s"] = round(time.perf_counter() - t0, 2)
    log(f"results: {out / 'results.md'}")
    if study.results_copy:
        for cell, seed in runs:
            _copy_result(study, cell, seed, read_record(run_dir(out, cell, seed) / "result.json"))
        _copy_report(out, Path(study.results_copy))
        log(f"results copied to {study.results_copy}")
    return report


def _copy_result(study: Study, cell: Cell, seed: int, result: dict[str, Any] | None) -> None:
    """Keep a finished run's result in `study.results_copy` too (when there is one)."""
    if study.results_copy and result is not None:
        path = run_dir(study.results_copy, cell, seed) / "result.json"
        if read_record(path) != result:
            write_record(path, result)


def _take_results_copy(study: Study, runs: Sequence[tuple[Cell, int]], log: Log) -> None:
    """Put the finished runs that `study.results_copy` holds and OUT lacks into OUT. A taken run
    counts as done only while its settings hold: the same data and prior, by content."""
    import shutil

    taken = 0
    for cell, seed in runs:
        src = run_dir(study.results_copy, cell, seed) / "result.json"
        dst = run_dir(study.out, cell, seed) / "result.json"
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            taken += 1
    if taken:
        log(f"took {taken} finished run(s) from {study.results_copy}")


def _copy_report(out: Path, copy: Path) -> None:
    """The aggregate (results.md, results.json, plots/) beside the runs' copies."""
    import shutil

    copy.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.json", "plan.json"):
        if (out / name).is_file():
            shutil.copyfile(out / name, copy / name)
    if (out / "plots").is_dir():
        shutil.copytree(out / "plots", copy / "plots", dirs_exist_ok=True)


def _build_frame_cache(cfg: DiT4DiTConfig, dataset: str, progress: bool) -> None:
    from ..data.training_data import build_training_data

    build_training_data(cfg, dataset, progress=progress, frame_cache=True)


_STOP: Any = None  # in a worker process: the event the main process sets when interrupted


def _init_worker(stop: Any) -> None:
    global _STOP
    _STOP = stop


def _parallel_run(study: Study, cell: Cell, seed: int, threads: int, prefix: str) -> dict[str, Any]:
    """One run in a worker process (the built-in evaluation, no progress bars)."""
    import torch

    if _STOP is not None and _STOP.is_set():
        raise AnalysisError(f"{cell.key} seed {seed}: not started, the study was interrupted")

    torch.set_num_threads(threads)
    evaluator, _ = make_evaluator(study.base_config(), study.dataset, study, threads)
    return run_one(study, cell, seed, evaluator, progress=False, prefix=prefix)


def _run_parallel(study: Study, runs: list[tuple[Cell, int]], jobs: int, threads: int | None, log: Log,
                  twins: dict[str, dict[str, Any]], evaluator: Evaluator) -> None:
    """Every run whose configs no earlier run shares, `jobs` at a time in spawned processes (in
    the grid's order); fills `twins`, and stores the result of each same-config run as soon as
    its first run is done. A failed run is logged and retried by the caller's sequential pass,
    which then raises its error."""
    import multiprocessing
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    first: dict[str, int] = {}
    same: dict[str, list[int]] = {}  # key -> the later runs with the same configs
    for k, (cell, seed) in enumerate(runs):
        key = run_settings(study, cell, seed)[2]
        if key in first:
            same.setdefault(key, []).append(k)
        first.setdefault(key, k)
    todo = sorted(first.values())
    log(f"{len(todo)} distinct runs of {len(runs)}, {jobs} at a time")

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted) if threading.current_thread() is threading.main_thread() \
        else None
    ctx = get_context("spawn")
    stop = ctx.Event()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(stop,))
    try:
        futures = {pool.submit(_parallel_run, study, runs[k][0], runs[k][1], threads or 1,
                               f"[{k + 1}/{len(runs)}] "): k for k in todo}
        for future in as_completed(futures):
            cell, seed = runs[futures[future]]
            key = run_settings(study, cell, seed)[2]
            try:
                twins.setdefault(key, future.result())
            except Exception as e:  # noqa: BLE001 - the sequential pass reruns it and raises
                log(f"{cell.key} seed {seed} failed in a worker: {type(e).__name__}: {e}")
                continue
            for k in same.get(key, []):  # nothing to train: the run takes the result just stored
                wants = run_settings(study, *runs[k])[1]["features"]
                if wants in (None, twins[key]["settings"]["features"]):  # else the sequential pass trains it
                    run_one(study, *runs[k], evaluator, progress=False, log=log,
                            prefix=f"[{k + 1}/{len(runs)}] ", twins=twins)
    except KeyboardInterrupt:
        # Stop the workers the way a single run stops (their trainers save a checkpoint on
        # SIGTERM), wait for them, and leave: rerunning the command resumes.
        log("interrupted: stopping the worker processes (each saves its checkpoint)")
        stop.set()  # queued runs are not started
        pool.shutdown(wait=False, cancel_futures=True)
        for p in multiprocessing.active_children():
            p.terminate()
        for p in multiprocessing.active_children():
            p.join()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
