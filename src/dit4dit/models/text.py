"""Text conditioning for the video DiT, and an on-disk cache of frozen-encoder embeddings.

- `TinyTextEncoder`: a small trainable byte-level transformer for models trained from scratch.
- `CosmosReason1TextEncoder`: the frozen Cosmos-Reason1-7B (a Qwen2.5-VL-7B) multi-layer embedding
  that Cosmos-Predict2.5 is trained with. It reproduces `Cosmos2_5_PredictBasePipeline._get_prompt_embeds`
  (diffusers): the prompt goes through the tokenizer's chat template with the Cosmos system message,
  padded / truncated to 512 tokens, the language model runs with `output_hidden_states=True`, each of
  `hidden_states[1:]` (one per decoder layer, the last one after the final norm) is normalised per
  token as `(h - mean) / (std + 1e-8)` (no affine, unbiased std, computed in the model's dtype), and
  the layers are concatenated along features: (B, 512, 28 * 3584 = 100352) for the 7B model.
- `EmbeddingCache`: the reference re-runs the 7B encoder on every call; instructions repeat, so
  embeddings are cached on disk (safetensors, atomic writes) keyed by encoder identity and prompt.

Nothing is ever downloaded: every loader uses `local_files_only=True` on local folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from dit4dit.config import TextConfig

from ..jsonio import read_json
from .weights import weight_files

__all__ = [
    "TextEncoder",
    "TinyTextEncoder",
    "CosmosReason1TextEncoder",
    "EmbeddingCache",
    "build_text_encoder",
    "COSMOS_SYSTEM_PROMPT",
    "QWEN2_5_VL_CHAT_TEMPLATE",
]

# System message of `Cosmos2_5_PredictBasePipeline._get_prompt_embeds` (diffusers 0.36-0.42).
COSMOS_SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."

# The chat template shipped with Qwen2.5-VL-7B-Instruct / Cosmos-Reason1-7B. Used only when the local
# tokenizer folder carries no template (tokenizer_config.json, chat_template.jinja or the legacy
# processor file chat_template.json); a warning is issued then. For the Cosmos conversation it
# renders "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n".
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_IDENTITY_VERSION = "v1"


def _as_prompt_list(prompts: Sequence[str] | str, who: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{who}: got an empty list of prompts")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"{who}: prompts must be strings, got {type(p).__name__}")
    return prompts


class TextEncoder(nn.Module):
    """Base class: `forward(list[str]) -> (B, max_length, embed_dim)` float32.

    `identity` is a stable string naming the encoder and its weights; `EmbeddingCache` keys on it.
    `storage_dtype` is the dtype in which an embedding can be stored without loss (the dtype the
    encoder computes in); the cache stores embeddings in it.
    """

    embed_dim: int
    max_length: int
    trainable: bool
    storage_dtype: torch.dtype = torch.float32

    @property
    def identity(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def forward(self, prompts: list[str]) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Tiny trainable encoder
# --------------------------------------------------------------------------------------------


class TinyTextEncoder(TextEncoder):
    """Byte-level transformer encoder, trained with the model.

    Tokens: the UTF-8 bytes of the prompt (0..255), truncated / right-padded with token 256 to
    `cfg.max_length`. Embedding + learned positions -> `cfg.num_layers` pre-norm transformer
    encoder layers (`cfg.width`, `cfg.num_heads`, GELU, feed-forward 4x) -> LayerNorm -> Linear to
    `out_dim`. Padding positions are part of the sequence (as in the Cosmos encoder, whose 512
    tokens include the padding).
    """

    PAD = 256
    VOCAB = 257

    def __init__(self, cfg: TextConfig, out_dim: int):
        super().__init__()
        if cfg.max_length < 1:
            raise ValueError(f"text.max_length must be >= 1, got {cfg.max_length}")
        if cfg.width < 1 or cfg.num_heads < 1 or cfg.width % cfg.num_heads:
            raise ValueError(f"text.width={cfg.width} must be a positive multiple of text.num_heads={cfg.num_heads}")
        if cfg.num_layers < 0:
            raise ValueError(f"text.num_layers must be >= 0, got {cfg.num_layers}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.cfg = cfg
        self.embed_dim = int(out_dim)
        self.max_length = int(cfg.max_length)
        self.trainable = True
        self.token_embed = nn.Embedding(self.VOCAB, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=cfg.width,
                nhead=cfg.num_heads,
                dim_feedforward=4 * cfg.width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, out_dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def identity(self) -> str:
        # Changes whenever the weights change (it is trainable): never a stale cache key.
        h = hashlib.sha256()
        h.update(json.dumps({"cfg": dataclasses.asdict(self.cfg), "out_dim": self.embed_dim}, sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return f"TinyTextEncoder|{_IDENTITY_VERSION}|{h.hexdigest()}"

    def tokenize(self, prompts: Sequence[str] | str) -> Tensor:
        """(B, max_length) int64 byte tokens, right-padded with `PAD`."""
        prompts = _as_prompt_list(prompts, "TinyTextEncoder")
        out = torch.full((len(prompts), self.max_length), self.PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            data = p.encode("utf-8")[: self.max_length]
            if data:
                out[i, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        return out

    def forward(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenize(prompts).to(self.token_embed.weight.device)
        x = self.token_embed(tokens) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x)).float()


# --------------------------------------------------------------------------------------------
# Cosmos-Reason1 (Qwen2.5-VL) frozen encoder
# --------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _is_qwen25vl_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        d = read_json(path, "config")
    except ValueError:
        return False
    if not isinstance(d, dict):
        return False
    return d.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in (d.get("architectures") or [])


def resolve_text_encoder_folders(path: str | Path, subfolder: str | None = None) -> tuple[Path, Path]:
    """Find (model folder, tokenizer folder) for a Qwen2.5-VL text encoder.

    Accepted layouts:
    - Cosmos diffusers checkpoint: `<path>/text_encoder/config.json` + `<path>/tokenizer/`;
    - plain transformers Qwen2.5-VL folder: `<path>/config.json` + tokenizer files in `<path>`;
    - explicit `subfolder`: `<path>/<subfolder>/config.json`, tokenizer in `<path>/tokenizer/`
      (diffusers layout) or in `<path>/<subfolder>/`.
    """
    if path is None:
        raise FileNotFoundError("no text-encoder path given (set text.path or the backbone folder)")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"text-encoder folder not found: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"text-encoder path is not a folder: {root}")
    if subfolder:
        model_dir = root / subfolder
        if not model_dir.is_dir():
            raise FileNotFoundError(f"text-encoder subfolder not found: {model_dir}")
        tok_candidates = [root / "tokenizer", model_dir]
    elif _is_qwen25vl_config(root / "config.json"):
        model_dir = root
        tok_candidates = [root, root / "tokenizer"]
    elif (root / "text_encoder" / "config.json").is_file():
        model_dir = root / "text_encoder"
        tok_candidates = [root / "tokenizer", model_dir]
    else:
        raise FileNotFoundError(
            f"no Qwen2.5-VL text encoder in {root}: expected {root / 'text_encoder' / 'config.json'} (Cosmos diffusers "
            f"layout) or a Qwen2.5-VL {root / 'config.json'}"
        )
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"text-encoder config not found: {cfg_file}")
    if not _is_qwen25vl_config(cfg_file):
        d = read_json(cfg_file, "text-encoder config")
        raise ValueError(
            f"{cfg_file} is not a Qwen2.5-VL config (model_type={d.get('model_type')!r}); Cosmos-Predict2.5 uses "
            f"Cosmos-Reason1-7B (Qwen2_5_VLForConditionalGeneration)"
        )
    for cand in tok_candidates:
        if _has_tokenizer(cand):
            return model_dir, cand
    raise FileNotFoundError(
        "no tokenizer files (" + ", ".join(_TOKENIZER_FILES) + ") in " + " or ".join(str(c) for c in tok_candidates)
    )


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the tensors (shard indexes left out); FileNotFoundError naming
    the folder or shard when there are none or one is missing."""
    return [f for f in weight_files(model_dir) if f.name.endswith(".safetensors")]


