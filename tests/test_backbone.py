"""Starting from a pretrained Cosmos-Predict2.5 folder: a tiny checkpoint in the official diffusers
layout (written by diffusers' and transformers' own `save_pretrained`) loaded through the
user-facing path — features and velocity against the diffusers forward, loss and backward, text
from the embedding cache alone, latent cache, checkpoint backbone hash, clear errors, and the
training-memory estimate."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import diffusers.models.transformers.transformer_cosmos as cosmos_mod  # noqa: E402
from backbone_fixtures import (TINY_SETS, TRAIN_OVERRIDES, frames, make_backbone, nearest_resize_shim,  # noqa: E402
                               tiny_cfg)
from lerobot_fixtures import DEFAULT_TASKS, make_v30_dataset  # noqa: E402

from dit4dit.cli import main  # noqa: E402
from dit4dit.config import ConfigError  # noqa: E402
from dit4dit.models.backbone import Backbone, BackboneError, codec_identity  # noqa: E402
from dit4dit.models.dit4dit import DiT4DiT  # noqa: E402
from dit4dit.train import checkpoint as ckpt  # noqa: E402
from dit4dit.train import tensor_files  # noqa: E402

GiB = 2**30


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny backbone, a dataset that fits it, and the text cache filled by `dit4dit embed-text`."""
    root = tmp_path_factory.mktemp("pretrained")
    bb = make_backbone(root / "bb", corpus=DEFAULT_TASKS)
    ds = make_v30_dataset(root / "ds", episodes=2, length=6, size=(32, 32))
    return {"root": root, "bb": bb, "ds": ds, "text_cache": root / "text"}


def _json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------
# Loading: the model over the backbone equals the diffusers model's own forward
# ------------------------------------------------------------------------------------------


def test_folder_validation_hash_and_config(env):
    bb = Backbone(env["bb"], require=("transformer", "vae", "scheduler", "text_encoder", "tokenizer"))
    cfg = tiny_cfg()
    bb.check_config(cfg)
    assert bb.video_config() == cfg.video  # the preset's video.* are the checkpoint's architecture
    d = bb.describe()
    assert d["pipeline"] == "Cosmos2_5_PredictBasePipeline" and d["missing"] == []
    assert len(d["hash"]) == 64 and set(d["components"]) == {"transformer", "vae"}
    assert Backbone(env["bb"]).content_hash == bb.content_hash  # stable


