"""Policy server, client, wire format, executor and `bench serve` (loopback only, bounded loops)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest

from dit4dit.envs.toy import IMAGE_KEY, ToyReachEnv
from dit4dit.serve import msgpack_numpy as mn
from dit4dit.serve.client import PolicyServerError, WebsocketClientPolicy, dummy_observation, parse_address
from dit4dit.serve.executor import ActionChunkExecutor, FrameHistory
from dit4dit.serve.server import PolicyServer

pytestmark = pytest.mark.timeout(120)

# the tiny preset made smaller still (~0.3 M parameters; one call ~15-30 ms on one CPU thread)
SMALL = ["video.num_layers=1", "feature_blocks=1", "video.num_attention_heads=2", "video.attention_head_dim=16",
         "video.adaln_lora_dim=16", "action.num_layers=2", "action.num_attention_heads=2",
         "action.attention_head_dim=16", "action.cross_attention_dim=32", "action.mlp_hidden=64",
         "num_action_steps=2", "action.dropout=0.0", "schema=toy_reach", "inputs.image_size=[32,32]"]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A real tiny DiT4DiT + the processor of a 2-episode toy_reach dataset (64 px camera, 32 px model)."""
    import torch

    from dit4dit.config import get_preset
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.processor import Processor
    from dit4dit.envs.toy import collect
    from dit4dit.models.dit4dit import DiT4DiT
    from dit4dit.policy import Policy

    root = tmp_path_factory.mktemp("toy") / "ds"
    collect(str(root), 2, seed=0, size=64)
    cfg = get_preset("tiny", SMALL)
    proc = Processor.for_dataset(LeRobotDataset(root), "toy_reach", cfg.inputs, action_horizon=cfg.action.action_horizon,
                                 progress=False)
    torch.manual_seed(0)
    return Policy(DiT4DiT.from_config(cfg, random_weights=True), proc)


@pytest.fixture(scope="module")
def server(tiny_policy):
    with PolicyServer(tiny_policy, "127.0.0.1", 0, max_size=2**20,
                      metadata={"model_version": "test-tiny"}).start_in_thread() as st:
        yield st


@pytest.fixture
def good_obs():
    return ToyReachEnv(size=64).reset(3)


class FakePolicy:
    """Fast stand-in with the Policy interface; `delay` seconds per call, optional failure modes."""

    def __init__(self, horizon=4, dim=2, delay=0.0, mode="ok"):
        self.horizon, self.dim, self.delay, self.mode = horizon, dim, delay, mode
        self.calls = 0

    def metadata(self):
        return {"schema": "fake", "embodiment": "fake", "cameras": [IMAGE_KEY], "camera_sizes": {IMAGE_KEY: [8, 8]},
                "image_size": [8, 8], "num_cond_frames": 1, "state_keys": ["observation.state[0:2]"],
                "action_dim": self.dim, "action_horizon": self.horizon, "fps": 10.0}

    def infer(self, obs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.mode == "raise":
            raise RuntimeError("boom")
        a = np.full((self.horizon, self.dim), float(self.calls), np.float32)
        if self.mode == "nan":
            a[1, 0] = np.nan
        return {"actions": a, "policy_timing": {"infer_ms": self.delay * 1e3}}


def _small_obs():
    return {IMAGE_KEY: np.zeros((8, 8, 3), np.uint8), "observation.state": np.zeros(2, np.float32), "prompt": "x"}


# ---------------------------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------------------------


def test_msgpack_numpy_roundtrip_and_openpi_layout():
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((2, 0, 3), np.uint8),
           "c": [np.int64(7), np.float32(1.5), np.bool_(True)], "s": "text", "raw": b"\x00\x01",
           "nested": {"x": np.array([1, 2], dtype=">i4"), "t": np.asfortranarray(np.arange(6.0).reshape(2, 3))}}
    data = mn.packb(obj)
    back = mn.unpackb(data)
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["a"].dtype == np.float32 and back["a"].flags.writeable
    assert back["b"].shape == (2, 0, 3)
    assert back["c"][0] == 7 and isinstance(back["c"][0], np.int64)
    assert isinstance(back["c"][1], np.float32) and back["c"][2]
    assert back["s"] == "text" and back["raw"] == b"\x00\x01"
    np.testing.assert_array_equal(back["nested"]["x"], [1, 2])
    np.testing.assert_array_equal(back["nested"]["t"], obj["nested"]["t"])
    # the raw layout is openpi-client's: binary marker keys, dtype.str, shape list, raw bytes
    raw = msgpack.unpackb(data, raw=False)
    arr = raw["a"]
    assert arr[b"__ndarray__"] is True and arr[b"dtype"] == "<f4" and list(arr[b"shape"]) == [3, 4]
    assert arr[b"data"] == obj["a"].tobytes()
    assert raw["c"][1][b"__npgeneric__"] is True and raw["c"][1][b"dtype"] == "<f4"
    # a map written the openpi way decodes here
    openpi = msgpack.packb({"x": {b"__ndarray__": True, b"data": np.ones(3, "<f8").tobytes(), b"dtype": "<f8",
                                  b"shape": (3,)}}, use_bin_type=True)
    np.testing.assert_array_equal(mn.unpackb(openpi)["x"], np.ones(3))


