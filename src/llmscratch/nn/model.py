"""The GPT: token and position embeddings, N transformer blocks, a language-model head.

```
idx (B, T) ─▶ tok_emb (+ pos_emb) ─▶ dropout               (B, T, C)
           ─▶ N × [x + attn(norm1(x)),  x + ff(norm2(x))]  (B, T, C)
           ─▶ final_norm ─▶ out_head                        (B, T, V)
```

The model knows nothing of training, files or devices. Parameter names are our own
(``checkpoint.py`` maps them to Hugging Face GPT-2 and to the book's ``GPTModel``):

``tok_emb``, ``pos_emb`` (learned positions only), ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv`` (Q, K, V stacked in that order), ``blocks.{i}.attn.out_proj``,
``blocks.{i}.norm2``, ``blocks.{i}.ff.fc_in``, ``blocks.{i}.ff.fc_out``, ``final_norm``,
``out_head`` (shares ``tok_emb.weight`` when ``tie_weights``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .attention import BACKENDS, attend
from ..errors import ConfigError
from .positions import (
    POSITION_KINDS,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
    sinusoidal_embedding,
)


@dataclass
class GPTConfig:
    """Everything that fixes the shape and the arithmetic of a GPT.

    The defaults are the book's ``GPT_CONFIG_124M`` (GPT-2 small without qkv biases).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    bias: bool = True  # biases of the other linear layers and of the LayerNorms
    tie_weights: bool = False
    pos_emb: str = "learned"  # one of POSITION_KINDS
    scale_attn: bool = True  # multiply Q·Kᵀ by 1/√d_head
    attn_backend: str = "fused"  # "fused" (SDPA) or "explicit"
    rope_base: float = 10000.0
    # The feed-forward nonlinearity: "gelu" (GPT-2's tanh approximation) or "relu2"
    # (squared ReLU, from "Primer", So et al. 2021: cheaper, and it learned faster in our CPU runs).
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5  # the epsilon of every norm (LayerNorm or RMSNorm)
    # The modern family (Llama, Qwen, SmolLM2); every default keeps GPT-2's shape.
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen: no mean, no bias)
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None: n_heads
    head_size: Optional[int] = None  # each head's dimension; None: emb_dim / n_heads (Qwen3 sets it)
    hidden_dim: Optional[int] = None  # the MLP's hidden width; None: 4 · emb_dim
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
    # Llama 3's stretch of RoPE's low frequencies: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: plain RoPE.
    rope_scaling: Optional[dict[str, Any]] = None
    # Pad the LM head's rows to a multiple of this on CUDA for faster matrix products.
    # Padded rows exist only inside forward: never saved, never sampled, never counted.
    pad_vocab_multiple: int = 64

    def __post_init__(self) -> None:
        check_field_types(self, lambda name, wanted, value: f"GPTConfig.{name} must be {wanted}, "
                                                            f"got {value!r}{_option(name)}")
        positive = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "pad_vocab_multiple")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                                  f"{_option(name)}")
        for name in ("n_kv_heads", "head_size", "hidden_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer or null (derived), "
                                  f"got {getattr(self, name)!r}")
        if self.head_size is None and self.emb_dim % self.n_heads != 0:
            raise ConfigError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}): "
                              f"each head gets emb_dim / n_heads dimensions (options --emb-dim, --n-heads)")
        if self.n_heads % self.kv_heads != 0:
            raise ConfigError(f"GPTConfig.n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads}): "
                              f"each key/value head serves an equal group of query heads")
        check_rope_scaling(self.rope_scaling)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}{_option('drop_rate')}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"GPTConfig.layer_norm_eps must be a small positive number such as 1e-5 (it keeps "
                              f"LayerNorm from dividing by zero), got {self.layer_norm_eps!r}")
        if not self.rope_base > 1:
            raise ConfigError(f"GPTConfig.rope_base must be greater than 1 (RoPE's frequencies are powers of "
                              f"1/rope_base; the usual value is 10000), got {self.rope_base!r}")
        for name, choices in (("pos_emb", POSITION_KINDS), ("activation", ACTIVATIONS), ("attn_backend", BACKENDS),
                              ("norm", NORMS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"GPTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}"
                                  f"{_option(name)}")
        if self.pos_emb == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"GPTConfig.pos_emb 'rope' needs an even head dimension, got {self.head_dim}")
        if self.rope_scaling is not None and self.pos_emb != "rope":
            raise ConfigError(f"GPTConfig.rope_scaling is for pos_emb 'rope', not {self.pos_emb!r}")
        if self.pos_emb == "sinusoidal" and self.emb_dim % 2 != 0:
            raise ConfigError(f"GPTConfig.pos_emb 'sinusoidal' needs an even emb_dim, got {self.emb_dim}")

    @property
    def head_dim(self) -> int:
        """Each head's dimension: ``head_size`` where set, else the head's share of the embedding, ``emb_dim / n_heads``."""
        return self.head_size if self.head_size is not None else self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The key/value heads: ``n_kv_heads`` where set (grouped-query attention), else one per query head."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ff_hidden(self) -> int:
        """The MLP's hidden width: ``hidden_dim`` where set, else GPT-2's ``4 · emb_dim``."""
        return self.hidden_dim if self.hidden_dim is not None else 4 * self.emb_dim

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """The config a mapping (``config.json``'s, a config file's ``model:``) describes.

        An unknown field is an error, not ignored. A number written as a string is read as a
        number, as ``TrainConfig.from_dict`` does: YAML 1.1, which PyYAML reads, takes
        ``layer_norm_eps: 1e-5`` (no dot) for the string ``"1e-5"``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a GPTConfig is a mapping of field names to values, got {type(data).__name__} "
                              f"{data!r}")
        fields = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields: {fields}")
        return cls(**numbers_from_strings(cls, data))

    def to_json(self) -> str:
        """The config as ``config.json`` holds it."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset of :data:`PRESETS`, with ``overrides`` applied on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Presets are deltas from the base (GPTConfig's defaults = the book's GPT_CONFIG_124M).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": {},
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
    # nanoGPT's shape of GPT-2 small: tied weights, no biases, no dropout.
    "nanogpt-124m": dict(tie_weights=True, bias=False, drop_rate=0.0),
    # Sized for a 2-core CPU: the default of `llmscratch train` (chosen by timed runs, see README):
    # nanoGPT's CPU recipe shape (4 layers, 4 heads, 128 dims, context 64) with a 4096-token BPE,
    # RoPE and a squared-ReLU MLP (each lowered the held-out loss at the same steps). At 64
    # tokens the written-out attention is faster on a CPU than SDPA's kernel (docs/performance.md).
    "cpu": dict(vocab_size=4096, context_length=64, emb_dim=128, n_layers=4, n_heads=4,
                drop_rate=0.0, tie_weights=True, pos_emb="rope", activation="relu2", attn_backend="explicit"),
    # Twice as wide with four times the context: the first default, kept for comparisons.
    "cpu-wide": dict(vocab_size=4096, context_length=256, emb_dim=256, n_layers=4, n_heads=4,
                     drop_rate=0.0, tie_weights=True),
    # For tests and quick experiments: seconds on a CPU.
    "test": dict(vocab_size=256, context_length=32, emb_dim=32, n_layers=2, n_heads=4, drop_rate=0.0),
}

