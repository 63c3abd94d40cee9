"""Latent codecs: pixel space-to-depth, the data-fitted PCA codec and the frozen Wan2.1 VAE (tiny
checkpoint built here)."""

import json

import pytest
import torch

from dit4dit.config import CodecConfig
from dit4dit.models.codecs import LatentCodec, PCACodec, PixelCodec, WanVAECodec, build_codec

# Non-trivial statistics: std far from 1 so that dividing and multiplying by it differ clearly.
MEAN = [0.1 * i - 0.7 for i in range(16)]
STD = [0.4 + 0.3 * i for i in range(16)]


def _frames(b=2, t=5, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------
# Pixel codec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_pixel_round_trip_exact(factor):
    codec = PixelCodec(factor)
    x = _frames(b=2, t=3, h=16, w=24)
    z = codec.encode(x)
    assert z.shape == (2, 3 * factor * factor, 3, 16 // factor, 24 // factor)
    assert codec.latent_channels == 3 * factor * factor
    assert codec.spatial_factor == factor and codec.temporal_factor == 1
    assert torch.equal(codec.decode(z), x)
    assert codec.latent_shape(3, 16, 24) == tuple(z.shape[1:])
    assert sum(p.numel() for p in codec.parameters()) == 0


def test_pixel_channel_layout():
    f = 4
    codec = PixelCodec(f)
    x = _frames(b=1, t=2, h=8, w=12)
    z = codec.encode(x)
    # channel c*f*f + dy*f + dx of cell (i, j) holds pixel (f*i + dy, f*j + dx) of colour c
    c, dy, dx, t, i, j = 2, 1, 3, 1, 1, 2
    assert z[0, c * f * f + dy * f + dx, t, i, j] == x[0, c, t, f * i + dy, f * j + dx]


def test_pixel_validation():
    codec = PixelCodec(4)
    assert codec.num_latent_frames(1) == 1 and codec.num_latent_frames(7) == 7
    with pytest.raises(ValueError, match="num_frames"):
        codec.num_latent_frames(0)
    with pytest.raises(ValueError, match="multiple"):
        codec.encode(torch.zeros(1, 3, 2, 10, 12))
    with pytest.raises(ValueError, match="colour channels"):
        codec.encode(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        codec.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 5, 1, 2, 2))
    with pytest.raises(ValueError):
        PixelCodec(0)


def test_build_codec_pixel():
    codec = build_codec(CodecConfig(kind="pixel", pixel_factor=4))
    assert isinstance(codec, PixelCodec) and isinstance(codec, LatentCodec) and codec.latent_channels == 48


# --------------------------------------------------------------------------------------------
# PCA codec
# --------------------------------------------------------------------------------------------


def _low_rank_frames(rank, factor=4, b=6, t=2, h=16, w=16, seed=0):
    """Frames whose f x f patches lie in a `rank`-dim affine subspace with distinct variances."""
    g = torch.Generator().manual_seed(seed)
    d = 3 * factor * factor
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    n = b * t * (h // factor) * (w // factor)
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.linspace(0.3, 0.05, rank, dtype=torch.float64)
    offset = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    patches = (coef @ basis.T + offset).float().reshape(b, t, h // factor, w // factor, d).movedim(-1, 1)
    return PixelCodec(factor).decode(patches), basis.T.float()


def test_pca_codec_recovers_a_low_rank_subspace():
    frames, basis = _low_rank_frames(rank=5)
    codec = PCACodec(factor=4, channels=5)
    assert not codec.fitted
    explained = codec.fit(frames)
    assert codec.fitted and explained == pytest.approx(1.0, abs=1e-5)
    z = codec.encode(frames)
    assert z.shape == (6, 5, 2, 4, 4)
    # Normalised latents: zero mean and unit variance per channel on the fitting data.
    flat = z.movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(flat.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(5), atol=1e-3, rtol=0)
    # Orthonormal components spanning the data's subspace; decode inverts encode there.
    torch.testing.assert_close(codec.components @ codec.components.T, torch.eye(5), atol=1e-5, rtol=0)
    proj = basis @ codec.components.T  # (5, 5): an orthogonal matrix when the spans agree
    torch.testing.assert_close(proj @ proj.T, torch.eye(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(codec.decode(z), frames, atol=1e-4, rtol=0)
    # Components come sorted by variance.
    assert torch.all(codec.scale[:-1] >= codec.scale[1:])


def test_pca_codec_keeps_the_top_components_only():
    frames, _ = _low_rank_frames(rank=6)
    codec = PCACodec(factor=4, channels=2)
    explained = codec.fit(frames)
    assert 0.2 < explained < 0.999
    # The reconstruction error is the variance left out: 1 - explained of the centred patches.
    x = PixelCodec(4).encode(frames)
    rec = PixelCodec(4).encode(codec.decode(codec.encode(frames)))
    centred = x - x.mean(dim=(0, 2, 3, 4), keepdim=True)
    left = ((x - rec) ** 2).sum() / (centred ** 2).sum()
    assert float(left) == pytest.approx(1 - explained, abs=1e-3)


def test_pca_codec_full_rank_is_an_exact_round_trip_and_fit_is_deterministic():
    x = _frames(b=3, t=2, h=8, w=8)
    a, b = PCACodec(factor=2, channels=12), PCACodec(factor=2, channels=12)
    a.fit(x)
    b.fit(x.clone())
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    torch.testing.assert_close(a.decode(a.encode(x)), x, atol=1e-4, rtol=0)


def test_pca_codec_refuses_before_fitting_and_bad_channels():
    codec = PCACodec(factor=4, channels=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        codec.encode(_frames(h=16, w=16))
    with pytest.raises(RuntimeError, match="not fitted"):
        codec.decode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        PCACodec(factor=2, channels=13)
    with pytest.raises(ValueError, match="channels"):
        PCACodec(factor=2, channels=0)
    codec.randomize(seed=1)
    z = codec.encode(_frames(h=16, w=16))
    assert z.shape == (2, 3, 5, 4, 4)
    with pytest.raises(ValueError, match=r"expects latents \(B, 3"):
        codec.decode(torch.zeros(1, 4, 1, 4, 4))


def test_build_pca_codec_and_config_checks():
    from dit4dit.config import ConfigError, get_preset

    codec = build_codec(CodecConfig(kind="pca", pixel_factor=8, pca_channels=16))
    assert isinstance(codec, PCACodec) and codec.latent_channels == 16 and not codec.fitted
    assert codec.learns_from_data  # so training fits it and checkpoints save it
    pixel = build_codec(CodecConfig(kind="pixel", pixel_factor=8))
    assert not pixel.learns_from_data and pixel.fitted
    with pytest.raises(TypeError, match="nothing to fit"):
        pixel.fit(_frames(h=16, w=16))
    assert build_codec(CodecConfig(kind="pca", pixel_factor=8, pca_channels=16), random_weights=True).fitted
    cfg = get_preset("tiny")
    assert cfg.codec.kind == "pca" and cfg.video.in_channels == cfg.codec.pca_channels + 1
    with pytest.raises(ConfigError, match="in_channels must be 17"):
        get_preset("tiny", ["codec.pca_channels=16"])
    with pytest.raises(ConfigError, match="pca_channels=200"):
        get_preset("tiny", ["codec.pca_channels=200", "video.in_channels=201", "video.out_channels=200"])


# --------------------------------------------------------------------------------------------
# Wan VAE
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    from backbone_fixtures import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**{**TINY_VAE, "latents_mean": MEAN, "latents_std": STD})
    root = tmp_path_factory.mktemp("cosmos")
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def codec(vae_root):
    return WanVAECodec.from_pretrained(vae_root)


def test_wan_loads_frozen(codec):
    assert codec.latent_channels == 16
    assert codec.spatial_factor == 8 and codec.temporal_factor == 4
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training
    codec.eval()
    assert codec.latents_mean.shape == (1, 16, 1, 1, 1) and codec.latents_std.shape == (1, 16, 1, 1, 1)
    assert codec.latents_std.flatten().tolist() == pytest.approx(STD)  # the TRUE std, not 1/std


def test_wan_num_latent_frames(codec):
    assert [codec.num_latent_frames(t) for t in (1, 5, 9, 93)] == [1, 2, 3, 24]
    for bad in (0, 2, 4, 6, 8):
        with pytest.raises(ValueError):
            codec.num_latent_frames(bad)
    assert codec.num_frames(2) == 5
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        codec.encode(_frames(t=4))


def test_wan_normalisation_divides_by_std(codec):
    x = _frames(b=2, t=5)
    z = codec.encode(x)
    assert z.shape == (2, 16, 2, 2, 3) and z.dtype == torch.float32
    with torch.no_grad():
        mode = codec.vae.encode(x).latent_dist.mode()
    mean = torch.tensor(MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z, (mode - mean) / std, rtol=1e-5, atol=1e-6)
    # the trap: dividing by the pipeline's `latents_std` attribute (= 1/std) multiplies by std
    wrong = (mode - mean) * std
    assert not torch.allclose(z, wrong, atol=1e-2)
    # deterministic (posterior mode, no sampling)
    assert torch.equal(codec.encode(x), z)


def test_wan_decode(codec):
    x = _frames(b=2, t=5)
    z = codec.encode(x)
    y = codec.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1
    mean = torch.tensor(MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref = codec.vae.decode(z * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(y, ref)
    # one latent frame decodes to one frame
    assert codec.decode(z[:, :, :1]).shape == (2, 3, 1, 16, 24)


def test_wan_causal_first_frame(codec):
    x = _frames(b=2, t=5, seed=3)
    z_all = codec.encode(x)
    z_first = codec.encode(x[:, :, :1])
    assert z_first.shape == (2, 16, 1, 2, 3)
    torch.testing.assert_close(z_first, z_all[:, :, :1], rtol=1e-5, atol=1e-5)
    # and the later latent frame does depend on the later frames
    x2 = x.clone()
    x2[:, :, 1:] = -x2[:, :, 1:]
    z2 = codec.encode(x2)
    torch.testing.assert_close(z2[:, :, :1], z_all[:, :, :1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z2[:, :, 1:], z_all[:, :, 1:])


def test_wan_no_grad(codec):
    x = _frames(b=1, t=1).requires_grad_(True)
    z = codec.encode(x)
    assert not z.requires_grad
    assert not codec.decode(z).requires_grad


def test_wan_folder_layouts(vae_root, codec):
    direct = WanVAECodec.from_pretrained(vae_root / "vae", subfolder=None)
    also = WanVAECodec.from_pretrained(vae_root / "vae")  # the VAE folder itself, default subfolder absent
    x = _frames(b=1, t=1)
    assert torch.equal(direct.encode(x), codec.encode(x))
    assert torch.equal(also.encode(x), codec.encode(x))
    built = build_codec(CodecConfig(kind="wan_vae"), backbone=str(vae_root))
    assert isinstance(built, WanVAECodec)
    built2 = build_codec(CodecConfig(kind="wan_vae", path=str(vae_root)))
    assert torch.equal(built2.encode(x), codec.encode(x))


def test_wan_errors(tmp_path, vae_root):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        WanVAECodec.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*vae"):
        WanVAECodec.from_pretrained(empty)
    no_weights = tmp_path / "noweights" / "vae"
    no_weights.mkdir(parents=True)
    (no_weights / "config.json").write_text((vae_root / "vae" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="weight"):
        WanVAECodec.from_pretrained(no_weights.parent)
    wrong = tmp_path / "wrong" / "vae"
    wrong.mkdir(parents=True)
    (wrong / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        WanVAECodec.from_pretrained(wrong.parent)
    with pytest.raises(ValueError, match="codec.path"):
        build_codec(CodecConfig(kind="wan_vae"))
