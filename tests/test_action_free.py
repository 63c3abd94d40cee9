"""Action-free video: folders of video files and LeRobot datasets without actions, video-only
training, co-training, `--init` from another run, `schema=auto`, and every bad-input case."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lerobot_fixtures

from dit4dit.config import ConfigError, get_preset  # noqa: E402
from dit4dit.data.action_free import (ActionFreeSamples, VideoFolder, action_free_samples, clip_frames,  # noqa: E402
                                      open_action_free, resample)
from dit4dit.data.video import DatasetError  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import init_from  # noqa: E402
from dit4dit.train.trainer import train  # noqa: E402

SMALL = [
    "action.num_layers=2", "video.num_layers=2", "feature_blocks=1", "inputs.image_size=[32,32]",
    "video.num_attention_heads=2", "video.attention_head_dim=16", "video.adaln_lora_dim=16",
    "video.text_embed_dim=32", "video.crossattn_proj_in_channels=32", "video.encoder_hidden_states_channels=32",
    "text.width=32", "action.cross_attention_dim=32", "action.num_attention_heads=2",
    "action.attention_head_dim=16", "action.mlp_hidden=64", "inputs.fps=10.0",
    "train.batch_size=4", "train.steps=2", "train.warmup_steps=1", "train.num_workers=0",
    "train.log_every=1", "train.save_every=100", "train.tensorboard=false",
]


def tiny_cfg(*extra: str):
    return get_preset("tiny", SMALL + list(extra))


def write_video(path: Path, frames: int, fps: int = 10, size=(40, 48), shade: int = 0) -> Path:
    """A real video file written with PyAV; frame i has a bar i * 2 px wide (its content moves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}[path.suffix]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(frames):
            img = np.full((*size, 3), shade, np.uint8)
            img[:, : 2 * i % size[1]] = 220
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture()
def video_folder(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "a.mp4", 24, shade=10)
    write_video(root / "nested" / "b.mp4", 30, fps=20, shade=60)
    write_video(root / "c.mkv", 20, shade=110)
    (root / "instructions.json").write_text(json.dumps({"a.mp4": "push the block", "nested/b.mp4": "open the drawer"}))
    return root


def processor_for(cfg):
    from dit4dit.data.action_free import placeholder_processor
    from dit4dit.data.schema import get_schema

    return placeholder_processor(get_schema(cfg.schema), cfg.inputs, action_dim=cfg.action.action_dim,
                                 state_dim=cfg.action.state_dim, action_horizon=cfg.action.action_horizon)


# ------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------


def test_resample_picks_the_nearest_source_frame():
    assert resample(30, None, 20.0, 10.0).tolist() == list(range(0, 30, 2))  # 20 fps -> 10 fps: every other
    assert resample(10, None, 10.0, 10.0).tolist() == list(range(10))
    up = resample(5, None, 10.0, 20.0)  # 10 fps -> 20 fps: each frame twice (nearest; ties go left)
    assert up.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    times = np.array([0.0, 0.1, 0.25, 0.3])  # irregular timestamps from a container
    assert resample(4, times, 10.0, 10.0).tolist() == [0, 1, 2, 3]


def test_video_folder_episodes_instructions_and_rate(video_folder):
    cfg = tiny_cfg()
    src = VideoFolder(video_folder, rate=10.0, min_frames=clip_frames(cfg.inputs), default_instruction="do it")
    names = [Path(e.where).relative_to(video_folder).as_posix() for e in src.episodes]
    assert names == ["a.mp4", "c.mkv", "nested/b.mp4"]  # recursive, sorted
    assert [e.task for e in src.episodes] == ["push the block", "do it", "open the drawer"]
    # b.mp4 is 30 frames at 20 fps: 15 frames at the training rate of 10 fps, every other source frame
    b = src.episodes[2]
    assert b.length == 15 and b.frames.tolist() == list(range(0, 30, 2))
    frames = src.camera_frames("image", b, [0, 3])
    assert frames.shape == (2, 40, 48, 3)
    bar = lambda img: int((img[20, :, 0] > 150).sum())  # noqa: E731 - bar width = 2 * source frame index
    assert [bar(f) for f in frames] == [0, 12]