# The modern family's common shape: RMSNorm, a SwiGLU MLP, RoPE, no biases, no dropout.
_MODERN: dict[str, Any] = dict(norm="rmsnorm", activation="swiglu", pos_emb="rope", bias=False, drop_rate=0.0,
                               tie_weights=True)
PRESETS.update({
    # SmolLM2-135M (Hugging Face): Llama's architecture, 9 query heads sharing 3 key/value heads.
    "smollm2-135m": dict(_MODERN, vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, hidden_dim=1536, rope_base=100000.0),
    # Llama 3.2 1B (Meta): 32 query heads over 8 key/value heads, RoPE stretched to 128k tokens.
    "llama3.2-1b": dict(_MODERN, vocab_size=128256, context_length=131072, emb_dim=2048, n_layers=16, n_heads=32,
                        n_kv_heads=8, hidden_dim=8192, rope_base=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    # Qwen2.5 0.5B (Alibaba): biases on q, k and v only.
    "qwen2.5-0.5b": dict(_MODERN, vocab_size=151936, context_length=32768, emb_dim=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, hidden_dim=4864, qkv_bias=True, rope_base=1000000.0, layer_norm_eps=1e-6),
    # Qwen3 0.6B (Alibaba): heads of 128 dimensions over a 1024-wide stream, RMSNorm on q and k.
    "qwen3-0.6b": dict(_MODERN, vocab_size=151936, context_length=40960, emb_dim=1024, n_layers=28, n_heads=16,
                       n_kv_heads=8, head_size=128, hidden_dim=3072, qk_norm=True, rope_base=1000000.0,
                       layer_norm_eps=1e-6),
    # A tiny Llama-shaped model for tests: grouped-query attention, SwiGLU, RMSNorm.
    "test-llama": dict(_MODERN, vocab_size=256, context_length=32, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       hidden_dim=48),
})


ACTIVATIONS = ("gelu", "relu2", "swiglu")
NORMS = ("layernorm", "rmsnorm")
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: Optional[dict[str, Any]]) -> None:
    """Refuse a ``rope_scaling`` that is not Llama 3's, naming what is wrong (the only kind implemented)."""
    if scaling is None:
        return
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ConfigError(f"GPTConfig.rope_scaling: only Llama 3's (rope_type 'llama3') is implemented, got {scaling!r}")
    missing = [k for k in ROPE_SCALING_KEYS[1:] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ConfigError(f"GPTConfig.rope_scaling lacks the number(s) {missing}; Llama 3's needs {ROPE_SCALING_KEYS}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"] or not scaling["factor"] >= 1:
        raise ConfigError(f"GPTConfig.rope_scaling needs high_freq_factor > low_freq_factor and factor >= 1, "
                          f"got {scaling!r}")


def numbers_from_strings(config_class: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with a string in a float field of dataclass ``config_class`` read as the number it spells.

    YAML 1.1, which PyYAML reads, takes ``lr: 3e-3`` and ``layer_norm_eps: 1e-5`` (no dot) for
    strings. A string that is no number stays, for the config's own check to name.
    """
    def kind(f: dataclasses.Field) -> str:
        return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))

    floats = {f.name for f in dataclasses.fields(config_class) if kind(f) in ("float", "Optional[float]")}
    out = dict(data)
    for name, value in data.items():
        if name in floats and isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def check_field_types(config: Any, message: Callable[[str, str, Any], str]) -> None:
    """Check every dataclass field of ``config`` against its annotation, first of all: a config file can hold anything.

    Annotations: ``int``, ``float`` (finite), ``str``, ``bool``, ``dict[str, Any]``, each possibly
    ``Optional[...]`` (then None passes). A wrong one raises ConfigError with
    ``message(field name, what it must be, the value)``.
    """
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("Optional["):
            if value is None:
                continue
            kind = kind.removeprefix("Optional[").removesuffix("]")
        wanted, ok = {
            "int": ("an integer", isinstance(value, int) and not isinstance(value, bool)),
            "float": ("a finite number", isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value)),
            "str": ("a string", isinstance(value, str)),
            "bool": ("true or false", isinstance(value, bool)),
            "dict[str, Any]": ("a mapping", isinstance(value, dict)),
        }[kind]
        if not ok:
            raise ConfigError(message(f.name, wanted, value))


# The `llmscratch train` option that sets a GPTConfig field, where one does: error messages name it.
# The other fields are set under `model:` in a --config file, by the field's own name.
FIELD_OPTIONS = {
    "n_layers": "--n-layers", "n_heads": "--n-heads", "emb_dim": "--emb-dim", "context_length": "--context-length",
    "pos_emb": "--pos-emb", "drop_rate": "--dropout", "attn_backend": "--attn-backend", "activation": "--activation",
    "scale_attn": "--no-scale-attn",
}


def _option(field: str) -> str:
    """`` (option --dropout)``: the end of an error message about a field that an option sets, else ``""``."""
    return f" (option {FIELD_OPTIONS[field]})" if field in FIELD_OPTIONS else ""


INIT_STD = 0.02  # GPT-2's initial standard deviation of embeddings and weights
# Tokens per chunk of the fused head + loss on the CPU: the (chunk, V) logits of the cpu
# preset's whole batch (1024 × 4096 floats, 16 MB) in one piece was the fastest measured.
CPU_LOSS_CHUNK = 1024
LOSS_IMPLS = ("auto", "plain", "chunked", "kernel")  # GPT.loss_impl
WEIGHT_LAYOUTS = ("row", "column")  # how a weight matrix lies in memory: store_weight, weight_layout


@torch.no_grad()
def store_weight(weight: nn.Parameter, layout: str) -> None:
    """Store ``weight (out, in)`` row-major (``"row"``, PyTorch's default) or column-major (``"column"``).

    Only the strides change: the values, the shape and the Parameter object stay (a tied module
    or an optimizer still holds the same one). Column-major memory holds ``Wᵀ`` row by row, so
    ``F.linear``'s ``x @ Wᵀ`` multiplies by a contiguous ``(in, out)`` matrix: the same product,
    which a BLAS library may run at a different speed (see ``generate.choose_weight_layout``).
    """
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"only a matrix has a row or column layout, got a weight of shape {tuple(weight.shape)}")
    if weight_layout(weight) != layout:
        weight.data = weight.data.t().contiguous().t() if layout == "column" else weight.data.contiguous()


def weight_layout(weight: torch.Tensor) -> str:
    """``"column"`` for a matrix stored transposed (see :func:`store_weight`), else ``"row"``."""
    return "column" if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous() else "row"


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ Wᵀ + b`` by oneDNN with ``W`` packed by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear``, plus an optional packed copy of the weight for decoding on a CPU.

    A decode step multiplies a few rows by every weight matrix. MKL, PyTorch's CPU matrix
    library, runs such products (2 to 16 rows) far below the speed of memory on this project's
    x86 VM: 30 ms for 8 rows by GPT-2's (50257, 768) head, where oneDNN (also inside PyTorch,
    the library ``torch.compile`` uses on CPUs) takes 12.5 ms with the weight packed once into
    its blocked layout (docs/performance.md). :meth:`pack` makes that copy;
    ``generate.choose_weight_layout`` packs a shape only where it measured it faster.

    The copy is used only where it computes what ``F.linear`` would: no gradient recorded, not
    under ``torch.compile``, and the weight unchanged since packing (the same memory, no
    in-place update since: an optimizer step, ``load_state_dict`` or ``.to()`` makes the copy
    stale, and the layer quietly goes back to ``F.linear``). An edit through ``.data``
    (``layer.weight.data.normal_()``) is the exception: it bypasses the version counter that
    PyTorch keeps for in-place updates, so after one call :meth:`unpack` (or
    ``model.unpack_weights()``), or edit under ``torch.no_grad()`` instead. It is never saved or copied:
    ``state_dict``, ``torch.save`` and ``copy.deepcopy`` see a plain ``nn.Linear``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.packed: Optional[torch.Tensor] = None  # oneDNN's blocked copy of `weight`
        self._packed_from: Optional[tuple[int, int]] = None  # (weight.data_ptr(), weight._version) at packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.packed is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and self.is_packed()):
            return _packed_product(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def is_packed(self) -> bool:
        """Whether a packed copy exists and is current: the weight still lies where it was packed, unchanged."""
        return self.packed is not None and self._packed_from == (self.weight.data_ptr(), self.weight._version)

    @torch.no_grad()
    def pack(self, rows: Optional[int] = None) -> bool:
        """Make the packed copy (tuned for ``rows`` rows a product); whether it could be made.

        Not where this PyTorch lacks oneDNN's ops, off the CPU, or where the packed product
        does not match ``F.linear`` on a test row (then nothing is packed).
        """
        self.unpack()
        w = self.weight
        if w.device.type != "cpu" or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows)
            probe = torch.randn(2, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
            got, want = _packed_product(probe, packed, self.bias), F.linear(probe, w, self.bias)
        except (RuntimeError, NotImplementedError):  # no oneDNN build, or no kernel for this dtype
            return False
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
            return False
        self.packed, self._packed_from = packed, (w.data_ptr(), w._version)
        return True

    def unpack(self) -> None:
        """Drop the packed copy (and its memory): back to ``F.linear``."""
        self.packed, self._packed_from = None, None

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's opaque tensor has no storage to copy or pickle; it is a cache, made again by pack().
        return {**super().__getstate__(), "packed": None, "_packed_from": None}


class KVCache:
    """Keys and values of earlier tokens, preallocated for ``max_len`` tokens per layer.

    During generation the prompt is run once (prefill) and each new token then attends
    to the stored keys and values instead of recomputing them: one token's work per step
    instead of the whole sequence's. It holds the key/value heads only: with grouped-query
    attention (``n_kv_heads < n_heads``) that is ``n_heads / n_kv_heads`` times less memory.
    """

    def __init__(
        self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch, n_heads, max_len, head_dim)  # (L, B, H, T_max, d)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens stored so far (the same for every layer)

    @classmethod
    def for_model(cls, cfg: GPTConfig, batch: int, max_len: Optional[int] = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        """A cache shaped for ``cfg``'s layers and heads, ``max_len`` tokens long (default: the context length)."""
        return cls(cfg.n_layers, batch, cfg.kv_heads, max_len or cfg.context_length, cfg.head_dim, device, dtype)

    def reset(self) -> None:
        """Forget the stored tokens (the memory stays allocated), ready for a new prompt."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (B, H, T_new, d)`` after the cached tokens; return all keys and values so far.

        ``length`` is not advanced here: every layer stores at the same positions, and
        ``GPT.forward`` advances it once all layers have stored theirs.
        """
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {end} tokens do not fit in a cache of {self.max_len}; "
                "allocate a longer cache or crop the sequence"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H, T_total, d) each


class StaticKVCache:
    """A KV cache with fixed shapes, for a decode step that can be compiled and graph-captured.

    :class:`KVCache` returns keys and values that grow by one column per step, so every
    step has new shapes. Here every step has the same shapes: each layer's keys and values
    are ``(B, H, T_max, d)`` tensors, the new ones are written with ``index_copy_`` at the
    slots given by a position *tensor* (no Python int, so no host sync), and attention runs
    over the whole preallocated cache with a mask ``key slot <= query position`` that hides
    the slots not written yet. That holds when the positions fill the slots from 0 with no
    gap, as :class:`~llmscratch.inference.generate.StaticDecoder` writes them (a prompt at 0 … T-1, then
    one slot a step): a slot below a query's position that was never written would be seen,
    as a zero key and value. The caller keeps the positions (and keeps them below
    ``max_len``): this cache holds no length.

    On CUDA the tensors are marked as static addresses, so a CUDA graph of the decode step
    (``torch.compile(mode="reduce-overhead")``) writes into them in place on every replay.
    Every row shares the same positions: prompts of equal length, no padding.
    """

    def __init__(
        self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ):
        shape = (batch, n_heads, max_len, head_dim)  # (B, H, T_max, d) per layer
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)  # (T_max,) the key positions
        if torch.device(device).type == "cuda":
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    @classmethod
    def for_model(cls, cfg: GPTConfig, batch: int, max_len: Optional[int] = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "StaticKVCache":
        """A cache shaped for ``cfg``'s layers and heads, ``max_len`` tokens long (default: the context length)."""
        return cls(cfg.n_layers, batch, cfg.kv_heads, max_len or cfg.context_length, cfg.head_dim, device, dtype)

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """Which cache slots each new token may attend to: ``(T_new, T_max)`` bool, ``True`` = visible."""
        return self.slots.unsqueeze(0) <= positions.unsqueeze(1)  # (T_new, T_max)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (B, H, T_new, d)`` at slots ``positions (T_new,)``; return the whole cache of ``layer``."""
        self.k[layer].index_copy_(2, positions, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, positions, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]  # (B, H, T_max, d) each


def pads_vocabulary(device: torch.device) -> bool:
    """Whether the head's weight is padded to ``pad_vocab_multiple`` rows on ``device``: on CUDA,
    whose matrix units run multiples of 64 faster; on a CPU the extra rows would only add work."""
    return device.type == "cuda"


@dataclass
class _Step:
    """What every layer needs to know about the current call (built once per forward)."""

    rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    alibi: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None
    cache: Optional[KVCache] = None
    static_cache: Optional[StaticKVCache] = None
    positions: Optional[torch.Tensor] = None  # (T,) slots of the new tokens in a static cache
    visible: Optional[torch.Tensor] = None  # (T, T_max) bool mask over a static cache
    need_weights: bool = False  # the explicit attention path, so that the weights exist (and are traced)
    weights: list = field(default_factory=list)
    # trace(layer, name, tensor): each attention layer hands over what it computes, in order:
    # "q", "k", "v" (B, H, T, d) per head (after RoPE where the model uses it; before the KV
    # cache), "weights" (B, H, T, T_total) with need_weights, "context" (B, H, T, d), "output"
    # (B, T, C). The inspection tools read attention through it instead of computing it again.
    trace: Optional[Callable[[int, str, torch.Tensor], None]] = None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019), as Llama and Qwen use it.

    ``x / √(mean(x²) + eps) · weight``: LayerNorm without the mean subtraction and the bias,
    cheaper and as good in practice. Computed in float32 whatever the input's precision.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` → ``(..., dim)``, each vector scaled to unit root mean square, then by ``weight``."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(cfg: GPTConfig, dim: Optional[int] = None) -> nn.Module:
    """The config's norm over ``dim`` features (default ``emb_dim``): LayerNorm or RMSNorm."""
    dim = dim or cfg.emb_dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as used inside the GPT, with grouped-query attention as an option.

    One ``qkv`` projection computes Q, K and V together (one matrix product instead of
    three); the causal mask is built per call, so relative positions run past the
    training length. With ``n_kv_heads < n_heads`` there are fewer key/value heads than
    query heads, each shared by a group of query heads (grouped-query attention, Ainslie et
    al. 2023): K and V, and the KV cache that stores them, shrink by that factor.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.emb_dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.out_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.layer_norm_eps)

    def project(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, C)`` → per-head ``q (B, H, T, d)``, ``k, v (B, H_kv, T, d)``; q and k rotated by RoPE's ``(cos, sin)``."""
        b, t, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        # The fused output is every query head, then every key head, then every value head,
        # whatever the head counts: one view splits it into heads, with no copy.
        qkv = self.qkv(x).view(b, t, h + 2 * h_kv, d).transpose(1, 2)  # (B, H + 2·H_kv, T, d)
        qk, v = qkv.split([h + h_kv, h_kv], dim=1)  # (B, H + H_kv, T, d), (B, H_kv, T, d)
        if self.cfg.qk_norm:  # each head's vector normalised on its own, with q's and k's own weights
            q, k = qk.split([h, h_kv], dim=1)  # (B, H, T, d), (B, H_kv, T, d)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)  # (B, H + H_kv, T, d)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated in one pass: they share the angles
        q, k = qk.split([h, h_kv], dim=1)  # (B, H, T, d), (B, H_kv, T, d)
        return q, k, v

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """``(B, T, C)`` → ``(B, T, C)``: attention over the visible tokens (cache, positions, masks from ``step``)."""
        b, t, _ = x.shape
        q, k, v = self.project(x, step.rope)  # (B, H, T, d), 2 × (B, H_kv, T, d)
        trace = step.trace
        if trace is not None:
            for name, tensor in (("q", q), ("k", k), ("v", v)):
                trace(self.layer, name, tensor)
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)  # (B, H_kv, T_total, d)
        elif step.static_cache is not None:
            k, v = step.static_cache.write(self.layer, step.positions, k, v)  # (B, H_kv, T_max, d)
        dropout_p = self.cfg.drop_rate if self.training else 0.0
        backend = "explicit" if step.need_weights else self.cfg.attn_backend
        y, weights = attend(
            q, k, v, causal=True, key_padding_mask=step.key_padding_mask, attn_bias=step.alibi,
            scale=self.cfg.scale_attn, dropout_p=dropout_p, backend=backend,
            need_weights=step.need_weights, causal_mask=step.visible,
        )  # (B, H, T, d)
        if step.need_weights:
            step.weights.append(weights)
        y_merged = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H·d): heads merged
        out = self.out_proj(y_merged)  # (B, T, C)
        if trace is not None:
            if weights is not None:
                trace(self.layer, "weights", weights)
            trace(self.layer, "context", y)
            trace(self.layer, "output", out)
        return out


