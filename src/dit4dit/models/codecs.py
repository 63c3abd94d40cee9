"""Latent codecs: map video frames in [-1, 1] to the (normalised) latent space the video DiT sees.

Three codecs share one interface (`LatentCodec`):

- `PixelCodec(factor)`: parameter-free space-to-depth. A frame (3, H, W) becomes
  (3 * f * f, H / f, W / f); `decode` is its exact inverse.
- `PCACodec(factor, channels)`: space-to-depth followed by a projection onto the `channels`
  principal components of the training frames' f x f patches, each component scaled to unit
  variance. It compresses like the Wan VAE (16 channels per 8 x 8 patch by default), so a small
  video DiT has room in its width for a whole token; without compression a 128-wide tiny model
  reading 768 raw values a token cannot represent the i.i.d. noise in the velocity target and its
  video loss stalls near 1 - 128/768. The basis is fitted on the dataset when training starts
  (`fit`) and saved with the checkpoint (`codec.*` in model.safetensors). Used by the tiny preset.
- `WanVAECodec`: the frozen Wan2.1 VAE (`diffusers.AutoencoderKLWan`) used by Cosmos-Predict2.5.
  Causal in time: T = 1 + 4k frames give 1 + k latent frames, the first frame is encoded on its
  own, so the conditioning frame alone can be encoded without padding the clip.

Normalisation (docs/design.md, section 3): latents are `(z - latents_mean) / latents_std`, with the *true*
standard deviation from the VAE config. The diffusers Cosmos pipeline stores `1 / std` in an
attribute that is also called `latents_std` and multiplies by it; code that divides by that
attribute multiplies by std instead. We never read the pipeline attribute: the statistics come
straight from `vae.config`.

Tensor layout everywhere: (B, C, T, H, W).
"""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from torch import Tensor, nn

from dit4dit.config import CodecConfig

from ..jsonio import read_json
from .weights import weight_files

__all__ = ["LatentCodec", "PixelCodec", "PCACodec", "WanVAECodec", "build_codec"]


class LatentCodec(nn.Module):
    """Base class of frozen / parameter-free codecs.

    Subclasses set `latent_channels`, `spatial_factor` (pixels per latent cell along H and W) and
    `temporal_factor` (1 for per-frame codecs, 4 for the causal Wan VAE). A codec that
    `learns_from_data` (the PCA codec) is fitted on the training frames when training starts
    (`fit`), is saved in checkpoints, and reports whether it is `fitted`.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    learns_from_data: bool = False

    @property
    def fitted(self) -> bool:
        """False only for a codec that learns from the data and has not been fitted yet."""
        return True

    def fit(self, frames: Tensor) -> float:
        """Fit a codec that learns from the data on frames (B, 3, T, H, W) in [-1, 1]; returns the
        fraction of the variance it keeps."""
        raise TypeError(f"{type(self).__name__} does not learn from the data; there is nothing to fit")

    # ---- shapes -----------------------------------------------------------------------------

    def num_latent_frames(self, num_frames: int) -> int:
        """Number of latent frames for a clip of `num_frames` frames (ValueError if invalid)."""
        try:
            if isinstance(num_frames, bool):
                raise TypeError
            num_frames = operator.index(num_frames)
        except TypeError:
            raise ValueError(f"{type(self).__name__}: num_frames must be an int, got {num_frames!r}") from None
        tf = self.temporal_factor
        if num_frames < 1:
            raise ValueError(f"{type(self).__name__}: num_frames must be >= 1, got {num_frames}")
        if tf == 1:
            return num_frames
        if (num_frames - 1) % tf != 0:
            lo = 1 + tf * ((num_frames - 1) // tf)
            raise ValueError(
                f"{type(self).__name__} is causal with temporal factor {tf}: a clip must hold 1 + {tf}*k frames "
                f"(1, {1 + tf}, {1 + 2 * tf}, ...), got {num_frames} (nearest valid: {lo} or {lo + tf})"
            )
        return 1 + (num_frames - 1) // tf

    def num_frames(self, num_latent_frames: int) -> int:
        """Inverse of `num_latent_frames`: frames produced by decoding `num_latent_frames` latents."""
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
        return 1 + self.temporal_factor * (num_latent_frames - 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H/f, W/f) for a clip of the given size (ValueError if it does not divide)."""
        self._check_spatial(height, width)
        f = self.spatial_factor
        return (self.latent_channels, self.num_latent_frames(num_frames), height // f, width // f)

    def _check_spatial(self, height: int, width: int) -> None:
        f = self.spatial_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"{type(self).__name__}: frame size {height}x{width} must be a positive multiple of the spatial "
                f"factor {f}"
            )

    def _check_frames(self, frames: Tensor) -> None:
        if not isinstance(frames, Tensor) or frames.ndim != 5:
            shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"{type(self).__name__}.encode expects frames (B, 3, T, H, W), got {shape}")
        if frames.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}.encode expects 3 colour channels in dim 1 (B, 3, T, H, W), got shape "
                f"{tuple(frames.shape)}"
            )
        self.num_latent_frames(int(frames.shape[2]))
        self._check_spatial(int(frames.shape[3]), int(frames.shape[4]))

    def _check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents, Tensor) or latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(
                f"{type(self).__name__}.decode expects latents (B, {self.latent_channels}, T, h, w), got {shape}"
            )

    # ---- codec ------------------------------------------------------------------------------

    def encode(self, frames: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, T', H/f, W/f)."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, T', h, w) -> frames (B, 3, T, h*f, w*f) in [-1, 1]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, spatial_factor={self.spatial_factor}, "
            f"temporal_factor={self.temporal_factor}"
        )


