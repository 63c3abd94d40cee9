"""The data of a training run (dit4dit.data.training_data): one open of the dataset folder at
start-up, the video check still run before training, and the codec's two draws of training clips."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lerobot_fixtures

from lerobot_fixtures import make_v30_dataset  # noqa: E402

from dit4dit.config import get_preset  # noqa: E402
from dit4dit.data import lerobot  # noqa: E402
from dit4dit.data.training_data import (DatasetFolder, build_training_data, is_labelled_dataset,  # noqa: E402
                                        resolve_auto_cameras)
from dit4dit.data.video import DatasetError  # noqa: E402

SMALL = ["inputs.image_size=[32,32]", "inputs.fps=10.0", "train.batch_size=2"]


@pytest.fixture()
def front_dataset(tmp_path):
    """A dataset whose camera the tiny preset does not name: schema=auto has to pick it."""
    return make_v30_dataset(tmp_path / "ds", episodes=2, length=10, size=(32, 32),
                            cameras=("observation.images.front",), state_dim=4, action_dim=4)


@pytest.fixture()
def count_opens(monkeypatch):
    opened: list[Path] = []
    init = lerobot.LeRobotDataset.__init__

    def counted(self, root, *a, **k):
        opened.append(Path(root))
        init(self, root, *a, **k)

    monkeypatch.setattr(lerobot.LeRobotDataset, "__init__", counted)
    return opened


def test_schema_auto_start_up_opens_the_dataset_once(front_dataset, count_opens):
    cfg = get_preset("tiny", SMALL + ["schema=auto", "mode=video_only"])
    folder = DatasetFolder(front_dataset)
    cfg = resolve_auto_cameras(cfg, folder)
    assert cfg.inputs.cameras == ("observation.images.front",)
    assert is_labelled_dataset(cfg, folder)
    samples, processor = build_training_data(cfg, folder, progress=False)
    assert len(samples) > 0 and processor.schema.name == "auto"
    assert count_opens == [front_dataset]
    # a second build on the same folder reuses the dataset too
    build_training_data(cfg, folder, processor, progress=False)
    assert len(count_opens) == 1
    # a plain path opens its own
    build_training_data(cfg, front_dataset, processor, progress=False)
    assert len(count_opens) == 2


def test_the_video_files_are_still_checked_before_training(front_dataset):
    cfg = resolve_auto_cameras(get_preset("tiny", SMALL + ["schema=auto"]), DatasetFolder(front_dataset))
    videos = sorted((front_dataset / "videos").rglob("*.mp4"))
    assert videos
    videos[0].unlink()
    folder = DatasetFolder(front_dataset)
    # questions about the features need no video ...
    assert is_labelled_dataset(cfg, folder)
    # ... but the samples are refused, naming the missing file
    with pytest.raises(DatasetError, match="missing video file"):
        build_training_data(cfg, folder, progress=False)


def test_a_folder_that_is_not_a_lerobot_dataset(tmp_path):
    from dit4dit.data.schema import SchemaError

    cfg = get_preset("tiny", SMALL + ["schema=auto"])
    folder = DatasetFolder(tmp_path)
    assert not folder.is_lerobot and not is_labelled_dataset(cfg, folder)
    with pytest.raises(SchemaError, match="meta/info.json"):
        resolve_auto_cameras(cfg, folder)
    assert resolve_auto_cameras(cfg, None) is cfg  # samples given as a Dataset: nothing to resolve


def test_codec_draws_share_one_helper():
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.train.codec_fit import CHECK_DRAW, FIT_DRAW, codec_clips

    cfg = get_preset("tiny", SMALL)
    data = SyntheticSamples(cfg, num_samples=12)
    by_index = torch.stack([data[i]["video"] for i in range(12)])
    fit = codec_clips(data, 0, FIT_DRAW, 5, in_index_order=True)
    check = codec_clips(data, 0, CHECK_DRAW, 5, in_index_order=False)
    assert fit.shape == check.shape == (5, *by_index.shape[1:])

    def rows(clips):
        return [next(i for i in range(12) if torch.equal(c, by_index[i])) for c in clips]

    assert rows(fit) == sorted(rows(fit))  # read in index order
    assert rows(fit) != rows(check)  # two draws, not one
    assert rows(codec_clips(data, 0, FIT_DRAW, 5, in_index_order=True)) == rows(fit)  # the same on every rank
    assert len(codec_clips(data, 0, FIT_DRAW, 100, in_index_order=True)) == 12  # at most every sample