def test_action_free_samples_have_the_training_layout(video_folder):
    cfg = tiny_cfg()
    samples = action_free_samples([video_folder], processor_for(cfg), cfg.action.action_horizon, 10.0,
                                  default_instruction="do it")
    s = samples[5]
    assert s["video"].shape == (3, cfg.inputs.num_frames, 32, 32) and s["video"].dtype == torch.float32
    assert not s["state_mask"].any() and not s["action_mask"].any() and not s["actions"].any()
    assert s["instruction"] in ("push the block", "do it", "open the drawer")
    assert len(samples) == 24 + 20 + 15


def test_lerobot_dataset_without_actions(tmp_path):
    """A LeRobot dataset with only a camera (no state, no action columns) is action-free video."""
    from dit4dit.data.writer import LeRobotWriter

    root = tmp_path / "noact"
    feats = {"observation.images.front": {"dtype": "video", "shape": [40, 48, 3], "names": ["height", "width",
                                                                                           "channels"]}}
    with LeRobotWriter(root, fps=10, features=feats, robot_type="camera_only") as w:
        for ep in range(2):
            w.add_episode({"observation.images.front": np.full((12, 40, 48, 3), 40 * ep, np.uint8)}, "watch")
    cfg = tiny_cfg()
    # the dataset's one camera stands for the model's one camera although the names differ
    src = open_action_free(root, processor_for(cfg), 10.0)
    samples = ActionFreeSamples(src, processor_for(cfg), cfg.action.action_horizon)
    assert len(samples) == 24 and samples[13]["instruction"] == "watch"
    # start-up opens the folder once: schema, processor and samples share it
    from dit4dit.data import lerobot

    opened = []
    real_init = lerobot.LeRobotDataset.__init__

    def counting_init(self, root, *a, **kw):
        opened.append(Path(root))
        real_init(self, root, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lerobot.LeRobotDataset, "__init__", counting_init)
        run = train(tiny_cfg("mode=video_only"), root, tmp_path / "run", progress=False)
        assert run["step"] == 2 and np.isfinite(run["final_loss"])
        assert opened == [root]
        # schema=auto takes the dataset's cameras without a state or action to infer
        opened.clear()
        run = train(tiny_cfg("mode=video_only", "schema=auto"), root, tmp_path / "auto", progress=False)
        assert run["step"] == 2 and np.isfinite(run["final_loss"])
        assert opened == [root]
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert saved["inputs"]["cameras"] == ["observation.images.front"]


# ------------------------------------------------------------------------------------------
# bad input: each case names the file
# ------------------------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos")
    with pytest.raises(DatasetError, match="no video files"):
        VideoFolder(tmp_path / "empty", 10.0)


def test_unreadable_and_truncated_files_stop_the_run_unless_skipped(tmp_path, caplog):
    root = tmp_path / "v"
    write_video(root / "good.mp4", 20)
    (root / "garbage.mp4").write_bytes(b"\x00\x01 this is not a video" * 50)
    whole = write_video(tmp_path / "whole.mp4", 40).read_bytes()
    (root / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError) as e:
        VideoFolder(root, 10.0, default_instruction="x")
    assert "cut.mp4" in str(e.value) and "--skip-bad-videos" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="dit4dit.data"):
        src = VideoFolder(root, 10.0, default_instruction="x", skip_bad=True)
    assert [Path(e.where).name for e in src.episodes] == ["good.mp4"]
    assert sorted(Path(f).name for f, _ in src.skipped) == ["cut.mp4", "garbage.mp4"]
    assert "cut.mp4" in caplog.text and "garbage.mp4" in caplog.text


def test_video_shorter_than_one_clip(tmp_path):
    cfg = tiny_cfg()  # 1 + 2 future frames at stride 4: a clip spans 9 frames
    root = tmp_path / "v"
    write_video(root / "short.mp4", 5)
    with pytest.raises(DatasetError, match=r"short\.mp4: video shorter than one clip"):
        open_action_free(root, processor_for(cfg), 10.0, default_instruction="x")


