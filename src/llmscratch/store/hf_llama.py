"""Hugging Face's Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) ⇄ our GPT.

The three share one layout, and our GPT computes all of them with its modern options:
RMSNorm, a SwiGLU MLP, RoPE (rotate-half, as ours), grouped-query attention. They differ in
three switches, which pick the ``model_type`` an export writes:

* Llama (SmolLM2 too): none of the two below; Llama 3 stretches RoPE (``rope_scaling``).
* Qwen2: biases on q, k and v (``qkv_bias``).
* Qwen3: RMSNorm on each head's q and k (``qk_norm``), heads wider than ``hidden / heads``.

Names: their ``q_proj``, ``k_proj``, ``v_proj`` are stacked into our one ``attn.qkv``, their
``gate_proj`` and ``up_proj`` into our ``ff.fc_in`` (the SwiGLU gate first): the same
:class:`~llmscratch.store.checkpoint.Rule` tables as GPT-2's, with the split sizes that
:func:`~llmscratch.store.checkpoint.qkv_sizes` and ``ff_hidden`` give. transformers writes
its RoPE settings as ``rope_theta``/``rope_scaling`` before version 5 and as
``rope_parameters`` since: both are read, and an export writes both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..files import PathLike, write_text_atomic
from ..nn.model import GPT, GPTConfig
from .checkpoint import (
    Rule, _convert_in, _convert_out, _refuse_all, _state_dict_of, _unwrap, _with_tied_head, _write_safetensors,
    qkv_sizes, read_hf_dir, refuse_non_finite,
)

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults for the fields a config.json may leave out (LlamaConfig, Qwen2Config, Qwen3Config).
_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}


def _vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.emb_dim,)


def _head_vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.head_dim,)


def _gate_up(cfg: GPTConfig) -> tuple[int, int]:
    return cfg.ff_hidden, cfg.ff_hidden  # rows of fc_in: the gate, then the value ("up")


LLAMA_TABLE: tuple[Rule, ...] = (
    Rule("tok_emb.weight", ("model.embed_tokens.weight",), lambda c: (c.vocab_size, c.emb_dim)),
    Rule("blocks.{i}.norm1.weight", ("model.layers.{i}.input_layernorm.weight",), _vec),
    Rule("blocks.{i}.attn.qkv.weight", ("model.layers.{i}.self_attn.q_proj.weight",
                                        "model.layers.{i}.self_attn.k_proj.weight",
                                        "model.layers.{i}.self_attn.v_proj.weight"),
         lambda c: (sum(qkv_sizes(c)), c.emb_dim), split=qkv_sizes),
    Rule("blocks.{i}.attn.qkv.bias", ("model.layers.{i}.self_attn.q_proj.bias",
                                      "model.layers.{i}.self_attn.k_proj.bias",
                                      "model.layers.{i}.self_attn.v_proj.bias"),
         lambda c: (sum(qkv_sizes(c)),), split=qkv_sizes, present=lambda c: c.qkv_bias),
    Rule("blocks.{i}.attn.q_norm.weight", ("model.layers.{i}.self_attn.q_norm.weight",), _head_vec,
         present=lambda c: c.qk_norm),
    Rule("blocks.{i}.attn.k_norm.weight", ("model.layers.{i}.self_attn.k_norm.weight",), _head_vec,
         present=lambda c: c.qk_norm),
    Rule("blocks.{i}.attn.out_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         lambda c: (c.emb_dim, c.n_heads * c.head_dim)),
    Rule("blocks.{i}.norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), _vec),
    Rule("blocks.{i}.ff.fc_in.weight", ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         lambda c: (2 * c.ff_hidden, c.emb_dim), split=_gate_up),
    Rule("blocks.{i}.ff.fc_out.weight", ("model.layers.{i}.mlp.down_proj.weight",), lambda c: (c.emb_dim, c.ff_hidden)),
    Rule("final_norm.weight", ("model.norm.weight",), _vec),
    Rule("out_head.weight", ("lm_head.weight",), lambda c: (c.vocab_size, c.emb_dim), present=lambda c: not c.tie_weights),
)


def is_llama_family(hf: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face ``config.json`` dict is one of :data:`LLAMA_FAMILY`."""
    return hf.get("model_type") in LLAMA_FAMILY


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """``(RoPE's base, Llama 3 scaling or None)`` from either generation of transformers' config keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", _DEFAULTS["rope_theta"]))
    scaling = params or legacy
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    keep = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {k: (kind if k == "rope_type" else scaling.get(k)) for k in keep}


def config_from_hf_llama(hf: Mapping[str, Any], *, source: str = "the Hugging Face config") -> GPTConfig:
    """Our GPTConfig for a Llama, Qwen2 or Qwen3 ``config.json`` dict; what our GPT cannot compute is refused by name."""
    kind = hf.get("model_type")
    if kind not in LLAMA_FAMILY:
        raise CheckpointError(f"{source}: model_type {kind!r} is not one of {sorted(LLAMA_FAMILY)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if name not in hf:
            raise CheckpointError(f"{source} lacks the field {name!r}; is it a {LLAMA_FAMILY[kind]} config?")
    get = lambda name: hf.get(name, _DEFAULTS.get(name))  # noqa: E731
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or (128 if kind == "qwen3" else width // heads)
    refusals = {
        "hidden_act": (get("hidden_act") != "silu", "only SwiGLU's SiLU gate is implemented"),
        "mlp_bias": (bool(get("mlp_bias")), "the MLP has no biases here"),
        "attention_bias": (kind != "qwen2" and bool(get("attention_bias")),
                           "biases on the attention's output projection are not implemented"),
        "use_sliding_window": (bool(hf.get("use_sliding_window", False)), "sliding-window attention is not implemented"),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            raise CheckpointError(f"{source}: {name}={hf.get(name)!r} cannot be imported: {why}")
    theta, scaling = _rope(hf)
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], context_length=get("max_position_embeddings"), emb_dim=width,
            n_heads=heads, n_layers=hf["num_hidden_layers"], n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_size=None if head_dim * heads == width else head_dim, hidden_dim=hf["intermediate_size"],
            drop_rate=0.0, qkv_bias=kind == "qwen2", bias=False, tie_weights=bool(get("tie_word_embeddings")),
            pos_emb="rope", rope_base=theta, rope_scaling=scaling, activation="swiglu", norm="rmsnorm",
            qk_norm=kind == "qwen3", layer_norm_eps=float(get("rms_norm_eps")),
        )
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: a field cannot be read: {err}; fix the config") from err


def hf_family(cfg: GPTConfig) -> str:
    """The ``model_type`` that holds ``cfg`` (``"llama"``, ``"qwen2"`` or ``"qwen3"``); what none can hold is refused."""
    _refuse_all("cannot export to the Llama family's format", cfg, {
        "norm": (cfg.norm != "rmsnorm", "Llama and Qwen use RMSNorm"),
        "activation": (cfg.activation != "swiglu", "Llama and Qwen use a SwiGLU MLP"),
        "pos_emb": (cfg.pos_emb != "rope", "Llama and Qwen use RoPE"),
        "bias": (cfg.bias, "Llama and Qwen have no biases outside q, k and v"),
        "scale_attn": (not cfg.scale_attn, "their attention divides by √d_head"),
        "qkv_bias": (cfg.qkv_bias and cfg.qk_norm, "no family has both q/k/v biases and q/k norms"),
    })
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_llama_config_from_ours(cfg: GPTConfig, bos_id: Optional[int] = None, eos_id: Optional[int] = None
                              ) -> dict[str, Any]:
    """The ``config.json`` dict transformers reads as ``cfg``'s family (see :func:`hf_family`)."""
    kind = hf_family(cfg)
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    hf: dict[str, Any] = {
        "model_type": kind, "architectures": [LLAMA_FAMILY[kind]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.layer_norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_base, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_weights, "attention_bias": kind == "qwen2", "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    if kind in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if kind == "qwen3":
            hf["attention_bias"] = False
    return hf


def hf_llama_to_ours(hf_state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig, *,
                     source: str = "the Hugging Face state dict") -> dict[str, torch.Tensor]:
    """A Llama-family state dict → ours, for ``cfg`` (see :func:`config_from_hf_llama`); every misfit named."""
    sd = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, recomputed
    if cfg.tie_weights:
        sd.pop("lm_head.weight", None)  # some files store the tied head anyway; the tie wins, as in transformers
    return _convert_in(LLAMA_TABLE, sd, cfg, source)


def ours_to_hf_llama(state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict (or model) → the family's, in transformers' save_pretrained names."""
    hf_family(cfg)
    theirs = _convert_out(LLAMA_TABLE, _state_dict_of(state_dict), cfg)
    if cfg.tie_weights:
        theirs.pop("lm_head.weight", None)
    return theirs


def load_hf_llama(directory: PathLike) -> GPT:
    """Our GPT with the weights of a Hugging Face Llama, Qwen2 or Qwen3 directory (sharded or not)."""
    directory = Path(directory)
    hf_config, hf_sd = read_hf_dir(directory)
    refuse_non_finite(hf_sd, directory, "get a good copy of the weights (download or save them again)")
    cfg = config_from_hf_llama(hf_config, source=str(directory / "config.json"))
    sd = hf_llama_to_ours({k: v.float() for k, v in hf_sd.items()}, cfg, source=str(directory))
    model = GPT(cfg)
    model.load_state_dict(_with_tied_head(sd, cfg), strict=True)
    return model.eval()


def save_hf_llama(model: nn.Module, out_dir: PathLike, bos_id: Optional[int] = None,
                  eos_id: Optional[int] = None) -> str:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``AutoModelForCausalLM`` loads; the family's name."""
    gpt = _unwrap(model)
    hf_config = hf_llama_config_from_ours(gpt.cfg, bos_id, eos_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out_dir / "model.safetensors", ours_to_hf_llama(gpt, gpt.cfg))
    write_text_atomic(out_dir / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return LLAMA_FAMILY[hf_config["model_type"]]
