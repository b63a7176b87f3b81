"""The book's own Llama 3 and Qwen3 (``llms_from_scratch.llama3``, ``llms_from_scratch.qwen3``) ⇄ our GPT.

The book's bonus material writes Llama 3.2 and Qwen3 from scratch, as ``Llama3Model`` and
``Qwen3Model`` over a config dict. Both are options of our one GPT (``norm="rmsnorm"``,
``activation="swiglu"``, ``pos_emb="rope"``, no biases), and their weights map onto ours with
one explicit :class:`~llmscratch.store.checkpoint.Rule` table each. What reading their code
settles:

* **Names.** ``trf_blocks.{i}.att.W_query/W_key/W_value`` are stacked into our one
  ``attn.qkv`` (cut at :func:`~llmscratch.store.checkpoint.qkv_sizes`); ``ff.fc1`` is SwiGLU's
  gate, ``ff.fc2`` its value ("up"), stacked into our ``ff.fc_in`` in that order; ``ff.fc3`` is
  our ``ff.fc_out``. ``Llama3Model`` uses ``torch.nn.RMSNorm`` (parameter ``weight``),
  ``Qwen3Model`` the book's own ``RMSNorm`` (parameter ``scale``; its optional ``shift`` is
  never built).
* **RMSNorm's epsilon.** Fixed in the code, not in the config: 1e-5 for every norm of
  ``Llama3Model``, 1e-6 for every norm of ``Qwen3Model`` (q/k norms included). Ours has one
  ``layer_norm_eps`` for all the norms of a model, so each maps exactly. Both compute the norm
  in float32 as ours does (``nn.RMSNorm`` in the input's dtype, float32 here).
* **RoPE.** "Rotate half", as ours and Hugging Face's: dimension ``i`` pairs with ``i + d/2``,
  the angles are ``cat([angles, angles])``, so q and k rows need no permutation. Llama's
  ``rope_freq`` is our ``rope_scaling`` (its ``original_context_length`` is our
  ``original_max_position_embeddings``); the book applies the same three-band rule
  (kept, slowed by ``factor``, blended between) that :func:`~llmscratch.nn.positions.llama3_inv_freq`
  writes as a clamped blend. Qwen3's RoPE is plain.
* **Grouped-query attention.** The book's ``n_kv_groups`` is the number of key/value heads
  (``W_key`` is ``n_kv_groups · head_dim`` wide), our ``n_kv_heads``, not the size of a group;
  it repeats each K/V head with ``repeat_interleave``, so query head ``h`` reads K/V head
  ``h // (H / H_kv)``, as ours does.
* **Head size.** Llama's is ``emb_dim / n_heads``; Qwen3's ``head_dim`` (``None``: the same)
  is our ``head_size``, and its ``qk_norm`` ours.
* **The output head.** The book always builds ``out_head`` as its own ``Linear``; Llama 3.2's
  loader ties it by loading the embedding into it. A tied config takes it only when it equals
  ``tok_emb``, and an export writes the shared matrix twice, as the book's state dict holds it.
* **Precision.** The book's configs compute in ``torch.bfloat16`` (their ``"dtype"``); the
  configs built here say float32 unless asked, as our CPU default.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..nn.model import GPTConfig
from .checkpoint import Rule, _convert_in, _convert_out, _refuse_all, _state_dict_of, qkv_sizes

LLAMA_EPS = 1e-5  # Llama3Model: nn.RMSNorm(..., eps=1e-5) everywhere
QWEN3_EPS = 1e-6  # Qwen3Model: RMSNorm(..., eps=1e-6) everywhere, q/k norms included


def _vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.emb_dim,)


def _head_vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.head_dim,)


def _qkv(cfg: GPTConfig) -> tuple[int, ...]:
    return (sum(qkv_sizes(cfg)), cfg.emb_dim)  # (H·d + 2·H_kv·d, C)


def _out_proj(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.emb_dim, cfg.n_heads * cfg.head_dim)


def _gate_up(cfg: GPTConfig) -> tuple[int, int]:
    return cfg.ff_hidden, cfg.ff_hidden  # rows of fc_in: the gate (fc1), then the value (fc2)


def _fc_in(cfg: GPTConfig) -> tuple[int, ...]:
    return (2 * cfg.ff_hidden, cfg.emb_dim)


def _fc_out(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.emb_dim, cfg.ff_hidden)


def _embedding(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.vocab_size, cfg.emb_dim)


def _untied(cfg: GPTConfig) -> bool:
    return not cfg.tie_weights


# llms_from_scratch.llama3.Llama3Model. Its RoPE cos/sin buffers are not saved (persistent=False).
BOOK_LLAMA_TABLE: tuple[Rule, ...] = (
    Rule("tok_emb.weight", ("tok_emb.weight",), _embedding),
    Rule("blocks.{i}.norm1.weight", ("trf_blocks.{i}.norm1.weight",), _vec),
    Rule("blocks.{i}.attn.qkv.weight", ("trf_blocks.{i}.att.W_query.weight", "trf_blocks.{i}.att.W_key.weight",
                                        "trf_blocks.{i}.att.W_value.weight"), _qkv, split=qkv_sizes),
    Rule("blocks.{i}.attn.out_proj.weight", ("trf_blocks.{i}.att.out_proj.weight",), _out_proj),
    Rule("blocks.{i}.norm2.weight", ("trf_blocks.{i}.norm2.weight",), _vec),
    Rule("blocks.{i}.ff.fc_in.weight", ("trf_blocks.{i}.ff.fc1.weight", "trf_blocks.{i}.ff.fc2.weight"), _fc_in,
         split=_gate_up),
    Rule("blocks.{i}.ff.fc_out.weight", ("trf_blocks.{i}.ff.fc3.weight",), _fc_out),
    Rule("final_norm.weight", ("final_norm.weight",), _vec),
    Rule("out_head.weight", ("out_head.weight",), _embedding, present=_untied),
)

# llms_from_scratch.qwen3.Qwen3Model: the same layout, its own RMSNorm ("scale"), and q/k norms.
BOOK_QWEN3_TABLE: tuple[Rule, ...] = (
    Rule("tok_emb.weight", ("tok_emb.weight",), _embedding),
    Rule("blocks.{i}.norm1.weight", ("trf_blocks.{i}.norm1.scale",), _vec),
    Rule("blocks.{i}.attn.qkv.weight", ("trf_blocks.{i}.att.W_query.weight", "trf_blocks.{i}.att.W_key.weight",
                                        "trf_blocks.{i}.att.W_value.weight"), _qkv, split=qkv_sizes),
    Rule("blocks.{i}.attn.q_norm.weight", ("trf_blocks.{i}.att.q_norm.scale",), _head_vec,
         present=lambda c: c.qk_norm),
    Rule("blocks.{i}.attn.k_norm.weight", ("trf_blocks.{i}.att.k_norm.scale",), _head_vec,
         present=lambda c: c.qk_norm),
    Rule("blocks.{i}.attn.out_proj.weight", ("trf_blocks.{i}.att.out_proj.weight",), _out_proj),
    Rule("blocks.{i}.norm2.weight", ("trf_blocks.{i}.norm2.scale",), _vec),
    Rule("blocks.{i}.ff.fc_in.weight", ("trf_blocks.{i}.ff.fc1.weight", "trf_blocks.{i}.ff.fc2.weight"), _fc_in,
         split=_gate_up),
    Rule("blocks.{i}.ff.fc_out.weight", ("trf_blocks.{i}.ff.fc3.weight",), _fc_out),
    Rule("final_norm.weight", ("final_norm.scale",), _vec),
    Rule("out_head.weight", ("out_head.weight",), _embedding, present=_untied),
)

# The keys of the book's config dicts (LLAMA32_CONFIG_1B, QWEN_CONFIG_06_B), "dtype" aside.
LLAMA_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups",
              "rope_base", "rope_freq")
QWEN3_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "head_dim", "qk_norm",
              "n_kv_groups", "rope_base")


# --------------------------------------------------------------------------- configs


def _require(book: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in book]
    if missing:
        raise CheckpointError(f"the book's {what} config lacks {missing}; it needs {list(keys)}")


def _modern(book: Mapping[str, Any], what: str, **fields: Any) -> GPTConfig:
    """Our config for the common part of the book's two configs, plus ``fields``."""
    try:
        return GPTConfig(
            vocab_size=book["vocab_size"], context_length=book["context_length"], emb_dim=book["emb_dim"],
            n_heads=book["n_heads"], n_layers=book["n_layers"], n_kv_heads=book["n_kv_groups"],
            hidden_dim=book["hidden_dim"], rope_base=float(book["rope_base"]), norm="rmsnorm", activation="swiglu",
            pos_emb="rope", bias=False, qkv_bias=False, drop_rate=0.0, **fields,
        )
    except ConfigError as err:
        raise CheckpointError(f"the book's {what} config does not make a GPTConfig: {err}") from err


