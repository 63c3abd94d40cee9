"""Text encoders: tiny trainable encoder, Cosmos-Reason1 (tiny Qwen2.5-VL built here) and the embedding cache."""

import json
import os
import types
import warnings

import pytest
import torch

from dit4dit.config import TextConfig
from backbone_fixtures import tiny_qwen, tiny_tokenizer
from dit4dit.models.text import (
    COSMOS_SYSTEM_PROMPT,
    CosmosReason1TextEncoder,
    EmbeddingCache,
    TextEncoder,
    TinyTextEncoder,
    build_text_encoder,
)

PROMPTS = ["pick up the red block and place it in the bowl", "open the top drawer"]
N_LAYERS, HIDDEN = 3, 32


# --------------------------------------------------------------------------------------------
# Tiny trainable encoder
# --------------------------------------------------------------------------------------------


def test_tiny_encoder_shapes_and_grad():
    cfg = TextConfig(kind="tiny", max_length=16, width=32, num_layers=2, num_heads=4)
    enc = TinyTextEncoder(cfg, out_dim=24)
    assert isinstance(enc, TextEncoder) and enc.trainable and enc.embed_dim == 24 and enc.max_length == 16
    out = enc(["push the puck", "é€ unicode bytes and a prompt far longer than sixteen bytes", ""])
    assert out.shape == (3, 16, 24) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1])
    tokens = enc.tokenize(["ab", "é"])
    assert tokens[0, :3].tolist() == [97, 98, TinyTextEncoder.PAD]
    assert tokens[1, :3].tolist() == [0xC3, 0xA9, TinyTextEncoder.PAD]
    out.square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ident = enc.identity
    with torch.no_grad():
        enc.proj.bias.add_(1.0)
    assert enc.identity != ident  # weights changed -> new identity
    built = build_text_encoder(cfg, out_dim=24)
    assert isinstance(built, TinyTextEncoder)


# --------------------------------------------------------------------------------------------
# Tiny Qwen2.5-VL checkpoint + tokenizer, built offline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A Cosmos diffusers layout (`text_encoder/` + `tokenizer/`) and a plain Qwen2.5-VL folder."""
    tok = tiny_tokenizer(PROMPTS)
    model = tiny_qwen(tok, num_layers=N_LAYERS, hidden=HIDDEN)
    root = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(root / "cosmos" / "text_encoder")
    tok.save_pretrained(root / "cosmos" / "tokenizer")
    model.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    return types.SimpleNamespace(root=root, cosmos=root / "cosmos", plain=root / "plain")


@pytest.fixture(scope="module")
def cosmos_enc(qwen):
    return CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, dtype=torch.float32)


def _pipeline_embeds(folder_model, folder_tok, prompts, dtype, max_length=512):
    """What diffusers' Cosmos2_5_PredictBasePipeline computes, with components loaded the way it loads them."""
    from diffusers import Cosmos2_5_PredictBasePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder_model), dtype=dtype, local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder_tok), local_files_only=True)
    # The pipeline cannot be instantiated without the cosmos_guardrail safety checker; its own method is
    # run unchanged on an object holding the two components it uses.
    fake = types.SimpleNamespace(text_encoder=text_encoder, tokenizer=tokenizer)
    with torch.no_grad():
        return Cosmos2_5_PredictBasePipeline._get_prompt_embeds(
            fake, prompt=prompts, max_sequence_length=max_length, device=torch.device("cpu"), dtype=dtype
        )


def test_cosmos_matches_pipeline(qwen, cosmos_enc):
    enc = cosmos_enc
    assert enc.embed_dim == N_LAYERS * HIDDEN and enc.max_length == 512 and not enc.trainable
    out = enc(PROMPTS)
    assert out.shape == (2, 512, N_LAYERS * HIDDEN) and out.dtype == torch.float32
    ref = _pipeline_embeds(qwen.cosmos / "text_encoder", qwen.cosmos / "tokenizer", PROMPTS, torch.float32)
    assert ref.shape == out.shape
    assert torch.equal(out, ref)
    # per-layer blocks are normalised per token (mean 0, unbiased std 1)
    blocks = out.view(2, 512, N_LAYERS, HIDDEN)
    torch.testing.assert_close(blocks.mean(-1), torch.zeros(2, 512, N_LAYERS), atol=1e-5, rtol=0)
    torch.testing.assert_close(blocks.std(-1), torch.ones(2, 512, N_LAYERS), atol=1e-4, rtol=0)


def test_cosmos_prompt_format(cosmos_enc):
    ids = cosmos_enc.tokenize(PROMPTS[1])
    assert ids.shape == (1, 512)
    text = cosmos_enc.tokenizer.decode(ids[0].tolist())
    expected = (f"<|im_start|>system\n{COSMOS_SYSTEM_PROMPT}<|im_end|>\n"
                f"<|im_start|>user\n{PROMPTS[1]}<|im_end|>\n")
    assert text.startswith(expected)
    assert text[len(expected):] == "<|endoftext|>" * (512 - len(cosmos_enc.tokenizer(expected)["input_ids"]))