class PixelCodec(LatentCodec):
    """Parameter-free space-to-depth codec: (3, T, H, W) -> (3*f*f, T, H/f, W/f), exact inverse.

    Channel order of the latents is (colour, row offset, column offset), i.e. channel
    `c * f * f + dy * f + dx` holds pixel `(f * i + dy, f * j + dx)` of colour `c`.
    Pixel values are kept as they are (frames in [-1, 1] are already roughly unit scale).
    """

    def __init__(self, factor: int = 8):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"PixelCodec factor must be a positive int, got {factor!r}")
        self.factor = factor
        self.latent_channels = 3 * factor * factor
        self.spatial_factor = factor
        self.temporal_factor = 1

    def encode(self, frames: Tensor) -> Tensor:
        self._check_frames(frames)
        b, c, t, h, w = frames.shape
        f = self.factor
        x = frames.reshape(b, c, t, h // f, f, w // f, f)
        x = x.permute(0, 1, 4, 6, 2, 3, 5)  # b, c, dy, dx, t, i, j
        return x.reshape(b, c * f * f, t, h // f, w // f)

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        b, _, t, h, w = latents.shape
        f = self.factor
        x = latents.reshape(b, 3, f, f, t, h, w)
        x = x.permute(0, 1, 4, 5, 2, 6, 3)  # b, c, t, i, dy, j, dx
        return x.reshape(b, 3, t, h * f, w * f).clamp(-1.0, 1.0)


class PCACodec(LatentCodec):
    """Space-to-depth by `factor`, then the top `channels` principal components of the patches.

    Buffers (saved in checkpoints): `mean` (3*f*f,), `components` (channels, 3*f*f) with
    orthonormal rows, `scale` (channels,) the standard deviation of each component on the fitting
    data, and `explained` the fraction of patch variance the components keep. Latent channel k is
    `((patch - mean) @ components[k]) / scale[k]`; `decode` maps back to the closest frame in the
    spanned subspace. An unfitted codec refuses to encode or decode.
    """

    learns_from_data = True

    def __init__(self, factor: int = 8, channels: int = 16):
        super().__init__()
        self.pixels = PixelCodec(factor)
        d = self.pixels.latent_channels
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= d:
            raise ValueError(f"PCACodec channels must be an int in [1, {d}] (3 x {factor} x {factor}), got {channels!r}")
        self.factor = factor
        self.latent_channels = channels
        self.spatial_factor = factor
        self.temporal_factor = 1
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(channels, d))
        self.register_buffer("scale", torch.zeros(channels))
        self.register_buffer("explained", torch.zeros(()))

    @property
    def fitted(self) -> bool:
        return bool((self.scale > 0).all())

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("PCACodec is not fitted: training fits it on the dataset (PCACodec.fit), and a "
                               "checkpoint stores it as codec.* in model.safetensors")

    @torch.no_grad()
    def fit(self, frames: Tensor, eps: float = 1e-6) -> float:
        """Fit mean, components and scales on frames (B, 3, T, H, W) in [-1, 1]; returns the
        fraction of patch variance kept. Deterministic for the same frames."""
        patches = self.pixels.encode(frames.float())  # (B, D, T, h, w)
        x = patches.movedim(1, -1).reshape(-1, patches.shape[1]).double()
        if x.shape[0] < 2:
            raise ValueError("PCACodec.fit needs at least two patches")
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        k = self.latent_channels
        comps = evecs[:, :k].T
        # Sign convention: the largest entry of each component is positive (reproducible bases).
        idx = comps.abs().argmax(1)
        comps = comps * comps.gather(1, idx[:, None]).sign()
        total = float(evals.sum())
        self.mean.copy_(mean.float())
        self.components.copy_(comps.float())
        self.scale.copy_(evals[:k].sqrt().clamp_min(eps).float())
        self.explained.fill_(float(evals[:k].sum()) / total if total > 0 else 1.0)
        return float(self.explained)

    @torch.no_grad()
    def randomize(self, seed: int = 0) -> "PCACodec":
        """A random orthonormal basis with zero mean and unit scales instead of a fitted one (the
        analogue of random VAE weights, for benchmarks and random-weight policies)."""
        g = torch.Generator().manual_seed(seed)
        d = self.mean.numel()
        q, _ = torch.linalg.qr(torch.randn(d, self.latent_channels, generator=g, dtype=torch.float64))
        self.mean.zero_()
        self.components.copy_(q.T.float())
        self.scale.fill_(1.0)
        self.explained.fill_(self.latent_channels / d)
        return self

    def encode(self, frames: Tensor) -> Tensor:
        self._check_frames(frames)
        self._require_fitted()
        x = self.pixels.encode(frames).movedim(1, -1)  # (B, T, h, w, D)
        z = (x - self.mean.to(x.dtype)) @ self.components.T.to(x.dtype) / self.scale.to(x.dtype)
        return z.movedim(-1, 1)

    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        self._require_fitted()
        z = latents.movedim(1, -1) * self.scale.to(latents.dtype)
        x = z @ self.components.to(latents.dtype) + self.mean.to(latents.dtype)
        return self.pixels.decode(x.movedim(-1, 1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", explained={float(self.explained):.4f}"


class WanVAECodec(LatentCodec):
    """Frozen Wan2.1 VAE (`diffusers.AutoencoderKLWan`) with Cosmos latent normalisation.

    `encode` is deterministic (posterior mode) and returns `(z - mean) / std` in float32;
    `decode` applies `z * std + mean`, runs the VAE decoder and clamps to [-1, 1].
    The VAE is always in eval mode, never gets gradients, and both directions run under no_grad.
    """

    def __init__(self, vae: nn.Module, source: str | None = None):
        super().__init__()
        cfg = vae.config
        for key in ("z_dim", "latents_mean", "latents_std", "temperal_downsample"):
            if cfg.get(key) is None:
                raise ValueError(f"VAE config{_where(source)} lacks {key!r}; is this an AutoencoderKLWan?")
        z_dim = int(cfg.z_dim)
        mean = torch.tensor(list(cfg.latents_mean), dtype=torch.float32)
        std = torch.tensor(list(cfg.latents_std), dtype=torch.float32)
        if mean.numel() != z_dim or std.numel() != z_dim:
            raise ValueError(
                f"VAE config{_where(source)}: latents_mean/latents_std need {z_dim} values (z_dim), got "
                f"{mean.numel()} and {std.numel()}"
            )
        if not bool((std > 0).all()):
            raise ValueError(f"VAE config{_where(source)}: latents_std must be positive, got {std.tolist()}")

        self.vae = vae
        self.source = source
        self.latent_channels = z_dim
        down = list(cfg.temperal_downsample)
        patch = getattr(cfg, "patch_size", None) or 1
        self.spatial_factor = (2 ** len(down)) * int(patch)
        self.temporal_factor = 2 ** sum(bool(d) for d in down)
        # True statistics, shape (1, C, 1, 1, 1). Not saved in state_dict: they belong to the VAE config.
        self.register_buffer("latents_mean", mean.view(1, z_dim, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, z_dim, 1, 1, 1), persistent=False)
        self._freeze()

    def _freeze(self) -> None:
        self.vae.eval()
        self.vae.requires_grad_(False)

    def train(self, mode: bool = True) -> "WanVAECodec":
        # The VAE is frozen: keep it in eval mode whatever the parent module does.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = "vae",
        dtype: torch.dtype = torch.float32,
    ) -> "WanVAECodec":
        """Load `AutoencoderKLWan` from a local folder (never the hub).

        `path` is either a diffusers pipeline folder holding `<subfolder>/config.json` (the Cosmos
        checkpoint layout, `subfolder="vae"`), or the VAE folder itself (`config.json` directly in
        `path`; then `subfolder` may be None or is ignored when `path/subfolder` does not exist).
        """
        from diffusers import AutoencoderKLWan

        folder = resolve_vae_folder(path, subfolder)
        try:
            vae = AutoencoderKLWan.from_pretrained(
                str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, EnvironmentError) as e:
            raise OSError(f"could not load the Wan VAE from {folder}: {e}") from e
        return cls(vae, source=str(folder))

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        self._check_frames(frames)
        x = frames.to(device=self.device, dtype=self.dtype)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mode().float()
        return (z - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        self._check_latents(latents)
        z = latents.float().to(self.latents_mean.device) * self.latents_std + self.latents_mean
        out = self.vae.decode(z.to(dtype=self.dtype)).sample
        return out.float().clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", source={self.source!r}" if self.source else "")


def _where(source: str | None) -> str:
    return f" ({source})" if source else ""


def resolve_vae_folder(path: str | Path, subfolder: str | None = "vae") -> Path:
    """Find the folder holding the VAE's `config.json`; clear FileNotFoundError naming the paths tried."""
    if path is None:
        raise FileNotFoundError("no VAE path given (set codec.path or the backbone folder)")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"VAE folder not found: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"VAE path is not a folder: {root}")
    tried = []
    if subfolder:
        sub = root / subfolder
        tried.append(sub / "config.json")
        if (sub / "config.json").is_file():
            return _check_vae_config(sub)
    tried.append(root / "config.json")
    if (root / "config.json").is_file() and _looks_like_vae(root / "config.json"):
        return _check_vae_config(root)
    if subfolder and not (root / subfolder).exists():
        raise FileNotFoundError(
            f"VAE subfolder not found: {root / subfolder} (and {root} holds no AutoencoderKLWan config.json); "
            f"expected a diffusers layout <path>/{subfolder}/config.json"
        )
    raise FileNotFoundError("VAE config.json not found; tried: " + ", ".join(str(t) for t in tried))


def _looks_like_vae(config_file: Path) -> bool:
    try:
        d = read_json(config_file, "VAE config")
    except ValueError:
        return False
    return isinstance(d, dict) and (d.get("_class_name") == "AutoencoderKLWan" or "latents_std" in d)


def _check_vae_config(folder: Path) -> Path:
    cfg_file = folder / "config.json"
    d = read_json(cfg_file, "VAE config")
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file}: the VAE config is not a JSON object")
    name = d.get("_class_name")
    if name is not None and name != "AutoencoderKLWan":
        raise ValueError(f"{cfg_file} describes a {name}, expected an AutoencoderKLWan (Wan2.1 VAE)")
    weight_files(folder)  # FileNotFoundError naming the folder when it has a config.json but no weights
    return folder


def build_codec(cfg: CodecConfig, backbone: str | None = None, random_weights: bool = False) -> LatentCodec:
    """Codec from config: `pixel` -> PixelCodec; `pca` -> an unfitted PCACodec (a random basis with
    `random_weights`); `wan_vae` -> VAE from `cfg.path` or `<backbone>/<subfolder>`.

    `random_weights=True` (benchmarks only), when no VAE folder is given (neither `cfg.path` nor
    `backbone`), builds the released Wan2.1 VAE architecture (the diffusers default config, with its
    latent mean/std) with random weights instead of failing.
    """
    if cfg.kind == "pixel":
        return PixelCodec(cfg.pixel_factor)
    if cfg.kind == "pca":
        codec = PCACodec(cfg.pixel_factor, cfg.pca_channels)
        return codec.randomize() if random_weights else codec
    if cfg.kind == "wan_vae" and random_weights and backbone is None and cfg.path is None:
        from diffusers import AutoencoderKLWan

        return WanVAECodec(AutoencoderKLWan(), source="random weights (AutoencoderKLWan default config)")
    if cfg.kind == "wan_vae":
        path = cfg.path if cfg.path is not None else backbone
        if path is None:
            raise ValueError(
                "codec.kind='wan_vae' needs a VAE folder: set codec.path or give the Cosmos backbone folder "
                "(which holds vae/)"
            )
        return WanVAECodec.from_pretrained(path, subfolder=cfg.subfolder)
    raise ValueError(f"unknown codec kind {cfg.kind!r}; expected 'pixel', 'pca' or 'wan_vae'")
