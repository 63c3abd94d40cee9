"""Real-time chunking (guided sampling, the policy's optional inputs) and the asynchronous executor."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from dit4dit import flow
from dit4dit.data.processor import ProcessorError
from dit4dit.models import rtc
from dit4dit.serve.executor import AsyncChunkExecutor

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ soft mask, weight
def test_prefix_weights_follow_the_papers_schedule():
    w = rtc.prefix_weights(8, 5, 2)
    assert w.shape == (8,)
    assert w[:2].tolist() == [1.0, 1.0] and w[5:].tolist() == [0.0, 0.0, 0.0]
    c = [(5 - i) / (5 - 2 + 1) for i in range(2, 5)]
    want = [ci * (math.exp(ci) - 1) / (math.e - 1) for ci in c]
    assert w[2:5].tolist() == pytest.approx(want, rel=1e-6)
    assert all(1 > a > b > 0 for a, b in zip(w[2:5].tolist(), w[3:5].tolist()))
    assert rtc.prefix_weights(8, 8, 8).tolist() == [1.0] * 8
    assert rtc.prefix_weights(4, 0, 0).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="delay=5"):
        rtc.prefix_weights(8, 4, 5)
    with pytest.raises(ValueError, match="prefix_len=9"):
        rtc.prefix_weights(8, 9, 0)


def test_guidance_weight_is_clipped_by_beta():
    assert rtc.guidance_weight(1.0, 5.0) == 5.0  # pure noise: unbounded, clipped
    assert rtc.guidance_weight(0.0, 5.0) == 5.0
    assert rtc.guidance_weight(0.5, 5.0) == pytest.approx(2.0)  # (0.25 + 0.25) / 0.25
    assert rtc.guidance_weight(0.5, 1.0) == 1.0
    assert rtc.guidance_weight(0.3, 0.0) == 0.0


# ------------------------------------------------------------------------------ the sampler
def _toy_velocity(x, tau):
    """A smooth nonlinear velocity field (differentiable in x), mixing the steps of the chunk."""
    mix = torch.linspace(-0.5, 0.5, x.shape[1])[None, :, None]
    return torch.tanh(x + mix) + 0.3 * x.roll(1, dims=1) * tau[:, None, None]


def test_zero_guidance_is_plain_sampling():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 8, 3, generator=g)
    target = torch.randn(2, 8, 3, generator=g)
    plain = flow.euler_sample(_toy_velocity, noise, 5)
    no_beta = rtc.guided_euler_sample(_toy_velocity, noise, 5, target, rtc.prefix_weights(8, 4, 0), max_guidance=0.0)
    no_mask = rtc.guided_euler_sample(_toy_velocity, noise, 5, target, torch.zeros(8), max_guidance=5.0)
    assert torch.equal(no_beta, plain) and torch.equal(no_mask, plain)


def test_guidance_pulls_the_chunk_towards_the_prefix():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 8, 3, generator=g)
    target = torch.randn(4, 8, 3, generator=g)
    w = rtc.prefix_weights(8, 6, 0)  # no frozen step: only the guidance acts
    plain = flow.euler_sample(_toy_velocity, noise, 5)
    guided = rtc.guided_euler_sample(_toy_velocity, noise, 5, target, w)
    err = lambda x: ((x - target)[:, :6] ** 2 * w[:6, None]).sum().item()  # noqa: E731
    assert err(guided) < 0.5 * err(plain)
    assert not torch.allclose(guided[:, 6:], plain[:, 6:])  # the rest of the chunk adapts too


def test_whole_chunk_fixed_returns_it_and_frozen_steps_are_exact():
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 8, 3, generator=g)
    target = torch.randn(1, 8, 3, generator=g)
    out = rtc.guided_euler_sample(_toy_velocity, noise, 4, target, rtc.prefix_weights(8, 8, 8))
    assert torch.equal(out, target)
    part = rtc.guided_euler_sample(_toy_velocity, noise, 4, target, rtc.prefix_weights(8, 5, 3))
    assert torch.equal(part[:, :3], target[:, :3]) and not torch.allclose(part[:, 3:], target[:, 3:])


def test_sampling_under_no_grad_still_guides():
    noise = torch.randn(1, 8, 3)
    target = torch.ones(1, 8, 3)
    with torch.no_grad():
        a = rtc.guided_euler_sample(_toy_velocity, noise, 5, target, rtc.prefix_weights(8, 8, 0))
    b = flow.euler_sample(_toy_velocity, noise, 5)
    assert ((a - target) ** 2).sum() < ((b - target) ** 2).sum()


# ------------------------------------------------------------------------------ the policy
@pytest.fixture(scope="module")
def policy():
    from dit4dit.policy import Policy

    return Policy.random("toy_reach")


def _obs(policy):
    sizes = policy.processor.camera_sizes
    obs = {k: np.zeros((*sizes[k], 3), np.uint8) for k in policy.processor.camera_keys}
    obs["observation.state"] = np.zeros(policy.processor.schema.state_dim, np.float32)
    obs["prompt"] = "reach the red target"
    return obs


def test_policy_without_rtc_keys_is_unchanged_and_zero_guidance_matches(policy):
    obs = _obs(policy)
    plain = policy.infer(obs)["actions"]
    h, a = plain.shape
    assert policy.realtime_inputs(obs) == {}
    old = policy.max_guidance
    try:
        policy.max_guidance = 0.0
        prefix = np.full((h // 2, a), 0.25, np.float32)
        same = policy.infer({**obs, "action_prefix": prefix, "inference_delay": 0})["actions"]
    finally:
        policy.max_guidance = old
    np.testing.assert_array_equal(same, plain)


def test_policy_whole_prefix_fixed_returns_it_in_robot_units(policy):
    obs = _obs(policy)
    h = policy.cfg.action.action_horizon
    a = policy.processor.schema.action_dim
    prefix = np.linspace(-0.8, 0.8, h * a, dtype=np.float32).reshape(h, a)
    out = policy.infer({**obs, "action_prefix": prefix, "inference_delay": h})["actions"]
    np.testing.assert_allclose(out, prefix, atol=1e-5)
    # a partial prefix: the frozen steps are exact, the chunk moves towards the rest
    out2 = policy.infer({**obs, "action_prefix": prefix[: h // 2], "inference_delay": 2})["actions"]
    np.testing.assert_allclose(out2[:2], prefix[:2], atol=1e-5)
    plain = policy.infer(obs)["actions"]
    k = h // 2
    assert np.abs(out2[2:k] - prefix[2:k]).sum() < np.abs(plain[2:k] - prefix[2:k]).sum()


@pytest.mark.parametrize("extra, match", [
    ({"inference_delay": 1}, "without 'action_prefix'"),
    ({"action_prefix": np.zeros((3,), np.float32)}, "expected shape"),
    ({"action_prefix": np.zeros((99, 2), np.float32)}, "1 <= K"),
    ({"action_prefix": np.zeros((2, 5), np.float32)}, "expected shape"),
    ({"action_prefix": np.array([[0.0, np.nan]], np.float32)}, "NaN/inf"),
    ({"action_prefix": np.array([[0.0, 1e9]])}, "beyond"),
    ({"action_prefix": np.array([["a", "b"]])}, "expected numbers"),
    ({"action_prefix": np.zeros((2, 2), np.float32), "inference_delay": 3}, "must be in \\[0, 2\\]"),
    ({"action_prefix": np.zeros((2, 2), np.float32), "inference_delay": -1}, "must be in"),
    ({"action_prefix": np.zeros((2, 2), np.float32), "inference_delay": 1.5}, "integer"),
    ({"action_prefix": np.zeros((2, 2), np.float32), "inference_delay": True}, "integer"),
])
def test_policy_rejects_bad_rtc_inputs(policy, extra, match):
    assert policy.processor.schema.action_dim == 2
    with pytest.raises(ProcessorError, match=match):
        policy.infer({**_obs(policy), **extra})


def test_server_reports_bad_rtc_inputs_and_serves_rtc(policy):
    from dit4dit.serve.client import PolicyServerError, WebsocketClientPolicy
    from dit4dit.serve.server import PolicyServer

    with PolicyServer(policy, host="127.0.0.1", port=0).start_in_thread() as srv:
        client = WebsocketClientPolicy(f"ws://127.0.0.1:{srv.port}")
        try:
            obs = _obs(policy)
            with pytest.raises(PolicyServerError, match="action_prefix"):
                client.infer({**obs, "action_prefix": np.full((2, 2), np.inf, np.float32)})
            h = policy.cfg.action.action_horizon
            prefix = np.full((h, 2), 0.5, np.float32)
            out = client.infer({**obs, "action_prefix": prefix, "inference_delay": h})["actions"]
            np.testing.assert_allclose(out, prefix, atol=1e-5)
        finally:
            client.close()


# ------------------------------------------------------------------------------ the executor
class ChunkPolicy:
    """Returns chunk q = [[100 q + i] for i in range(H)] for query q; records what it was sent."""

    def __init__(self, horizon: int = 8):
        self.horizon = horizon
        self.sent: list[dict] = []

    def infer(self, obs):
        q = len(self.sent)
        self.sent.append(dict(obs))
        return {"actions": np.array([[100.0 * q + i] for i in range(self.horizon)], np.float32)}


def _run(ex, steps):
    out = []
    for t in range(steps):
        a = ex.act({"t": t})
        out.append(None if a is None else float(a[0]))
    return out


def test_async_switches_to_step_d_of_the_new_chunk():
    pol = ChunkPolicy()
    ex = AsyncChunkExecutor(pol, 4, mode="async", delay_steps=2)
    acts = _run(ex, 12)
    # the first chunk arrives at step 2 (at its step 2); chunk 1 (observation of step 4) at step 6, ...
    assert acts == [None, None, 2, 3, 4, 5, 102, 103, 104, 105, 202, 203]
    assert [o["t"] for o in pol.sent] == [0, 4, 8]
    assert "action_prefix" not in pol.sent[1]


def test_async_without_delay_is_plain_chunking():
    ex = AsyncChunkExecutor(ChunkPolicy(), 4, mode="async", delay_steps=0)
    assert _run(ex, 8) == [0, 1, 2, 3, 100, 101, 102, 103]


def test_sync_waits_for_every_chunk():
    pol = ChunkPolicy()
    ex = AsyncChunkExecutor(pol, 3, mode="sync", delay_steps=2)
    acts = _run(ex, 12)
    assert acts == [None, None, 0, 1, 2, None, None, 100, 101, 102, None, None]
    assert [o["t"] for o in pol.sent] == [0, 5, 10]


def test_rtc_sends_the_actions_still_to_run_and_the_delay():
    pol = ChunkPolicy()
    ex = AsyncChunkExecutor(pol, 4, mode="rtc", delay_steps=3)
    steps = []
    for t in range(8):
        a = ex.act({"t": t})
        steps.append(dict(ex.last_step))
    assert "action_prefix" not in pol.sent[0]  # nothing to continue yet
    np.testing.assert_array_equal(pol.sent[1]["action_prefix"][:, 0], [4, 5, 6, 7])
    assert pol.sent[1]["inference_delay"] == 3
    assert [s["chunk"] for s in steps] == [None, None, None, 0, 0, 0, 0, 1]
    assert steps[7]["switched"] and steps[7]["index"] == 3 and not steps[6]["switched"]
    assert a[0] == 103


def test_ensemble_averages_the_chunks_that_arrived():
    ex = AsyncChunkExecutor(ChunkPolicy(), 2, mode="ensemble", delay_steps=1)
    acts = _run(ex, 5)
    # step 1: chunk 0 only; step 3: chunk 0 (step 3) and chunk 1 (observation of step 2, its step 1)
    assert acts[0] is None and acts[1] == 1 and acts[2] == 2
    assert acts[3] == pytest.approx((3 + 101) / 2)
    assert acts[4] == pytest.approx((4 + 102) / 2)
    ex2 = AsyncChunkExecutor(ChunkPolicy(), 2, mode="ensemble", delay_steps=1, ensemble_decay=1.0)
    w = np.exp(-np.arange(2.0))
    assert _run(ex2, 4)[3] == pytest.approx((w[0] * 3 + w[1] * 101) / w.sum())


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class GatedPolicy(ChunkPolicy):
    """A policy that answers only when the test opens the gate, advancing the fake clock."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, seconds
        self.gate = threading.Event()

    def infer(self, obs):
        assert self.gate.wait(10.0)
        self.gate.clear()
        self.clock.now += self.seconds
        return super().infer(obs)