def config_from_book_llama(book: Mapping[str, Any], *, tie_weights: bool = False) -> GPTConfig:
    """Our GPTConfig for a config dict of the book's ``Llama3Model`` (``LLAMA32_CONFIG_1B``'s keys).

    ``n_kv_groups`` → ``n_kv_heads``; ``rope_freq`` (or ``None``) → ``rope_scaling``; every
    norm's epsilon is the book's fixed 1e-5. The dict does not say whether the head is tied
    (Llama 3.2's is: its loader copies the embedding into ``out_head``): ``tie_weights`` does.
    """
    _require(book, LLAMA_KEYS, "Llama3Model")
    freq = book["rope_freq"]
    scaling = None
    if freq is not None:
        scaling = {"rope_type": "llama3", "factor": freq["factor"], "low_freq_factor": freq["low_freq_factor"],
                   "high_freq_factor": freq["high_freq_factor"],
                   "original_max_position_embeddings": freq["original_context_length"]}
    return _modern(book, "Llama3Model", rope_scaling=scaling, layer_norm_eps=LLAMA_EPS, tie_weights=tie_weights)


def config_from_book_qwen3(book: Mapping[str, Any], *, tie_weights: bool = False) -> GPTConfig:
    """Our GPTConfig for a config dict of the book's ``Qwen3Model`` (``QWEN_CONFIG_06_B``'s keys).

    ``head_dim`` → ``head_size`` (``None`` where it is ``emb_dim / n_heads``), ``qk_norm`` as it
    is, every norm's epsilon the book's fixed 1e-6. The mixture-of-experts configs
    (``num_experts``) are refused: our MLP is dense.
    """
    if book.get("num_experts", 0):
        raise CheckpointError(f"the book's Qwen3Model config has num_experts={book['num_experts']}: a mixture of "
                              "experts, which our GPT's dense MLP cannot compute; use a dense Qwen3 config")
    _require(book, QWEN3_KEYS, "Qwen3Model")
    head = book["head_dim"]
    head_size = None if head is None or head * book["n_heads"] == book["emb_dim"] else head
    return _modern(book, "Qwen3Model", head_size=head_size, qk_norm=bool(book["qk_norm"]), layer_norm_eps=QWEN3_EPS,
                   tie_weights=tie_weights)