def _text_model_key(key: str) -> str | None:
    """Map a checkpoint key of Qwen2_5_VLForConditionalGeneration to a Qwen2_5_VLTextModel key.

    Handles the on-disk layout written by transformers (`model.layers.*`, `visual.*`, `lm_head.*`)
    and the in-memory layout of transformers >= 4.52 (`model.language_model.layers.*`,
    `model.visual.*`). Vision and LM-head weights map to None (not needed for embeddings).
    """
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    if key.startswith("model.") and not key.startswith("model.visual."):
        return key[len("model.") :]
    return None


def _load_text_model(model_dir: Path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """Build `Qwen2_5_VLTextModel` and fill it from the checkpoint, reading only the language-model tensors.

    Skips the vision tower and the LM head (about 1.2 B of the 8.3 B parameters of the 7B model) and
    never computes the 152k-way logits the full model would compute for all 512 tokens.
    """
    from safetensors import safe_open
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, Qwen2_5_VLTextModel

    config = Qwen2_5_VLConfig.from_pretrained(str(model_dir), local_files_only=True)
    text_config = config.text_config
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel._from_config(text_config, attn_implementation=attn_implementation, dtype=dtype)
    expected = set(model.state_dict().keys())
    state: dict[str, Tensor] = {}
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                target = _text_model_key(key)
                if target is None or target not in expected:
                    continue
                if target in state:
                    raise ValueError(f"checkpoint {model_dir} holds two tensors for {target!r} (second: {key!r})")
                state[target] = f.get_tensor(key).to(dtype)
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"checkpoint {model_dir} lacks {len(missing)} language-model tensors, e.g. {missing[:5]}; "
            f"is it a Qwen2.5-VL checkpoint?"
        )
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inverse frequencies, float32) are not in the checkpoint: rebuild them.
    model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"text model from {model_dir}: tensors left uninitialised: {left[:5]}")
    return model


