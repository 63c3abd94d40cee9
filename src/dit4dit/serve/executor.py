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
import time
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


# --------------------------------------------------------------------------------------------
# asynchronous execution under inference delay
# --------------------------------------------------------------------------------------------

EXECUTION_MODES = ("sync", "async", "ensemble", "rtc")


class _Inline:
    """A request answered at once but delivered ``delay`` control steps later (simulated latency)."""

    def __init__(self, result: Any, ready_step: int) -> None:
        self.result, self.ready_step = result, ready_step

    def ready(self, step: int) -> bool:
        return step >= self.ready_step


class _Threaded:
    """A request computed in a background thread; delivered at the first step after it finished."""

    def __init__(self, pool: Any, fn: Callable[[Any], Any], obs: Any, clock: Callable[[], float]) -> None:
        self.sent = clock()
        self.done_at: float | None = None
        self._clock = clock

        def run() -> Any:
            try:
                return fn(obs)
            finally:
                self.done_at = self._clock()

        self.future = pool.submit(run)

    def ready(self, step: int) -> bool:  # noqa: ARG002 - ready when the thread is done
        return self.future.done()

    @property
    def result(self) -> Any:
        return self.future.result()


class AsyncChunkExecutor:
    """Action chunks under inference delay: the next chunk is computed while the current one runs.

    One call of :meth:`act` per control step. Every ``execute_steps`` (``s``) steps the executor
    sends the current observation; the chunk comes back ``d`` control steps later (the inference
    delay), during which the robot keeps executing the current chunk. The chunk's step 0 belongs to
    the step the observation was taken, so on arrival the executor switches to its step ``d``.
    Modes (``mode``):

    - ``sync``: no overlap: the robot waits while the chunk is computed (:meth:`act` returns None:
      hold still for that step), then runs its first ``s`` actions;
    - ``async``: naive switching to the newest chunk at step ``d``;
    - ``ensemble``: every arrived chunk that covers the step is averaged with weights
      ``exp(-ensemble_decay * i)``, ``i = 0`` the oldest (temporal ensembling, with latency);
    - ``rtc``: like ``async``, but each request carries the current chunk's actions still to be
      executed (``action_prefix``, from the step the observation is taken) and ``inference_delay``
      ``d``, so that a policy with real-time chunking (``dit4dit.models.rtc``) continues them.

    Latency: ``delay_steps`` simulates a fixed delay of ``d`` steps (the policy is called inline and
    its chunk is held back ``d`` steps: deterministic, for benchmarks and tests); with
    ``background=True`` the policy runs in a worker thread, the chunk is used at the first step
    after it arrives (at its step = the steps elapsed since the request), and ``delay_steps`` is
    only the delay announced to an RTC policy, updated from the measured latency
    (``ceil(latency / period_s)`` with ``clock``, the largest of the last ``delay_window`` requests)
    when ``period_s`` is given. Before the first chunk arrives, and whenever the chunks run out
    (``s + d > H``), :meth:`act` returns None. ``s + d <= H`` keeps the robot moving.

    ``last_step`` describes the step just taken: ``chunk`` (the query number of the chunk the
    action came from, None when holding), ``index`` (its step in that chunk) and ``switched``
    (whether that differs from the previous step's chunk).
    """

    def __init__(self, policy: Any, execute_steps: int, *, mode: str = "async", delay_steps: int = 0,
                 ensemble_decay: float = 0.0, background: bool = False, period_s: float | None = None,
                 clock: Callable[[], float] | None = None, delay_window: int = 10,
                 binary_dims: Mapping[int, tuple[float, float]] | None = None,
                 action_low: Sequence[float] | np.ndarray | None = None,
                 action_high: Sequence[float] | np.ndarray | None = None) -> None:
        if mode not in EXECUTION_MODES:
            raise ValueError(f"mode={mode!r}; expected one of {EXECUTION_MODES}")
        if execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {execute_steps}")
        if delay_steps < 0:
            raise ValueError(f"delay_steps must be >= 0, got {delay_steps}")
        if not math.isfinite(ensemble_decay):
            raise ValueError("ensemble_decay must be finite")
        if period_s is not None and not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self._infer: Callable[[Any], Any] = policy.infer if hasattr(policy, "infer") else policy
        self.mode = mode
        self.execute_steps = int(execute_steps)
        self.delay_steps = int(delay_steps)
        self.ensemble_decay = float(ensemble_decay)
        self.background = bool(background)
        self.period_s = period_s
        self.clock = clock or time.monotonic
        self.delay_window = int(delay_window)
        self._finisher = ActionChunkExecutor(lambda obs: None, binary_dims=binary_dims, action_low=action_low,
                                             action_high=action_high)
        self._pool = None
        if self.background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit4dit-infer")
        self.reset()

    def reset(self) -> None:
        """Forget chunks and requests (call at the start of every episode); a request still
        running in the background is left to finish and ignored."""
        self.t = 0
        self.num_queries = 0
        self.last_result: Any = None
        self.last_step: dict[str, Any] = {"chunk": None, "index": None, "switched": False}
        self._last_chunk: int | None = None  # the chunk of the last step that executed an action
        self._chunks: list[tuple[int, int, np.ndarray]] = []  # (query number, step of its observation, chunk)
        self._pending: tuple[int, int, Any] | None = None  # (query number, step sent, request)
        self._next_query = 0
        self._sync_left = 0  # sync: actions of the current chunk still to run
        self._delays: collections.deque[int] = collections.deque(maxlen=max(1, self.delay_window))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def announced_delay(self) -> int:
        """The inference delay sent to an RTC policy with the next request."""
        return max(self._delays) if self._delays else self.delay_steps

    def needs_observation(self) -> bool:
        """Whether the next :meth:`act` call sends its observation to the policy."""
        if self._pending is not None:
            return False
        if self.mode == "sync":
            return self._sync_left == 0
        return self.t >= self._next_query

    # ---------------------------------------------------------------------------- internals
    def _current(self) -> tuple[int, int, np.ndarray] | None:
        return self._chunks[-1] if self._chunks else None

    def _request(self, obs: Any) -> None:
        q = self.num_queries
        self.num_queries += 1
        if self.mode == "rtc":
            cur = self._current()
            if cur is not None and self.t - cur[1] < len(cur[2]):
                d = self.announced_delay
                prefix = cur[2][self.t - cur[1]:]
                obs = dict(obs)
                obs["action_prefix"] = prefix
                obs["inference_delay"] = int(min(d, len(prefix)))
        if self.background:
            req: Any = _Threaded(self._pool, self._infer, obs, self.clock)
        else:
            req = _Inline(self._infer(obs), self.t + self.delay_steps)
        self._pending = (q, self.t, req)
        self._next_query = self.t + self.execute_steps

    def _collect(self) -> None:
        if self._pending is None:
            return
        q, sent, req = self._pending
        if not req.ready(self.t):
            return
        self._pending = None
        result = req.result  # raises the policy's error, if any
        self.last_result = result
        chunk = _chunk_of(result)
        if self.background and self.period_s is not None and req.done_at is not None:
            self._delays.append(int(math.ceil(max(0.0, req.done_at - req.sent) / self.period_s - 1e-9)))
        self._chunks.append((q, sent, chunk))
        self._chunks = [c for c in self._chunks if self.t - c[1] < len(c[2])] or [self._chunks[-1]]
        if self.mode == "sync":
            self._sync_left = min(self.execute_steps, len(chunk))
            self._sync_start = self.t

    def act(self, obs: Any) -> np.ndarray | None:
        """The action for this step (None: nothing to execute yet, hold still), then advance."""
        self._collect()
        if self.needs_observation():
            self._request(obs)
            self._collect()  # delay 0: available at once
        action, chunk_id, index = self._select()
        prev = self._last_chunk
        self.last_step = {"chunk": chunk_id, "index": index,
                          "switched": chunk_id is not None and prev is not None and chunk_id != prev}
        if chunk_id is not None:
            self._last_chunk = chunk_id
        self.t += 1
        return None if action is None else self._finisher._finish(action)

    __call__ = act

    def _select(self) -> tuple[np.ndarray | None, int | None, int | None]:
        if self.mode == "sync":
            if self._sync_left == 0 or not self._chunks:
                return None, None, None
            q, _sent, chunk = self._chunks[-1]
            i = self.t - self._sync_start
            self._sync_left -= 1
            return chunk[i], q, i
        live = [c for c in self._chunks if 0 <= self.t - c[1] < len(c[2])]
        if not live:
            return None, None, None
        if self.mode == "ensemble":
            preds = np.stack([c[self.t - s] for _q, s, c in live])
            w = np.exp(-self.ensemble_decay * np.arange(len(preds), dtype=np.float64))
            w /= w.sum()
            q, sent, _c = live[-1]
            return (w[:, None] * preds).sum(0).astype(np.float32), q, self.t - sent
        q, sent, chunk = live[-1]
        return chunk[self.t - sent], q, self.t - sent