class FeedForward(nn.Module):
    """Position-wise MLP: expand to ``ff_hidden`` (4·C for GPT-2), a nonlinearity, project back.

    ``cfg.activation``: GELU with the tanh approximation (GPT-2), the squared ReLU ``relu(h)²``
    of Primer, or SwiGLU (Shazeer 2020; Llama, Qwen), where ``fc_in`` computes two vectors,
    a gate and a value, stacked along its output, and ``silu(gate) · value`` goes on.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.activation = cfg.activation
        hidden = cfg.ff_hidden
        self.fc_in = Linear(cfg.emb_dim, 2 * hidden if cfg.activation == "swiglu" else hidden, bias=cfg.bias)
        self.fc_out = Linear(hidden, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` → ``(B, T, C)``, each position on its own (attention is what mixes the tokens)."""
        h = self.fc_in(x)  # (B, T, hidden), or (B, T, 2·hidden) for SwiGLU
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)  # 2 × (B, T, hidden)
            h = F.silu(gate) * value
        elif self.activation == "relu2":
            h = torch.square(F.relu(h))
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc_out(h)  # (B, T, C)


class Block(nn.Module):
    """A pre-norm transformer block: attention and feed-forward, each with a residual."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        """``(B, T, C)`` → ``(B, T, C)``: the residual stream after this block's attention and feed-forward."""
        x = x + self.drop(self.attn(self.norm1(x), step))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x