def _fingerprint(files: Iterable[Path], content_limit: int = 32 << 20) -> str:
    """Hash of file names + contents (small files) or names + sizes + mtimes (large weight files)."""
    h = hashlib.sha256()
    for f in sorted(set(files)):
        if not f.is_file():
            continue
        st = f.stat()
        h.update(f.name.encode() + b"\0")
        if st.st_size <= content_limit and f.suffix != ".safetensors":
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(b"\0")
    return h.hexdigest()


class CosmosReason1TextEncoder(TextEncoder):
    """Frozen Qwen2.5-VL (Cosmos-Reason1-7B) multi-layer prompt embedding, as the Cosmos pipeline computes it.

    Output: (B, max_length, num_layers * hidden) float32 (100352 for the 7B model).
    `model` is either a `Qwen2_5_VLTextModel` (default, lighter) or a full
    `Qwen2_5_VLForConditionalGeneration` (`text_only=False`); both give identical hidden states.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int = 512,
        identity: str | None = None,
        system_prompt: str = COSMOS_SYSTEM_PROMPT,
    ):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the Qwen2.5-VL tokenizer has no chat template")
        cfg = model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.hidden_size = int(text_cfg.hidden_size)
        self.embed_dim = self.num_layers * self.hidden_size
        self.max_length = int(max_length)
        self.trainable = False
        self.system_prompt = system_prompt
        self.storage_dtype = next(model.parameters()).dtype
        self._identity = identity or f"CosmosReason1TextEncoder|{_IDENTITY_VERSION}|unnamed|{id(model)}"
        self._freeze()

    def _freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "CosmosReason1TextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: always eval
        return self

    @property
    def identity(self) -> str:
        return self._identity

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        max_length: int = 512,
        text_only: bool = True,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
    ) -> "CosmosReason1TextEncoder":
        """Load from a local folder: Cosmos diffusers layout (`text_encoder/` + `tokenizer/`) or a plain
        Qwen2.5-VL folder (see `resolve_text_encoder_folders`). Never downloads.

        `text_only=True` builds only the language model (no vision tower, no LM head); `False` loads the
        full `Qwen2_5_VLForConditionalGeneration` exactly as the diffusers pipeline does. Same output.
        """
        model_dir, tok_dir = resolve_text_encoder_folders(path, subfolder)
        tokenizer = _load_tokenizer(model_dir, tok_dir)
        if text_only:
            model = _load_text_model(model_dir, dtype, attn_implementation)
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(model_dir), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
            )
        if device is not None:
            model = model.to(device)
        ident = _cosmos_identity(model_dir, tok_dir, tokenizer.chat_template, max_length, dtype)
        return cls(model, tokenizer, max_length=max_length, identity=ident)

    @classmethod
    def identity_for(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        max_length: int = 512,
    ) -> str:
        """The `identity` that `from_pretrained` with the same arguments gives, without loading the weights
        (only the tokenizer): lets a server read cached embeddings without the 7B model in memory."""
        model_dir, tok_dir = resolve_text_encoder_folders(path, subfolder)
        tokenizer = _load_tokenizer(model_dir, tok_dir)
        return _cosmos_identity(model_dir, tok_dir, tokenizer.chat_template, max_length, dtype)

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        """The chat the Cosmos pipeline builds for one prompt."""
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]

    def tokenize(self, prompts: Sequence[str] | str) -> Tensor:
        """(B, max_length) input ids, one chat-templated prompt at a time as the pipeline does."""
        prompts = _as_prompt_list(prompts, "CosmosReason1TextEncoder")
        rows = []
        for p in prompts:
            ids = self.tokenizer.apply_chat_template(
                self.conversation(p),
                tokenize=True,
                add_generation_prompt=False,
                add_vision_id=False,
                max_length=self.max_length,
                truncation=True,
                padding="max_length",
            )
            if not isinstance(ids, list) and "input_ids" in ids:
                ids = ids["input_ids"]
            ids = torch.as_tensor(ids, dtype=torch.long)
            if ids.ndim != 1 or ids.numel() != self.max_length:
                raise ValueError(
                    f"tokenizer returned {tuple(ids.shape)} ids for a prompt, expected ({self.max_length},); does the "
                    f"tokenizer define a pad token?"
                )
            rows.append(ids)
        return torch.stack(rows, 0)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        input_ids = self.tokenize(prompts).to(self.device)
        outputs = self.model(input_ids, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        if hidden_states is None or len(hidden_states) != self.num_layers + 1:
            n = None if hidden_states is None else len(hidden_states)
            raise RuntimeError(f"expected {self.num_layers + 1} hidden states from the text model, got {n}")
        normed = []
        for h in hidden_states[1:]:
            normed.append((h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-8))
        return torch.cat(normed, dim=-1).float()


def _load_tokenizer(model_dir: Path, tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = _find_chat_template(tok_dir, model_dir)
    return tokenizer


def _cosmos_identity(model_dir: Path, tok_dir: Path, chat_template: str, max_length: int, dtype: torch.dtype) -> str:
    files = [model_dir / "config.json", model_dir / "model.safetensors.index.json", *_weight_files(model_dir)]
    files += [p for p in tok_dir.iterdir() if p.is_file() and p.suffix in (".json", ".txt", ".jinja", ".model")]
    return "|".join(
        [
            "CosmosReason1TextEncoder",
            _IDENTITY_VERSION,
            f"model={model_dir.resolve()}",
            f"tokenizer={tok_dir.resolve()}",
            f"max_length={max_length}",
            f"dtype={str(dtype).removeprefix('torch.')}",
            f"template={hashlib.sha256(chat_template.encode()).hexdigest()[:16]}",
            f"system={hashlib.sha256(COSMOS_SYSTEM_PROMPT.encode()).hexdigest()[:16]}",
            f"files={_fingerprint(files)}",
        ]
    )


def _find_chat_template(*folders: Path) -> str:
    for folder in folders:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        legacy = folder / "chat_template.json"  # the processor's legacy file (Qwen2.5-VL releases)
        if legacy.is_file():
            tpl = read_json(legacy, "chat template").get("chat_template")
            if isinstance(tpl, str):
                return tpl
    warnings.warn(
        f"no chat template in {', '.join(str(f) for f in folders)}; using the built-in Qwen2.5-VL template",
        stacklevel=4,
    )
    return QWEN2_5_VL_CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------


class EmbeddingCache:
    """On-disk cache of frozen text-encoder embeddings.

    One safetensors file per (encoder identity, prompt): `<root>/<k[:2]>/<k>.safetensors` with
    `k = sha256(identity + "\\0" + prompt)`, tensor `embedding` stored in the encoder's
    `storage_dtype` (lossless), metadata holding the identity and prompt (checked on read, so a hash
    collision or a foreign file is a miss, never a wrong embedding). Files are written to a temporary
    name in the same folder and moved into place with `os.replace`, so concurrent writers (several
    ranks) and interrupted runs never leave a partial file under the final name. A small in-memory
    LRU (`memory_bytes`) avoids re-reading hot prompts from disk every step.
    """

    FORMAT = "dit4dit.text_embedding.v1"

    def __init__(self, root: str | Path, memory_bytes: int = 1 << 30):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = int(memory_bytes)
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(identity: str, prompt: str) -> str:
        return hashlib.sha256((identity + "\0" + prompt).encode("utf-8")).hexdigest()

    def path(self, identity: str, prompt: str) -> Path:
        k = self.key(identity, prompt)
        return self.root / k[:2] / f"{k}.safetensors"

    # ---- memory LRU ---------------------------------------------------------------------------

    def _remember(self, k: str, t: Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.memory_bytes:
            return
        with self._lock:
            if k in self._memory:
                self._memory.move_to_end(k)
                return
            self._memory[k] = t
            self._memory_used += size
            while self._memory_used > self.memory_bytes and self._memory:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= old.numel() * old.element_size()

    def _recall(self, k: str) -> Tensor | None:
        with self._lock:
            t = self._memory.get(k)
            if t is not None:
                self._memory.move_to_end(k)
            return t

    # ---- single entries -----------------------------------------------------------------------

    def get(self, identity: str, prompt: str) -> Tensor | None:
        """The cached embedding (float32, CPU) or None."""
        from safetensors import safe_open

        k = self.key(identity, prompt)
        t = self._recall(k)
        if t is not None:
            return t.clone() if t.dtype == torch.float32 else t.float()  # never hand out the cached tensor
        file = self.path(identity, prompt)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if (
                    meta.get("format") != self.FORMAT
                    or meta.get("identity") != identity
                    or meta.get("prompt") != prompt
                ):
                    return None
                t = f.get_tensor("embedding")
        except Exception as e:  # unreadable / foreign file: a miss, recomputed and overwritten
            warnings.warn(f"ignoring unreadable embedding cache file {file}: {e}", stacklevel=2)
            return None
        self._remember(k, t)
        return t.clone() if t.dtype == torch.float32 else t.float()

    def put(self, identity: str, prompt: str, tensor: Tensor) -> Path:
        """Store one embedding (any shape; its dtype is kept). Atomic: tmp file + os.replace."""
        from safetensors.torch import save_file

        k = self.key(identity, prompt)
        file = self.path(identity, prompt)
        file.parent.mkdir(parents=True, exist_ok=True)
        t = tensor.detach().to("cpu").contiguous().clone()
        meta = {"format": self.FORMAT, "identity": identity, "prompt": prompt}
        fd, tmp = tempfile.mkstemp(prefix=f".{k[:16]}.", suffix=".tmp", dir=str(file.parent))
        os.close(fd)
        try:
            save_file({"embedding": t}, tmp, metadata=meta)
            os.replace(tmp, file)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._remember(k, t)
        return file

    def lookup(self, identity: str, prompts: Sequence[str] | str, device: str | torch.device | None = None) -> Tensor:
        """(B, L, D) float32 embeddings read from the cache only (no encoder); KeyError naming missing prompts."""
        prompts = _as_prompt_list(prompts, "EmbeddingCache.lookup")
        found: dict[str, Tensor] = {}
        missing = []
        for p in dict.fromkeys(prompts):
            t = self.get(identity, p)
            if t is None:
                missing.append(p)
            else:
                found[p] = t
        if missing:
            raise KeyError(
                f"{len(missing)} prompt(s) not in the embedding cache {self.root} for this encoder: "
                + ", ".join(repr(m) for m in missing[:5])
            )
        self.hits += len(prompts)
        out = torch.stack([found[p] for p in prompts], 0)
        return out if device is None else out.to(device)

    def __contains__(self, item: tuple[str, str]) -> bool:
        identity, prompt = item
        k = self.key(identity, prompt)
        return self._recall(k) is not None or self.path(identity, prompt).is_file()

    # ---- batched ------------------------------------------------------------------------------

    def embed(
        self,
        encoder: TextEncoder,
        prompts: Sequence[str] | str,
        batch_size: int = 8,
        device: str | torch.device | None = None,
    ) -> Tensor:
        """(B, max_length, D) float32 embeddings; the encoder runs only on (unique) cache misses.

        Returned on `device` (default: the encoder's device). A hit and a miss give the same values
        (a miss returns what was stored). Trainable encoders are refused: their embeddings change
        with every optimiser step.
        """
        if encoder.trainable:
            raise ValueError(
                f"{type(encoder).__name__} is trainable; caching its embeddings would freeze stale values "
                f"(call the encoder directly)"
            )
        prompts = _as_prompt_list(prompts, "EmbeddingCache.embed")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        identity = encoder.identity
        out: list[Tensor | None] = [None] * len(prompts)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            if p in todo:
                todo[p].append(i)
                continue
            t = self.get(identity, p)
            if t is None:
                todo[p] = [i]
            else:
                self.hits += 1
                out[i] = t
        missing = list(todo)
        self.misses += len(missing)
        store = getattr(encoder, "storage_dtype", torch.float32)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad():
                emb = encoder(chunk)
            for p, e in zip(chunk, emb):
                stored = e.detach().to(device="cpu", dtype=store)
                self.put(identity, p, stored)
                value = stored.float()
                for i in todo[p]:
                    out[i] = value
        result = torch.stack([t for t in out if t is not None], 0)
        return result.to(device if device is not None else encoder.device)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def build_text_encoder(
    cfg: TextConfig,
    out_dim: int,
    backbone: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> TextEncoder:
    """Text encoder from config.

    `out_dim` is the width the video DiT takes (`VideoDiTConfig.text_input_dim`). The tiny encoder
    projects to it; the Cosmos encoder's width is fixed by its checkpoint (layers x hidden), so a
    mismatch is an error. `dtype` applies to the frozen Cosmos encoder only.
    """
    if cfg.kind == "tiny":
        return TinyTextEncoder(cfg, out_dim)
    if cfg.kind == "cosmos_reason1":
        path = cfg.path if cfg.path is not None else backbone
        if path is None:
            raise ValueError(
                "text.kind='cosmos_reason1' needs a folder: set text.path (Qwen2.5-VL / Cosmos-Reason1) or give the "
                "Cosmos backbone folder (which holds text_encoder/ and tokenizer/)"
            )
        enc = CosmosReason1TextEncoder.from_pretrained(path, dtype=dtype, max_length=cfg.max_length)
        if enc.embed_dim != out_dim:
            raise ValueError(
                f"the text encoder at {path} gives {enc.num_layers} layers x {enc.hidden_size} = {enc.embed_dim} "
                f"features per token, but the video DiT expects {out_dim} (video.crossattn_proj_in_channels / "
                f"text_input_dim)"
            )
        return enc
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; expected 'tiny' or 'cosmos_reason1'")