def test_cosmos_variants_match_pipeline(qwen):
    # bf16 text-only model vs the full model the pipeline loads (rotary buffers must stay float32)
    enc = CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, dtype=torch.bfloat16)
    ref = _pipeline_embeds(qwen.cosmos / "text_encoder", qwen.cosmos / "tokenizer", PROMPTS, torch.bfloat16)
    assert enc.storage_dtype == torch.bfloat16
    assert torch.equal(enc(PROMPTS), ref.float())
    # the full Qwen2_5_VLForConditionalGeneration path, plain folder, truncation to a short length
    long_prompt = " ".join(PROMPTS * 10)
    full = CosmosReason1TextEncoder.from_pretrained(qwen.plain, dtype=torch.float32, text_only=False, max_length=40)
    text = CosmosReason1TextEncoder.from_pretrained(qwen.plain, dtype=torch.float32, max_length=40)
    ref = _pipeline_embeds(qwen.plain, qwen.plain, [long_prompt, PROMPTS[0]], torch.float32, max_length=40)
    assert ref.shape == (2, 40, N_LAYERS * HIDDEN)
    assert torch.equal(full([long_prompt, PROMPTS[0]]), ref)
    assert torch.equal(text([long_prompt, PROMPTS[0]]), ref)


def test_cosmos_identity_frozen_and_layouts(qwen, cosmos_enc):
    again = CosmosReason1TextEncoder.from_pretrained(qwen.cosmos / "", subfolder="text_encoder", dtype=torch.float32)
    assert again.identity == cosmos_enc.identity  # stable across loads
    assert CosmosReason1TextEncoder.identity_for(qwen.cosmos, dtype=torch.float32) == cosmos_enc.identity
    plain = CosmosReason1TextEncoder.from_pretrained(qwen.plain, dtype=torch.float32)
    assert plain.identity != cosmos_enc.identity
    bf16 = CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, dtype=torch.bfloat16)
    assert bf16.identity != cosmos_enc.identity
    short = CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, dtype=torch.float32, max_length=64)
    assert short.identity != cosmos_enc.identity
    assert torch.equal(plain(PROMPTS), cosmos_enc(PROMPTS))
    assert not any(p.requires_grad for p in cosmos_enc.parameters())
    cosmos_enc.train()
    assert not cosmos_enc.model.training
    built = build_text_encoder(TextConfig(kind="cosmos_reason1", max_length=64), out_dim=N_LAYERS * HIDDEN,
                               backbone=str(qwen.cosmos), dtype=torch.float32)
    assert built.identity == short.identity
    with pytest.raises(ValueError, match="expects 100352"):
        build_text_encoder(TextConfig(kind="cosmos_reason1"), out_dim=100352, backbone=str(qwen.cosmos))
    with pytest.raises(ValueError, match="text.path"):
        build_text_encoder(TextConfig(kind="cosmos_reason1"), out_dim=96)


def test_cosmos_checkpoint_key_layouts(qwen, cosmos_enc, tmp_path):
    """A checkpoint saved with the in-memory key names (`model.language_model.*`) loads the same."""
    from safetensors.torch import load_file, save_file

    src = qwen.cosmos / "text_encoder"
    dst = tmp_path / "text_encoder"
    dst.mkdir()
    state = load_file(str(src / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        elif k.startswith("visual."):
            k = "model." + k
        renamed[k] = v
    save_file(renamed, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    os.symlink(qwen.cosmos / "tokenizer", tmp_path / "tokenizer")
    enc = CosmosReason1TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(enc(PROMPTS), cosmos_enc(PROMPTS))


def test_cosmos_missing_chat_template_falls_back(qwen, cosmos_enc, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen.cosmos / "tokenizer"), local_files_only=True)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tokenizer")
    for f in ("chat_template.jinja", "chat_template.json"):
        assert not (tmp_path / "tokenizer" / f).exists()
    os.symlink(qwen.cosmos / "text_encoder", tmp_path / "text_encoder")
    with pytest.warns(UserWarning, match="built-in Qwen2.5-VL template"):
        enc = CosmosReason1TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(enc(PROMPTS), cosmos_enc(PROMPTS))


def test_cosmos_errors(tmp_path, qwen):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CosmosReason1TextEncoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        CosmosReason1TextEncoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="subfolder"):
        CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, subfolder="nope")
    bad = tmp_path / "bad" / "text_encoder"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        CosmosReason1TextEncoder.from_pretrained(bad.parent, subfolder="text_encoder")


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------


