"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of LLMs").

A weight ``W (out, in)`` stays frozen; next to it train two small matrices, ``A (in, r)`` and
``B (r, out)``, and compute

```
y = x·Wᵀ + b  +  scaling · dropout(x)·A·B          x (…, in) → (…, out)
```

``B`` starts at zero, so the model starts exactly as it was; ``A`` starts random
(``kaiming_uniform_(A, a=√5)`` on the ``(in, r)`` tensor, the book's appendix E line, which
gives ``U(±1/√r)``). Only ``r·(in + out)`` numbers per matrix learn instead of ``in·out``.

**Scaling.** The LoRA paper and Hugging Face PEFT multiply by ``alpha / rank`` (``scaling=
"alpha/rank"``, our default): changing the rank then keeps the update's size, and the
learning rate need not move with it. The book's appendix E (``llms_from_scratch.appendix_e.
LoRALayer``) multiplies by ``alpha`` itself (``scaling="alpha"``); with that setting our
numbers equal the book's, with the default they equal PEFT's (both tested).

**Fused projections.** Our attention computes q, k and v in one ``attn.qkv`` layer (rows
``[q | k | v]``), and a SwiGLU MLP its gate and value in one ``ff.fc_in`` (rows
``[gate | up]``). The book, Llama and PEFT have separate layers there. An adapter on
``query`` therefore owns its own ``A`` and ``B`` and adds only to the query rows of the fused
output, which is what an adapter on a separate ``q_proj`` computes. ``qkv`` (and ``mlp_in``)
put one adapter on the whole fused layer instead, as PEFT does on GPT-2's fused ``c_attn``.

Targets (:data:`TARGETS`): ``query``, ``key``, ``value`` (rows of ``attn.qkv``), ``qkv``
(all of it), ``out`` (``attn.out_proj``), ``mlp_in`` (all of ``ff.fc_in``), ``gate`` and
``up`` (its SwiGLU halves), ``mlp_out`` (``ff.fc_out``). The default, ``query,value``, is the
LoRA paper's choice and PEFT's for Llama. The output head and the embeddings are never adapted.

State-dict names: the base weights keep theirs (``blocks.0.attn.qkv.weight``), each adapter
adds ``blocks.0.attn.qkv.lora.query.A`` and ``….B``. :func:`merge_lora` folds
``scaling · (A·B)ᵀ`` into the rows of ``W`` and removes the adapters: a plain model again.
This module is pure PyTorch; ``store/lora.py`` saves and loads adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from .model import GPT, GPTConfig, Linear

# target → (the layer inside a block it adapts, which rows of that layer's output)
TARGETS = {
    "query": "attn.qkv",
    "key": "attn.qkv",
    "value": "attn.qkv",
    "qkv": "attn.qkv",
    "out": "attn.out_proj",
    "mlp_in": "ff.fc_in",
    "gate": "ff.fc_in",
    "up": "ff.fc_in",
    "mlp_out": "ff.fc_out",
}
DEFAULT_TARGETS = ("query", "value")
SCALINGS = ("alpha/rank", "alpha")  # PEFT and the LoRA paper; the book's appendix E
# Targets that overlap (a whole fused layer and its parts): asking for both is refused.
_OVERLAPS = (("qkv", ("query", "key", "value")), ("mlp_in", ("gate", "up")))