def test_instructions_naming_missing_files_and_files_without_instruction(tmp_path):
    root = tmp_path / "v"
    write_video(root / "a.mp4", 12)
    (root / "instructions.json").write_text(json.dumps({"a.mp4": "push", "gone.mp4": "open"}))
    with pytest.raises(DatasetError, match="gone.mp4"):
        VideoFolder(root, 10.0)
    (root / "instructions.json").write_text(json.dumps({}))
    with pytest.raises(DatasetError, match=r"a\.mp4: no instruction.*--default-instruction"):
        VideoFolder(root, 10.0)
    (root / "instructions.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instructions.json: invalid JSON"):
        VideoFolder(root, 10.0)


def test_folder_for_a_two_camera_model_is_refused(video_folder):
    cfg = get_preset("libero")
    from dit4dit.data.action_free import placeholder_processor
    from dit4dit.data.schema import get_schema

    proc = placeholder_processor(get_schema(cfg.schema), cfg.inputs, action_dim=32, state_dim=64, action_horizon=8)
    with pytest.raises(DatasetError, match="one view per file"):
        open_action_free(video_folder, proc, 20.0)


# ------------------------------------------------------------------------------------------
# video-only training, co-training, --init
# ------------------------------------------------------------------------------------------


def test_video_only_run_on_a_folder_of_mp4_files(video_folder, tmp_path):
    cfg = tiny_cfg("mode=video_only", "train.default_instruction=do the task")
    run = train(cfg, video_folder, tmp_path / "vo", progress=False)
    assert run["step"] == 2 and np.isfinite(run["final_loss"]) and run["codec_fit"]["frames"] > 0
    rows = [json.loads(x) for x in (tmp_path / "vo" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_video" in r and "loss_action" not in r for r in rows if r["kind"] == "train")
    log = (tmp_path / "vo" / "train.log").read_text()
    assert "action-free video: video folder" in log and "59 samples" in log


def test_cotraining_batches_mix_labelled_and_action_free_rows(video_folder, tmp_path):
    from lerobot_fixtures import make_v30_dataset

    labelled = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32))
    seen = []

    def loss_fn(model, batch, generator):
        seen.append(batch)
        return model.loss(batch, generator)

    cfg = tiny_cfg(f"train.video_datasets={json.dumps([str(video_folder)])}", "train.video_data_fraction=0.5",
                   "train.default_instruction=do the task")
    run = train(cfg, labelled, tmp_path / "co", progress=False, loss_fn=loss_fn)
    assert run["step"] == 2
    for batch in seen:
        assert batch["has_actions"].tolist() == [True, True, False, False]
        free = [i for i, h in enumerate(batch["has_actions"]) if not h]
        assert not batch["action_mask"][free].any()
        assert {batch["instruction"][i] for i in free} <= {"push the block", "do the task", "open the drawer"}
    rows = [json.loads(x) for x in (tmp_path / "co" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_action" in r and "loss_video" in r for r in rows if r["kind"] == "train")
    # resume keeps both streams' positions
    cfg4 = tiny_cfg(*[f"train.video_datasets={json.dumps([str(video_folder)])}", "train.steps=3",
                      "train.default_instruction=do the task"])
    train(cfg4, labelled, tmp_path / "co", progress=False, resume=True)
    state = json.loads((tmp_path / "co" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["video_stream"]["batch_in_epoch"] == 3 and state["video_stream"]["num_samples"] == 59


def test_cotraining_config_checks():
    with pytest.raises(ConfigError, match="video_data_fraction"):
        tiny_cfg("train.video_datasets=[\"x\"]", "train.video_data_fraction=0.1")  # 0 rows of 4
    with pytest.raises(ConfigError, match="video loss only"):
        tiny_cfg("train.video_datasets=[\"x\"]", "mode=action_only")


def test_init_from_a_video_only_run(video_folder, tmp_path):
    """--init: the video DiT (and codec, text encoder) equal the video-only run's weights at the
    start of fine-tuning; tensors that differ in shape are reported and kept fresh."""
    from lerobot_fixtures import make_v30_dataset

    from dit4dit.models.dit4dit import DiT4DiT

    vo = tmp_path / "vo"
    train(tiny_cfg("mode=video_only", "train.default_instruction=do it"), video_folder, vo, progress=False)
    prior = ckpt.load_checkpoint(vo)
    prior_ema = {k: v.clone() for k, v in prior.ema_state().items()}

    cfg = tiny_cfg("action.mlp_hidden=48")
    model = DiT4DiT.from_config(cfg)
    report = init_from.init_weights_from(model, vo, config=cfg)
    for name, t in model.video_dit.state_dict().items():
        assert torch.equal(t, prior_ema[f"video_dit.{name}"]), name
    assert torch.equal(model.codec.components, prior_ema["codec.components"]) and model.codec.fitted
    assert report["loaded"]["video_dit"] == len(model.video_dit.state_dict())
    bad = {m["name"] for m in report["mismatched"]}
    assert "action_dit.state_encoder.linear_1.weight" in bad and all(n.startswith("action_dit.") for n in bad)
    assert report["codec"] and report["loaded_tensors"] > 0

    # through training: lr 0 for the video DiT, so its weights after one step are still the prior's
    labelled = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32))
    run = train(tiny_cfg("action.mlp_hidden=48", f"train.init_from={json.dumps(str(vo))}", "train.steps=1",
                         "train.lr_video=0.0", "train.lr_other=0.0"), labelled, tmp_path / "ft", progress=False)
    assert run["init"]["mismatched"] and run["codec_fit"] is None  # the codec came with --init
    after = ckpt.load_checkpoint(tmp_path / "ft").model_state()
    for name, t in after.items():
        if name.startswith(("video_dit.", "codec.", "text_encoder.")):
            assert torch.equal(t, prior_ema[name]), name
    log = (tmp_path / "ft" / "train.log").read_text()
    assert "tensors loaded" in log and "kept fresh: action_dit.state_encoder.linear_1.weight" in log
    assert json.loads((tmp_path / "ft" / "init.json").read_text())["checkpoint"].startswith(str(vo))


def test_init_with_another_text_encoder_is_an_error(video_folder, tmp_path):
    from dit4dit.models.dit4dit import DiT4DiT

    vo = tmp_path / "vo"
    train(tiny_cfg("mode=video_only", "train.default_instruction=do it", "train.steps=1"), video_folder, vo,
          progress=False)
    cfg = tiny_cfg("text.max_length=16")
    with pytest.raises(ckpt.CheckpointError, match="another text encoder.*text.max_length"):
        init_from.init_weights_from(DiT4DiT.from_config(cfg), vo, config=cfg)


# ------------------------------------------------------------------------------------------
# any dataset from the command line: schema=auto
# ------------------------------------------------------------------------------------------


def test_schema_auto_trains_on_a_dataset_the_preset_does_not_fit(tmp_path):
    from lerobot_fixtures import make_v30_dataset

    from dit4dit.data.schema import SchemaError

    root = make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32),
                            cameras=("observation.images.front",), state_dim=4, action_dim=4)
    with pytest.raises(SchemaError) as e:
        train(tiny_cfg(), root, tmp_path / "refused", progress=False)
    assert "schema=auto" in str(e.value) and "PATH.json" in str(e.value)
    run = train(tiny_cfg("schema=auto"), root, tmp_path / "auto", progress=False)
    assert run["step"] == 2
    proc = json.loads((tmp_path / "auto" / "processor.json").read_text())
    assert proc["schema"]["cameras"][0]["key"] == "observation.images.front"
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["inputs"]["cameras"] == \
        ["observation.images.front"]
    # a schema file works the same way
    from dit4dit.data.schema import infer_schema
    from dit4dit.data.lerobot import LeRobotDataset

    path = infer_schema(LeRobotDataset(root), name="front_arm").save(tmp_path / "front_arm.json")
    run = train(tiny_cfg(f"schema={path}", "inputs.cameras=[\"front\"]"), root, tmp_path / "file", progress=False)
    assert run["step"] == 2