@pytest.mark.parametrize("payload, phrase", [
    ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}, "not allowed"),
    ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": [3]}, "needs 12 bytes"),
    ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": {"names": ["a"], "formats": ["O"]}, b"shape": [1]},
     "must be a string"),
    ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "[('a', '<f4'), ('b', '<f4')]", b"shape": [1]},
     "dtype"),
    ({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [-1]}, "non-negative"),
    ({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "nonsense", b"shape": [1]}, "unknown array dtype"),
])
def test_msgpack_numpy_rejects_unsafe_arrays(payload, phrase):
    data = msgpack.packb({"x": payload}, use_bin_type=True)
    with pytest.raises(mn.WireFormatError, match=phrase):
        mn.unpackb(data)


def test_msgpack_numpy_rejects_garbage_and_objects():
    for junk in (b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\x93\x01\x02\x03\x04"):
        with pytest.raises(mn.WireFormatError):
            mn.unpackb(junk)
    with pytest.raises(TypeError):
        mn.packb({"x": np.array([object()], dtype=object)})
    with pytest.raises(TypeError):
        mn.packb({"x": {1, 2}})


def test_parse_address():
    assert parse_address("localhost:8001") == ("localhost", 8001)
    assert parse_address("10.0.0.2") == ("10.0.0.2", 8000)
    assert parse_address("[::1]:9000") == ("::1", 9000)


# ---------------------------------------------------------------------------------------------
# the real tiny policy over a real connection
# ---------------------------------------------------------------------------------------------


def test_round_trip_matches_local_policy(server, tiny_policy, good_obs):
    with WebsocketClientPolicy("127.0.0.1", server.port) as client:
        meta = client.get_server_metadata()
        assert meta["embodiment"] == "toy_reach" and meta["cameras"] == [IMAGE_KEY]
        assert meta["camera_sizes"][IMAGE_KEY] == [64, 64] and meta["image_size"] == [32, 32]
        assert meta["action_horizon"] == 8 and meta["action_dim"] == 2 and meta["fps"] == 20.0
        assert meta["model_version"] == "test-tiny" and meta["wire_format"] == "openpi-msgpack-numpy"
        assert meta["max_message_bytes"] == 2**20
        assert meta["max_inflight_bytes"] == 256 * 2**20
        out = client.infer(good_obs)
        acts = out["actions"]
        assert acts.shape == (8, 2) and acts.dtype == np.float32 and np.isfinite(acts).all()
        assert set(out["server_timing"]) >= {"infer_ms", "queue_ms", "decode_ms", "budget_wait_ms",
                                             "prev_total_ms"}
        assert "preprocess_ms" in out["policy_timing"]
        # same numbers as calling the policy in-process (normalisation + preprocessing on the server)
        np.testing.assert_array_equal(acts, tiny_policy.infer(good_obs)["actions"])
        # openpi-style key spellings are accepted too
        openpi_obs = {"observation/images/image": good_obs[IMAGE_KEY], "observation/state": good_obs["observation.state"],
                      "prompt": good_obs["prompt"]}
        np.testing.assert_array_equal(client.infer(openpi_obs)["actions"], acts)
        assert client.infer(dummy_observation(meta))["actions"].shape == (8, 2)


def _raw_connect(port, **kw):
    from websockets.sync.client import connect

    ws = connect(f"ws://127.0.0.1:{port}", compression=None, proxy=None, **kw).__enter__()
    meta = mn.unpackb(ws.recv(timeout=10))
    return ws, meta


def test_openpi_style_raw_client(server, good_obs):
    """What openpi-client does: read metadata, send packed dict, read one binary reply; errors are text."""
    packer = msgpack.Packer(default=mn.pack_array, use_bin_type=True)
    ws, meta = _raw_connect(server.port)
    try:
        assert isinstance(meta, dict) and meta["action_horizon"] == 8
        ws.send(packer.pack(good_obs))
        reply = ws.recv(timeout=30)
        assert isinstance(reply, bytes)
        assert mn.unpackb(reply)["actions"].shape == (8, 2)
        ws.send(packer.pack({"prompt": "x"}))
        err = ws.recv(timeout=30)
        assert isinstance(err, str) and json.loads(err)["error"]["type"] == "bad_observation"
    finally:
        ws.close()


def _bad_cases(obs):
    img, state = obs[IMAGE_KEY], obs["observation.state"]
    drop = lambda k: {kk: v for kk, v in obs.items() if kk != k}  # noqa: E731
    return [
        ("missing camera", drop(IMAGE_KEY), "bad_observation", "lacks camera"),
        ("missing state", drop("observation.state"), "bad_observation", "lacks the state key"),
        ("missing prompt", drop("prompt"), "bad_observation", "lacks the instruction"),
        ("state shape", {**obs, "observation.state": np.zeros((2, 3), np.float32)}, "bad_observation", "1-D"),
        ("state NaN", {**obs, "observation.state": np.array([np.nan, 0.0], np.float32)}, "bad_observation", "NaN"),
        ("state text", {**obs, "observation.state": np.array(["a", "b"])}, "bad_observation", "numbers"),
        ("image dtype", {**obs, IMAGE_KEY: img.astype(np.float32) / 255}, "bad_observation", "uint8"),
        ("image size", {**obs, IMAGE_KEY: np.zeros((48, 48, 3), np.uint8)}, "bad_observation", "48x48"),
        ("channel first", {**obs, IMAGE_KEY: np.ascontiguousarray(img.transpose(2, 0, 1))}, "bad_observation",
         "channel-first"),
        ("grey image", {**obs, IMAGE_KEY: img[..., 0]}, "bad_observation", "shape"),
        ("prompt type", {**obs, "prompt": 3}, "bad_observation", "string"),
        ("state too short", {**obs, "observation.state": np.zeros(1, np.float32)}, "bad_observation",
         "observation.state"),
    ]


def test_bad_observations_named_and_connection_survives(server, good_obs):
    with WebsocketClientPolicy("127.0.0.1", server.port) as client:
        for name, obs, kind, phrase in _bad_cases(good_obs):
            with pytest.raises(PolicyServerError) as ei:
                client.infer(obs)
            assert ei.value.type == kind, name
            assert phrase.lower() in ei.value.message.lower(), (name, ei.value.message)
            # the same connection still serves good requests
        assert client.infer(good_obs)["actions"].shape == (8, 2)


def test_malformed_messages_named_and_connection_survives(server, good_obs):
    ws, _ = _raw_connect(server.port)
    try:
        cases = [
            ("text frame", "hello", "bad_message", "text frame"),
            ("truncated msgpack", mn.packb(good_obs)[:-7], "malformed_msgpack", "malformed"),
            ("junk bytes", b"\xc1\xc1\xc1", "malformed_msgpack", "malformed"),
            ("not a map", mn.packb([1, 2, 3]), "bad_message", "map"),
            ("object dtype", msgpack.packb({IMAGE_KEY: {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O",
                                                        b"shape": [1]}}, use_bin_type=True),
             "malformed_msgpack", "not allowed"),
        ]
        for name, payload, kind, phrase in cases:
            ws.send(payload)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str), name
            err = json.loads(reply)["error"]
            assert err["type"] == kind and phrase in err["message"], (name, err)
        ws.send(mn.packb(good_obs))
        assert mn.unpackb(ws.recv(timeout=30))["actions"].shape == (8, 2)
    finally:
        ws.close()