@dataclass(frozen=True)
class LoRAConfig:
    """How a model is adapted: rank, alpha, dropout, targets and scaling, checked here once.

    ``scaling``: ``"alpha/rank"`` (PEFT, the LoRA paper) or ``"alpha"`` (the book's appendix E).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    scaling: str = "alpha/rank"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # "query,value" as a command line gives it
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer (such as 8 or 16), got {self.rank!r} "
                              "(option --lora-rank)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r} (option --lora-alpha)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r} (option --lora-dropout)")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"LoRA scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r} "
                              "(option --lora-scaling)")
        if not self.targets:
            raise ConfigError(f"LoRA needs at least one target (option --lora-targets); choose from "
                              f"{', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))} (option --lora-targets); "
                              f"choose from {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRA targets {','.join(self.targets)} name a target twice (option --lora-targets)")
        for whole, parts in _OVERLAPS:
            both = [p for p in parts if p in self.targets]
            if whole in self.targets and both:
                raise ConfigError(f"LoRA targets {whole!r} and {', '.join(map(repr, both))} overlap: {whole!r} "
                                  f"adapts the whole fused layer, {', '.join(both)} parts of it; keep one "
                                  "(option --lora-targets)")

    @property
    def scale(self) -> float:
        """The number the adapter's product is multiplied by: ``alpha / rank`` or ``alpha``."""
        return self.alpha / self.rank if self.scaling == "alpha/rank" else float(self.alpha)

    def to_dict(self) -> dict:
        """Plain values, as ``adapter.json`` holds them."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "scaling": self.scaling}

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        """From :meth:`to_dict`'s mapping; a missing or unknown key is an error."""
        names = {"rank", "alpha", "dropout", "targets", "scaling"}
        if set(data) != names:
            raise ConfigError(f"a LoRA config needs exactly the keys {sorted(names)}, got {sorted(data)}")
        return cls(**{**data, "targets": tuple(data["targets"])})


@dataclass
class LoRAInfo:
    """What :func:`add_lora` did: the parameters that train, all parameters, and the adapted layers."""

    trainable: int
    total: int
    adapters: int
    config: LoRAConfig
    layers: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"LoRA rank {self.config.rank}, alpha {self.config.alpha:g} (scaling {self.config.scaling} = "
                f"{self.config.scale:g}) on {','.join(self.config.targets)}: {self.adapters} adapters; "
                f"{self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.trainable / max(1, self.total):.2f} %)")


