"""Hostile and careless input against the server, the processor, datasets and checkpoints.

1. decoding is bounded and off the event loop; 2. an empty token is refused; 3. observations and
datasets are validated exactly; 4. idle clients cannot hold the slots; 5. errors and log lines
are bounded; 6. checkpoints are checked by content, resume falls back to an intact one, config and
processor must agree, the frame cache is keyed by content; plus a seeded fuzz run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lerobot_fixtures import make_v30_dataset  # noqa: E402

from dit4dit.config import ConfigError  # noqa: E402
from dit4dit.data.video import DatasetError  # noqa: E402
from dit4dit.serve import msgpack_numpy as mn  # noqa: E402
from dit4dit.serve.client import PolicyServerError, WebsocketClientPolicy, dummy_observation  # noqa: E402
from dit4dit.serve.server import PolicyServer  # noqa: E402

pytestmark = pytest.mark.timeout(180)

from test_serve import SMALL  # noqa: E402  (the same tiny policy as the serving tests)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from dit4dit.config import get_preset
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.processor import Processor
    from dit4dit.envs.toy import collect
    from dit4dit.models.dit4dit import DiT4DiT
    from dit4dit.policy import Policy

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy") / "ds"
    collect(str(root), 2, seed=0, size=64)
    cfg = get_preset("tiny", SMALL)
    proc = Processor.for_dataset(LeRobotDataset(root), "toy_reach", cfg.inputs,
                                 action_horizon=cfg.action.action_horizon, progress=False)
    torch.manual_seed(0)
    return Policy(DiT4DiT.from_config(cfg, random_weights=True), proc)


@pytest.fixture(scope="module")
def server(tiny_policy):
    with PolicyServer(tiny_policy, "127.0.0.1", 0, max_size=16 * 2**20,
                      metadata={"model_version": "test-tiny"}).start_in_thread() as st:
        yield st


def _client(st, **kw):
    return WebsocketClientPolicy("127.0.0.1", st.port, timeout=60, **kw)


def _raw_ws(st):
    from websockets.sync.client import connect

    ws = connect(f"ws://127.0.0.1:{st.port}", compression=None, max_size=None, proxy=None).__enter__()
    ws.recv(timeout=10)  # metadata
    return ws


def _ping_ms(ws) -> float:
    t = time.perf_counter()
    ws.ping().wait(30)
    return (time.perf_counter() - t) * 1e3


# ------------------------------------------------------------------------------------------------
# 1. decoding: bounded, off the event loop
# ------------------------------------------------------------------------------------------------


def test_decoding_bounds_container_counts():
    flat = b"\xdd" + (2**20).to_bytes(4, "big") + b"\x80" * 2**20  # an array of 1 M empty maps
    with pytest.raises(mn.WireFormatError, match="max_array_len"):
        mn.unpackb(flat)
    nested = msgpack.packb([[{}] * 2048] * 512)  # every container short, 1 M maps in all
    t = time.perf_counter()
    with pytest.raises(mn.WireFormatError, match="more than 4096 arrays and maps"):
        mn.unpackb(nested)
    assert time.perf_counter() - t < 1.0
    with pytest.raises(mn.WireFormatError, match="max_map_len"):
        mn.unpackb(msgpack.packb({str(i): 0 for i in range(5000)}))
    many_items = msgpack.packb([[0] * 4000] * 20)  # 80 000 elements in 21 containers
    with pytest.raises(mn.WireFormatError, match="65536 elements"):
        mn.unpackb(many_items)
    ok = mn.unpackb(mn.packb({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "p": "x", "l": [1, 2]}))
    assert ok["a"].shape == (2, 3) and ok["p"] == "x" and ok["l"] == [1, 2]


def test_empty_map_flood_is_refused_and_pings_stay_fast(server, tiny_policy):
    attacker = _raw_ws(server)
    watcher = _raw_ws(server)
    base = [_ping_ms(watcher) for _ in range(3)]
    flood = b"\xdd" + (15 * 2**20).to_bytes(4, "big") + b"\x80" * (15 * 2**20)  # ~15 MB of empty maps
    pings: list[float] = []
    stop = threading.Event()

    def ping_loop():
        while not stop.is_set():
            pings.append(_ping_ms(watcher))
            time.sleep(0.01)

    th = threading.Thread(target=ping_loop, daemon=True)
    th.start()
    t0 = time.perf_counter()
    attacker.send(flood)
    err = json.loads(attacker.recv(timeout=60))["error"]
    took = time.perf_counter() - t0
    stop.set()
    th.join(30)
    assert err["type"] == "malformed_msgpack" and "max_array_len" in err["message"], err
    assert took < 5.0
    assert pings and max(pings) < 2000.0, (base, pings)
    with _client(server) as c:  # the server still serves valid requests
        assert c.infer(dummy_observation(c.get_server_metadata()))["actions"].shape[1] == 2
    attacker.close()
    watcher.close()


def test_decoding_runs_off_the_event_loop(tiny_policy, monkeypatch):
    srv = PolicyServer(tiny_policy, "127.0.0.1", 0)
    real = srv._decode

    def slow_decode(msg):
        time.sleep(1.5)  # a decode that takes long: the loop must keep answering
        return real(msg)

    monkeypatch.setattr(srv, "_decode", slow_decode)
    with srv.start_in_thread() as st:
        slow = _raw_ws(st)
        watcher = _raw_ws(st)
        slow.send(mn.packb(dummy_observation(srv.metadata)))
        time.sleep(0.2)
        assert _ping_ms(watcher) < 500.0
        assert isinstance(slow.recv(timeout=60), bytes)
        slow.close()
        watcher.close()


# ------------------------------------------------------------------------------------------------
# 2. tokens
# ------------------------------------------------------------------------------------------------


def test_empty_token_is_an_error_not_no_auth(tmp_path, monkeypatch, tiny_policy, caplog):
    from dit4dit.cli.common import serve_token as _serve_token

    monkeypatch.delenv("DIT4DIT_SERVE_TOKEN", raising=False)
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        _serve_token(argparse.Namespace(token=None, token_file=str(empty)))
    with pytest.raises(ConfigError, match="--token is empty"):
        _serve_token(argparse.Namespace(token="", token_file=None))
    monkeypatch.setenv("DIT4DIT_SERVE_TOKEN", "")
    with pytest.raises(ConfigError, match="set but empty"):
        _serve_token(argparse.Namespace(token=None, token_file=None))
    monkeypatch.setenv("DIT4DIT_SERVE_TOKEN", "a-long-enough-secret-value")
    assert _serve_token(argparse.Namespace(token=None, token_file=None)) == "a-long-enough-secret-value"
    monkeypatch.delenv("DIT4DIT_SERVE_TOKEN")
    assert _serve_token(argparse.Namespace(token=None, token_file=None)) is None  # no option: no auth
    with pytest.raises(ValueError, match="empty"):
        PolicyServer(tiny_policy, token="   ")
    with caplog.at_level(logging.WARNING, logger="dit4dit.serve"):
        PolicyServer(tiny_policy, token="short")
    assert any("only 5 characters" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# 3. exact observation validation
# ------------------------------------------------------------------------------------------------


def test_wrong_observations_are_bad_observation_naming_key_expected_received(server):
    with _client(server) as c:
        meta = c.get_server_metadata()
        good = dummy_observation(meta)
        key = next(k for k in good if "state" in k)
        width = good[key].shape[0]
        ref = c.infer(good)["actions"]
        cases = {
            "wider": (np.zeros(width + 1, np.float32), [key, f"{width} values", f"[{width + 1}]"]),
            "64": (np.zeros(64, np.float32), [key, f"{width} values", "[64]"]),
            "1000": (np.zeros(1000, np.float32), [key, f"{width} values", "[1000]"]),
            "narrower": (np.zeros(width - 1, np.float32), [key, f"{width} values"]),
            "complex": (np.zeros(width, np.complex64), [key, "real numbers", "complex64"]),
            "ragged": ([[1.0, 2.0], [3.0]], [key, "not a regular array"]),
            "strings": (np.array(["a"] * width), [key, "real numbers"]),
        }
        for name, (value, words) in cases.items():
            with pytest.raises(PolicyServerError) as ei:
                c.infer({**good, key: value})
            assert ei.value.type == "bad_observation", (name, ei.value)
            for w in words:
                assert w in ei.value.message, (name, w, ei.value.message)
        for prompt, words in ((b"\xff\xfe\x80", ["prompt", "UTF-8"]), (["a", ["b"]], ["prompt", "string"]),
                              (42, ["prompt", "string"]), ("p" * 5000, ["prompt", "5000 characters"])):
            with pytest.raises(PolicyServerError) as ei:
                c.infer({**good, "prompt": prompt})
            assert ei.value.type == "bad_observation" and all(w in ei.value.message for w in words), ei.value
        cam = next(k for k in good if "image" in k)
        with pytest.raises(PolicyServerError) as ei:
            c.infer({**good, cam: good[cam][:-1]})
        assert ei.value.type == "bad_observation" and cam in ei.value.message
        np.testing.assert_array_equal(c.infer(good)["actions"], ref)  # valid requests unaffected


def _toy_dataset(tmp_path, **kw):
    return make_v30_dataset(tmp_path / "ds", episodes=2, length=8, size=(16, 16), state_dim=2, action_dim=2, **kw)


def _rewrite_parquet(path: Path, fn) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def test_dataset_columns_and_info_checked_on_open(tmp_path):
    from dit4dit.data.lerobot import LeRobotDataset

    root = _toy_dataset(tmp_path)
    LeRobotDataset(root)  # intact: opens
    data = next((root / "data").rglob("*.parquet"))
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())

    # an action column 3 wide where info.json says 2
    orig = pq.read_table(data)
    _rewrite_parquet(data, lambda t: t.set_column(t.column_names.index("action"), "action",
                                                  pa.array([[0.0, 0.0, 0.0]] * t.num_rows, pa.list_(pa.float32()))))
    with pytest.raises(DatasetError, match=r"key 'action'.*rows of shape \[3\].*declares shape \[2\]"):
        LeRobotDataset(root)
    pq.write_table(orig, data)

    # info.json: state shape 3 against data 2
    bad = json.loads(json.dumps(info))
    bad["features"]["observation.state"]["shape"] = [3]
    bad["features"]["observation.state"]["names"] = ["a", "b", "c"]
    info_path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"observation.state.*rows of shape \[2\].*declares shape \[3\]"):
        LeRobotDataset(root)

    # total_frames 1000 against 16
    bad = json.loads(json.dumps(info))
    bad["total_frames"] = 1000
    info_path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="total_frames is 1000 but .* hold 16"):
        LeRobotDataset(root)
    info_path.write_text(json.dumps(info))
    LeRobotDataset(root)


def test_video_to_timestamp_past_the_end_is_refused(tmp_path, capsys):
    from dit4dit.cli import main
    from dit4dit.data.lerobot import LeRobotDataset

    root = _toy_dataset(tmp_path)
    ep_file = next((root / "meta" / "episodes").rglob("*.parquet"))
    col = next(c for c in pq.read_schema(ep_file).names if c.endswith("/to_timestamp"))

    def push_end(t):
        vals = t.column(col).to_pylist()
        vals[-1] = vals[-1] + 5.0  # 5 s past the end of the file
        return t.set_column(t.column_names.index(col), col, pa.array(vals, t.schema.field(col).type))

    assert main(["dataset", "check", str(root)]) == 0
    _rewrite_parquet(ep_file, push_end)
    with pytest.raises(DatasetError, match="to_timestamp .* past the end of the video"):
        LeRobotDataset(root)
    assert main(["dataset", "check", str(root)]) == 2
    assert "past the end of the video" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 4. idle and slow clients
# ------------------------------------------------------------------------------------------------


def test_idle_clients_cannot_hold_the_slots(tiny_policy):
    with PolicyServer(tiny_policy, "127.0.0.1", 0, max_clients=2, evict_idle_after=0.3,
                      idle_timeout=None).start_in_thread() as st:
        idle = [_client(st), _client(st)]
        time.sleep(0.6)
        with _client(st) as newcomer:  # takes the slot of the idlest connection instead of a 503
            assert newcomer.infer(dummy_observation(newcomer.get_server_metadata()))["actions"].ndim == 2
        assert st.server.stats["evicted"] == 1
        for c in idle:
            c.close()
    with PolicyServer(tiny_policy, "127.0.0.1", 0, max_clients=2, evict_idle_after=None,
                      idle_timeout=None).start_in_thread() as st:
        a, b = _client(st), _client(st)
        with pytest.raises(PolicyServerError, match="503"):
            _client(st)
        a.close()
        b.close()


def test_idle_timeout_and_per_host_limit(tiny_policy):
    IDLE = 1.5  # long enough that a reconnect and a reply on a loaded 2-core machine fit inside it
    with PolicyServer(tiny_policy, "127.0.0.1", 0, idle_timeout=IDLE, max_clients_per_host=2).start_in_thread() as st:
        c = _client(st)
        obs = dummy_observation(c.get_server_metadata())
        time.sleep(IDLE + 1.5)
        assert st.server.stats["idle_closed"] == 1 and st.server.active_clients == 0
        assert c.infer(obs)["actions"].ndim == 2  # the client reconnects on its next call
        d = _client(st)
        with pytest.raises(PolicyServerError, match="503.*2 connections"):
            _client(st)
        c.close()
        d.close()
    with PolicyServer(tiny_policy, "127.0.0.1", 0, idle_timeout=IDLE).start_in_thread() as st:
        ws = _raw_ws(st)
        ws.send(b"\x81\xa1")  # an incomplete message, then nothing: cut off like an idle client
        time.sleep(IDLE + 1.5)
        assert st.server.stats["idle_closed"] == 1


# ------------------------------------------------------------------------------------------------
# 5. bounded errors and logs
# ------------------------------------------------------------------------------------------------


def test_errors_and_log_lines_are_bounded(server, caplog):
    caplog.set_level(logging.INFO, logger="dit4dit.serve")
    ws = _raw_ws(server)
    meta = server.server.metadata
    good = dummy_observation(meta)
    key = next(k for k in good if "state" in k)
    width = good[key].shape[0]
    nan_state = np.full(width, np.nan, np.float32)
    huge_nan = np.full(3 * 2**20, np.nan, np.float32)  # 12 MB
    long_keys = {("k" * 200) + str(i): 0 for i in range(1000)}
    attacks = [mn.packb({**good, key: nan_state}), mn.packb({**good, key: huge_nan}), mn.packb(long_keys),
               mn.packb({str(i): 0 for i in range(10**6)})]
    for msg in attacks:
        ws.send(msg)
        reply = ws.recv(timeout=60)
        assert isinstance(reply, str) and len(reply) < 1500, len(reply)
        assert json.loads(reply)["error"]["type"] in ("bad_observation", "malformed_msgpack")
    ws.close()
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 5000


# ------------------------------------------------------------------------------------------------
# 6. checkpoints and the frame cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two checkpoints (steps 1 and 2) of a tiny model trained on a small dataset (with processor)."""
    from test_train import tiny_cfg

    from dit4dit.train.trainer import train

    tmp = tmp_path_factory.mktemp("run")
    root = make_v30_dataset(tmp / "ds", episodes=2, length=10, size=(32, 32))
    cfg = tiny_cfg("train.steps=2", "train.save_every=1", "train.ema_decay=0.9")
    train(cfg, root, tmp / "run", progress=False)
    return cfg, root, tmp / "run"


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def test_flipped_bit_in_weights_is_refused(trained_run, tmp_path):
    from dit4dit.serve.server import load_served_policy
    from dit4dit.train import checkpoint as ckpt

    _, _, run = trained_run
    run = _copy_run(run, tmp_path / "run")
    _, meta = load_served_policy(run)
    assert meta["checkpoint"] == "checkpoints/step_000002" and str(tmp_path) not in json.dumps(meta)
    ema = run / "checkpoints" / "step_000002" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-3] ^= 0x10  # one bit of one weight
    ema.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors: content hash .* corrupted or was modified"):
        load_served_policy(run)
    with pytest.raises(ckpt.CheckpointError, match="content hash"):
        ckpt.load_policy(run)
    _, meta2 = load_served_policy(run, verify_hashes=False)  # only when asked
    assert meta2["weights_fingerprint"] != meta["weights_fingerprint"]


