"""Pre-extracted frame cache and batch buffers (dit4dit.data.frame_cache, dit4dit.data.samples).

Cached samples must equal decoded samples bit for bit; a cache built for another dataset or other
image settings is rebuilt or refused, never used; a failed build leaves nothing that looks
complete; batches assembled in reusable (shared-memory) buffers equal plain stacked ones.
"""

from __future__ import annotations

import gc
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from lerobot_fixtures import camera_salt, make_v21_dataset, make_v30_dataset, read_code

from dit4dit.config import InputConfig
from dit4dit.data import samples as samples_mod
from dit4dit.data.frame_cache import (FrameCache, FrameCacheError, build_frame_cache, dataset_fingerprint,
                                      open_frame_cache, to_unit_float)
from dit4dit.data.lerobot import LeRobotDataset
from dit4dit.data.loader import make_loader
from dit4dit.data.processor import Processor
from dit4dit.data.samples import TrainingSamples, collate
from dit4dit.data.schema import Camera, infer_schema

CAM0, CAM1 = "observation.images.image", "observation.images.wrist_image"
LENGTHS = (7, 12, 4)


@pytest.fixture(scope="module")
def v30_root(tmp_path_factory):
    return make_v30_dataset(tmp_path_factory.mktemp("fc30") / "ds", episodes=3, length=LENGTHS, size=(48, 64),
                            cameras=(CAM0, CAM1))


def _processor(ds, image_size=(32, 64), flip=True, nc=2, nf=3, stride=2, horizon=4):
    """Two cameras side by side, the first stored upside down (flip), 48x64 -> 32x32 cells."""
    schema = infer_schema(ds, name="fc_bot", cameras=[CAM0, CAM1])
    schema = replace(schema, cameras=(Camera(CAM0, flip=flip), Camera(CAM1)))
    inp = InputConfig(cameras=("image", "wrist_image"), camera_layout="side_by_side", image_size=image_size,
                      num_cond_frames=nc, num_future_frames=nf, frame_stride=stride)
    return Processor.for_dataset(ds, schema, inp, action_horizon=horizon, progress=False)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------


def test_cached_samples_equal_decoded_samples(v30_root, tmp_path):
    ds = LeRobotDataset(v30_root)
    proc = _processor(ds)
    out = build_frame_cache(v30_root, proc, out_dir=tmp_path / "cache", progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["shape"] == [sum(LENGTHS), 3, 32, 64] and index["layout"] == "NCHW"
    assert [e[1:] for e in index["episodes"]] == [[0, 7], [7, 12], [19, 4]]
    assert not [p for p in out.iterdir() if p.name not in ("frames.npy", "index.json")]

    plain = TrainingSamples(ds, processor=proc)
    cached = TrainingSamples(ds, processor=proc, frame_cache=out)
    assert isinstance(cached.frame_cache, FrameCache) and plain.frame_cache is None
    for i in range(len(plain)):
        _assert_same(cached[i], plain[i])
    # the stored frames are the processor's canvas: flipped camera 0 left, camera 1 right
    img = cached.frame_cache.images(1, [5])[0]
    assert read_code(img[:, :32][::-1, ::-1], camera_salt(0)) == (1, 5)
    assert read_code(img[:, 32:], camera_salt(1)) == (1, 5)
    # batch path: __getitems__ + collate (one batch buffer, no stack) == stacked decoded samples
    idx = [3, 0, 22, 7, 11]
    ref = collate([plain[i] for i in idx])
    for samples in (cached, plain):
        _assert_same(collate(samples.__getitems__(idx)), ref)


def test_v21_per_episode_videos_and_to_unit_float(tmp_path):
    root = make_v21_dataset(tmp_path / "v21", episodes=2, length=(5, 6), size=(48, 64), cameras=(CAM0, CAM1))
    ds = LeRobotDataset(root)
    proc = _processor(ds, image_size=(16, 32), flip=False, nc=1, nf=2, stride=1, horizon=3)
    out = build_frame_cache(ds, proc, progress=False)  # default location inside the dataset
    assert out.parent == root / ".dit4dit_cache" and out.name.startswith("frames-")
    plain, cached = TrainingSamples(ds, processor=proc), TrainingSamples(ds, processor=proc, frame_cache=True)
    assert cached.frame_cache.directory == out  # True reuses the default cache
    for i in range(len(plain)):
        _assert_same(cached[i], plain[i])
    # to_unit_float is the processor's float conversion, channel-last or planar
    canvas = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    planar = np.ascontiguousarray(canvas.transpose(0, 3, 1, 2))
    assert torch.equal(to_unit_float(canvas), to_unit_float(planar, planar=True))
    assert torch.equal(to_unit_float(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, 3))[:, 0],
                       torch.arange(256, dtype=torch.float32).reshape(16, 16).mul(1 / 127.5).sub(1).expand(3, 16, 16))