class CountingEncoder(TextEncoder):
    """A frozen encoder with deterministic outputs that counts its calls."""

    def __init__(self, name="fake", dim=8, length=4, dtype=torch.float32):
        super().__init__()
        self.embed_dim, self.max_length, self.trainable = dim, length, False
        self.storage_dtype = dtype
        self.name = name
        self.calls = []

    @property
    def identity(self):
        return f"CountingEncoder|{self.name}"

    def forward(self, prompts):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(p.encode()) + 1000 * len(p))
            out.append(torch.randn(self.max_length, self.embed_dim, generator=g))
        return torch.stack(out).to(self.storage_dtype).float()


def test_cache_hits_never_run_encoder(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path / "cache")
    prompts = ["a", "bb", "a", "ccc"]
    direct = enc(prompts)
    enc.calls.clear()
    first = cache.embed(enc, prompts)
    assert enc.calls == [["a", "bb", "ccc"]]  # unique misses only, once
    assert torch.equal(first, direct)
    second = cache.embed(enc, ["ccc", "a"])
    assert len(enc.calls) == 1 and torch.equal(second, direct[[3, 0]])
    # a fresh cache object on the same folder: disk hits (no memory), still no encoder call
    cold = EmbeddingCache(tmp_path / "cache", memory_bytes=0)
    assert torch.equal(cold.embed(enc, prompts), direct)
    assert len(enc.calls) == 1 and cold.hits == 4 and cold.misses == 0
    # a different identity is a miss
    other = CountingEncoder(name="other")
    cold.embed(other, ["a"])
    assert other.calls == [["a"]]
    assert cold.get(other.identity, "bb") is None and cold.get(enc.identity, "bb") is not None
    # batching of misses
    enc2 = CountingEncoder(name="batched")
    cache.embed(enc2, [f"p{i}" for i in range(5)], batch_size=2)
    assert [len(c) for c in enc2.calls] == [2, 2, 1]


def test_cache_files_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st
    from safetensors import safe_open

    cache = EmbeddingCache(tmp_path)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b))[1])
    t = torch.randn(3, 5)
    path = cache.put("id", "prompt", t)
    assert replaced and replaced[-1][1] == path and replaced[-1][0] != path
    assert path == cache.path("id", "prompt") and path.suffix == ".safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["identity"] == "id" and f.metadata()["prompt"] == "prompt"
        assert torch.equal(f.get_tensor("embedding"), t)

    # a writer dying half-way leaves neither a final file nor a temp file
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.put("id", "other prompt", t)
    assert not cache.path("id", "other prompt").exists()
    assert all(not p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_cache_corrupt_file_is_a_miss(tmp_path):
    enc = CountingEncoder()
    EmbeddingCache(tmp_path).embed(enc, ["x"])
    cache = EmbeddingCache(tmp_path, memory_bytes=0)
    cache.path(enc.identity, "x").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cache.embed(enc, ["x"])
    assert len(enc.calls) == 2 and torch.equal(out, enc(["x"]))
    assert torch.equal(EmbeddingCache(tmp_path, memory_bytes=0).get(enc.identity, "x"), out[0])


def test_cache_refuses_trainable(tmp_path):
    enc = TinyTextEncoder(TextConfig(kind="tiny", max_length=8, width=16, num_layers=1, num_heads=2), out_dim=4)
    with pytest.raises(ValueError, match="trainable"):
        EmbeddingCache(tmp_path).embed(enc, ["x"])


def test_cache_with_cosmos_encoder(tmp_path, qwen):
    enc = CosmosReason1TextEncoder.from_pretrained(qwen.cosmos, dtype=torch.bfloat16, max_length=48)
    calls = []
    enc.register_forward_pre_hook(lambda mod, args: calls.append(args[0]))
    direct = enc(PROMPTS)
    calls.clear()
    cache = EmbeddingCache(tmp_path)
    miss = cache.embed(enc, PROMPTS)
    hit = EmbeddingCache(tmp_path, memory_bytes=0).embed(enc, PROMPTS)
    assert len(calls) == 1
    assert miss.dtype == torch.float32 and torch.equal(miss, direct) and torch.equal(hit, direct)
    # serving from the cache alone: identity without loading weights, lookup without an encoder
    ident = CosmosReason1TextEncoder.identity_for(qwen.cosmos, dtype=torch.bfloat16, max_length=48)
    assert ident == enc.identity
    assert torch.equal(EmbeddingCache(tmp_path).lookup(ident, PROMPTS[::-1]), direct.flip(0))
    with pytest.raises(KeyError, match="not cached"):
        cache.lookup(ident, ["not cached"])
    with safe_open_tensor(cache.path(enc.identity, PROMPTS[0])) as t:
        assert t.dtype == torch.bfloat16 and t.shape == (48, N_LAYERS * HIDDEN)  # stored losslessly in bf16


class safe_open_tensor:
    def __init__(self, path):
        from safetensors import safe_open

        self._f = safe_open(str(path), framework="pt")

    def __enter__(self):
        return self._f.__enter__().get_tensor("embedding")

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)