class GPT(nn.Module):
    """A decoder-only language model: GPT-2's shape by default, Llama's and Qwen's by the config's options."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        if cfg.pos_emb == "alibi":
            self.register_buffer("alibi_slopes", torch.empty(cfg.n_heads), persistent=False)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        # How training computes the head and the loss (not part of the config: every way gives
        # the same numbers up to rounding), one of LOSS_IMPLS:
        #   "plain": logits, then F.cross_entropy (the readable path; what inference uses);
        #   "chunked": linear_cross_entropy, `loss_chunk` tokens at a time (faster on the CPU);
        #   "kernel": kernels.head_cross_entropy, the Triton kernel on CUDA (on the CPU, the
        #             kernel's PyTorch reference, for tests);
        #   "auto": "chunked" on the CPU, "kernel" on CUDA where Triton is installed, else "plain".
        self.loss_impl: str = "auto"
        self.loss_chunk: int = CPU_LOSS_CHUNK
        self.reset_buffers()
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Compute the buffers that are not saved (ALiBi's slopes); again after ``to_empty``."""
        if self.cfg.pos_emb == "alibi":
            self.alibi_slopes.copy_(alibi_slopes(self.cfg.n_heads))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/√(2·layers), zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.out_proj.weight", "ff.fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=INIT_STD)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head is not counted twice)."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields shared ones once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.cfg.pos_emb == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        positions: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache | StaticKVCache] = None,
        need_weights: bool = False,
        trace: Optional[Callable[[int, str, torch.Tensor], None]] = None,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the model.

        Args:
            idx: token ids ``(B, T)``.
            targets: next-token ids ``(B, T)``; ``-100`` marks positions left out of the loss.
            positions: position ids ``(B, T)`` or ``(T,)``; default ``0..T-1`` after the cached tokens.
            key_padding_mask: ``(B, T_total)`` bool over every key (cached + new), ``False`` = padding.
            cache: a :class:`KVCache` (the new keys and values are appended to it) or a
                :class:`StaticKVCache` (written at ``positions``, which it then requires as a
                ``(T,)`` tensor; no range check, so no host sync: the caller keeps them in range
                and fills the slots from 0 with no gap).
            need_weights: also return the per-layer attention weights (explicit backend).
            trace: ``trace(layer, name, tensor)`` sees what every attention layer computes (see
                ``_Step.trace``): per-head q, k, v, the weights (with ``need_weights``), the context.
            last_only: the logits of the last position only, ``(B, 1, V)`` (a prefill needs no
                others; the head is a third of a 128-token prefill of GPT-2 small).

        Returns:
            logits ``(B, T, V)``, or the mean cross-entropy loss when ``targets`` is given;
            with ``need_weights``, a pair ``(that, [weights (B, H, T, T_total) per layer])``.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, tokens), got {tuple(idx.shape)}")
        b, t = idx.shape
        static = cache if isinstance(cache, StaticKVCache) else None
        if static is not None:
            if positions is None or positions.dim() != 1 or key_padding_mask is not None:
                raise ValueError("a StaticKVCache needs positions as a (T,) tensor and no key_padding_mask")
            if self.cfg.pos_emb == "alibi":
                raise ValueError("a StaticKVCache does not support alibi positions; use KVCache")
            cache = None
        start = cache.length if cache is not None else 0
        if self.cfg.pos_emb == "learned" and static is None:
            self._check_learned_positions(positions, start + t - 1)
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device)  # (T,)

        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.pos_emb == "learned":
            x = x + self.pos_emb(positions)  # (B, T, C); (T, C) broadcasts over the batch
        elif self.cfg.pos_emb == "sinusoidal":
            # Scaled to the token embeddings' initial size: unscaled, the ±1 sines swamp the
            # 0.02-sized token vectors and the model learns far slower (docs/experiments.md).
            x = x + (INIT_STD * sinusoidal_embedding(positions, self.cfg.emb_dim)).to(x.dtype)
        x = self.drop(x)

        step = _Step(key_padding_mask=key_padding_mask, cache=cache, need_weights=need_weights, trace=trace)
        if static is not None:
            step.static_cache, step.positions, step.visible = static, positions, static.visible(positions)
        if self.cfg.pos_emb == "rope":
            step.rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base, self.cfg.rope_scaling)
        elif self.cfg.pos_emb == "alibi":
            step.alibi = alibi_bias(self.alibi_slopes, t, start + t, idx.device)  # (H, T, T_total)
        for block in self.blocks:
            x = block(x, step)
        if cache is not None:
            cache.length += t
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.final_norm(x)  # (B, T, C)

        if targets is None:
            out = self.logits(x)
        else:
            out = self.loss(x, targets)
        return (out, step.weights) if need_weights else out

    def _check_learned_positions(self, positions: Optional[torch.Tensor], default_top: int) -> None:
        """Refuse a position past the learned table. Default positions (``None``: their top is
        ``default_top``) are checked on the host's ints: no device sync (and no graph break
        under torch.compile) in the training step."""
        top = default_top if positions is None else (int(positions.max()) if positions.numel() else 0)
        if top >= self.cfg.context_length:
            raise ValueError(
                f"position {top} is past the context length {self.cfg.context_length} of learned "
                "position embeddings; crop the input or use rope/alibi/sinusoidal/none positions"
            )

    def _head_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head's weight, padded to a multiple of ``pad_vocab_multiple`` rows on CUDA."""
        w = self.out_head.weight  # (V, C)
        pad = -self.cfg.vocab_size % self.cfg.pad_vocab_multiple  # rows up to the next multiple
        if pad and pads_vocabulary(x.device):
            w = F.pad(w, (0, 0, 0, pad))  # (V_pad, C); the extra rows are zeros
        return w

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, T, C)`` → logits over the real vocabulary ``(B, T, V)``."""
        w = self._head_weight(x)  # (V_pad, C)
        logits = self.out_head(x) if w is self.out_head.weight else F.linear(x, w)  # (B, T, V_pad)
        return logits[..., : self.cfg.vocab_size]  # (B, T, V)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from final hidden states, in float32."""
        impl = self.loss_implementation(x.device)
        if impl != "plain" and torch.is_grad_enabled() and x.requires_grad:
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            flat_x, flat_targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # (B·T, C), (B·T,)
            if impl == "kernel":
                return kernels.head_cross_entropy(flat_x, self._head_weight(x), flat_targets, self.cfg.vocab_size, dtype)
            return linear_cross_entropy(flat_x, self._head_weight(x), flat_targets, self.cfg.vocab_size,
                                        self.loss_chunk, dtype)
        logits = self.logits(x)  # (B, T, V)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
        )  # (B·T, V) against (B·T,)

    def unpack_weights(self) -> None:
        """Drop every packed copy of a weight (:meth:`Linear.pack`) and the memory it holds."""
        for layers in self.linear_layers().values():
            for layer in layers:
                layer.unpack()

    def linear_layers(self) -> dict[tuple[int, int], list[Linear]]:
        """The model's linear layers (the head included), grouped by their weight's ``(out, in)`` shape."""
        groups: dict[tuple[int, int], list[Linear]] = {}
        for module in self.modules():
            if isinstance(module, Linear):
                groups.setdefault(tuple(module.weight.shape), []).append(module)
        return groups

    def loss_implementation(self, device: torch.device) -> str:
        """Which way :meth:`loss` computes a training loss on ``device`` (``loss_impl`` resolved)."""
        impl = self.loss_impl
        if impl not in LOSS_IMPLS:
            raise ValueError(f"GPT.loss_impl must be one of {LOSS_IMPLS}, not {impl!r}")
        if impl == "auto":
            if device.type == "cpu":
                return "chunked"
            return "kernel" if kernels.triton_available(device) else "plain"
        if impl == "kernel" and not kernels.triton_available(device) and device.type != "cpu":
            raise ValueError(f"GPT.loss_impl='kernel' needs a CUDA device with Triton and a C compiler, not {device}; "
                             "use 'plain' or 'chunked'")
        return impl