def test_features_and_velocity_equal_the_diffusers_forward(env, monkeypatch):
    from diffusers import CosmosTransformer3DModel

    if not hasattr(cosmos_mod, "transforms"):
        monkeypatch.setattr(cosmos_mod, "transforms", nearest_resize_shim(), raising=False)
    cfg = tiny_cfg()
    default = DiT4DiT.from_config(cfg, backbone=env["bb"])
    assert default.video_dtype == torch.bfloat16 and default.codec.dtype == torch.float32  # 2B defaults
    model = DiT4DiT.from_config(cfg, backbone=env["bb"], video_dtype=torch.float32).eval()
    ref = CosmosTransformer3DModel.from_pretrained(str(env["bb"] / "transformer"), torch_dtype=torch.float32).eval()

    h, w = cfg.inputs.image_size
    video = frames(2, cfg.inputs.num_frames, h, w)
    with torch.no_grad():
        latents = model.encode_video(video)
        text = model.encode_text(["pick up the red block", "open the top drawer"])
        assert latents.shape == (2, 16, 2, h // 8, w // 8) and text.shape == (2, 512, 96)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=g)
        x, ts, cm = model.video_dit.video2world_inputs(latents, noise, torch.tensor([0.3, 0.8]), 1)
        k = cfg.feature_blocks
        captured = {}
        hook = ref.transformer_blocks[k - 1].register_forward_hook(lambda m, a, o: captured.__setitem__("h", o))
        want_v = ref(x, ts, text, condition_mask=cm, padding_mask=torch.zeros(1, 1, h, w), return_dict=False)[0]
        hook.remove()
        feats = model.video_dit.features(x, ts, cm, text, k)
        vel = model.video_dit(x, ts, cm, text)
    assert feats.shape == (2, 2 * (h // 16) * (w // 16), 32)
    assert torch.equal(feats, captured["h"])  # hidden states after block k, bit for bit
    assert torch.equal(vel, want_v)  # velocity of the full forward


def test_loss_backward_and_text_from_the_cache_alone(env, capsys):
    cfg = tiny_cfg()
    ds, cache = env["ds"], env["text_cache"]
    r = _json(capsys, ["embed-text", "--backbone", str(env["bb"]), "--dataset", str(ds), "--cache", str(cache),
                       *TINY_SETS, "--json"])
    assert r["prompts"] == 2 and r["misses"] == 2 and r["hits"] == 0
    r = _json(capsys, ["embed-text", "--backbone", str(env["bb"]), "--dataset", str(ds), "--cache", str(cache),
                       "--prompt", "push the green button", *TINY_SETS, "--json"])
    assert r["prompts"] == 3 and r["hits"] == 2 and r["misses"] == 1

    model = DiT4DiT.from_config(cfg, backbone=env["bb"], video_dtype=torch.float32)
    h, w = cfg.inputs.image_size
    a = cfg.action
    batch = {"video": frames(2, cfg.inputs.num_frames, h, w), "state": torch.randn(2, a.state_dim),
             "state_mask": torch.ones(2, a.state_dim, dtype=torch.bool),
             "actions": torch.rand(2, a.action_horizon, a.action_dim) * 2 - 1,
             "action_mask": torch.ones(2, a.action_horizon, a.action_dim, dtype=torch.bool),
             "instruction": list(DEFAULT_TASKS[:2])}
    loss, logs = model.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(logs) == {"loss", "loss_action", "loss_video"}
    loss.backward()
    for part in (model.video_dit.transformer.transformer_blocks[0], model.video_dit.transformer.proj_out,
                 model.action_dit):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in model.codec.parameters())

    served = DiT4DiT.from_config(cfg, backbone=env["bb"], text_cache_dir=str(cache), load_text_encoder=False).eval()
    assert served.text_encoder is None
    with torch.no_grad():
        emb = served.encode_text(list(DEFAULT_TASKS))
        assert torch.equal(emb[:2], model.text_encoder(list(DEFAULT_TASKS[:2])).to(torch.bfloat16).float())
        out = served.predict_action(batch["video"][:, :, :1], batch["state"], list(DEFAULT_TASKS[:2]),
                                    generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, a.action_horizon, a.action_dim) and torch.isfinite(out).all()
    with pytest.raises(KeyError, match="embed-text"):
        served.encode_text(["a prompt nobody cached"])


def test_plain_qwen_folder_for_the_text_encoder(env, tmp_path, capsys):
    """A backbone without text_encoder/ + tokenizer/, the text encoder from a plain transformers
    Qwen2.5-VL folder (`text.path`): same embeddings, and embed-text fills the cache for it."""
    plain = tmp_path / "qwen"
    shutil.copytree(env["bb"] / "text_encoder", plain)
    for f in (env["bb"] / "tokenizer").iterdir():
        shutil.copy(f, plain / f.name)
    bb = _copy(env["bb"], tmp_path / "no_text")
    shutil.rmtree(bb / "text_encoder")
    shutil.rmtree(bb / "tokenizer")
    cfg = tiny_cfg(f"text.path={plain}")
    model = DiT4DiT.from_config(cfg, backbone=bb)
    ref = DiT4DiT.from_config(tiny_cfg(), backbone=env["bb"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(["open the top drawer"]), ref.encode_text(["open the top drawer"]))
    with pytest.raises(BackboneError, match="missing subfolders text_encoder/, tokenizer/"):
        DiT4DiT.from_config(tiny_cfg(), backbone=bb)
    r = _json(capsys, ["embed-text", "--backbone", str(bb), "--prompt", "open the top drawer", "--cache",
                       str(tmp_path / "cache"), *TINY_SETS, "--set", f"text.path={plain}", "--json"])
    assert r["misses"] == 1 and r["text_encoder"] == str(plain)
    served = DiT4DiT.from_config(cfg, backbone=bb, text_cache_dir=str(tmp_path / "cache"), load_text_encoder=False)
    assert served.text_encoder is None
    assert torch.equal(served.encode_text(["open the top drawer"]), ref.encode_text(["open the top drawer"]))


# ------------------------------------------------------------------------------------------
# Bad input: named clearly, before any weight loads
# ------------------------------------------------------------------------------------------


def test_bad_backbone_folders(env, tmp_path):
    cfg = tiny_cfg()
    no_vae = _copy(env["bb"], tmp_path / "no_vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(BackboneError, match=r"missing subfolder vae/"):
        DiT4DiT.from_config(cfg, backbone=no_vae)
    with pytest.raises(BackboneError, match=r"video\.num_layers: preset 3, backbone transformer 4"):
        DiT4DiT.from_config(tiny_cfg("video.num_layers=3", "feature_blocks=2"), backbone=env["bb"])
    bad = _copy(env["bb"], tmp_path / "corrupt")
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BackboneError, match=r"transformer/diffusion_pytorch_model\.safetensors: corrupted or "
                                            r"truncated"):
        DiT4DiT.from_config(cfg, backbone=bad)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[24:])
    with pytest.raises(BackboneError, match="unreadable header"):
        Backbone(bad)
    with pytest.raises(BackboneError, match="model_index.json missing"):
        Backbone(env["bb"] / "transformer")
    with pytest.raises(BackboneError, match="not found"):
        Backbone(tmp_path / "nowhere")
    assert main(["info", "--preset", "cosmos-2b", *TINY_SETS, "--backbone", str(no_vae), "--train"]) == 0
    assert main(["info", "--preset", "cosmos-2b", "--backbone", str(env["bb"])]) == 2  # preset != tiny folder


# ------------------------------------------------------------------------------------------
# Latent cache, training over the backbone, checkpoint hash
# ------------------------------------------------------------------------------------------


def test_latent_cache_gives_the_same_loss(env, capsys):
    from dit4dit.data.latent_cache import LatentCacheError, LatentSamples, cache_samples, open_latent_cache
    from dit4dit.data.samples import collate as default_collate

    cfg = tiny_cfg()
    r = _json(capsys, ["cache-latents", "--backbone", str(env["bb"]), "--dataset", str(env["ds"]), "--schema",
                       "metaworld_sawyer", *TINY_SETS, "--out", str(env["root"] / "latents"), "--batch-size", "2",
                       "--json"])
    assert r["samples"] == 12 and r["latent_shape"] == [16, 2, 4, 4]
    env["latents"] = r["cache"]
    samples = cache_samples(env["ds"], cfg)
    cache = open_latent_cache(r["cache"], samples, codec_identity(cfg, env["bb"]))
    with pytest.raises(LatentCacheError, match="another VAE"):
        open_latent_cache(r["cache"], samples, "wan_vae:" + "0" * 64)
    cached = LatentSamples(samples, cache)
    model = DiT4DiT.from_config(cfg, backbone=env["bb"], video_dtype=torch.float32)
    for idx in ([0, 1], [6, 11]):  # the clips of the cache's first batch; end-of-episode clips
        plain = default_collate([samples[i] for i in idx])
        with_latents = default_collate([cached[i] for i in idx])
        assert torch.equal(with_latents["latents"], model.encode_video(plain["video"]))
        a = model.loss(plain, torch.Generator().manual_seed(1))[0]
        b = model.loss(with_latents, torch.Generator().manual_seed(1))[0]
        assert torch.equal(a, b)


def test_checkpoint_records_the_backbone_hash(env, tmp_path, monkeypatch, capsys):
    from dit4dit.models.video_dit import VideoDiT
    from dit4dit.train.trainer import train

    if "latents" not in env:
        pytest.skip("needs the latent cache of test_latent_cache_gives_the_same_loss")
    cfg = tiny_cfg(*TRAIN_OVERRIDES)
    train_sets = [a for o in TRAIN_OVERRIDES for a in ("--set", o)]
    s = _json(capsys, ["train", "--preset", "cosmos-2b", *TINY_SETS, *train_sets,
                       "--dataset", str(env["ds"]), "--out", str(tmp_path / "run"), "--backbone", str(env["bb"]),
                       "--text-cache", str(env["text_cache"]), "--latent-cache", env["latents"], "--device", "cpu",
                       "--json"])
    folder = Path(s["checkpoint"])
    state = json.loads((folder / "trainer_state.json").read_text())
    want = Backbone(env["bb"]).content_hash
    assert state["backbone"]["hash"] == want and state["backbone"]["path"] == str(env["bb"].resolve())
    assert tensor_files.safetensors_metadata(folder / "model.safetensors")["backbone_hash"] == want
    weights = tensor_files.read_safetensors(folder / "model.safetensors")
    assert not any(k.startswith(("codec.", "text_encoder.")) for k in weights)  # frozen parts are not saved

    def no_video_read(*a, **k):  # the checkpoint holds every video-DiT weight: the backbone's are not read
        raise AssertionError("VideoDiT.from_pretrained called while loading a checkpoint")

    monkeypatch.setattr(VideoDiT, "from_pretrained", no_video_read)
    model, processor, _ = ckpt.load_policy(folder)  # recorded backbone and text cache
    assert model.text_encoder is None and model.video_dtype == torch.bfloat16
    saved = tensor_files.read_safetensors(folder / "model.safetensors")
    assert all(torch.equal(v, saved[f"video_dit.{k}"].to(v.dtype)) for k, v in model.video_dit.state_dict().items())

    other = _copy(env["bb"], tmp_path / "other")
    make_backbone(tmp_path / "seed1", seed=1, text_encoder=False)
    shutil.rmtree(other / "vae")
    shutil.copytree(tmp_path / "seed1" / "vae", other / "vae")  # same architecture, other weights
    with pytest.raises(ckpt.CheckpointError, match=r"content hash .* its vae/ differ"):
        ckpt.load_policy(folder, backbone=str(other))
    with pytest.raises(ckpt.CheckpointError, match="content hash"):
        train(cfg, env["ds"], tmp_path / "run", backbone=str(other), resume=True, progress=False)
    moved = tmp_path / "run_moved"
    shutil.copytree(tmp_path / "run", moved)
    st = json.loads((moved / "checkpoints" / folder.name / "trainer_state.json").read_text())
    st["backbone"]["path"] = str(tmp_path / "gone")
    (moved / "checkpoints" / folder.name / "trainer_state.json").write_text(json.dumps(st))
    with pytest.raises(ckpt.CheckpointError, match="pass backbone=PATH"):
        ckpt.load_policy(moved)
    model2, _, _ = ckpt.load_policy(moved, backbone=str(env["bb"]), load_text_encoder=True)
    assert model2.text_encoder is not None


# ------------------------------------------------------------------------------------------
# Memory estimate
# ------------------------------------------------------------------------------------------


def test_memory_estimate_for_cosmos_2b(capsys, monkeypatch):
    from dit4dit.config import get_preset
    from dit4dit.train.memory import InsufficientMemoryError, check_training_memory, estimate_training_memory

    cfg = get_preset("cosmos-2b")
    r = _json(capsys, ["info", "--preset", "cosmos-2b", "--train", "--batch", "8", "--json"])
    est = r["memory"]
    p = est["params"]
    assert 2.0e9 < p["video_dit"] < 2.1e9 and p["text_encoder"] == 0
    by = est["bytes"]
    assert by["weights"] == 4 * p["trainable"] and by["optimizer"] == 8 * p["with_gradient"]
    assert by["gradients"] == 4 * p["with_gradient"] and by["text_encoder"] == 0 and by["ema"] == 0
    assert 15 * GiB < by["weights"] + by["gradients"] < 20 * GiB
    assert by["activations_blocks_no_checkpointing"] > 20 * by["activations_blocks_checkpointing"]
    tot = est["total_bytes"]
    assert 30 * GiB < tot["checkpointing"] < 60 * GiB < 80 * GiB < tot["no_checkpointing"]
    assert est["fits"] == {"checkpointing": True, "no_checkpointing": False, "config": True}
    loaded = estimate_training_memory(cfg, 8, text_encoder_loaded=True)
    assert 12 * GiB < loaded["bytes"]["text_encoder"] < 15 * GiB  # Cosmos-Reason1-7B language model, bf16
    small = estimate_training_memory(cfg, 8, gpu_memory_gb=40, text_encoder_loaded=False)
    assert small["fits"]["checkpointing"] is False
    assert estimate_training_memory(cfg, 2, text_encoder_loaded=False)["total_bytes"]["checkpointing"] < \
        tot["checkpointing"]

    assert check_training_memory(cfg, "cpu") is None  # only checked on a GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * GiB, 24 * GiB))
    with pytest.raises(InsufficientMemoryError, match=r"not enough GPU memory .* estimated .*checked before "
                                                      r"loading") as e:
        check_training_memory(cfg, "cuda:0", text_encoder_loaded=False)
    assert "AdamW" in str(e.value) and isinstance(e.value, ConfigError)
    monkeypatch.setenv("DIT4DIT_SKIP_MEMORY_CHECK", "1")
    assert check_training_memory(cfg, "cuda:0") is None


def test_memory_estimate_for_the_tiny_codecs_and_the_static_baseline():
    """The per-frame codecs (pixel, pca) give one latent frame per frame; the static-image
    baseline trains its whole encoder on the conditioning frames only."""
    from dit4dit.config import get_preset
    from dit4dit.models.dit4dit import parameter_counts
    from dit4dit.train.memory import estimate_training_memory

    cfg = get_preset("tiny")
    assert cfg.codec.kind == "pca"
    est = estimate_training_memory(cfg)
    per_frame = (cfg.inputs.image_size[0] // cfg.codec.pixel_factor // cfg.video.patch_size[1]) * \
        (cfg.inputs.image_size[1] // cfg.codec.pixel_factor // cfg.video.patch_size[2])
    assert est["tokens_per_sample"] == cfg.inputs.num_frames * per_frame
    static = get_preset("tiny", ["encoder=static_image", "mode=action_only"])
    s = estimate_training_memory(static)
    assert s["tokens_per_sample"] == static.inputs.num_cond_frames * per_frame
    assert s["params"]["video_dit"] == parameter_counts(static)["image_encoder"] == \
        s["params"]["with_gradient"] - s["params"]["action_dit"] - parameter_counts(static)["text_encoder_trainable"]
    assert s["rows"]["video_loss"] == 0 and s["bytes"]["activations_blocks_no_checkpointing"] > 0


def test_memory_formula_matches_what_autograd_saves(env):
    """The activation formula against the bytes autograd really saves for one training step
    (bf16 autocast on CPU; weight casts excluded), on the tiny backbone."""
    from dit4dit.train.memory import estimate_training_memory
    from dit4dit.bench.synthetic import SyntheticSamples
    from dit4dit.data.samples import collate as default_collate

    cfg = tiny_cfg("inputs.image_size=[64,64]")
    model = DiT4DiT.from_config(cfg, backbone=env["bb"], video_dtype=torch.float32).train()
    batch = default_collate([SyntheticSamples(cfg, num_samples=2)[i] for i in range(2)])
    with torch.no_grad():
        batch["latents"] = model.encode_video(batch["video"])
        text = model.encode_text(batch["instruction"])
    model._encode_text = lambda prompts: text[: len(prompts)]
    weights = {tuple(p.shape) for p in model.parameters()}
    saved = {}

    def pack(t):
        if not (t.ndim <= 2 and (tuple(t.shape) in weights or tuple(t.shape)[::-1] in weights)):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(batch, torch.Generator().manual_seed(0))
    by = estimate_training_memory(cfg, 2, backbone=env["bb"], text_encoder_loaded=False)["bytes"]
    est = by["activations_embedding"] + by["activations_blocks_no_checkpointing"] + by["activations_action_dit"]
    assert 0.8 < est / sum(saved.values()) < 1.2
