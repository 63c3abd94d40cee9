"""A local Cosmos-Predict2.5 backbone folder (the diffusers layout), checked before anything loads.

The official diffusers revision of the 2B checkpoint (`nvidia/Cosmos-Predict2.5-2B`, revision
`diffusers/base/post-trained`) is a pipeline folder::

    BACKBONE/
      model_index.json     {"_class_name": "Cosmos2_5_PredictBasePipeline", "transformer": [...], ...}
      transformer/         config.json + diffusion_pytorch_model*.safetensors   (CosmosTransformer3DModel)
      vae/                 config.json + diffusion_pytorch_model*.safetensors   (AutoencoderKLWan, Wan2.1)
      scheduler/           scheduler_config.json                                (UniPCMultistepScheduler)
      text_encoder/        config.json + model*.safetensors                     (Qwen2.5-VL: Cosmos-Reason1-7B)
      tokenizer/           tokenizer.json / tokenizer_config.json / vocab.json ...

`Backbone(path)` resolves and validates such a folder without loading any weight: the folder and
`model_index.json` exist and name a Cosmos pipeline; each component a caller needs exists
(`require`, a clear error naming the missing subfolder), has its config, and its safetensors files
have well-formed headers that match their sizes (a truncated or corrupted file is named). The
transformer's config can be read and compared with a preset before the 4 GB of weights load
(`check_config`).

Content hash (`content_hash`): sha256 over, for `transformer/` and `vae/` (the parts a trained
checkpoint depends on besides its own weights):

- the component's `config.json` (keys starting with `_` except `_class_name` dropped, so
  re-saving with another diffusers version does not change it);
- for every weight file (`*.safetensors`, and the shard index if any): its name, its size, its
  full safetensors header (every tensor's name, dtype, shape and byte offsets, and the metadata),
  and the first and last MiB of its tensor data.

It reads a few MiB, never the whole 4 GB. It detects another checkpoint, another architecture,
another precision, a re-export, truncation and any fine-tune that changes the first or last
tensors of a file; it does NOT detect an edit that only changes bytes in the middle of a weight
file while keeping every shape (use a full-file sha256 for that). The text encoder is not part
of the hash: cached text embeddings carry their own identity (`CosmosReason1TextEncoder.identity`,
which fingerprints the text-encoder files), so another text encoder is a cache miss, never a wrong
embedding.

The tests build a complete tiny folder in this layout (`tests/backbone_fixtures.py`) and run the
pretrained code path on it without the 2B checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import ConfigError, DiT4DiTConfig, VideoDiTConfig
from ..jsonio import read_json
from ..safetensors_header import header_bytes, read_header
from .weights import weight_files as _weight_files

__all__ = [
    "Backbone",
    "BackboneError",
    "COMPONENTS",
    "needed_components",
    "read_safetensors_header",
]

MODEL_INDEX = "model_index.json"
COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
# What `diffusers` / `transformers` class each component must hold (None: not checked).
EXPECTED_CLASS = {
    "transformer": "CosmosTransformer3DModel",
    "vae": "AutoencoderKLWan",
    "scheduler": None,
    "text_encoder": None,  # checked by model_type (qwen2_5_vl) below
    "tokenizer": None,
}
CONFIG_FILE = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
               "text_encoder": "config.json", "tokenizer": None}
HASH_COMPONENTS = ("transformer", "vae")
HASH_VERSION = "dit4dit.backbone_hash.v1"
SAMPLE_BYTES = 1 << 20  # bytes of tensor data hashed at the start and at the end of each weight file
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class BackboneError(ConfigError):
    """A backbone folder that is missing, incomplete, corrupted or does not match the config."""


# --------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------


_MAX_HEADER = 256 * 1024 * 1024


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """(raw JSON header, file size); BackboneError naming the file if it cannot be a safetensors file."""
    return header_bytes(path, BackboneError, _MAX_HEADER)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a safetensors header and check it against the file size (truncation, garbage, overlap).

    Raises `BackboneError` naming the file. Reads only the header.
    """
    return read_header(path, BackboneError, _MAX_HEADER)


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a component folder (`dit4dit.models.weights.weight_files`: each shard
    index followed by its shards, else the one `*.safetensors` file or the one with the official
    name); BackboneError if there are none, a choice is ambiguous or a shard is missing."""
    return _weight_files(folder, error=BackboneError)


def folder_hash(folder: str | os.PathLike, tag: str = "", config_name: str = "config.json") -> str:
    """The content hash of one component folder (see the module docstring for what it covers):
    its config (private `_` keys but `_class_name` dropped) and, per weight file, name, size,
    safetensors header and the first and last MiB of tensor data."""
    folder = Path(folder)
    h = hashlib.sha256()
    h.update(f"{HASH_VERSION}\n{tag}\n".encode())
    cfg = read_json(folder / config_name, f"{tag or 'component'} config", error=BackboneError)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    for f in weight_files(folder):
        size = f.stat().st_size
        h.update(f"\nfile:{f.name}:{size}\n".encode())
        if f.suffix != ".safetensors":  # a shard index: hashed whole (small)
            h.update(f.read_bytes())
            continue
        raw, _ = _header_bytes(f)
        h.update(raw)
        start = 8 + len(raw)
        with open(f, "rb") as fh:
            fh.seek(start)
            h.update(fh.read(min(SAMPLE_BYTES, size - start)))
            tail = max(start, size - SAMPLE_BYTES)
            fh.seek(tail)
            h.update(fh.read(size - tail))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def needed_components(cfg: DiT4DiTConfig, *, load_text_encoder: bool = True, text_cache: bool = False) -> list[str]:
    """The backbone subfolders a model built from `cfg` reads: the transformer; the VAE when
    the codec is the Wan VAE without its own `codec.path`; the text encoder and tokenizer when the
    text encoder is Cosmos-Reason1 without its own `text.path` and is loaded, or when cached
    embeddings are looked up (their key fingerprints the text-encoder files and needs the tokenizer).
    The static-image baseline (`encoder=static_image`) has no video DiT and reads no transformer."""
    need = ["transformer"] if cfg.encoder == "video_dit" else []
    if cfg.codec.kind == "wan_vae" and cfg.codec.path is None:
        need.append("vae")
    if cfg.text.kind == "cosmos_reason1" and cfg.text.path is None and (load_text_encoder or text_cache):
        need += ["text_encoder", "tokenizer"]
    return need


class Backbone:
    """A validated local Cosmos-Predict2.5 diffusers folder (see the module docstring).

    `require` lists the components that must be present and well formed (default: the
    transformer). Nothing is loaded: configs and safetensors headers are read.
    """

    def __init__(self, path: str | os.PathLike, require: Iterable[str] = ("transformer",)):
        if path is None:
            raise BackboneError("no backbone folder given (--backbone PATH: a local Cosmos-Predict2.5 diffusers "
                                "folder)")
        self.root = Path(path).expanduser().resolve()
        if not self.root.exists():
            raise BackboneError(f"backbone folder not found: {self.root}")
        if not self.root.is_dir():
            raise BackboneError(f"backbone path is not a folder: {self.root}")
        index_file = self.root / MODEL_INDEX
        if not index_file.is_file():
            present = sorted(p.name for p in self.root.iterdir())[:12]
            raise BackboneError(
                f"{self.root}: not a diffusers pipeline folder ({MODEL_INDEX} missing; it holds {present}). Expected "
                f"the Cosmos-Predict2.5 layout (revision diffusers/base/post-trained): {MODEL_INDEX}, "
                f"{'/, '.join(COMPONENTS)}/")
        self.index: dict[str, Any] = read_json(index_file, "pipeline index", error=BackboneError)
        if not isinstance(self.index, dict):
            raise BackboneError(f"{index_file}: expected a JSON object")
        name = str(self.index.get("_class_name", ""))
        if "cosmos" not in name.lower():
            raise BackboneError(f"{index_file}: the pipeline is {name or 'unnamed'!r}, not a Cosmos pipeline "
                                f"(expected Cosmos2_5_PredictBasePipeline)")
        self.pipeline_class = name
        self._checked: set[str] = set()
        self.require(*require)

    @classmethod
    def open(cls, path: "str | os.PathLike | Backbone", require: Iterable[str] = ("transformer",)) -> "Backbone":
        if isinstance(path, Backbone):
            path.require(*require)
            return path
        return cls(path, require)

    def __repr__(self) -> str:
        return f"Backbone({str(self.root)!r}, {self.pipeline_class})"

    def __fspath__(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------ components
    def folder(self, component: str) -> Path:
        if component not in COMPONENTS:
            raise ValueError(f"unknown backbone component {component!r}; expected one of {COMPONENTS}")
        return self.root / component

    def has(self, component: str) -> bool:
        return self.folder(component).is_dir()

    def require(self, *components: str) -> "Backbone":
        """Check that each component is present and well formed; BackboneError naming what is wrong."""
        missing = [c for c in components if not self.has(c)]
        if missing:
            present = [c for c in COMPONENTS if self.has(c)]
            raise BackboneError(
                f"{self.root}: missing subfolder{'s' if len(missing) > 1 else ''} "
                f"{', '.join(m + '/' for m in missing)} (present: {', '.join(p + '/' for p in present) or 'none'}); "
                f"the Cosmos-Predict2.5 diffusers folder holds {', '.join(c + '/' for c in COMPONENTS)}")
        for c in components:
            if c in self._checked:
                continue
            folder = self.folder(c)
            cfg_name = CONFIG_FILE[c]
            if cfg_name is not None:
                cfg = self.component_config(c)
                want = EXPECTED_CLASS[c]
                have = cfg.get("_class_name")
                if want is not None and have is not None and have != want:
                    raise BackboneError(f"{folder / cfg_name}: describes a {have}, expected a {want}")
                if c == "text_encoder" and cfg.get("model_type") not in (None, "qwen2_5_vl"):
                    raise BackboneError(f"{folder / cfg_name}: model_type {cfg.get('model_type')!r}, expected "
                                        f"'qwen2_5_vl' (Cosmos-Reason1-7B)")
            if c == "tokenizer" and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                raise BackboneError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
            if c in ("transformer", "vae", "text_encoder"):
                for f in self.weight_files(c):
                    if f.suffix == ".safetensors":
                        read_safetensors_header(f)
            self._checked.add(c)
        return self

    def component_config(self, component: str) -> dict[str, Any]:
        name = CONFIG_FILE[component]
        if name is None:
            raise ValueError(f"{component} has no config file")
        path = self.folder(component) / name
        d = read_json(path, f"{component} config", error=BackboneError)
        if not isinstance(d, dict):
            raise BackboneError(f"{path}: expected a JSON object")
        return d

    def weight_files(self, component: str) -> list[Path]:
        """The component's weight files (shard index first when sharded); BackboneError if none or
        a listed shard is missing. Pickle `.bin` files are never read."""
        return weight_files(self.folder(component))

    # ------------------------------------------------------------------ configs
    def transformer_config(self) -> dict[str, Any]:
        """`transformer/config.json` (read without loading any weight)."""
        self.require("transformer")
        return self.component_config("transformer")

    def video_config(self, **ours: Any) -> VideoDiTConfig:
        """A `VideoDiTConfig` with the transformer's architecture (`ours`: the fields that are ours
        only, `timestep_scale` and `rope_fps`; defaults 1.0 / None as for the pretrained model)."""
        t = self.transformer_config()
        kwargs = {}
        for name in VideoDiTConfig.__dataclass_fields__:
            if name in ("timestep_scale", "rope_fps"):
                continue
            if name not in t:
                raise BackboneError(f"{self.folder('transformer') / 'config.json'}: lacks {name!r}")
            v = t[name]
            kwargs[name] = tuple(v) if isinstance(v, list) else v
        kwargs.update(ours)
        return VideoDiTConfig(**kwargs)

    def config_mismatches(self, cfg: DiT4DiTConfig, components: Sequence[str] | None = None) -> list[str]:
        """Differences between the folder's configs and `cfg` (empty when they fit)."""
        comps = list(components) if components is not None else [c for c in ("transformer", "vae", "text_encoder")
                                                                  if self.has(c)]
        out = []
        if "transformer" in comps:
            t = self.transformer_config()
            for k, v in cfg.video.diffusers_kwargs().items():
                if _norm(t.get(k)) != _norm(v):
                    out.append(f"video.{k}: preset {v!r}, backbone transformer {t.get(k, '<absent>')!r}")
        if "vae" in comps and cfg.codec.kind == "wan_vae" and cfg.codec.path is None:
            v = self.component_config("vae")
            z = v.get("z_dim")
            if z is not None and int(z) != cfg.video.latent_channels:
                out.append(f"vae z_dim {z} vs the video DiT's {cfg.video.latent_channels} latent channels "
                           f"(video.in_channels - 1)")
        if "text_encoder" in comps and cfg.text.kind == "cosmos_reason1" and cfg.text.path is None:
            d = self.component_config("text_encoder")
            tc = d.get("text_config") or d
            hidden, layers = tc.get("hidden_size"), tc.get("num_hidden_layers")
            if hidden is not None and layers is not None and int(hidden) * int(layers) != cfg.video.text_input_dim:
                out.append(f"text encoder {layers} layers x {hidden} = {int(hidden) * int(layers)} features per token "
                           f"vs the video DiT's text input {cfg.video.text_input_dim} "
                           f"(video.crossattn_proj_in_channels)")
        return out

    def check_config(self, cfg: DiT4DiTConfig, components: Sequence[str] | None = None) -> None:
        """BackboneError listing every field where the folder's configs and the preset differ."""
        diffs = self.config_mismatches(cfg, components)
        if diffs:
            raise BackboneError(f"the backbone {self.root} does not match the config {cfg.name!r}:\n  - "
                                + "\n  - ".join(diffs))

    # ------------------------------------------------------------------ content hash
    def component_hash(self, component: str) -> str:
        """sha256 of one component (see the module docstring for what it covers)."""
        self.require(component)
        return folder_hash(self.folder(component), component, CONFIG_FILE[component] or "config.json")

    @functools.cached_property
    def component_hashes(self) -> dict[str, str]:
        return {c: self.component_hash(c) for c in HASH_COMPONENTS if self.has(c)}

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over the transformer's and the VAE's hashes (`component_hash`)."""
        h = hashlib.sha256(HASH_VERSION.encode())
        for c in HASH_COMPONENTS:
            h.update(f"\n{c}:{self.component_hashes.get(c, 'absent')}".encode())
        return h.hexdigest()

    def record(self) -> dict[str, Any]:
        """What a checkpoint records about the backbone it was trained over."""
        return {"path": str(self.root), "hash": self.content_hash, "components": dict(self.component_hashes),
                "pipeline": self.pipeline_class, "hash_version": HASH_VERSION}

    def describe(self) -> dict[str, Any]:
        out = self.record()
        out["present"] = [c for c in COMPONENTS if self.has(c)]
        out["missing"] = [c for c in COMPONENTS if not self.has(c)]
        return out


# --------------------------------------------------------------------------------------------
# Identities and prompts of a backbone
# --------------------------------------------------------------------------------------------


def codec_identity(cfg: DiT4DiTConfig, backbone: "str | os.PathLike | Backbone | None" = None) -> str:
    """What determines the latents a config's codec produces: `pixel:<factor>` for the pixel codec,
    `wan_vae:<hash of the VAE folder>` for the Wan VAE (from `codec.path` or `<backbone>/vae`)."""
    if cfg.codec.kind == "pixel":
        return f"pixel:{cfg.codec.pixel_factor}"
    if cfg.codec.kind == "pca":
        raise BackboneError("codec.kind='pca' is fitted on the training frames when training starts, so its "
                            "latents cannot be cached ahead of training: train from frames (--frame-cache)")
    from .codecs import resolve_vae_folder

    path = cfg.codec.path
    if path is None:
        if backbone is None:
            raise BackboneError("codec.kind='wan_vae' needs the backbone folder (--backbone) or codec.path")
        path = str(Backbone.open(backbone, require=("vae",)).root)
    try:
        folder = resolve_vae_folder(path, cfg.codec.subfolder)
    except (FileNotFoundError, ValueError) as e:
        raise BackboneError(str(e)) from e
    return "wan_vae:" + folder_hash(folder, "vae")


def uncached_prompts(cfg: DiT4DiTConfig, backbone: "str | os.PathLike | Backbone | None", text_cache_dir: Any,
                     prompts: Iterable[str]) -> list[str]:
    """The prompts whose embedding by `cfg`'s frozen text encoder is not in `text_cache_dir` (the
    cache key needs the tokenizer and the text-encoder files, not the weights)."""
    from .text import CosmosReason1TextEncoder, EmbeddingCache

    source = cfg.text.path or (str(Backbone.open(backbone).root) if backbone is not None else None)
    if source is None:
        return list(dict.fromkeys(prompts))
    identity = CosmosReason1TextEncoder.identity_for(source, max_length=cfg.text.max_length)
    cache = EmbeddingCache(text_cache_dir)
    return [p for p in dict.fromkeys(prompts) if (identity, p) not in cache]


def embed_prompts(cfg: DiT4DiTConfig, backbone: "str | os.PathLike | Backbone | None", prompts: Iterable[str],
                  cache_dir: str | os.PathLike, *, device: str = "cpu", batch_size: int = 8,
                  progress: Any = None) -> dict[str, Any]:
    """Fill the text-embedding cache with `cfg`'s frozen text encoder (from `text.path` or
    `<backbone>/text_encoder`) for every prompt not cached yet; the encoder is loaded only when
    something is missing. Embeddings are computed exactly as training and serving compute them
    (bfloat16 encoder, `text.max_length` tokens), so they find them by the same key.
    `progress(done, total)` is called after each batch. Returns counts."""
    import time

    from .text import CosmosReason1TextEncoder, EmbeddingCache, build_text_encoder

    if cfg.text.kind != "cosmos_reason1":
        raise ConfigError(f"text.kind={cfg.text.kind!r} is trained with the model: there is nothing to cache "
                          f"(embed-text is for the frozen Cosmos-Reason1 text encoder)")
    if cfg.text.path is not None:
        source = str(Path(cfg.text.path).expanduser())
    elif backbone is not None:
        source = str(Backbone.open(backbone, require=("text_encoder", "tokenizer")).root)
    else:
        raise BackboneError("embed-text needs --backbone PATH (or --set text.path=QWEN2.5-VL-FOLDER)")
    t0 = time.perf_counter()
    uniq = list(dict.fromkeys(str(p) for p in prompts))
    cache = EmbeddingCache(cache_dir)
    identity = CosmosReason1TextEncoder.identity_for(source, max_length=cfg.text.max_length)
    missing = [p for p in uniq if (identity, p) not in cache]
    if missing:
        enc = build_text_encoder(cfg.text, cfg.video.text_input_dim, source).to(device)
        if enc.identity != identity:  # pragma: no cover - the two are built from the same files
            raise RuntimeError("text encoder identity differs from identity_for(); cache keys would not match")
        for start in range(0, len(missing), batch_size):
            cache.embed(enc, missing[start:start + batch_size], batch_size=batch_size)
            if progress is not None:
                progress(min(start + batch_size, len(missing)), len(missing))
        del enc
    return {"cache": str(cache.root), "text_encoder": source, "prompts": len(uniq), "hits": len(uniq) - len(missing),
            "misses": len(missing), "embedded": len(missing), "identity": identity,
            "seconds": round(time.perf_counter() - t0, 3)}