def loss_label(impl: str, device: torch.device) -> str:
    """How logs and tables name the loss :meth:`GPT.loss_implementation` resolved to on ``device``."""
    if impl == "kernel" and device.type == "cpu":  # the custom operator's CPU implementation: the same math
        return "kernel loss (its PyTorch reference: Triton kernels run on CUDA)"
    return f"{impl} loss"


@functools.cache
def _onednn_logits() -> bool:
    """Whether :func:`_logits_product` may use oneDNN: an x86 CPU build with the op, giving ``F.linear``'s values."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (RuntimeError, NotImplementedError):  # PyTorch built without oneDNN
        return False
    return torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-6)


def _logits_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x (n, C) @ w (V, C)ᵀ``: the head's forward product, by oneDNN for float32 on an x86 CPU.

    This one product, many rows by a wide vocabulary over a narrow ``C`` (1024 × 128 by
    128 × 4096 in the ``cpu`` preset), runs 10-15 % faster in oneDNN than in MKL on this
    project's x86 VM; every other product of the step runs as fast or faster in MKL
    (docs/performance.md). Not under ``torch.compile``, which picks its own kernels.
    """
    if (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and x.is_contiguous() and w.is_contiguous()
            and not torch.compiler.is_compiling() and _onednn_logits()):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.t()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ wᵀ`` whose forward pass also computes both gradients.

    The logits are made ``chunk`` rows at a time and turned at once, in their own memory and
    while they may still sit in the cache, into their gradient ``softmax − onehot`` (llm.c's
    "fused classifier"): one exp per logit, no log-softmax kept for a backward pass, no zeroed
    (N, V) gradient to scatter into, no one-hot matrix. Backward only scales the saved
    gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, x, w, targets, vocab: int, chunk: int, dtype: torch.dtype):
        # x (N, C), w (V_pad, C) (rows from `vocab` on are padding), targets (N,) with -100 = ignored
        xl, wl = x.to(dtype), w.to(dtype)
        wide = torch.promote_types(dtype, torch.float32)  # the softmax's precision
        valid = (targets != -100)[:, None]  # (N, 1)
        target = torch.where(valid, targets[:, None], 0)  # (N, 1); an ignored row's gradient is dropped below
        x_kept = xl * valid.to(dtype)  # (N, C): ignored rows add nothing to the weight's gradient
        losses, grad_x, grad_w = [], [], None
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            t = target[rows]  # (n, 1)
            logits = _logits_product(xl[rows], wl).to(wide)  # (n, V_pad)
            logits[:, vocab:] = float("-inf")  # padded columns: probability 0
            top = logits.amax(dim=1, keepdim=True)  # (n, 1)
            picked = logits.gather(1, t)  # (n, 1)
            # The softmax written out, in place: a second (n, V) buffer would be fresh memory
            # every step, which the OS hands over page by page (measured: 8 % of a CPU step).
            total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # (n, 1): Σ exp(logit − top) ≥ 1
            losses.append(top + total.log() - picked)  # logsumexp − logit(target)
            probs = logits.div_(total)  # (n, V_pad)
            grad = probs.scatter_add_(1, t, torch.full_like(picked, -1.0)).to(dtype)  # softmax − onehot
            grad_x.append(grad @ wl)  # (n, C)
            part = grad.t() @ x_kept[rows]  # (V_pad, C)
            grad_w = part.to(wide) if grad_w is None else grad_w.add_(part)
        count = valid.sum()
        grad_x = torch.cat(grad_x) * valid  # (N, C)
        ctx.save_for_backward(grad_x.to(x.dtype), grad_w.to(w.dtype), count)
        return torch.where(valid, torch.cat(losses), 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count.clamp_min(1)  # no target at all: a NaN loss (as F.cross_entropy), zero gradients
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int,
                         dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.cross_entropy(x @ w[:vocab]ᵀ, targets, ignore_index=-100)`` without keeping the logits.

    ``x (N, C)``, ``w (V_pad, C)`` (rows past ``vocab`` are ignored), ``targets (N,)``; the
    matrix products run in ``dtype`` (default ``x.dtype``), the softmax in float32. Meant for
    training: the forward pass already computes the gradients (its cost is the backward's).
    """
    return _LinearCrossEntropy.apply(x, w, targets, vocab, chunk, dtype or x.dtype)