def test_policy_from_checkpoint_records_its_source(trained_run, tmp_path):
    from dit4dit.policy import Policy
    from dit4dit.train import checkpoint as ckpt

    _, _, run = trained_run
    policy = Policy.from_checkpoint(run)  # a run folder: its newest checkpoint, EMA weights
    src = policy.source
    assert src.path.name == "step_000002" and src.step == 2 and src.weights.name == "ema.safetensors"
    assert src.run_name == f"{run.name}/step_000002" and src.in_run and src.hashes_verified
    assert src.recorded_sha256 == ckpt.file_sha256(src.weights)
    assert policy.processor is not None and not policy.model.training
    raw = Policy.from_checkpoint(run / "checkpoints" / "step_000001", use_ema=False, verify_hashes=False, seed=None)
    assert raw.source.weights.name == "model.safetensors" and raw.source.step == 1 and raw.seed is None
    assert not raw.source.hashes_verified
    bare = _copy_run(run, tmp_path / "bare")
    (bare / "checkpoints" / "step_000002" / "processor.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no processor.json"):
        Policy.from_checkpoint(bare)


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained_run, tmp_path, caplog):
    from test_train import tiny_cfg

    from dit4dit.train import checkpoint as ckpt
    from dit4dit.train.trainer import train

    cfg, root, run = trained_run
    run = _copy_run(run, tmp_path / "run")
    model = run / "checkpoints" / "step_000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])  # a truncated latest checkpoint
    with caplog.at_level(logging.WARNING, logger="dit4dit.train"):
        found = ckpt.load_latest_intact(run)
    assert found.step == 1 and any("damaged" in r.getMessage() for r in caplog.records)
    s = train(tiny_cfg("train.steps=3", "train.save_every=1", "train.ema_decay=0.9"), root, run, resume=True,
              progress=False)
    assert s["step"] == 3