class LoRAAdapter(nn.Module):
    """One low-rank update ``scaling · dropout(x)·A·B``, added to rows ``[start, stop)`` of a layer's output.

    The book's ``LoRALayer`` with a dropout and a choice of scaling; ``A (in, r)``, ``B (r, rows)``.
    """

    def __init__(self, in_features: int, start: int, stop: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.start, self.stop, self.scale = start, stop, scale
        self.A = nn.Parameter(torch.empty(in_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as the book: U(±1/√rank) over the (in, r) tensor
        self.B = nn.Parameter(torch.zeros(rank, stop - start))  # zero: the adapted model starts as the base
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (…, in)`` → the update of the adapted rows ``(…, stop - start)``."""
        return self.scale * (self.dropout(x) @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, ``scaling · (A·B)ᵀ``: ``(stop - start, in)``, in float32."""
        return self.scale * (self.A.float() @ self.B.float()).t()  # (rows, in)

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop}, rank={self.A.shape[1]}, scale={self.scale:g}"


class LoRALinear(Linear):
    """A :class:`~llmscratch.nn.model.Linear` with adapters: the same (frozen) weight and bias
    Parameters, plus ``lora``, a dict of :class:`LoRAAdapter` by target name.

    It stays a ``Linear`` (``.weight``, packing, ``linear_layers()`` work as before), so the
    rest of the model, the inspection tools and the decoder see no difference.
    """

    def __init__(self, base: Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same Parameters: the base weights are not copied
        self.bias = base.bias
        self.lora = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (…, in)`` → ``x·Wᵀ + b`` plus every adapter's update on its rows ``(…, out)``."""
        out = super().forward(x)  # (…, out)
        for adapter in self.lora.values():
            if adapter.start == 0 and adapter.stop == self.out_features:
                out = out + adapter(x)
            else:  # only its rows of the fused output; F.linear's backward does not need `out`
                out[..., adapter.start:adapter.stop] += adapter(x)  # (…, stop - start)
        return out

    @torch.no_grad()
    def merged(self) -> Linear:
        """A plain ``Linear`` holding ``W + Σ scaling·(A·B)ᵀ`` (the same weight Parameter, updated in place)."""
        for adapter in self.lora.values():
            rows = self.weight[adapter.start:adapter.stop]  # (rows, in), a view
            rows.copy_((rows.float() + adapter.delta_weight()).to(rows.dtype))
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


def target_rows(cfg: GPTConfig, target: str) -> tuple[int, int]:
    """The rows ``[start, stop)`` of its layer's output that ``target`` adapts, for a model of ``cfg``."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim  # rows of q, and of k and of v
    hidden = cfg.ff_hidden
    swiglu = cfg.activation == "swiglu"
    if target in ("gate", "up") and not swiglu:
        raise ConfigError(f"LoRA target {target!r} is half of a SwiGLU MLP, and this model's MLP is "
                          f"{cfg.activation}: use mlp_in (option --lora-targets)")
    return {
        "query": (0, q), "key": (q, q + kv), "value": (q + kv, q + 2 * kv), "qkv": (0, q + 2 * kv),
        "out": (0, cfg.emb_dim), "mlp_in": (0, 2 * hidden if swiglu else hidden),
        "gate": (0, hidden), "up": (hidden, 2 * hidden), "mlp_out": (0, cfg.emb_dim),
    }[target]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of ``model`` by its name (``blocks.0.attn.qkv``); empty for a plain model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries adapters."""
    return bool(lora_layers(model))


def lora_config(model: nn.Module) -> Optional[LoRAConfig]:
    """The :class:`LoRAConfig` :func:`add_lora` applied to ``model``, or None for a plain model."""
    return getattr(model, "lora_config", None) if has_lora(model) else None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: GPT, config: LoRAConfig) -> LoRAInfo:
    """Wrap the layers ``config.targets`` name in every block, freeze every base parameter; see :func:`add_lora`."""
    if has_lora(model):
        raise ConfigError("this model already carries LoRA adapters: merge them first (merge_lora, or "
                          "`llmscratch export RUN OUT --merge`), then add new ones")
    cfg = model.cfg
    rows = {t: target_rows(cfg, t) for t in config.targets}  # checked for every target before any change
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in enumerate(model.blocks):
        for target in config.targets:
            path = TARGETS[target]
            layer = block.get_submodule(path)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                _replace(block, path, layer)
                names.append(f"blocks.{i}.{path}")
            start, stop = rows[target]
            adapter = LoRAAdapter(layer.in_features, start, stop, config.rank, config.scale, config.dropout)
            layer.lora[target] = adapter.to(device=layer.weight.device, dtype=layer.weight.dtype)
    model.lora_config = config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRAInfo(trainable=trainable, total=sum(p.numel() for p in model.parameters()),
                    adapters=len(config.targets) * len(model.blocks), config=config, layers=names)


def add_lora(model: GPT, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_TARGETS, *, scaling: str = "alpha/rank") -> LoRAInfo:
    """Put LoRA adapters on ``targets`` of every block of ``model`` (in place) and freeze all else.

    Every parameter the model had stops training (``requires_grad=False``); only the adapters'
    ``A`` and ``B`` train. A task that adds a new head unfreezes it itself, after this call.
    The adapters start with ``B = 0``: the model computes exactly what it did. Returns the counts.
    """
    return apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets),
                                        scaling=scaling))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``W += scaling·(A·B)ᵀ``) and remove the adapters.

    The model is plain again (the same parameter names and shapes as before :func:`add_lora`),
    and every parameter trains again (``requires_grad=True``). A model without adapters is left as it is.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    if layers:
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "lora_config"):
            del model.lora_config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (``blocks.0.attn.qkv.lora.query.A``, …): what an adapter file holds."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a model :func:`add_lora` prepared the same way; every key and shape must match."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 "shape of " + ", ".join(f"{k} {tuple(sd[k].shape)} (the model's {tuple(expected[k].shape)})"
                                         for k in wrong[:4]) if wrong else ""]
        raise CheckpointError("the adapter tensors do not fit this model's adapters (rank, targets or base model "
                          "differ): " + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=False)
