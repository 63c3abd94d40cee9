"""Closed-loop evaluation on MetaWorld, on held-out layouts of each task.

Protocol. Episode ``e`` of a task runs on held-out layout ``eval_layout(seed + e)`` (40..49, then
90..99, ...: never a demonstration layout, see :mod:`dit4dit.envs.metaworld`), or on
``layouts[(seed + e) % len(layouts)]`` when a list of layouts is given. The policy gets the observation dict
(camera image at the checkpoint's camera size and from the camera view its training data was
captured with, hand state, instruction) and returns an action
chunk (H, 4); the first ``replan_every`` actions are executed (default: the checkpoint's
``replan_every`` when its protocol states one, else the whole chunk), then the policy is asked
again. An episode ends at the first ``info["success"]`` (success) or after ``max_steps`` steps
(failure). The policy's sampler is reseeded per episode (``Policy.seed``), so an episode that
revisits a layout of a given list is a fresh draw of the stochastic policy.

Parallelism. With a checkpoint path, episodes run in ``workers`` spawned processes; each loads
the policy itself (:meth:`dit4dit.policy.Policy.from_checkpoint`). An in-memory policy object runs in
this process.

Outputs: a result dict (per-task successes, rate, Wilson 95% CI, mean steps to success, timing)
and, with ``out``, ``results.json``, ``results.md`` (a Markdown table) and rollout videos
(GIF or MP4) under ``out/videos``.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..envs.metaworld import (
    DEFAULT_CAMERA,
    IMAGE_KEY,
    INSTRUCTIONS,
    MAX_PATH_LENGTH,
    MetaWorldError,
    cached_env,
    eval_layout,
    check_camera,
    parse_tasks,
    JobRunner,
)
from ..jsonio import write_json
from ..stats import wilson_interval

DEFAULT_IMAGE_SIZE = 64


# --------------------------------------------------------------------------------------------
# protocol of a policy
# --------------------------------------------------------------------------------------------



class _FrameHistory:
    """The camera frames an episode has shown, for a model with several conditioning frames:
    frames t - (nc-1-k) * stride, the first frame standing in before the start (the training
    samples' convention, dit4dit.data.samples)."""

    def __init__(self, obs: dict, num_cond_frames: int, stride: int) -> None:
        self.nc, self.stride = int(num_cond_frames), int(stride)
        self.span = (self.nc - 1) * self.stride + 1
        self.frames = deque([obs[IMAGE_KEY]] * self.span, maxlen=self.span)

    def append(self, frame: np.ndarray) -> None:
        self.frames.append(frame)

    def query(self, obs: dict) -> dict:
        """The observation to send: ``obs`` with its image replaced by the conditioning frames."""
        query = dict(obs)
        if self.nc > 1:
            query[IMAGE_KEY] = np.stack([self.frames[self.span - 1 - (self.nc - 1 - k) * self.stride]
                                         for k in range(self.nc)])
        return query

def policy_protocol(policy: Any) -> dict[str, Any]:
    """The policy's evaluation protocol (``policy.metadata()``), or {} for a bare object."""
    meta = getattr(policy, "metadata", None)
    if callable(meta):
        try:
            return dict(meta())
        except Exception:  # noqa: BLE001 - a bare policy without a processor
            return {}
    return {}


def _image_size(meta: dict[str, Any], override: int | Sequence[int] | None) -> tuple[int, int]:
    if override is not None:
        return (int(override), int(override)) if np.isscalar(override) else tuple(int(v) for v in override)
    sizes = meta.get("camera_sizes") or {}
    for key, hw in sizes.items():
        if key == IMAGE_KEY or str(key).rsplit(".", 1)[-1] == "image":
            return int(hw[0]), int(hw[1])
    if sizes:
        hw = next(iter(sizes.values()))
        return int(hw[0]), int(hw[1])
    if meta.get("image_size"):
        return int(meta["image_size"][0]), int(meta["image_size"][1])
    return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE


def _camera(meta: dict[str, Any], override: str | None) -> str:
    """The camera view to render: ``override``, else the view the checkpoint's training frames were
    captured from (its protocol's ``capture``), else MetaWorld's ``corner4``."""
    trained = ((meta.get("capture") or {}).get("cameras") or {}).get(IMAGE_KEY)
    camera = check_camera(override or trained or DEFAULT_CAMERA)
    if trained and camera != trained:
        warnings.warn(f"evaluating with camera {camera!r}, but the checkpoint was trained on {trained!r} frames",
                      stacklevel=3)
    return camera


def _replan(meta: dict[str, Any], replan_every: int | None) -> int | None:
    if replan_every is not None:
        if replan_every < 1:
            raise MetaWorldError(f"replan_every={replan_every} must be >= 1")
        return int(replan_every)
    for k in ("replan_every", "execute_steps", "action_steps_executed"):
        if meta.get(k):
            return int(meta[k])
    return None  # the whole chunk


# --------------------------------------------------------------------------------------------
# one episode
# --------------------------------------------------------------------------------------------


def _start_episode(policy: Any, spec: dict[str, Any]) -> tuple[Any, Any, int, int]:
    """The episode's (cached) environment, bound to an oracle policy if any, and the policy seeded
    for the episode; returns (env, the policy's previous seed, conditioning frames, frame stride)."""
    env = cached_env(spec["task"], spec["camera"], spec["image_size"], spec["max_steps"])
    bind = getattr(policy, "bind_env", None)
    if callable(bind):  # oracle policies only (OracleExpertPolicy)
        bind(env)
    old_seed = getattr(policy, "seed", None)
    if old_seed is not None:
        policy.seed = int(spec["policy_seed"])
    return env, old_seed, int(spec["num_cond_frames"]), int(spec.get("frame_stride", 1))


def _reset_env(
    env: Any, spec: dict[str, Any], nc: int, stride: int
) -> tuple[dict[str, Any], _FrameHistory, list | None]:
    """Reset ``env`` to the spec's layout: the first observation, its frame history and the list of
    recorded frames (None unless ``spec["record"]``)."""
    obs = env.reset(spec["layout"])
    return obs, _FrameHistory(obs, nc, stride), ([obs[IMAGE_KEY]] if spec["record"] else None)


def _step_env(
    env: Any, action: np.ndarray, history: _FrameHistory, frames: list | None, observe: bool = True
) -> tuple[dict[str, Any] | None, bool, bool]:
    """Execute one action; the new frame joins the history (and the recording): (obs, success, done).
    With ``observe=False`` (a step whose frame nobody looks at) nothing is rendered and obs is None."""
    obs, success, done = env.step(action, observe=observe)
    if obs is not None:
        history.append(obs[IMAGE_KEY])
        if frames is not None:
            frames.append(obs[IMAGE_KEY])
    return obs, success, done


def _env_ms_per_step(env: Any, t_env0: dict[str, float]) -> float:
    """Milliseconds of simulation and rendering per step since the timing snapshot ``t_env0``."""
    spent = env.timing["step_s"] - t_env0["step_s"] + env.timing["render_s"] - t_env0["render_s"]
    return 1e3 * spent / max(1, env.steps)


def run_episode(policy: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """One closed-loop episode (see the module docstring); ``spec`` from :func:`_specs`."""
    if spec.get("execution"):
        return run_latency_episode(policy, spec)
    env, old_seed, nc, stride = _start_episode(policy, spec)
    replan = spec["replan_every"]
    t_env0 = dict(env.timing)
    start = time.perf_counter()
    infer_s, calls = 0.0, 0
    try:
        obs, history, frames = _reset_env(env, spec, nc, stride)
        # Every frame is wanted when recording or conditioning on past frames; otherwise only the
        # frame the next query shows (the same episode: rendering never changes the simulation).
        every_frame = frames is not None or nc > 1
        success = done = False
        while not (success or done):
            query = history.query(obs)
            t0 = time.perf_counter()
            chunk = np.asarray(policy.infer(query)["actions"], dtype=np.float32)
            infer_s += time.perf_counter() - t0
            calls += 1
            if chunk.ndim == 1:
                chunk = chunk[None]
            if chunk.ndim != 2 or chunk.shape[-1] < 4 or len(chunk) == 0:
                raise MetaWorldError(f"the policy returned actions of shape {chunk.shape}; expected (H, 4)")
            n = len(chunk) if replan is None else min(replan, len(chunk))
            for i, a in enumerate(chunk[:n, :4]):
                obs, success, done = _step_env(env, a, history, frames, observe=every_frame or i == n - 1)
                if success or done:
                    break
    finally:
        if old_seed is not None:
            policy.seed = old_seed
    return {
        "task": spec["task"], "episode": spec["episode"], "layout": spec["layout"], "success": bool(success),
        "steps": env.steps, "policy_calls": calls, "infer_ms": 1e3 * infer_s / max(1, calls),
        "wall_s": time.perf_counter() - start,
        "env_ms_per_step": _env_ms_per_step(env, t_env0),
        "frames": np.stack(frames) if frames is not None else None,
    }


def run_latency_episode(policy: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """One closed-loop episode under a simulated inference delay (``spec["delay"]`` control steps)
    with an :class:`~dit4dit.serve.executor.AsyncChunkExecutor` in mode ``spec["execution"]``.

    The simulated robot never waits for the policy except in ``sync`` mode (or before the first
    chunk arrives): a step with nothing to execute holds the arm still (zero motion, the last
    gripper command) and counts against the step limit, as the time would on a robot. Smoothness:
    the mean absolute change of the executed end-effector motion (the first three action
    dimensions) from one step to the next, over the episode and at the steps where execution
    moves to another chunk (holds included: a stop and a restart are motion changes)."""
    from ..serve.executor import AsyncChunkExecutor

    env, old_seed, nc, stride = _start_episode(policy, spec)
    execute = spec["replan_every"] or int(spec.get("action_horizon") or 1)
    infer_s = 0.0

    def timed(obs: dict[str, Any]) -> Any:
        nonlocal infer_s
        t0 = time.perf_counter()
        try:
            return policy.infer(obs)
        finally:
            infer_s += time.perf_counter() - t0

    executor = AsyncChunkExecutor(timed, execute, mode=spec["execution"], delay_steps=int(spec["delay"]),
                                  ensemble_decay=float(spec.get("ensemble_decay", 0.0)))
    t_env0 = dict(env.timing)
    start = time.perf_counter()
    executed: list[np.ndarray] = []
    boundaries: list[int] = []
    holds = 0
    try:
        obs, history, frames = _reset_env(env, spec, nc, stride)
        success = done = False
        while not (success or done):
            query = history.query(obs)
            action = executor.act(query)
            if action is None:
                holds += 1
                a = np.zeros(4, np.float32)
                a[3] = executed[-1][3] if executed else 0.0
            else:
                if action.shape[-1] < 4:
                    raise MetaWorldError(f"the policy returned actions of shape {action.shape}; expected (4,)")
                a = np.asarray(action[:4], np.float32)
                if executor.last_step["switched"]:
                    boundaries.append(len(executed))
            executed.append(a)
            obs, success, done = _step_env(env, a, history, frames)
    finally:
        if old_seed is not None:
            policy.seed = old_seed
    acts = np.stack(executed)[:, :3].astype(np.float64)
    change = np.abs(np.diff(acts, axis=0)).mean(axis=1) if len(acts) > 1 else np.zeros(0)
    at_bounds = [float(change[i - 1]) for i in boundaries if i >= 1]
    return {
        "task": spec["task"], "episode": spec["episode"], "layout": spec["layout"], "success": bool(success),
        "steps": env.steps, "policy_calls": executor.num_queries, "hold_steps": holds,
        "infer_ms": 1e3 * infer_s / max(1, executor.num_queries), "wall_s": time.perf_counter() - start,
        "env_ms_per_step": _env_ms_per_step(env, t_env0),
        "action_change_sum": float(change.sum()), "action_change_count": int(len(change)),
        "boundary_change_sum": float(sum(at_bounds)), "boundary_count": len(at_bounds),
        "frames": np.stack(frames) if frames is not None else None,
    }


def smoothness(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pooled smoothness of latency episodes: mean absolute step-to-step change of the executed
    motion over all steps and at chunk boundaries (:func:`run_latency_episode`)."""
    n = sum(r["action_change_count"] for r in results)
    nb = sum(r["boundary_count"] for r in results)
    return {"mean_abs_action_change": sum(r["action_change_sum"] for r in results) / n if n else None,
            "mean_abs_boundary_change": sum(r["boundary_change_sum"] for r in results) / nb if nb else None,
            "boundaries": nb, "hold_steps": sum(r["hold_steps"] for r in results),
            "steps": sum(r["steps"] for r in results)}


# --------------------------------------------------------------------------------------------
# worker processes (checkpoint path)
# --------------------------------------------------------------------------------------------

_WORKER_POLICY: Any = None


def _init_worker(checkpoint: str, device: str, backbone: str | None, threads: int) -> None:
    global _WORKER_POLICY
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    _WORKER_POLICY = load_checkpoint_policy(checkpoint, device, backbone)


def _worker_episode(spec: dict[str, Any]) -> dict[str, Any]:
    return run_episode(_WORKER_POLICY, spec)


def load_checkpoint_policy(checkpoint: str | os.PathLike, device: str = "cpu", backbone: str | None = None):
    """The policy a run / checkpoint folder holds (:meth:`Policy.from_checkpoint`)."""
    from ..policy import Policy

    return Policy.from_checkpoint(checkpoint, device=device, backbone=backbone)


def load_checkpoint_scene(checkpoint: str | os.PathLike, device: str = "cpu"):
    """``(policy, camera, image_size)``: the checkpoint's policy with the camera view and image size
    its training frames had, i.e. what a `MetaWorldEnv` must render for it (used by the probes)."""
    policy = load_checkpoint_policy(checkpoint, device)
    meta = policy_protocol(policy)  # the processor's: capture (the camera view) and camera sizes
    return policy, _camera(meta, None), meta["camera_sizes"][IMAGE_KEY]


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def episode_layouts(episodes: int, seed: int = 0, layouts: Sequence[int] | None = None) -> list[int]:
    """The layout of each evaluation episode (module docstring)."""
    if layouts is None:
        return [eval_layout(seed + e) for e in range(episodes)]
    return [int(layouts[(seed + e) % len(layouts)]) for e in range(episodes)]


def _specs(tasks: list[str], *, seed: int, layouts: Sequence[int], camera: str,
           image_size: tuple[int, int], max_steps: int, replan_every: int | None, num_cond_frames: int,
           frame_stride: int, record_videos: int, execution: str | None = None, delay: int = 0,
           ensemble_decay: float = 0.0, action_horizon: int | None = None) -> list[dict[str, Any]]:
    specs = []
    for ti, t in enumerate(tasks):
        for e, layout in enumerate(layouts):
            specs.append({"task": t, "episode": e, "layout": int(layout),
                          "policy_seed": int(seed) * 1_000_003 + ti * 10_007 + e, "camera": camera,
                          "image_size": image_size, "max_steps": int(max_steps), "replan_every": replan_every,
                          "num_cond_frames": int(num_cond_frames), "frame_stride": int(frame_stride),
                          "record": e < record_videos})
            if execution:
                specs[-1].update(execution=execution, delay=int(delay), ensemble_decay=float(ensemble_decay),
                                 action_horizon=action_horizon)
    return specs


def evaluate(policy_or_checkpoint: Any, tasks: str | Sequence[str], episodes: int = 10, *,
             replan_every: int | None = None, max_steps: int = MAX_PATH_LENGTH, seed: int = 0, workers: int = 1,
             record_videos: int = 0, out: str | Path | None = None, camera: str | None = None,
             image_size: int | Sequence[int] | None = None, device: str = "cpu", backbone: str | None = None,
             layouts: Sequence[int] | None = None, video_format: str = "gif", threads: int | None = None,
             progress: Callable[[int, int], None] | None = None, execution: str | None = None,
             delay: int = 0, ensemble_decay: float = 0.0) -> dict[str, Any]:
    """Success rate per task (Wilson 95% CI) of a policy on held-out MetaWorld layouts.

    ``policy_or_checkpoint``: an object with ``infer(obs) -> {"actions": (H, 4)}`` (run in this
    process) or a run / checkpoint folder (loaded in each of ``workers`` processes).
    ``layouts``: the layouts to cycle through (default: a held-out layout of its own per episode).
    ``record_videos``: the first N episodes of each task are saved as videos under ``out``.
    ``threads``: torch threads per worker process (default: cores / workers); with one process
    it is applied only when given.
    ``execution`` (sync | async | ensemble | rtc) with ``delay`` (control steps): execution under a
    simulated inference delay (:func:`run_latency_episode`); the result gains ``latency`` with the
    smoothness measures. None (default): the plain loop (query, run ``replan_every`` actions).
    """
    task_list = parse_tasks(tasks)
    if execution is not None:
        from ..serve.executor import EXECUTION_MODES

        if execution not in EXECUTION_MODES:
            raise MetaWorldError(f"execution={execution!r} must be one of {', '.join(EXECUTION_MODES)}")
        if delay < 0:
            raise MetaWorldError(f"delay={delay} must be >= 0 control steps")
    elif delay:
        raise MetaWorldError("delay needs an execution mode (sync | async | ensemble | rtc)")
    if episodes < 1:
        raise MetaWorldError("episodes must be >= 1")
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise MetaWorldError(f"max_steps={max_steps} must be in [1, {MAX_PATH_LENGTH}]")
    if video_format not in ("gif", "mp4"):
        raise MetaWorldError(f"video_format={video_format!r} must be gif | mp4")
    if layouts is not None and (not len(layouts) or min(int(v) for v in layouts) < 0):
        raise MetaWorldError(f"layouts {list(layouts)} must be a non-empty list of layout numbers >= 0")
    layouts = episode_layouts(episodes, seed, layouts)
    from_path = isinstance(policy_or_checkpoint, (str, os.PathLike))
    if from_path:
        checkpoint = str(policy_or_checkpoint)
        if not Path(checkpoint).exists():
            raise MetaWorldError(f"checkpoint {checkpoint} not found")
        if threads and workers <= 1:
            import torch

            torch.set_num_threads(int(threads))
        # the protocol comes from one policy loaded here (cheap for small models; a worker reloads it)
        local_policy = load_checkpoint_policy(checkpoint, device, backbone) if workers <= 1 else None
        meta = policy_protocol(local_policy) if local_policy is not None else _checkpoint_protocol(checkpoint)
    else:
        checkpoint, local_policy = None, policy_or_checkpoint
        meta = policy_protocol(local_policy)
        workers = 1  # an in-memory policy cannot be shipped to other processes
    size = _image_size(meta, image_size)
    camera = _camera(meta, camera)
    replan = _replan(meta, replan_every)
    nc = int(meta.get("num_cond_frames") or 1)
    stride = int(meta.get("frame_stride") or 1)
    specs = _specs(task_list, seed=seed, layouts=layouts, camera=camera, image_size=size,
                   max_steps=max_steps, replan_every=replan, num_cond_frames=nc, frame_stride=stride,
                   record_videos=record_videos if out is not None else 0, execution=execution, delay=delay,
                   ensemble_decay=ensemble_decay, action_horizon=meta.get("action_horizon"))

    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    if local_policy is not None:
        runner = JobRunner(1)
        jobs = runner.map(functools.partial(run_episode, local_policy), specs)
    else:
        per_worker = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        runner = JobRunner(workers, initializer=_init_worker, initargs=(checkpoint, device, backbone, per_worker))
        jobs = runner.map(_worker_episode, specs)
    with runner:
        for r in jobs:
            results.append(r)
            if progress:
                progress(len(results), len(specs))
    seconds = time.perf_counter() - start

    videos: list[str] = []
    if out is not None:
        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r["frames"] is not None:
                name = f"{r['task']}_ep{r['episode']:03d}_layout{r['layout']}_{'success' if r['success'] else 'fail'}"
                videos.append(str(save_video(r["frames"], out / "videos" / f"{name}.{video_format}")))
    for r in results:
        r.pop("frames", None)

    per_task: dict[str, dict[str, Any]] = {}
    for t in task_list:
        rs = [r for r in results if r["task"] == t]
        s = sum(r["success"] for r in rs)
        steps = [r["steps"] for r in rs if r["success"]]
        lo, hi = wilson_interval(s, len(rs))
        per_task[t] = {"instruction": INSTRUCTIONS[t], "successes": s, "episodes": len(rs),
                       "success_rate": s / len(rs), "ci95": [lo, hi],
                       "mean_steps_to_success": float(np.mean(steps)) if steps else None,
                       "layouts": sorted({r["layout"] for r in rs})}
    n_s = sum(p["successes"] for p in per_task.values())
    n = len(results)
    result = {
        "benchmark": "metaworld",
        "checkpoint": checkpoint,
        "per_task": per_task,
        "success_rate": n_s / n,
        "ci95": list(wilson_interval(n_s, n)),
        "mean_task_success_rate": float(np.mean([p["success_rate"] for p in per_task.values()])),
        "episodes": n,
        "episodes_per_task": episodes,
        "protocol": {"replan_every": replan, "action_horizon": meta.get("action_horizon"),
                     "max_steps": max_steps, "camera": camera, "image_size": list(size),
                     "num_cond_frames": nc, "frame_stride": stride, "layouts": [int(v) for v in layouts], "seed": seed},
        "timing": {"seconds": seconds, "workers": workers,
                   "mean_infer_ms": float(np.mean([r["infer_ms"] for r in results])),
                   "mean_env_ms_per_step": float(np.mean([r["env_ms_per_step"] for r in results]))},
        "videos": videos,
        "episodes_detail": results,
    }
    if execution is not None:
        result["latency"] = {"execution": execution, "delay": int(delay), "ensemble_decay": float(ensemble_decay),
                             **smoothness(results)}
    if out is not None:
        write_json(out / "results.json", result)
        (out / "results.md").write_text(markdown_table(result))
    return result


def _checkpoint_protocol(checkpoint: str) -> dict[str, Any]:
    """The protocol stored in a checkpoint's processor.json (without building the model)."""
    try:
        from ..policy import checkpoint_protocol

        return checkpoint_protocol(checkpoint)
    except Exception:  # noqa: BLE001 - fall back to the defaults; the workers will fail loudly if broken
        return {}


def _ranges(values: Sequence[int]) -> str:
    """[40, 41, 42, 90, 91] -> "40..42, 90..91"."""
    vs = sorted(set(int(v) for v in values))
    runs: list[list[int]] = []
    for v in vs:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def markdown_table(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"# MetaWorld evaluation{' of ' + result['checkpoint'] if result.get('checkpoint') else ''}",
        "",
        f"Layouts {_ranges(p['layouts'])}, {result['episodes_per_task']} episodes per task, "
        f"max {p['max_steps']} steps, replan every {p['replan_every'] or 'chunk'} "
        f"(horizon {p['action_horizon']}), camera {p['camera']} {p['image_size'][0]}x{p['image_size'][1]}.",
        "",
        "| task | instruction | successes | success rate | 95% CI | mean steps to success |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for t, r in result["per_task"].items():
        steps = f"{r['mean_steps_to_success']:.0f}" if r["mean_steps_to_success"] is not None else "-"
        lines.append(f"| {t} | {r['instruction']} | {r['successes']}/{r['episodes']} | {r['success_rate']:.0%} | "
                     f"[{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}] | {steps} |")
    lo, hi = result["ci95"]
    lines.append(f"| **all** | | {sum(r['successes'] for r in result['per_task'].values())}/{result['episodes']} | "
                 f"**{result['success_rate']:.0%}** | [{lo:.0%}, {hi:.0%}] | |")
    tm = result["timing"]
    lines += ["", f"{tm['seconds']:.1f} s with {tm['workers']} worker(s); policy call {tm['mean_infer_ms']:.1f} ms, "
              f"env step + render {tm['mean_env_ms_per_step']:.1f} ms."]
    if result.get("videos"):
        lines += ["", "Videos: " + ", ".join(f"[{Path(v).name}](videos/{Path(v).name})" for v in result["videos"])]
    return "\n".join(lines) + "\n"


def save_video(frames: np.ndarray, path: str | Path, fps: float = 20, scale: int = 2) -> Path:
    """(T, H, W, 3) uint8 -> GIF (Pillow) or MP4 (PyAV, H.264), by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if path.suffix == ".gif":
        from .report import save_gif

        return save_gif(frames, path, fps=fps, scale=1)
    from ..data.video import VideoEncoder

    enc = VideoEncoder(path, fps, frames.shape[2], frames.shape[1], codec="h264", gop=None)
    enc.write(frames)
    enc.close()
    return path