def test_resume_before_the_first_save_says_so(tmp_path):
    from test_train import tiny_cfg

    from dit4dit.train import checkpoint as ckpt
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.train.trainer import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("killed before the first save\n")
    cfg = tiny_cfg("train.steps=1")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint yet"):
        train(cfg, SyntheticSamples(cfg, num_samples=4), run, resume=True, progress=False)


def test_config_and_processor_must_agree(trained_run, tmp_path):
    from dit4dit.serve.server import load_served_policy
    from dit4dit.train import checkpoint as ckpt

    _, _, run = trained_run
    run = _copy_run(run, tmp_path / "run")
    pj = run / "checkpoints" / "step_000002" / "processor.json"
    d = json.loads(pj.read_text())
    d["action_horizon"] = int(d["action_horizon"]) // 2
    pj.write_text(json.dumps(d))
    with pytest.raises(ckpt.CheckpointError, match="action_horizon: config.json .* processor.json"):
        load_served_policy(run)


def test_eval_toy_without_processor_is_a_clear_error(tmp_path, capsys):
    from test_train import tiny_cfg

    from dit4dit.cli import main
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.train.trainer import train

    cfg = tiny_cfg("train.steps=1")
    train(cfg, SyntheticSamples(cfg, num_samples=4), tmp_path / "run", progress=False)
    assert main(["eval", "toy", "--checkpoint", str(tmp_path / "run"), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "processor.json" in err and "AttributeError" not in err


def test_frame_cache_keyed_by_content(tmp_path):
    from dit4dit.config import InputConfig
    from dit4dit.data.frame_cache import FrameCacheError, build_frame_cache, dataset_fingerprint, open_frame_cache
    from dit4dit.data.lerobot import LeRobotDataset
    from dit4dit.data.processor import Processor
    from dit4dit.data.schema import infer_schema

    root = _toy_dataset(tmp_path)
    ds = LeRobotDataset(root)
    proc = Processor.for_dataset(ds, infer_schema(ds, name="fc_bot"), InputConfig(image_size=(16, 16),
                                 num_cond_frames=1, num_future_frames=1), action_horizon=2, progress=False)
    out = build_frame_cache(ds, proc, out_dir=tmp_path / "cache", progress=False)
    open_frame_cache(out, root, proc)
    video = next((root / "videos").rglob("*.mp4"))
    fp = dataset_fingerprint(root)
    data = bytearray(video.read_bytes())
    st = video.stat()
    data[len(data) // 2] ^= 0xFF  # corrupted in place: same size, same times
    video.write_bytes(bytes(data))
    import os

    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert video.stat().st_size == st.st_size and video.stat().st_mtime_ns == st.st_mtime_ns
    assert dataset_fingerprint(root) != fp
    with pytest.raises(FrameCacheError, match="stale frame cache"):
        open_frame_cache(out, root, proc)


# ------------------------------------------------------------------------------------------------
# fuzz (seeded, bounded)
# ------------------------------------------------------------------------------------------------


def test_fuzz_server(server):
    from dit4dit.bench.fuzz import run_fuzz

    r = run_fuzz("127.0.0.1", server.port, cases=300, seed=0, time_limit=60.0)
    assert r["crashes"] == 0 and r["hangs"] == 0 and r["internal_errors"] == 0, r
    assert r["valid_replies_unchanged"], r
    assert r["cases"] == 300 and r["ping_ms"]["p99"] < 1000.0, r


def test_bench_serve_fuzz_report(tiny_policy):
    from dit4dit.bench.serve import bench_serve

    r = bench_serve(policy=tiny_policy, fuzz=40, fuzz_seed=3)
    assert r["benchmark"] == "serve-fuzz" and r["runs"] == []
    s = r["summary"]
    assert s["cases"] == 40 and s["crashes"] == 0 and s["hangs"] == 0 and s["internal_errors"] == 0
    assert s["valid_replies_unchanged"] and s["server_alive"]
    assert r["fuzz"]["server_rss_mb"]["start"] > 0 and r["fuzz"]["ping_ms"]["n"] > 0
