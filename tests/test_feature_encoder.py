"""The feature-encoder interface, the rule of which losses run (`cfg.losses()`), the model's
constructor arguments and the one weight-file discovery."""

import json

import pytest
import torch

from dit4dit.config import get_preset
from dit4dit.models.dit4dit import DiT4DiT
from dit4dit.models.features import FeatureEncoder, StaticImageFeatures, VideoDiTFeatures
from dit4dit.models.video_dit import VideoDiT
from dit4dit.models.weights import weight_files

SMALL = ["video.num_layers=2", "feature_blocks=1", "action.num_layers=2", "inputs.image_size=[32,32]",
         "action.dropout=0.0", "repeated_diffusion_steps=2"]


def cfg_of(*extra):
    return get_preset("tiny", SMALL + list(extra))


def make_batch(cfg, b=4):
    g = torch.Generator().manual_seed(0)
    h, w = cfg.inputs.image_size
    a = cfg.action
    return {"video": torch.rand(b, 3, cfg.inputs.num_frames, h, w, generator=g) * 2 - 1,
            "state": torch.rand(b, a.state_dim, generator=g), "state_mask": torch.ones(b, a.state_dim, dtype=torch.bool),
            "actions": torch.rand(b, a.action_horizon, a.action_dim, generator=g) * 2 - 1,
            "action_mask": torch.ones(b, a.action_horizon, a.action_dim, dtype=torch.bool),
            "instruction": ["push the button", "open the drawer"] * (b // 2)}


@pytest.mark.parametrize("extra, video, action, image", [
    ((), True, True, False),
    (("lambda_video=0",), False, True, False),
    (("mode=action_only",), False, True, False),
    (("mode=video_only",), True, False, False),
    (("encoder=static_image",), False, True, False),  # joint without a video model: the action loss alone
    (("encoder=static_image", "mode=action_only"), False, True, False),
    (("encoder=static_image", "mode=image_only"), False, False, True),
])
def test_losses_rule_and_the_model_logs_agree(extra, video, action, image):
    cfg = cfg_of(*extra)
    which = cfg.losses()
    assert (which.video, which.action, which.image) == (video, action, image)
    assert which.generative == (video or image)
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    _, logs = model.loss(make_batch(cfg), torch.Generator().manual_seed(0))
    assert set(logs) == set(which.names) | {"loss"}


def test_losses_rule_checks_the_rows():
    joint = cfg_of().losses()
    joint.check_rows(2, 2)
    with pytest.raises(ValueError, match="every row of this batch is action-free"):
        joint.check_rows(0, 2)
    with pytest.raises(ValueError, match="2 rows of action-free video.*lambda_video=0"):
        cfg_of("lambda_video=0").losses().check_rows(2, 2)
    with pytest.raises(ValueError, match="action-free video.*encoder=static_image"):
        cfg_of("encoder=static_image").losses().check_rows(2, 1)
    cfg_of("mode=video_only").losses().check_rows(0, 3)


def test_memory_estimate_counts_the_rows_the_loss_runs():
    from dit4dit.train.memory import estimate_training_memory

    rows = lambda *extra: estimate_training_memory(cfg_of(*extra), 4)["rows"]  # noqa: E731
    assert rows() == {"video_loss": 4, "features": 4, "action": 8, "shared_pass": True}
    # the static-image baseline has no video loss, whatever lambda_video says
    assert rows("encoder=static_image")["video_loss"] == 0
    # its pretraining denoises every row's current frame and runs no action DiT
    assert rows("encoder=static_image", "mode=image_only") == {"video_loss": 4, "features": 0, "action": 0,
                                                               "shared_pass": False}


def test_both_encoders_implement_the_interface():
    torch.manual_seed(0)
    video = DiT4DiT.from_config(cfg_of(), random_weights=True).eval()
    static = DiT4DiT.from_config(cfg_of("encoder=static_image"), random_weights=True).eval()
    assert isinstance(video.feature_encoder, VideoDiTFeatures) and video.feature_encoder.reads_future
    assert isinstance(static.feature_encoder, StaticImageFeatures) and not static.feature_encoder.reads_future
    for model in (video, static):
        enc = model.feature_encoder
        assert isinstance(enc, FeatureEncoder) and enc.module is model.trainable_modules()[
            "video_dit" if model.video_dit is not None else "image_encoder"]
        cond_video = torch.rand(2, 3, 1, 32, 32) * 2 - 1
        text = model.encode_text(["push the button", "open the drawer"])
        cond = model.encode_video(cond_video)
        tau = torch.full((2,), model.cfg.tau_f)
        with torch.no_grad():
            direct = enc.features(cond, text, tau, torch.Generator().manual_seed(1))
        assert torch.equal(direct, model.extract_features(cond_video, text, torch.Generator().manual_seed(1)))
        assert direct.shape[0] == 2 and direct.shape[2] == model.cfg.video.width
    # the static encoder has no flow time and draws nothing from the generator
    g = torch.Generator().manual_seed(7)
    assert static.feature_encoder.sample_tau_f(2, g, torch.device("cpu")) is None
    with torch.no_grad():
        static.feature_encoder.features(cond, text, None, g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_constructor_arguments_instead_of_assignments():
    cfg = cfg_of("codec.pca_channels=48", "video.in_channels=49", "video.out_channels=48",
                 "codec.generated_channels=8", "gradient_checkpointing=true")
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True)
    assert model.video_dit.generated_channels == 8 and model.video_dit.gradient_checkpointing
    assert model.text_identity is None and model.backbone is None
    with pytest.raises(ValueError, match="generated_channels=8"):
        DiT4DiT(cfg, VideoDiT(cfg.video), model.action_dit, model.codec, model.text_encoder)
    # a fixed embedding served for a prompt without encoding it (forgotten when training starts)
    model.eval()
    emb = torch.randn(cfg.text.max_length, cfg.video.text_input_dim)
    model.remember_text_embedding("a prompt the encoder never sees", emb)
    with torch.no_grad():
        assert torch.equal(model.encode_text(["a prompt the encoder never sees"])[0], emb)
    model.train().eval()
    with torch.no_grad():
        assert not torch.equal(model.encode_text(["a prompt the encoder never sees"])[0], emb)


def test_weight_files(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "b.safetensors").write_bytes(b"x")
    assert [p.name for p in weight_files(single)] == ["b.safetensors"]
    (single / "a.safetensors").write_bytes(b"x")  # two files, nothing says which: an error, not both
    with pytest.raises(FileNotFoundError, match="2 safetensors files .*a.safetensors, b.safetensors.* no shard index"):
        weight_files(single)
    variants = tmp_path / "variants"  # the official name beside a variant: the official file only
    variants.mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (variants / name).write_bytes(b"x")
    assert [p.name for p in weight_files(variants)] == ["diffusion_pytorch_model.safetensors"]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w1": "model-2.safetensors", "w0": "model-1.safetensors"}}))
    (sharded / "model-1.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json: weight shards missing: model-2"):
        weight_files(sharded)
    (sharded / "model-2.safetensors").write_bytes(b"x")
    assert [p.name for p in weight_files(sharded)] == [index.name, "model-1.safetensors", "model-2.safetensors"]

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no safetensors weights .*pytorch_model.bin"):
        weight_files(pickles, error=ValueError)