# ---------------------------------------------------------------------------------------------
# staleness and atomicity
# ---------------------------------------------------------------------------------------------


def test_cache_rejected_or_rebuilt_when_image_settings_change(v30_root, tmp_path):
    ds = LeRobotDataset(v30_root)
    proc = _processor(ds)
    out = build_frame_cache(ds, proc, out_dir=tmp_path / "c", progress=False)
    fp = json.loads((out / "index.json").read_text())["fingerprint"]
    assert build_frame_cache(ds, proc, out_dir=out, progress=False) == out  # up to date: reused
    assert json.loads((out / "index.json").read_text())["fingerprint"] == fp

    for other in (_processor(ds, image_size=(16, 32)), _processor(ds, flip=False)):
        with pytest.raises(FrameCacheError, match="other image settings"):
            TrainingSamples(ds, processor=other, frame_cache=out)
        with pytest.raises(FrameCacheError, match="other image settings"):
            open_frame_cache(out, ds, other)
    # other frame counts / stride / horizon share the cache (only the image path matters)
    TrainingSamples(ds, processor=_processor(ds, nc=1, nf=5, stride=1, horizon=6), frame_cache=out)
    # building with the new settings into the same folder rebuilds it
    small = _processor(ds, image_size=(16, 32))
    build_frame_cache(ds, small, out_dir=out, progress=False)
    assert json.loads((out / "index.json").read_text())["shape"] == [sum(LENGTHS), 3, 16, 32]
    cached, plain = TrainingSamples(ds, processor=small, frame_cache=out), TrainingSamples(ds, processor=small)
    _assert_same(cached[9], plain[9])
    # a cache rebuilt after it was opened is refused where it is mapped later (a worker)
    stale = TrainingSamples(ds, processor=small, frame_cache=out)
    build_frame_cache(ds, small, out_dir=out, progress=False, force=True)
    with pytest.raises(FrameCacheError, match="rebuilt or removed after it was opened"):
        stale[0]
    # the default location depends on the settings: two caches side by side
    a = build_frame_cache(ds, proc, progress=False)
    b = build_frame_cache(ds, small, progress=False)
    assert a != b and a.parent == b.parent


def test_cache_rejected_or_rebuilt_when_dataset_changes(tmp_path):
    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=(6, 5), size=(48, 64), cameras=(CAM0, CAM1))
    ds = LeRobotDataset(root)
    proc = _processor(ds, nc=1, nf=2, stride=1)
    out = build_frame_cache(ds, proc, out_dir=tmp_path / "c", progress=False)
    fp = dataset_fingerprint(root)
    # the same folder rewritten with other episodes (lengths, content): the cache is stale
    make_v30_dataset(root, episodes=2, length=(5, 6), size=(48, 64), cameras=(CAM0, CAM1), overwrite=True)
    assert dataset_fingerprint(root) != fp
    ds2 = LeRobotDataset(root)
    proc2 = _processor(ds2, nc=1, nf=2, stride=1)
    with pytest.raises(FrameCacheError, match="stale frame cache"):
        TrainingSamples(ds2, processor=proc2, frame_cache=out)
    build_frame_cache(ds2, proc2, out_dir=out, progress=False)  # rebuilt
    cached, plain = TrainingSamples(ds2, processor=proc2, frame_cache=out), TrainingSamples(ds2, processor=proc2)
    for i in range(len(plain)):
        _assert_same(cached[i], plain[i])
    # metadata edits count too (info.json content)
    info = root / "meta" / "info.json"
    meta = json.loads(info.read_text())
    meta["robot_type"] = "another_bot"
    info.write_text(json.dumps(meta, indent=4))
    with pytest.raises(FrameCacheError, match="stale"):
        open_frame_cache(out, LeRobotDataset(root), proc2)