def test_oversized_message_closes_only_that_client(tiny_policy, good_obs):
    with PolicyServer(tiny_policy, "127.0.0.1", 0, max_size=64 * 1024).start_in_thread() as st:
        other = WebsocketClientPolicy("127.0.0.1", st.port)
        big = WebsocketClientPolicy("127.0.0.1", st.port)
        try:
            with pytest.raises(PolicyServerError) as ei:
                big.infer({**good_obs, "junk": np.zeros(100_000, np.uint8)})
            assert ei.value.type == "message_too_big" and "65536" in ei.value.message
            assert other.infer(good_obs)["actions"].shape == (8, 2)  # others unaffected
            assert big.infer(good_obs)["actions"].shape == (8, 2)  # the client reconnects by itself
        finally:
            other.close()
            big.close()


def test_concurrent_clients_8x50(server, good_obs):
    n_clients, n_requests = 8, 50
    errors, counts = [], [0] * n_clients
    start = threading.Barrier(n_clients)

    def run(i):
        try:
            with WebsocketClientPolicy("127.0.0.1", server.port, timeout=60) as c:
                obs = ToyReachEnv(size=64).reset(100 + i)
                start.wait(timeout=30)
                for _ in range(n_requests):
                    a = c.infer(obs)["actions"]
                    assert a.shape == (8, 2) and np.isfinite(a).all()
                    counts[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(f"{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    assert not errors, errors
    assert counts == [n_requests] * n_clients


# ---------------------------------------------------------------------------------------------
# server behaviour with fake policies (fast)
# ---------------------------------------------------------------------------------------------


def test_event_loop_not_blocked_by_inference():
    slow = FakePolicy(delay=1.5)
    with PolicyServer(slow, "127.0.0.1", 0).start_in_thread() as st:
        a = WebsocketClientPolicy("127.0.0.1", st.port)
        t = threading.Thread(target=a.infer, args=(_small_obs(),), daemon=True)
        t.start()
        time.sleep(0.2)  # the request is being computed now
        t0 = time.perf_counter()
        body = urllib.request.urlopen(f"http://127.0.0.1:{st.port}/healthz", timeout=5).read()
        b = WebsocketClientPolicy("127.0.0.1", st.port)  # handshake + metadata while busy
        elapsed = time.perf_counter() - t0
        assert body == b"OK\n" and b.get_server_metadata()["action_horizon"] == 4
        assert elapsed < 0.8, f"health check / connect took {elapsed:.2f} s while inference was running"
        t.join(10)
        a.close()
        b.close()


def test_policy_failures_reported_and_server_survives():
    for mode, kind in (("raise", "inference_failed"), ("nan", "non_finite_actions")):
        pol = FakePolicy(mode=mode)
        with PolicyServer(pol, "127.0.0.1", 0).start_in_thread() as st:
            with WebsocketClientPolicy("127.0.0.1", st.port) as c:
                for _ in range(2):
                    with pytest.raises(PolicyServerError) as ei:
                        c.infer(_small_obs())
                    assert ei.value.type == kind
                pol.mode = "ok"
                assert c.infer(_small_obs())["actions"].shape == (4, 2)


def test_token_authentication_and_health_check():
    with PolicyServer(FakePolicy(), "127.0.0.1", 0, token="s3cret").start_in_thread() as st:
        assert urllib.request.urlopen(f"http://127.0.0.1:{st.port}/healthz", timeout=5).status == 200
        for token in (None, "wrong"):
            with pytest.raises(PolicyServerError) as ei:
                WebsocketClientPolicy("127.0.0.1", st.port, token=token)
            assert ei.value.type == "unauthorized"
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{st.port}/", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}), timeout=5)
        assert he.value.code == 401
        he.value.close()  # else the server's shutdown waits for this socket (close_timeout)
        with WebsocketClientPolicy("127.0.0.1", st.port, token="s3cret") as c:
            assert c.get_server_metadata()["auth"] == "token"
            assert c.infer(_small_obs())["actions"].shape == (4, 2)
        with WebsocketClientPolicy(f"ws://127.0.0.1:{st.port}/?token=s3cret", None) as c:
            assert c.infer(_small_obs())["actions"].shape == (4, 2)
        ws, meta = _raw_connect(st.port, additional_headers={"Authorization": "Api-Key s3cret"})  # openpi-client
        ws.close()


class GatedPolicy(FakePolicy):
    """Answers a request with its state[0] in every entry; records the server's in-flight bytes at
    each call; a call waits for `gate` (set it to let calls through)."""

    def __init__(self):
        super().__init__()
        self.server = None
        self.seen = []
        self.gate = threading.Event()

    def infer(self, obs):
        self.calls += 1
        self.seen.append(self.server.inflight_bytes)
        assert self.gate.wait(60), "the test never opened the gate"
        a = np.full((self.horizon, self.dim), float(obs["observation.state"][0]), np.float32)
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "nan":
            a[1, 0] = np.nan
        return {"actions": a}


def _budget_server(policy, budget):
    srv = PolicyServer(policy, "127.0.0.1", 0, max_inflight_bytes=budget)
    policy.server = srv
    return srv


def _padded_obs(value, pad):
    """A small observation made `pad` bytes larger; its packed size does not depend on `value`."""
    return {**_small_obs(), "observation.state": np.array([value, 0.0], np.float32), "pad": np.zeros(pad, np.uint8)}


def _until(cond, timeout=60.0):
    """Poll `cond` until it holds (True) or `timeout` seconds pass (False): a deadline, not a timing check."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _abort(ws):
    """Drop a connection without a closing handshake."""
    import socket

    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()


def test_inflight_budget_bounds_concurrent_requests():
    n_clients, n_requests = 5, 3
    size = len(mn.packb(_padded_obs(0.0, 20_000)))
    cost = 2 * size  # INFLIGHT_BYTES_PER_MESSAGE_BYTE
    budget = 5 * size  # two requests fit, three do not
    pol = GatedPolicy()
    with _budget_server(pol, budget).start_in_thread() as st:
        srv = st.server
        errors, replies = [], [[] for _ in range(n_clients)]
        start = threading.Barrier(n_clients)

        def run(i):
            try:
                ws, meta = _raw_connect(st.port)
                assert meta["max_inflight_bytes"] == budget and meta["max_message_bytes"] == 16 * 2**20
                try:
                    start.wait(timeout=30)
                    for k in range(n_requests):
                        ws.send(mn.packb(_padded_obs(10.0 * i + k, 20_000)))
                        replies[i].append(mn.unpackb(ws.recv(timeout=90))["actions"])
                finally:
                    ws.close()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_clients)]
        for t in threads:
            t.start()
        # the first request is held in inference; one more fits the budget, the other three wait
        assert _until(lambda: srv.stats["inflight_waits"] >= n_clients - 2 or bool(errors)), srv.stats
        assert srv.inflight_bytes == 2 * cost and srv._budget.waiting == n_clients - 2
        pol.gate.set()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "clients did not finish in time"
        assert not errors, errors
        for i in range(n_clients):
            assert [float(a[0, 0]) for a in replies[i]] == [10.0 * i + k for k in range(n_requests)]
        assert pol.calls == n_clients * n_requests
        assert max(pol.seen) <= budget and srv.stats["inflight_peak_bytes"] == 2 * cost
        assert srv.inflight_bytes == 0 and srv._budget.waiting == 0


def test_inflight_budget_released_after_errors_and_disconnects():
    size = len(mn.packb(_padded_obs(0.0, 20_000)))
    cost = 2 * size
    pol = GatedPolicy()
    pol.gate.set()
    with _budget_server(pol, 3 * size).start_in_thread() as st:  # one request at a time
        srv = st.server
        ws, _ = _raw_connect(st.port)
        try:
            for payload, kind in (("text", "bad_message"), (b"\xc1\xc1", "malformed_msgpack"),
                                  (mn.packb([1, 2]), "bad_message")):
                ws.send(payload)
                assert json.loads(ws.recv(timeout=30))["error"]["type"] == kind
                assert srv.inflight_bytes == 0  # released before the reply is sent
            for mode, kind in (("raise", "inference_failed"), ("nan", "non_finite_actions")):
                pol.mode = mode
                ws.send(mn.packb(_padded_obs(1.0, 20_000)))
                assert json.loads(ws.recv(timeout=30))["error"]["type"] == kind
                assert srv.inflight_bytes == 0
            pol.mode = "ok"
        finally:
            ws.close()
        # abrupt disconnects: one client while its request is computed, one while its request waits
        pol.gate.clear()
        calls = pol.calls
        busy, _ = _raw_connect(st.port)
        busy.send(mn.packb(_padded_obs(2.0, 20_000)))
        assert _until(lambda: pol.calls == calls + 1)
        waiting, _ = _raw_connect(st.port)
        waiting.send(mn.packb(_padded_obs(3.0, 20_000)))
        assert _until(lambda: srv._budget.waiting == 1)
        assert srv.inflight_bytes == cost
        _abort(waiting)
        assert _until(lambda: srv._budget.waiting == 0), "the closed connection kept its place in the queue"
        assert srv._budget.queued_bytes == 0
        _abort(busy)
        pol.gate.set()
        assert _until(lambda: srv.inflight_bytes == 0 and srv.active_clients == 0), (srv.inflight_bytes, srv.stats)
        assert pol.calls == calls + 1  # the request of the client that left while waiting was never computed
        # the whole budget is there again
        with WebsocketClientPolicy("127.0.0.1", st.port) as c:
            assert float(c.infer(_padded_obs(4.0, 20_000))["actions"][0, 0]) == 4.0
        assert srv.inflight_bytes == 0 and srv._budget.waiting == 0


def test_inflight_request_larger_than_budget_is_computed_alone():
    big, bigger = (len(mn.packb(_padded_obs(0.0, pad))) for pad in (30_000, 40_000))
    budget = big  # smaller than either request's cost (2 x its size)
    pol = GatedPolicy()
    with _budget_server(pol, budget).start_in_thread() as st:
        srv = st.server
        a, _ = _raw_connect(st.port)
        b, _ = _raw_connect(st.port)
        try:
            a.send(mn.packb(_padded_obs(1.0, 30_000)))
            assert _until(lambda: pol.calls == 1)  # admitted: nothing else was in flight
            b.send(mn.packb(_padded_obs(2.0, 40_000)))
            assert _until(lambda: srv.stats["inflight_waits"] == 1)  # waits while a's is in flight
            assert srv.inflight_bytes == 2 * big
            pol.gate.set()
            assert float(mn.unpackb(a.recv(timeout=30))["actions"][0, 0]) == 1.0
            assert float(mn.unpackb(b.recv(timeout=30))["actions"][0, 0]) == 2.0
        finally:
            a.close()
            b.close()
        assert pol.seen == [2 * big, 2 * bigger]  # each one alone
        assert srv.stats["inflight_peak_bytes"] == 2 * bigger and srv.inflight_bytes == 0


def test_inflight_queue_is_bounded_and_a_full_queue_answers_server_busy():
    size = len(mn.packb(_padded_obs(0.0, 20_000)))
    budget = 3 * size  # one request in flight (cost 2 x size); the queue holds 3 waiting messages
    pol = GatedPolicy()
    with _budget_server(pol, budget).start_in_thread() as st:
        srv = st.server
        conns = [_raw_connect(st.port)[0] for _ in range(5)]
        try:
            conns[0].send(mn.packb(_padded_obs(0.0, 20_000)))
            assert _until(lambda: pol.calls == 1)  # held in inference
            for i in (1, 2, 3):
                conns[i].send(mn.packb(_padded_obs(float(i), 20_000)))
                assert _until(lambda i=i: srv._budget.waiting == i)
            assert srv._budget.queued_bytes == 3 * size
            # the queue is full: the fifth request is refused at once, never decoded or computed
            conns[4].send(mn.packb(_padded_obs(4.0, 20_000)))
            err = json.loads(conns[4].recv(timeout=30))["error"]
            assert err["type"] == "server_busy" and err["request"] == 1 and str(budget) in err["message"]
            assert srv.stats["busy_refused"] == 1 and srv._budget.waiting == 3
            pol.gate.set()
            for i in range(4):
                assert float(mn.unpackb(conns[i].recv(timeout=30))["actions"][0, 0]) == float(i)
            # the refused client's connection is still open, and the request goes through now
            conns[4].send(mn.packb(_padded_obs(5.0, 20_000)))
            assert float(mn.unpackb(conns[4].recv(timeout=30))["actions"][0, 0]) == 5.0
        finally:
            for c in conns:
                c.close()
        assert pol.calls == 5 and srv.inflight_bytes == 0 and srv._budget.queued_bytes == 0


def test_client_retries_a_busy_server_when_asked():
    size = len(mn.packb(_padded_obs(0.0, 20_000)))
    pol = GatedPolicy()
    with _budget_server(pol, 3 * size).start_in_thread() as st:  # one in flight, three waiting fill it
        srv = st.server
        conns = [_raw_connect(st.port)[0] for _ in range(4)]
        try:
            conns[0].send(mn.packb(_padded_obs(0.0, 20_000)))
            assert _until(lambda: pol.calls == 1)
            for i in (1, 2, 3):
                conns[i].send(mn.packb(_padded_obs(float(i), 20_000)))
                assert _until(lambda i=i: srv._budget.waiting == i)
            with WebsocketClientPolicy("127.0.0.1", st.port) as c:
                with pytest.raises(PolicyServerError) as e:  # no retry: the refusal is raised
                    c.infer(_padded_obs(7.0, 20_000))
                assert e.value.type == "server_busy"
                c.busy_retry_s = 60.0
                opener = threading.Timer(0.5, pol.gate.set)  # capacity comes back while the client retries
                opener.start()
                try:
                    assert float(c.infer(_padded_obs(8.0, 20_000))["actions"][0, 0]) == 8.0
                finally:
                    opener.cancel()
            assert srv.stats["busy_refused"] >= 2
            for i in range(4):
                assert float(mn.unpackb(conns[i].recv(timeout=30))["actions"][0, 0]) == float(i)
        finally:
            for c in conns:
                c.close()


def test_server_defaults_to_localhost_and_max_clients():
    pol = FakePolicy()
    srv = PolicyServer(pol, port=0, max_clients=1)
    assert srv.host == "127.0.0.1"
    with srv.start_in_thread() as st:
        with WebsocketClientPolicy("127.0.0.1", st.port):
            with pytest.raises(PolicyServerError) as ei:
                WebsocketClientPolicy("127.0.0.1", st.port)
            assert "503" in ei.value.message
    with pytest.raises(PolicyServerError) as ei:  # stopped: nothing listens any more
        WebsocketClientPolicy("127.0.0.1", st.port, open_timeout=2)
    assert ei.value.type == "connection_failed"


# ---------------------------------------------------------------------------------------------
# action-chunk executor
# ---------------------------------------------------------------------------------------------


class ChunkPolicy:
    """Chunk k (k = 0, 1, ...) holds 100 * k + step index in every dimension."""

    def __init__(self, horizon=6, dim=2):
        self.h, self.d, self.k = horizon, dim, 0

    def infer(self, obs):
        c = (100.0 * self.k + np.arange(self.h, dtype=np.float32))[:, None].repeat(self.d, 1)
        self.k += 1
        return {"actions": c}


def test_executor_runs_n_actions_per_chunk():
    ex = ActionChunkExecutor(ChunkPolicy(), execute_steps=4)
    got = [ex.act({})[0] for _ in range(10)]
    assert got == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201] and ex.num_queries == 3
    ex = ActionChunkExecutor(ChunkPolicy(), execute_steps=None)  # the whole chunk
    got = [ex.act({})[0] for _ in range(8)]
    assert got == [0, 1, 2, 3, 4, 5, 100, 101]
    ex.reset()
    assert ex.needs_query() and ex.num_queries == 0


def test_executor_temporal_ensembling():
    k = 0.5
    ex = ActionChunkExecutor(ChunkPolicy(horizon=4), execute_steps=1, ensemble_decay=k)
    outs = [float(ex.act({})[0]) for _ in range(6)]
    # step t sees chunks started at max(0, t-3)..t; chunk s predicts 100 * s + (t - s) for step t
    for t, got in enumerate(outs):
        starts = list(range(max(0, t - 3), t + 1))
        preds = np.array([100.0 * s + (t - s) for s in starts])
        w = np.exp(-k * np.arange(len(starts)))
        assert got == pytest.approx(float((w * preds).sum() / w.sum()), rel=1e-5)
    assert ex.num_queries == 6
    # binary dims re-snapped, clipping applied
    ex = ActionChunkExecutor(lambda obs: np.array([[0.2, 5.0], [-0.3, -5.0]]), execute_steps=1, ensemble_decay=0.0,
                             binary_dims={0: (-1.0, 1.0)}, action_low=[-9, -1], action_high=[9, 1])
    np.testing.assert_array_equal(ex.act(None), [1.0, 1.0])
    np.testing.assert_array_equal(ex.act(None), [-1.0, 0.0])  # mean(-0.3, 0.2) = -0.05 snaps low; mean(-5, 5) = 0
    with pytest.raises(ValueError):
        ActionChunkExecutor(lambda obs: np.array([[np.nan, 0.0]])).act(None)


def test_frame_history():
    h = FrameHistory(num_frames=3, stride=2)
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(6)]
    h.push(frames[0])
    assert [int(f[0, 0, 0]) for f in h.frames()] == [0, 0, 0]
    for f in frames[1:]:
        h.push(f)
    assert [int(f[0, 0, 0]) for f in h.frames()] == [1, 3, 5]
    one = FrameHistory()
    one.push(frames[2])
    assert one.frames().shape == (2, 2, 3)


# ---------------------------------------------------------------------------------------------
# bench serve + CLI wiring
# ---------------------------------------------------------------------------------------------


def test_bench_serve_in_process_fake_policy():
    from dit4dit.bench.serve import bench_serve

    r = bench_serve(policy=FakePolicy(delay=0.002), clients=(1, 3), requests=5, warmup=1)
    assert [x["clients"] for x in r["runs"]] == [1, 3]
    for x in r["runs"]:
        assert x["errors"] == 0 and x["replies"] == x["clients"] * 5
        assert 0 < x["latency_ms"]["p50"] <= x["latency_ms"]["p99"] and x["throughput_rps"] > 0
    assert set(r["summary"]) == {"1_clients", "3_clients"}
    json.dumps(r)


def test_cli_parsers():
    from dit4dit.cli import build_parser
    from dit4dit.cli.eval import get_eval_subparsers

    parser = build_parser()
    a = parser.parse_args(["serve", "--random-weights", "toy_reach", "--port", "0", "--token", "t"])
    assert a.host == "127.0.0.1" and a.random_weights == "toy_reach" and callable(a.func)
    a = parser.parse_args(["serve", "--checkpoint", "runs/x"])
    assert a.port == 8000 and a.max_message_mb == 16.0
    assert a.max_inflight_mb == 256.0
    a = parser.parse_args(["eval", "libero", "--server", "h:1", "--suite", "libero_10"])
    assert a.trials == 50 and a.seed == 7 and a.suite == "libero_10"
    a = parser.parse_args(["eval", "robocasa-gr1", "--server", "h:1", "--tasks", "PnPCupToDrawerClose"])
    assert a.replan == 16
    a = parser.parse_args(["bench", "serve", "--json"])
    assert a.clients == [1, 8] and a.requests == 50
    # others can add `eval` benchmarks to the same parser
    sub = next(x for x in parser._actions if x.__class__.__name__ == "_SubParsersAction")
    ev1, ev2 = get_eval_subparsers(sub), get_eval_subparsers(sub)
    assert ev1 is ev2 and {"libero", "robocasa-gr1"} <= set(ev1.choices)
