"""The client side of a policy server: one episode of a robot or simulator driven by action chunks.

Every client (the LIBERO and RoboCasa-GR1 evaluation clients, the Unitree G1 control loop) runs
the same loop::

    episode.reset()                      # reset the environment, let it settle
    while steps < max_steps:
        raw = episode.observe()          # read the robot; camera frames join the frame history
        obs = episode.request(raw)       # only when the executor needs a new chunk
        action = executor.act(obs)       # ActionChunkExecutor: query the server, one action per step
        success, ended = episode.act(action)

:func:`run_episode` is that loop; a client supplies its environment-specific half as a
:class:`ClientEpisode` (what to read, how to build the server's observation dict, how to execute
an action and what counts as success). :func:`chunk_executor` builds the executor the clients
share, and :func:`resize_image` the resizing every client applies to camera images before they
are sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .executor import ActionChunkExecutor

__all__ = ["ClientEpisode", "Rollout", "chunk_executor", "resize_image", "run_episode"]


def resize_image(img: np.ndarray, size: Sequence[int], pad: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3) (bilinear); ``pad`` keeps the aspect ratio and pads with black."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    if not pad:
        return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    ih, iw = img.shape[:2]
    r = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * r)), max(1, round(iw * r))
    small = np.array(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def chunk_executor(policy: Any, execute_steps: int | None, horizon: int | None = None, *,
                   ensemble_decay: float | None = None) -> ActionChunkExecutor:
    """An :class:`ActionChunkExecutor` running ``execute_steps`` actions of each chunk (None: the
    whole chunk), never more than the server's action ``horizon`` when it is known."""
    execute = execute_steps if execute_steps is None or horizon is None else min(int(execute_steps), int(horizon))
    return ActionChunkExecutor(policy, execute, ensemble_decay=ensemble_decay)


class ClientEpisode:
    """The environment-specific half of one episode (subclass it; :func:`run_episode` is the rest)."""

    def reset(self) -> None:
        """Start the episode: reset the environment (and let it settle) and the frame history."""
        raise NotImplementedError

    def observe(self) -> Any:
        """The current raw observation; its camera frames join the frame history."""
        raise NotImplementedError

    def request(self, raw: Any) -> dict[str, Any]:
        """The observation dict the policy server gets for ``raw`` (cameras, state, prompt)."""
        raise NotImplementedError

    def act(self, action: np.ndarray) -> tuple[bool, bool]:
        """Execute one action (robot units); returns ``(success, ended)``: either ends the episode."""
        raise NotImplementedError

    def video_frame(self, raw: Any) -> np.ndarray | None:
        """The video frame recorded for ``raw`` (None: nothing to record)."""
        return None

    def final_frame(self) -> np.ndarray | None:
        """A last video frame after the final action (None: none)."""
        return None


@dataclass
class Rollout:
    """What one episode did: success, policy steps, server queries, wall time, recorded frames and
    the latency of each query (milliseconds, as the client saw it)."""

    success: bool
    steps: int
    queries: int
    seconds: float
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    query_ms: list[float] = field(default_factory=list, repr=False)


def run_episode(episode: ClientEpisode, executor: ActionChunkExecutor, max_steps: int, *,
                record: bool = False) -> Rollout:
    """Run ``episode`` for at most ``max_steps`` actions, asking the server (through ``executor``)
    whenever the current chunk is used up; stops at the first success or end. ``record`` keeps
    the episode's video frames."""
    t_start = time.perf_counter()
    executor.reset()
    episode.reset()
    frames: list[np.ndarray] = []
    query_ms: list[float] = []
    success = False
    steps = 0
    while steps < max_steps:
        raw = episode.observe()
        if record and (frame := episode.video_frame(raw)) is not None:
            frames.append(frame)
        obs = episode.request(raw) if executor.needs_query() else None
        t0 = time.perf_counter()
        action = executor.act(obs)
        if obs is not None:
            query_ms.append((time.perf_counter() - t0) * 1e3)
        success, ended = episode.act(action)
        steps += 1
        if success or ended:
            break
    if record and (frame := episode.final_frame()) is not None:
        frames.append(frame)
    return Rollout(bool(success), steps, executor.num_queries, time.perf_counter() - t_start, frames, query_ms)
