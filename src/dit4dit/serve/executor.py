"""Turning action chunks into one action per control step, for any robot or simulator loop.

:class:`ActionChunkExecutor` wraps a policy (a :class:`~dit4dit.serve.client.WebsocketClientPolicy`,
a local :class:`~dit4dit.policy.Policy`, anything with ``infer(obs) -> {"actions": (H, A)}``)::

    executor = ActionChunkExecutor(policy, execute_steps=4)          # replan every 4 steps
    executor = ActionChunkExecutor(policy, execute_steps=1, ensemble_decay=0.01)  # ACT-style
    executor.reset()
    while running:
        action = executor.act(obs)        # (A,) float32, robot units
        obs = robot.step(action)

Without ensembling, the executor queries the policy, runs the first ``execute_steps`` actions of
the chunk open-loop, then queries again. With ``ensemble_decay = k`` it queries every
``execute_steps`` steps and, at each step, averages every live chunk's prediction for that step
with weights ``exp(-k * i)``, ``i = 0`` for the oldest chunk (the ACT convention: ``k > 0``
favours older, smoother predictions, ``k < 0`` newer ones, ``k = 0`` is a plain mean).

:class:`FrameHistory` keeps the camera frames a model with ``num_cond_frames > 1`` needs (oldest
first, ``frame_stride`` control steps apart, the first frame repeated until enough exist).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def _chunk_of(result: Any) -> np.ndarray:
    actions = result["actions"] if isinstance(result, Mapping) else result
    arr = np.asarray(actions, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"expected an action chunk of shape (H, A), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("the policy returned non-finite actions")
    return arr


class ActionChunkExecutor:
    """Execute ``execute_steps`` actions of each chunk (None = the whole chunk), optionally with
    temporal ensembling across overlapping chunks.

    ``policy``: an object with ``infer(obs)`` or a callable ``obs -> result``; the result is a dict
    with ``actions`` (H, A) or the array itself. ``binary_dims``: ``{action index: (low, high)}``
    re-snapped to the nearer value after ensembling (e.g. a gripper in {-1, +1}); ``action_low`` /
    ``action_high``: optional clipping of every executed action (a last safety net).
    """

    def __init__(self, policy: Any, execute_steps: int | None = None, *, ensemble_decay: float | None = None,
                 binary_dims: Mapping[int, tuple[float, float]] | None = None,
                 action_low: Sequence[float] | np.ndarray | None = None,
                 action_high: Sequence[float] | np.ndarray | None = None) -> None:
        if execute_steps is not None and execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1 (or None for the whole chunk), got {execute_steps}")
        if ensemble_decay is not None and not math.isfinite(ensemble_decay):
            raise ValueError("ensemble_decay must be finite")
        self._infer: Callable[[Any], Any] = policy.infer if hasattr(policy, "infer") else policy
        self.execute_steps = execute_steps
        self.ensemble_decay = ensemble_decay
        self.binary_dims = dict(binary_dims or {})
        self.action_low = None if action_low is None else np.asarray(action_low, np.float32)
        self.action_high = None if action_high is None else np.asarray(action_high, np.float32)
        self.reset()

    def reset(self) -> None:
        """Forget queued actions and chunks (call at the start of every episode)."""
        self.t = 0
        self.num_queries = 0
        self.last_result: Any = None
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start step, chunk), oldest first
        self._next_query = 0

    @property
    def ensembling(self) -> bool:
        return self.ensemble_decay is not None

    def needs_query(self) -> bool:
        """Whether the next :meth:`act` call will query the policy (it needs a fresh observation)."""
        return self._next_query <= self.t if self.ensembling else not self._queue

    def _query(self, obs: Any) -> np.ndarray:
        result = self._infer(obs)
        self.last_result = result
        self.num_queries += 1
        return _chunk_of(result)

    def act(self, obs: Any) -> np.ndarray:
        """The action for the current step (queries the policy when needed), then advance."""
        if self.ensembling:
            action = self._act_ensembled(obs)
        else:
            if not self._queue:
                chunk = self._query(obs)
                n = len(chunk) if self.execute_steps is None else min(self.execute_steps, len(chunk))
                self._queue.extend(chunk[:n])
            action = self._queue.popleft()
        self.t += 1
        return self._finish(action)

    __call__ = act

    def _act_ensembled(self, obs: Any) -> np.ndarray:
        if self._next_query <= self.t:
            chunk = self._query(obs)
            self._chunks.append((self.t, chunk))
            step = self.execute_steps or len(chunk)
            self._next_query = self.t + step
        live = [(s, c) for s, c in self._chunks if self.t - s < len(c)]
        self._chunks = live
        if not live:  # the chunks ran out before the next query (execute_steps > H)
            chunk = self._query(obs)
            self._chunks = live = [(self.t, chunk)]
            self._next_query = self.t + (self.execute_steps or len(chunk))
        preds = np.stack([c[self.t - s] for s, c in live])
        k = float(self.ensemble_decay or 0.0)
        w = np.exp(-k * np.arange(len(preds), dtype=np.float64))
        w /= w.sum()
        return (w[:, None] * preds).sum(0).astype(np.float32)

    def _finish(self, action: np.ndarray) -> np.ndarray:
        a = np.array(action, dtype=np.float32)
        for i, (lo, hi) in self.binary_dims.items():
            a[i] = hi if a[i] > (lo + hi) / 2 else lo
        if self.action_low is not None or self.action_high is not None:
            a = np.clip(a, self.action_low if self.action_low is not None else -np.inf,
                        self.action_high if self.action_high is not None else np.inf).astype(np.float32)
        return a


class FrameHistory:
    """The last frames of one camera, as the model conditions on them.

    ``frames()`` returns ``(num_frames, H, W, 3)`` (oldest first), frames ``stride`` pushes
    apart, ending with the newest; before enough frames exist the oldest is repeated. With
    ``num_frames == 1`` it returns the newest frame as ``(H, W, 3)``.
    """

    def __init__(self, num_frames: int = 1, stride: int = 1) -> None:
        if num_frames < 1 or stride < 1:
            raise ValueError("num_frames and stride must be >= 1")
        self.num_frames = int(num_frames)
        self.stride = int(stride)
        self._buf: collections.deque[np.ndarray] = collections.deque(maxlen=(self.num_frames - 1) * self.stride + 1)

    def reset(self) -> None:
        self._buf.clear()

    def push(self, frame: np.ndarray) -> None:
        self._buf.append(np.asarray(frame))

    def frames(self) -> np.ndarray:
        if not self._buf:
            raise ValueError("no frame pushed yet")
        if self.num_frames == 1:
            return self._buf[-1]
        n = len(self._buf)
        idx = [max(0, n - 1 - (self.num_frames - 1 - j) * self.stride) for j in range(self.num_frames)]
        return np.stack([self._buf[i] for i in idx])