def test_background_inference_switches_when_the_chunk_arrives():
    clock = FakeClock()
    pol = GatedPolicy(clock, seconds=0.25)
    ex = AsyncChunkExecutor(pol, 4, mode="rtc", delay_steps=1, background=True, period_s=0.1, clock=clock)
    try:
        assert ex.act({"t": 0}) is None  # sent; nothing to run yet
        assert ex.act({"t": 1}) is None
        pol.gate.set()
        ex._pending[2].future.result(timeout=10)
        a = ex.act({"t": 2})  # arrived during step 1..2: its step 2
        assert a[0] == 2 and ex.last_step["index"] == 2
        assert ex.announced_delay == 3  # ceil(0.25 s / 0.1 s) from the fake clock
        assert ex.act({"t": 3})[0] == 3
        assert ex.act({"t": 4})[0] == 4 and ex._pending is not None  # query 1: s = 4 steps after query 0
        assert [float(ex.act({"t": t})[0]) for t in (5, 6)] == [5, 6]  # stale actions while it runs
        pol.gate.set()
        ex._pending[2].future.result(timeout=10)
        assert ex.act({"t": 7})[0] == 103 and ex.last_step["switched"] and ex.last_step["index"] == 3
        np.testing.assert_array_equal(pol.sent[1]["action_prefix"][:, 0], [4, 5, 6, 7])
        assert pol.sent[1]["inference_delay"] == 3  # ceil(0.25 s / 0.1 s), measured on the fake clock
    finally:
        ex.close()


def test_executor_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        AsyncChunkExecutor(ChunkPolicy(), 4, mode="fast")
    with pytest.raises(ValueError, match="execute_steps"):
        AsyncChunkExecutor(ChunkPolicy(), 0)
    with pytest.raises(ValueError, match="delay_steps"):
        AsyncChunkExecutor(ChunkPolicy(), 4, delay_steps=-1)