def _common_refusals(cfg: GPTConfig, family: str) -> dict[str, tuple[bool, str]]:
    return {
        "norm": (cfg.norm != "rmsnorm", f"{family} uses RMSNorm"),
        "activation": (cfg.activation != "swiglu", f"{family} uses a SwiGLU MLP"),
        "pos_emb": (cfg.pos_emb != "rope", f"{family} uses RoPE"),
        "bias": (cfg.bias, f"{family}'s layers have no biases"),
        "qkv_bias": (cfg.qkv_bias, f"{family}'s W_query, W_key and W_value have no biases"),
        "scale_attn": (not cfg.scale_attn, f"{family} divides the scores by √d_head"),
    }


def book_llama_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The book's ``Llama3Model`` config dict for ``cfg``; refuses, all at once, what that model cannot compute."""
    family = "the book's Llama3Model"
    _refuse_all("cannot express this config as the book's Llama3Model", cfg, {
        **_common_refusals(cfg, family),
        "qk_norm": (cfg.qk_norm, f"{family} has no q/k norms"),
        "head_size": (cfg.head_dim * cfg.n_heads != cfg.emb_dim, f"{family}'s heads split emb_dim evenly"),
        "layer_norm_eps": (cfg.layer_norm_eps != LLAMA_EPS, f"{family}'s RMSNorm uses eps={LLAMA_EPS}"),
    })
    scaling = cfg.rope_scaling
    freq = None if scaling is None else {
        "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
        "high_freq_factor": scaling["high_freq_factor"],
        "original_context_length": scaling["original_max_position_embeddings"]}
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "hidden_dim": cfg.ff_hidden,
            "n_kv_groups": cfg.kv_heads, "rope_base": cfg.rope_base, "dtype": dtype, "rope_freq": freq}