def test_failed_build_leaves_no_complete_cache(v30_root, tmp_path, monkeypatch):
    ds = LeRobotDataset(v30_root)
    proc = _processor(ds)
    out = build_frame_cache(ds, proc, out_dir=tmp_path / "c", progress=False)
    calls = {"n": 0}
    real = Processor.images

    def failing(self, cams):
        calls["n"] += 1
        if calls["n"] == 2:  # second chunk: the frames file is half written
            raise RuntimeError("disk on fire")
        return real(self, cams)

    monkeypatch.setattr(Processor, "images", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_frame_cache(ds, proc, out_dir=out, progress=False, force=True)
    assert not (out / "index.json").exists()  # the old cache was invalidated before the rebuild started
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no temporary files left
    with pytest.raises(FrameCacheError, match="no complete frame cache"):
        TrainingSamples(ds, processor=proc, frame_cache=out)
    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        build_frame_cache(ds, proc, out_dir=fresh, progress=False)
    assert sorted(p.name for p in fresh.iterdir()) == []
    monkeypatch.undo()
    build_frame_cache(ds, proc, out_dir=out, progress=False)  # and a new build completes
    TrainingSamples(ds, processor=proc, frame_cache=out)
    # a truncated frames file is refused even with an index
    with open(out / "frames.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FrameCacheError, match="wrong size"):
        open_frame_cache(out)
    # never overwrites a folder that is not a cache
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FrameCacheError, match="not a frame cache"):
        build_frame_cache(ds, proc, out_dir=other, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# batch buffers (ring slots) and workers
# ---------------------------------------------------------------------------------------------


def _ids(batch):
    return list(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))


def _cached_and_plain(root, tmp_path, monkeypatch):
    """The dataset's training samples through a fresh frame cache, and by decoding. The ring-slot
    threshold is lowered so that these small batches travel through ring slots and by value."""
    monkeypatch.setattr(samples_mod, "_RING_MIN_BYTES", 1024)
    ds = LeRobotDataset(root)
    proc = _processor(ds)
    out = build_frame_cache(ds, proc, out_dir=tmp_path / "c", progress=False)
    return TrainingSamples(ds, processor=proc, frame_cache=out), TrainingSamples(ds, processor=proc)


def test_ring_slots_are_reused_and_released(v30_root, tmp_path, monkeypatch):
    cached, plain = _cached_and_plain(v30_root, tmp_path, monkeypatch)
    ring_count = len(samples_mod._RINGS)
    held = [collate(cached.__getitems__([i, i + 1, i + 2])) for i in range(0, 18, 2)]  # more than the slots
    ring = samples_mod._lease_of(held[0]["video"]).ring
    assert not ring.shared and ring in samples_mod._RINGS[ring_count:]
    assert int(ring.state.sum()) == ring.slots  # every slot leased, the rest fell back to plain memory
    for j, b in enumerate(held):
        _assert_same(b, collate([plain[i] for i in (2 * j, 2 * j + 1, 2 * j + 2)]))
    view = held[0]["video"][1]  # a view keeps its slot
    del held, b
    gc.collect()
    assert int(ring.state.sum()) == 1
    del view
    assert int(ring.state.sum()) == 0
    # per-sample items (the trainer's path) collate into a slot too, and give it back
    batch = collate([cached[i] for i in (4, 5, 6)])
    assert int(ring.state.sum()) == 1
    _assert_same(batch, collate([plain[i] for i in (4, 5, 6)]))
    del batch
    assert int(ring.state.sum()) == 0


def test_loader_workers_with_cache_match_decoding(v30_root, tmp_path, monkeypatch):
    cached, plain = _cached_and_plain(v30_root, tmp_path, monkeypatch)
    ref = list(make_loader(plain, 4, num_workers=0, seed=3).batches(14))  # 5 batches an epoch
    loader = make_loader(cached, 4, num_workers=2, seed=3)
    try:
        got = list(loader.batches(14))  # all held: more than a worker's ring slots
        for a, b in zip(got, ref):
            assert _ids(a) == _ids(b)
            _assert_same(a, b)
        pids = {w.pid for w in loader.loader._iterator._workers}
        rings = [r for k, r in samples_mod._REMOTE_RINGS.items() if k[0] in pids]
        assert len(rings) == 2
        assert rings and all(int(r.bytes[:samples_mod._RING_SLOTS].sum()) > 0 for r in rings)
        del got, a, b
        gc.collect()
        assert all(int(r.bytes[:samples_mod._RING_SLOTS].sum()) == 0 for r in rings)  # released
        more = list(loader.batches(6))  # slots reused by the workers
        for a, b in zip(more, list(make_loader(plain, 4, num_workers=0, seed=3, start_epoch=2,
                                            start_batch=4).batches(6))):
            _assert_same(a, b)
    finally:
        loader.close()


class _PerItem(torch.utils.data.Dataset):
    """A wrapper without __getitems__ (like the trainer's keyed samples): items one by one."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_per_item_workers_match(v30_root, tmp_path, monkeypatch):
    for samples in _cached_and_plain(v30_root, tmp_path, monkeypatch):
        ref = list(make_loader(samples, 4, num_workers=0, seed=5).batches(7))
        loader = make_loader(_PerItem(samples), 4, num_workers=2, seed=5)
        try:
            for a, b in zip(loader.batches(7), ref):
                _assert_same(a, b)
        finally:
            loader.close()


# ---------------------------------------------------------------------------------------------
# command-line functions
# ---------------------------------------------------------------------------------------------


def test_cache_frames_cli_and_bench(tmp_path, capsys):
    from dit4dit.cli import main
    from dit4dit.bench.data import bench_data
    from dit4dit.data.inspect import cache_frames

    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=(6, 5), size=(48, 64))  # fits metaworld_sawyer
    assert main(["cache-frames", str(root), "--schema", "metaworld_sawyer", "--image-size", "32", "48",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["frames"] == 11 and r["image_size"] == [32, 48] and r["cache"] == str(tmp_path / "c")
    assert r["bytes"] == 11 * 3 * 32 * 48 and r["cameras"] == [CAM0]
    again = cache_frames(root, "metaworld_sawyer", (32, 48), out_dir=tmp_path / "c", progress=False)
    assert again["fingerprint"] == r["fingerprint"]

    bench = bench_data(root, "metaworld_sawyer", image_size=(32, 48), batch_size=2, num_workers=0,
                       num_batches=2, num_future_frames=2, action_horizon=4, progress=False,
                       frame_cache=tmp_path / "c")
    json.dumps(bench)
    assert bench["frame_cache"] == str(tmp_path / "c") and bench["samples_per_s"] > 0
    assert bench["video_shape"] == [2, 3, 3, 32, 48]
    with pytest.raises(FrameCacheError, match="other image settings"):
        bench_data(root, "metaworld_sawyer", image_size=32, batch_size=2, num_workers=0, num_batches=1,
                   num_future_frames=2, action_horizon=4, progress=False, frame_cache=tmp_path / "c")
    assert main(["bench", "data", str(root), "--schema", "metaworld_sawyer", "--image-size", "32", "--batch", "2",
                 "--workers", "0", "--batches", "2", "--frame-cache", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["frame_cache"].startswith(str(root / ".dit4dit_cache" / "frames-"))
    assert r["cache_build_s"] is not None and r["cpu_ms_per_sample_main"] > 0