def book_qwen3_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The book's ``Qwen3Model`` config dict for ``cfg``; refuses, all at once, what that model cannot compute."""
    family = "the book's Qwen3Model"
    _refuse_all("cannot express this config as the book's Qwen3Model", cfg, {
        **_common_refusals(cfg, family),
        "rope_scaling": (cfg.rope_scaling is not None, f"{family}'s RoPE is not scaled"),
        "layer_norm_eps": (cfg.layer_norm_eps != QWEN3_EPS, f"{family}'s RMSNorm uses eps={QWEN3_EPS}"),
    })
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "hidden_dim": cfg.ff_hidden, "head_dim": cfg.head_dim,
            "qk_norm": cfg.qk_norm, "n_kv_groups": cfg.kv_heads, "rope_base": cfg.rope_base, "dtype": dtype}


# --------------------------------------------------------------------------- weights


def book_head_is_tied(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a book state dict's ``out_head.weight`` is its ``tok_emb.weight`` (Llama 3.2, Qwen3-0.6B)."""
    head, emb = state_dict.get("out_head.weight"), state_dict.get("tok_emb.weight")
    return head is not None and emb is not None and head.shape == emb.shape and torch.equal(head, emb)


def _book_to_ours(table: tuple[Rule, ...], state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig,
                  source: str) -> dict[str, torch.Tensor]:
    sd = dict(state_dict)
    if cfg.tie_weights:
        if "out_head.weight" in sd and not book_head_is_tied(sd):
            raise CheckpointError(f"{source}: the config ties the head to the embedding (tie_weights=True), but "
                                  "out_head.weight differs from tok_emb.weight; use a config with tie_weights=False")
        sd.pop("out_head.weight", None)  # the same matrix as tok_emb: ours stores it once
    return _convert_in(table, sd, cfg, source)


def _ours_to_book(table: tuple[Rule, ...], model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
                  cfg: GPTConfig) -> dict[str, torch.Tensor]:
    theirs = _convert_out(table, _state_dict_of(model_or_state), cfg)
    if cfg.tie_weights:
        theirs["out_head.weight"] = theirs["tok_emb.weight"].clone()  # the book's model always has its own head
    return theirs


def book_llama_to_ours(state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig, *,
                       source: str = "the book's Llama3Model state dict") -> dict[str, torch.Tensor]:
    """A ``Llama3Model`` state dict → ours for ``cfg`` (:func:`config_from_book_llama`); every misfit named."""
    return _book_to_ours(BOOK_LLAMA_TABLE, state_dict, cfg, source)


def ours_to_book_llama(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
                       cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our weights → a state dict ``Llama3Model(book_llama_config(cfg))`` loads strictly."""
    book_llama_config(cfg)  # refuses what the book's model cannot compute
    return _ours_to_book(BOOK_LLAMA_TABLE, model_or_state, cfg)


def book_qwen3_to_ours(state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig, *,
                       source: str = "the book's Qwen3Model state dict") -> dict[str, torch.Tensor]:
    """A ``Qwen3Model`` state dict → ours for ``cfg`` (:func:`config_from_book_qwen3`); every misfit named."""
    return _book_to_ours(BOOK_QWEN3_TABLE, state_dict, cfg, source)


def ours_to_book_qwen3(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
                       cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our weights → a state dict ``Qwen3Model(book_qwen3_config(cfg))`` loads strictly."""
    book_qwen3_config(cfg)
    return _ours_to_book(BOOK_QWEN3_TABLE, model_or_state, cfg)

