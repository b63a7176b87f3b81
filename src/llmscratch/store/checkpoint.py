"""Checkpoints: the run directory, and weights exchanged with Hugging Face GPT-2 and the book.

A **run directory** holds everything needed to pick a model up again::

    run_dir/
      config.json          GPTConfig.to_json(): the shape and arithmetic of the model
      model.safetensors    the weights; a tied LM head is stored once (as tok_emb.weight)
      <tokenizer files>    written by Tokenizer.save(run_dir)
      training_state.pt    optimizer, step, RNG states... (read with weights_only=True)

Training adds ``train_config.json`` (its options), ``metrics.jsonl``, ``loss.png``, ``best/``
(the weights of the best validation score, with the tokenizer) and, under FSDP, ``sharded/``.

Every file is written atomically (temporary file in the same directory, fsync, rename), so a
crash mid-write leaves the previous good file in place; a full disk is said in one line with
the folder and the space needed (:class:`files.DiskFullError`). Every read failure (missing
file, bad JSON, weights that do not fit the config, a truncated or corrupted file, weights
holding NaN or infinities) raises :class:`CheckpointError` naming the file and saying what to
do. ``config.json`` must be complete: a missing field is read from the weights where they show
it and refused where they do not (:func:`load_config`).

**Foreign formats.** Each has one explicit mapping table (:data:`HF_TABLE`, :data:`BOOK_TABLE`)
with shape checks, used in both directions. The widths the tables cut at come from the config
through :func:`qkv_sizes` (Q, K, V in the fused ``attn.qkv``) and :func:`mlp_hidden`:

* Hugging Face GPT-2 (``transformers.GPT2LMHeadModel``): Conv1D weights are stored
  ``(in, out)``, transposed relative to ``nn.Linear``; ``c_attn`` is Q, K, V fused along the
  output, exactly like our ``attn.qkv`` once transposed. Both the ``save_pretrained`` layout
  (``transformer.h.0…``, ``lm_head.weight``) and the hub's published layout (no
  ``transformer.`` prefix, ``attn.bias``/``attn.masked_bias`` buffers) are read.
* The book's ``llms_from_scratch.ch04.GPTModel``: separate ``W_query``/``W_key``/``W_value``,
  LayerNorm ``scale``/``shift``, a causal ``mask`` buffer per block. The head count is not in
  the weights, so importing needs it from a preset or ``--heads``.

:func:`import_checkpoint` and :func:`export_checkpoint` are what ``llmscratch import`` and
``llmscratch export`` call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..files import DiskFullError, PathLike, disk_full_error, sync_directory, write_atomic, write_text_atomic
from ..nn.lora import has_lora
from ..nn.model import GPT, GPTConfig
from . import lora as lora_files
from .rundir import ADAPTER_CONFIG_FILE, BEST_DIR, CONFIG_FILE, LATEST, SHARDED_DIR, TRAIN_CONFIG_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE

# Fields that change how a model runs but not what its weights are; load_model accepts them
# as overrides (e.g. the explicit attention backend for inspection, no dropout for eval).
RUNTIME_FIELDS = ("attn_backend", "drop_rate", "pad_vocab_multiple", "context_length")

# A safetensors header is JSON describing the tensors: a few KB per tensor at most.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


# =========================================================================== writing (whole or not at all: files.py)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], tag: Optional[dict[str, str]] = None) -> None:
    """Write contiguous CPU copies of ``tensors`` (the format refuses views and shared storage)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt", **(tag or {})}),
                 size=_safetensors_size(cpu))


def _safetensors_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """About the bytes a safetensors file of ``tensors`` takes: the data and a JSON header (≈ 100 bytes a tensor)."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 100 * len(tensors) + 1024


def _torch_size(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: its tensors' data, plus a little for everything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() + 64
    if isinstance(obj, dict):
        return sum(_torch_size(k) + _torch_size(v) for k, v in obj.items()) + 64
    if isinstance(obj, (list, tuple)):
        return sum(_torch_size(v) for v in obj) + 64
    return 16 + (len(obj) if isinstance(obj, (str, bytes)) else 0)


def weights_tag(run_dir: PathLike) -> dict[str, str]:
    """The tag :func:`save_model` wrote into ``model.safetensors``'s header (``{}`` for none)."""
    from safetensors import safe_open

    path = Path(run_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # the loader names the damage when it reads the file
        raise CheckpointError(f"{path} could not be read ({err}); restore it from a backup") from err
    return {k: v for k, v in meta.items() if k in SAVE_TAG_KEYS}


def _write_torch(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp), size=_torch_size(obj))


def read_text(path: PathLike) -> str:
    """Read a UTF-8 text file of a run directory, with a clear error if it is missing."""
    path = Path(path)
    _require_file(path, "is this a run directory written by `llmscratch train`?")
    return path.read_text(encoding="utf-8")


def read_json(path: PathLike) -> dict[str, Any]:
    """Read a JSON object of a run directory (``train_config.json``, say), with clear errors."""
    path = Path(path)
    _require_file(path, "is this a run directory written by `llmscratch train`?")
    return _read_json(path)


# =========================================================================== safe reads


def _require_dir(directory: Path, what: str = "run directory") -> None:
    if not directory.exists():
        if directory.is_symlink():  # a link whose target was deleted or moved
            target = Path(os.path.normpath(directory.parent / os.readlink(directory)))
            if directory.name == LATEST:
                raise CheckpointError(
                    f"{what} {directory} is a link to {target}, which no longer exists (deleted or moved); "
                    f"`latest` points at the newest run in {directory.parent} that saved a checkpoint: give "
                    f"another run there by its own name (ls {directory.parent}), or train a new one")
            raise CheckpointError(f"{what} {directory} is a link to {target}, which does not exist (deleted or "
                                  "moved); give the run's own path, or point the link at an existing run")
        raise CheckpointError(f"{what} {directory} does not exist; check the path")
    if not directory.is_dir():
        raise CheckpointError(f"{what} {directory} is a file, not a directory")


def _require_file(path: Path, hint: str) -> None:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "is missing"
        raise CheckpointError(f"{path} {where}; {hint}")


def read_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU, or raise a clear CheckpointError.

    The 8-byte header length is checked against the file size first, so a truncated file
    is reported as such; whatever else the library rejects (bad JSON, offsets past the
    end, unknown dtypes) is wrapped with the file's name.
    """
    path = Path(path)
    if not path.exists() and (path.parent / SHARDED_DIR).is_dir():
        raise CheckpointError(
            f"{path} is missing: {path.parent} holds only a sharded checkpoint ({SHARDED_DIR}/, from --fsdp), "
            f"as a run stopped before its end leaves it; make it whole with "
            f"`llmscratch export {path.parent} OUT_DIR --format run`, or continue it with --resume under torchrun")
    _require_file(path, "save the model again or point at the directory that holds it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(
            f"{path} is {size} bytes long, too short to be a safetensors file: it is truncated "
            "or empty; save it again or restore a good copy"
        )
    header_len = int.from_bytes(head, "little")
    if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise CheckpointError(
            f"{path} is truncated or corrupted: its header claims {header_len} bytes but the file "
            f"has {size - 8} after the length field; save it again or restore a good copy"
        )
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as err:  # the Rust library raises its own types; name the file instead
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is "
            "truncated or corrupted: save it again or restore a good copy"
        ) from err


def _sniff(path: Path) -> tuple[Optional[str], str]:
    """``("torch" | "safetensors" | None, what the file looks like)``, from its first bytes.

    ``torch.save`` writes a zip archive (it begins ``PK``, 3, 4) or, in its old format, a
    pickle (byte 0x80, the protocol opcode); a safetensors file begins with its header's
    length (8 bytes) and the header's ``{``.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror}); check that it is a file you may read") from err
    if not head:
        return None, "it is empty"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors", ""  # first: a header length can begin with the byte 0x80
    if head.startswith(b"PK\x03\x04") or head[0] == 0x80:
        return "torch", ""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut in two at byte 64 still makes text
        text = head[:err.start].decode("utf-8") if len(head) == 64 and err.start >= 61 else ""
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return None, f"it is text (it begins {text[:24]!r})"
    return None, f"it begins with the bytes {head[:8].hex(' ')}, as neither format does"


def _torch_error_reason(err: Exception) -> str:
    """What went wrong in ``torch.load``, in one line, without its advice to load with weights_only=False
    (which runs whatever code the file holds: never worth it for a checkpoint)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # weights_only refused something: keep only what it refused
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = re.split(r"\s*(?:Please use|Check the documentation)", text)[0]
    text = " ".join(text.split())
    # Drop torch's own advice (bug reports, documentation links, the unsafe weights_only=False).
    text = re.split(r"(?<=\.) (?=This is an internal|If you are seeing|In PyTorch|Please |Re-running|Check the)",
                    text)[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _torch_load(path: Path, what: str, fix: str = "save it again or restore a good copy") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError (``fix``: what to do)."""
    kind, looks = _sniff(path)
    if kind != "torch":
        raise CheckpointError(f"{path} could not be read as {what}: it is not a file torch.save wrote "
                              f"({looks or 'it is a safetensors file'}); {fix}")
    try:
        with warnings.catch_warnings():  # garbage bytes can look like an unusual pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be read as {what} ({_torch_error_reason(err)}); "
            "it is truncated, corrupted, or holds objects other than tensors and plain Python "
            f"values (only those load with weights_only=True, which runs no code from the file); {fix}"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text ({err}); it is corrupted") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "fix or restore the file"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# =========================================================================== the run directory


def _unwrap(model: nn.Module) -> GPT:
    """The GPT inside a ``torch.compile`` or DistributedDataParallel wrapper."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected an llmscratch GPT, got {type(model).__name__}")
        model = inner
    return model


def _state_dict_for_file(model: GPT, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The model's state dict (or ``state_dict``, gathered from shards) with a tied head stored once;
    for a model with LoRA adapters, the adapters alone (``store/lora.py``: the base stays in its run)."""
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    if has_lora(model):  # with a task's new layers (a classifier's head: GPTClassifier.saved_with_adapters)
        extra = tuple(getattr(model, "saved_with_adapters", ()))
        return {k: v for k, v in sd.items() if ".lora." in k or (extra and k.startswith(extra))}
    if model.cfg.tie_weights:
        sd.pop("out_head.weight", None)
    return sd


def save_model(run_dir: PathLike, model: nn.Module,
               state_dict: Optional[Mapping[str, torch.Tensor]] = None, tag: Optional[dict[str, str]] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``run_dir`` (created if needed), atomically.

    ``state_dict``: the full weights when the model's own are FSDP shards (see distributed.py).
    ``tag``: strings kept in the weights file's header (:data:`SAVE_TAG_KEYS`), to pair the
    weights with the training state saved beside them (see :func:`check_saved_together`).
    """
    run_dir = Path(run_dir)
    gpt = _unwrap(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    _mark_adapters(run_dir, gpt)
    _write_safetensors(run_dir / WEIGHTS_FILE, _state_dict_for_file(gpt, state_dict), tag)
    write_text_atomic(run_dir / CONFIG_FILE, gpt.cfg.to_json() + "\n")


def _mark_adapters(run_dir: Path, gpt: GPT) -> None:
    """Before weights are written: ``adapter.json`` for a model with LoRA adapters (its weights file will
    hold only them), and no stale one beside whole weights."""
    if has_lora(gpt):
        lora_files.write_adapter_config(run_dir, gpt)
    else:
        (run_dir / ADAPTER_CONFIG_FILE).unlink(missing_ok=True)


# How messages name the model types of Hugging Face configs.
HF_FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def load_config(run_dir: PathLike) -> GPTConfig:
    """The GPTConfig in ``run_dir/config.json``; bad JSON or bad fields raise CheckpointError.

    The file must be complete: a missing field is taken from the weights where their names and
    shapes show it, and refused, by name, where they do not (see :func:`_complete_config`).
    """
    run_dir = Path(run_dir)
    _require_dir(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        _no_config(run_dir)
    _require_file(path, "restore it from a backup, or train or import the run again")
    data = _read_json(path)
    if "model_type" in data:
        name = HF_FAMILY_NAMES.get(data["model_type"], repr(data["model_type"]))
        raise CheckpointError(f"{path} is a Hugging Face {name} config, not a run's: turn {run_dir} "
                              f"into a run with `llmscratch import {run_dir} RUN_DIR`")
    data = _complete_config(data, path, run_dir / WEIGHTS_FILE)
    try:
        return GPTConfig.from_dict(data)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has a bad field: {err}") from err


# A run's config.json holds every GPTConfig field: GPTConfig.to_json has always written them
# all. Fields added since the first version: `activation` (GELU before it existed) and the
# modern family's (see _MODERN_FIELDS). A field the file lacks (hand-edited, damaged) is
#   * read from the weights where their names and shapes show it (sizes, which biases and
#     position table exist, a tied head): the model is then exactly the saved one;
#   * given its default where it changes neither what the model computes nor how it trains:
#     the attention backend (the two compute the same function, tested equal), the head's
#     padding (padded rows never leave forward), RoPE's base for a model without RoPE;
#   * refused otherwise, naming the file and the field. `activation` too, although a config
#     from before it existed meant GELU: such a file cannot be told from one that lost the
#     key, and running a squared-ReLU model as GELU gives wrong numbers without a word.
#     Those early runs need "activation": "gelu" added, as the message says.
_HARMLESS_DEFAULTS = ("attn_backend", "pad_vocab_multiple")
# The modern family's fields came all at once: a config.json with none of them was written
# before they existed, when every model had their defaults (LayerNorm, a key/value head per
# query head, ...). Where only some are missing, the shapes' fields take their defaults (a
# wrong one cannot load: the weights' shapes are checked and the error names the field), and
# `norm` and `rope_scaling`, which change the numbers without changing a shape, are refused.
_MODERN_FIELDS = ("norm", "n_kv_heads", "head_size", "hidden_dim", "qk_norm", "rope_scaling")
_SHAPE_CHECKED = ("n_kv_heads", "head_size", "hidden_dim", "qk_norm")

# What to write for a field the weights cannot show: its meaning and the option that set it.
_FIELD_HINTS = {
    "n_heads": "the number of attention heads, which divides emb_dim (train's --n-heads)",
    "pos_emb": "how positions are given: \"rope\", \"sinusoidal\", \"alibi\" or \"none\" (not \"learned\": the "
               "weights hold no pos_emb.weight) (train's --pos-emb)",
    "context_length": "the context the model was trained with (train's --context-length)",
    "drop_rate": "the dropout it was trained with (train's --dropout; it matters only for training)",
    "scale_attn": "true, unless it was trained with --no-scale-attn",
    "rope_base": "RoPE's base, 10000.0 unless it was changed",
    "activation": "\"gelu\" or \"relu2\" (train's --activation; runs saved before the field existed used \"gelu\")",
    "layer_norm_eps": "LayerNorm's epsilon, 1e-05 unless it was changed",
    "norm": "\"layernorm\" (GPT-2) or \"rmsnorm\" (Llama, Qwen, SmolLM2)",
    "rope_scaling": "null, or Llama 3's {\"rope_type\": \"llama3\", \"factor\", \"low_freq_factor\", "
                    "\"high_freq_factor\", \"original_max_position_embeddings\"}",
}


def _complete_config(data: dict[str, Any], path: Path, weights: Path) -> dict[str, Any]:
    """``data`` with every missing GPTConfig field read from the weights or harmlessly defaulted, else an error.

    An unknown key is left for :meth:`GPTConfig.from_dict` to name first: a misspelt key
    explains the missing one.
    """
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    missing = [n for n in names if n not in data]
    if not missing or set(data) - set(names):
        return data
    shapes = _weight_shapes(weights) if weights.is_file() else None
    completed = _fill_missing(data, missing, shapes)
    refused = [n for n in names if n not in completed]
    if refused:
        raise _incomplete_config_error(path, weights, refused, weights_read=shapes is not None)
    return completed


def _fill_missing(data: dict[str, Any], missing: list[str],
                  shapes: Optional[Mapping[str, tuple[int, ...]]]) -> dict[str, Any]:
    """``data`` with the ``missing`` fields the weights' ``shapes`` show, and those harmless to default."""
    found = {name: value for name, value, _ in _infer_ours(shapes)} if shapes is not None else {}
    if found.get("pos_emb") == "not learned":
        del found["pos_emb"]  # rope, sinusoidal, alibi or none: the weights cannot say which
    completed = dict(data)
    for name in missing:
        if name in found and (name != "context_length" or completed.get("pos_emb", found.get("pos_emb")) == "learned"):
            completed[name] = found[name]
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    modern = _MODERN_FIELDS if all(n in missing for n in _MODERN_FIELDS) else _SHAPE_CHECKED
    for name in modern:
        if name in missing:
            completed[name] = defaults[name]
    for name in _HARMLESS_DEFAULTS + ("rope_base",):
        if name in missing and (name != "rope_base" or completed.get("pos_emb", "rope") != "rope"):
            completed[name] = defaults[name]
    return completed


def _incomplete_config_error(path: Path, weights: Path, refused: list[str], weights_read: bool) -> CheckpointError:
    """The error for a ``config.json`` lacking fields the weights cannot show: what to add for each."""
    why = "the weights cannot show" + ("" if weights_read else f" ({weights.name} is missing there)")
    return CheckpointError(
        f"{path} lacks {', '.join(f'{n!r}' for n in refused)}, which {why}: add "
        + "; ".join(f'"{n}": {_FIELD_HINTS.get(n, "its value")}' for n in refused)
        + " — the value the model was trained with (train_config.json beside it names a trained run's preset "
        "and options) — or restore config.json from a backup")


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, from its header alone (no data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # the Rust library raises its own types; name the file instead
        raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err}); it is truncated or "
                              "corrupted: save it again or restore a good copy") from err


def _no_config(run_dir: Path) -> None:
    """Raise the CheckpointError for a folder without ``config.json``, saying what the folder is instead."""
    raise CheckpointError(_without_config(run_dir)[1])


def _without_config(run_dir: Path) -> tuple[str, str]:
    """What a folder without ``config.json`` is: ``(a few words for a listing, the error saying what to do)``."""
    path = run_dir / CONFIG_FILE
    best = run_dir / BEST_DIR
    if (run_dir / TRAIN_CONFIG_FILE).is_file():
        if (run_dir / WEIGHTS_FILE).exists():
            return ("a training run whose first checkpoint was cut short: config.json is missing",
                    f"{path} is missing beside {run_dir / WEIGHTS_FILE}: the training run's first checkpoint was cut "
                    f"short (or config.json was deleted); restore it from a backup, or train the run again "
                    f"(delete {run_dir}, or choose another --name)")
        best_saved = (best / CONFIG_FILE).is_file()
        return ("a training run that stopped before its first checkpoint"
                + (", with best/ weights" if best_saved else ""),
                f"{run_dir} holds a training run that stopped before its first checkpoint: it has train_config.json "
                f"but no {CONFIG_FILE} and no weights, so there is nothing to load here; "
                + (f"load the best weights it saved, in {best}, or " if best_saved else "")
                + f"train it again (delete {run_dir}, or choose another --name)")
    return ("not a run: no config.json",
            f"{path} is missing, so {run_dir} is not a run directory (which `llmscratch train` or `llmscratch import` "
            "writes); give the run's folder, or turn Hugging Face or book weights into one with `llmscratch import`")


def folder_kind(directory: PathLike) -> str:
    """What ``directory`` is, in a few words: ``"run"`` for a run whose config loads, else what it is instead.

    For listings of a folder of runs; the same classification as the errors of
    :func:`load_config` (a training run stopped before its first checkpoint, a Hugging Face
    directory, a dangling link...), without their advice.
    """
    directory = Path(directory)
    if directory.is_symlink() and not directory.exists():
        return f"a link to {os.readlink(directory)}, which no longer exists"
    if not directory.is_dir():
        return "not a folder"
    if not (directory / CONFIG_FILE).exists():
        return _without_config(directory)[0]
    try:
        load_config(directory)
    except CheckpointError as err:
        found = re.search(r"is a Hugging Face (.+) config, not a run's", str(err))
        if found:
            return f"a Hugging Face {found.group(1)} directory (`llmscratch import` makes a run of it)"
        return f"a run that cannot be loaded (`llmscratch info {directory}` says why)"
    return "run"


def checkpoint_step(run_dir: PathLike) -> Optional[int]:
    """The step of the run's newest checkpoint, or None where it has none (imported weights, say).

    Read from the weights' tag (their file's header) or the small training state of a sharded
    (FSDP) checkpoint, so a listing reads no optimizer state; only a run saved before weights
    were tagged has its training state read whole.
    """
    run_dir = Path(run_dir)
    steps = []
    for state_dir in (run_dir, run_dir / SHARDED_DIR):
        if not (state_dir / TRAINING_STATE_FILE).is_file():
            continue
        step = None
        if state_dir == run_dir and (run_dir / WEIGHTS_FILE).is_file():
            step = weights_tag(run_dir).get("step")
        if step is None:
            state = _torch_load(state_dir / TRAINING_STATE_FILE, "a training state")
            step = state.get("step") if isinstance(state, dict) else None
        if step is not None:
            steps.append(int(step))
    return max(steps) if steps else None


def _infer_ours(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, Any, str]]:
    """What our weight names and shapes (``{name: shape}``) say about the config: ``(field, value, evidence)``.

    The head count, the activation, the non-learned position kinds and the scalars (dropout,
    epsilon, RoPE's base, attention scaling) leave no trace in the weights.
    """
    facts: list[tuple[str, Any, str]] = []
    if len(shapes.get("tok_emb.weight", ())) == 2:
        vocab, dim = shapes["tok_emb.weight"]
        facts += [("vocab_size", vocab, "tok_emb.weight has %d rows" % vocab),
                  ("emb_dim", dim, "tok_emb.weight has %d columns" % dim)]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layers = max(layers) + 1 if layers else 0
    facts.append(("n_layers", n_layers, f"blocks 0..{n_layers - 1} are stored" if layers else "no blocks are stored"))
    if "pos_emb.weight" in shapes:
        facts.append(("pos_emb", "learned", "pos_emb.weight is present"))
        if shapes["pos_emb.weight"]:
            rows = shapes["pos_emb.weight"][0]
            facts.append(("context_length", rows, "pos_emb.weight has %d rows" % rows))
    else:
        facts.append(("pos_emb", "not learned", "there is no pos_emb.weight"))
    if layers:
        has = "blocks.0.attn.qkv.bias" in shapes
        facts.append(("qkv_bias", has, f"blocks.0.attn.qkv.bias is {'present' if has else 'absent'}"))
    has = "final_norm.bias" in shapes
    facts.append(("bias", has, f"final_norm.bias is {'present' if has else 'absent'}"))
    has = "out_head.weight" in shapes
    facts.append(("tie_weights", not has,
                  "out_head.weight is stored separately" if has else "there is no separate out_head.weight"))
    return facts


def _config_disagreements(cfg: GPTConfig, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    lines = []
    for name, value, evidence in _infer_ours({k: tuple(v.shape) for k, v in tensors.items()}):
        said = getattr(cfg, name)
        if name == "pos_emb":
            agrees = (said == "learned") == (value == "learned")
        elif name == "context_length":
            agrees = cfg.pos_emb != "learned" or said == value
        else:
            agrees = said == value
        if not agrees:
            lines.append(f"{name}: the config says {said!r} but the weights say {value!r} ({evidence})")
    return lines


def _short(names: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` names, and how many more there are."""
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return sep.join(names[:limit]) + more


def _key_disagreements(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape differences, each list shortened."""
    lines = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k} (expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)})"
              for k in sorted(set(expected) & set(found)) if expected[k].shape != found[k].shape]
    if missing:
        lines.append(f"missing keys: {_short(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches: {_short(shapes)}")
    return lines


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], source: PathLike, fix: str) -> None:
    """Raise a CheckpointError naming the first tensor of ``source`` that holds NaN or an infinity.

    No trained or imported model holds one (training stops at a NaN loss before it saves), so
    such a value means a damaged file; left in, it would surface later as a puzzling error deep
    in sampling or as NaN losses. ``fix``: what to do instead. One pass of ``isfinite`` per
    tensor: about as cheap as reading the file.
    """
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf, n = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()), tensor.numel()
            what = " and ".join(part for part in (f"NaN ({nan} of {n} values)" if nan else "",
                                                  f"infinite values ({inf} of {n})" if inf else "") if part)
            raise CheckpointError(f"{source}: tensor {name} holds {what}, which no saved model does: the file is "
                                  f"damaged; {fix}")


def _non_finite_fix(run_dir: Path) -> str:
    """What to load instead of a run whose weights are damaged: its best/ weights, its checkpoint, a backup."""
    if run_dir.name == BEST_DIR and (run_dir.parent / WEIGHTS_FILE).is_file():
        return (f"load the run's last checkpoint, {run_dir.parent}, instead, or restore {run_dir / WEIGHTS_FILE} "
                "from a backup")
    if (run_dir / BEST_DIR / WEIGHTS_FILE).is_file():
        return (f"load the run's best weights, {run_dir / 'best'}, instead (to train on: "
                f"`llmscratch train --init-from {run_dir / 'best'}`), or restore the file from a backup or a "
                "previous checkpoint")
    return "restore it from a backup or a previous checkpoint, or train or import the model again"


def load_model(run_dir: PathLike, device: Union[str, torch.device] = "cpu", **config_overrides: Any) -> GPT:
    """Build the GPT described by ``run_dir/config.json`` and load ``model.safetensors`` into it.

    ``config_overrides`` may change the runtime-only fields in :data:`RUNTIME_FIELDS`
    (for example ``attn_backend="explicit"``, ``drop_rate=0.0``). Weights that do not fit
    the config raise a CheckpointError naming each differing field and key, and so do weights
    holding NaN or infinities (:func:`refuse_non_finite`). The model is returned in eval mode
    (as ``from_pretrained`` does); call ``.train()`` to train it.
    """
    run_dir = Path(run_dir)
    if lora_files.is_adapter(run_dir):
        return _load_with_adapters(run_dir, device, config_overrides)
    cfg = load_config(run_dir)
    bad = sorted(set(config_overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(
            f"cannot override {bad} when loading {run_dir}: they fix the shape of the saved weights; "
            f"only {list(RUNTIME_FIELDS)} may be overridden"
        )
    if config_overrides:
        try:
            cfg = GPTConfig.from_dict({**cfg.to_dict(), **config_overrides})
        except ConfigError as err:
            raise CheckpointError(f"bad override for {run_dir}: {err}") from err

    weights_path = run_dir / WEIGHTS_FILE
    tensors = read_safetensors(weights_path)
    refuse_non_finite(tensors, weights_path, _non_finite_fix(run_dir))
    model = GPT(cfg)
    expected = _state_dict_for_file(model)
    problems = _config_disagreements(cfg, tensors) + _key_disagreements(expected, tensors)
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match {run_dir / CONFIG_FILE}:\n  - " + "\n  - ".join(problems)
            + "\nfix config.json to describe these weights, or put the matching weights beside it"
        )
    if cfg.tie_weights:
        tensors["out_head.weight"] = tensors["tok_emb.weight"]  # same Parameter: loaded twice, same values
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def _load_with_adapters(run_dir: Path, device: Union[str, torch.device], overrides: dict[str, Any]) -> GPT:
    """A LoRA run or adapter folder: its base run's model with the adapters of ``run_dir`` on it."""
    adapter = lora_files.read_adapter_config(run_dir)
    if lora_files.is_adapter(adapter.base_run):
        raise CheckpointError(f"{run_dir}'s base run {adapter.base_run} holds adapters itself; adapters go on whole "
                              f"weights: merge the base first (`llmscratch export {adapter.base_run} OUT --format run "
                              "--merge`) and point adapter.json at OUT")
    model = load_model(adapter.base_run, **overrides)
    weights_path = run_dir / WEIGHTS_FILE
    tensors = read_safetensors(weights_path)
    refuse_non_finite(tensors, weights_path, _non_finite_fix(run_dir))
    lora_files.load_adapter(model, run_dir, tensors)
    return model.to(device).eval()


# Leaf values that torch.load(weights_only=True) accepts back.
_PLAIN_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds something torch.load(weights_only=True) would refuse (named by its path)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; use strings or numbers")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise CheckpointError(
            f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
            "refuses; store tensors and plain Python values (for RNG states: torch.Generator.get_state() "
            "or numpy's Generator.bit_generator.state dict)"
        )


def save_training_state(run_dir: PathLike, state: dict) -> None:
    """Write ``training_state.pt`` atomically; ``state`` must hold only tensors and plain values."""
    if not isinstance(state, dict):
        raise TypeError(f"training state must be a dict, got {type(state).__name__}")
    _check_plain(state, "training_state")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_torch(run_dir / TRAINING_STATE_FILE, state)


# A checkpoint is two files, and no file system renames two files as one: so both carry the same
# tag, and :func:`save_checkpoint` stages both before it renames either (see there).
SAVE_TAG_KEYS = ("save_id", "step")
PENDING = ".pending."  # the prefix of a checkpoint's files while they are staged


def new_save_tag(step: int) -> dict[str, str]:
    """A tag for one checkpoint: its step and an id no other save shares."""
    return {"save_id": uuid.uuid4().hex, "step": str(step)}


def save_checkpoint(run_dir: PathLike, model: nn.Module, state: dict) -> None:
    """Write a resumable checkpoint, weights and training state, so that a kill at any moment leaves one whole pair.

    Each file is atomic on its own (:mod:`files`), but a kill between two writes would leave
    new weights beside the previous optimizer state, and the previous weights gone. So both are
    first written whole under staged names (``.pending.model.safetensors``,
    ``.pending.training_state.pt``), then renamed into place, weights first. A kill before the
    first rename leaves the previous pair; a kill between the two renames leaves the new weights
    and the new state still staged, which :func:`load_training_state` finishes renaming
    (:func:`finish_interrupted_save`). The two files carry one tag, checked on resume.

    A save that fails before its first rename (a full disk, say) removes what it staged, so
    the previous checkpoint stays whole and the space is free again; a full disk raises
    :class:`files.DiskFullError` naming the folder, the space the checkpoint needs and what
    is free.
    """
    if not isinstance(state, dict):
        raise TypeError(f"training state must be a dict, got {type(state).__name__}")
    run_dir = Path(run_dir)
    tag = new_save_tag(int(state.get("step", -1)))
    state = {**state, "weights_tag": tag}
    _check_plain(state, "training_state")
    gpt = _unwrap(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    _mark_adapters(run_dir, gpt)
    staged_weights, staged_state = run_dir / (PENDING + WEIGHTS_FILE), run_dir / (PENDING + TRAINING_STATE_FILE)
    weights = _state_dict_for_file(gpt, None)
    try:
        _write_safetensors(staged_weights, weights, tag)
        _write_torch(staged_state, state)
        write_text_atomic(run_dir / CONFIG_FILE, gpt.cfg.to_json() + "\n")
    except BaseException as err:
        staged_weights.unlink(missing_ok=True)  # useless without its pair, and it takes the space
        staged_state.unlink(missing_ok=True)
        if isinstance(err, DiskFullError):
            need = _safetensors_size(weights) + _torch_size(state)
            raise _checkpoint_disk_full(run_dir, tag["step"], need) from err
        raise
    os.replace(staged_weights, run_dir / WEIGHTS_FILE)
    os.replace(staged_state, run_dir / TRAINING_STATE_FILE)
    sync_directory(run_dir)


def _checkpoint_disk_full(run_dir: Path, step: str, need: int) -> DiskFullError:
    """The one-line error for a checkpoint the disk had no room for: what was kept, and how to go on."""
    if (run_dir / WEIGHTS_FILE).is_file() and (run_dir / TRAINING_STATE_FILE).is_file():
        try:
            kept = weights_tag(run_dir).get("step")
        except CheckpointError:
            kept = None
        which = f"the checkpoint of step {kept}" if kept else "the previous checkpoint"
        after = (f"nothing was lost: {which} is still whole there; continue from it with "
                 f"`llmscratch train --resume {run_dir}` once there is room")
    else:
        after = "no earlier checkpoint was there to lose; start the training again once there is room"
    return disk_full_error(run_dir, f"the checkpoint of step {step}", need, after)


def finish_interrupted_save(run_dir: PathLike) -> bool:
    """Rename a staged training state into place if its save got as far as the weights; whether it did.

    The second half of :func:`save_checkpoint` after a kill between its two renames: the weights
    in place carry the staged state's tag, so the pair is whole again. Anything else staged (a
    save killed before its first rename) is left for the next save to overwrite.
    """
    run_dir = Path(run_dir)
    staged = run_dir / (PENDING + TRAINING_STATE_FILE)
    if not staged.is_file() or not (run_dir / WEIGHTS_FILE).is_file():
        return False
    try:
        theirs = _torch_load(staged, "a staged training state").get("weights_tag")
        ours = weights_tag(run_dir)
    except (CheckpointError, AttributeError):
        return False
    if not theirs or theirs != ours:
        return False
    try:
        os.replace(staged, run_dir / TRAINING_STATE_FILE)
    except OSError as err:
        raise CheckpointError(f"{run_dir}'s last save was cut short after its weights were renamed into place; "
                              f"finishing it needs {staged} renamed to {TRAINING_STATE_FILE}, which failed "
                              f"({err}): make {run_dir} writable, or rename it yourself") from err
    sync_directory(run_dir)
    return True


def check_saved_together(run_dir: PathLike, state: dict) -> None:
    """Refuse weights and a training state from different saves (runs saved untagged pass)."""
    theirs = state.get("weights_tag")
    if not theirs:
        return
    ours = weights_tag(run_dir)
    if ours != theirs:
        run_dir = Path(run_dir)
        raise CheckpointError(
            f"{run_dir / WEIGHTS_FILE} (step {ours.get('step', '?')}) and {run_dir / TRAINING_STATE_FILE} "
            f"(step {theirs.get('step', '?')}) are not from the same save (were they copied from two "
            f"checkpoints?). The resume changed nothing. To go on from these weights with a fresh optimizer, "
            f"start a new run with --init-from {run_dir}; or restore both files from a backup"
        )


def load_training_state(run_dir: PathLike) -> Optional[dict]:
    """The dict in ``run_dir/training_state.pt``, or None when the run has none.

    A save cut short between renaming its weights and its training state is finished first
    (:func:`finish_interrupted_save`), so the state read is the one saved with the weights.
    """
    run_dir = Path(run_dir)
    _require_dir(run_dir)
    finish_interrupted_save(run_dir)
    path = run_dir / TRAINING_STATE_FILE
    if not path.exists():
        return None
    state = _torch_load(path, "a training state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a dict, got {type(state).__name__}; it was not written by llmscratch")
    return state


def save_run(run_dir: PathLike, model: nn.Module, tokenizer: Any = None,
             training_state: Optional[dict] = None) -> None:
    """Save the model, and the tokenizer and training state when given, into ``run_dir``."""
    save_model(run_dir, model)
    if tokenizer is not None:
        tokenizer.save(Path(run_dir))
    if training_state is not None:
        save_training_state(run_dir, training_state)


def has_tokenizer_files(directory: PathLike) -> bool:
    """Whether ``directory`` holds files a tokenizer was saved to (``tokenizer*``, GPT-2 BPE files)."""
    directory = Path(directory)
    names = ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe")
    return any(directory.glob("tokenizer*")) or any((directory / n).exists() for n in names)


def no_tokenizer_error(run_dir: PathLike, purpose: str = "text") -> CheckpointError:
    """The error for a run without tokenizer files, when ``purpose`` (e.g. "the prompt") must become tokens."""
    return CheckpointError(
        f"{run_dir} has no tokenizer files (tokenizer_config.json with tokenizer.json, chars.json or "
        f"vocab.bpe + encoder.json; or vocab.json + merges.txt), so {purpose} cannot be turned into tokens; "
        "copy them from the run or Hugging Face directory the weights came from, or import the weights again "
        f"with their tokenizer (`llmscratch import SOURCE {run_dir} --force`, without --no-tokenizer; "
        "--tokenizer-dir DIR for the book's format)")


def load_run(run_dir: PathLike, device: Union[str, torch.device] = "cpu", *,
             need_tokenizer: Optional[str] = None) -> tuple[GPT, Any, Optional[dict]]:
    """``(model, tokenizer or None, training state or None)`` from a run directory.

    ``need_tokenizer``: what the tokenizer is for (e.g. ``"the prompt"``); then a run without
    tokenizer files raises :func:`no_tokenizer_error` instead of giving ``None``.
    """
    model = load_model(run_dir, device=device)
    tokenizer = None
    if has_tokenizer_files(run_dir):
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(run_dir))
    elif need_tokenizer is not None:
        raise no_tokenizer_error(run_dir, need_tokenizer)
    return model, tokenizer, load_training_state(run_dir)


def describe(model: GPT) -> str:
    """One line for people: parameter count and the config's shape."""
    c = model.cfg
    extras = [c.pos_emb + " positions", "qkv bias" if c.qkv_bias else "no qkv bias",
              "tied head" if c.tie_weights else "untied head"]
    if not c.bias:
        extras.append("no other biases")
    if not c.scale_attn:
        extras.append("unscaled attention")
    if c.activation != "gelu" or c.hidden_dim is not None:
        extras.append(f"{c.activation} MLP" + (f" of {c.ff_hidden}" if c.hidden_dim is not None else ""))
    if c.norm != "layernorm":
        extras.append(c.norm)
    if c.qk_norm:
        extras.append("q/k norms")
    if c.rope_scaling is not None:
        extras.append(f"{c.rope_scaling.get('rope_type')} RoPE scaling")
    heads = f"{c.n_heads} heads" + (f" sharing {c.kv_heads} key/value heads" if c.kv_heads != c.n_heads else "")
    if c.head_size is not None:
        heads += f" of {c.head_dim} dims"
    return (f"{model.num_parameters():,} parameters; vocab {c.vocab_size}, context {c.context_length}, "
            f"{c.emb_dim} dims, {heads}, {c.n_layers} layers; " + ", ".join(extras))


# =========================================================================== mapping tables


def qkv_sizes(cfg: GPTConfig) -> tuple[int, int, int]:
    """The rows of Q, K and V in our fused ``attn.qkv`` (stacked in that order along its output).

    Q has ``n_heads · head_dim`` rows, K and V ``n_kv_heads · head_dim`` each: all three are
    ``emb_dim`` for GPT-2, where every query head has its own key and value head; fewer with
    grouped-query attention.
    """
    return cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim


def mlp_hidden(cfg: GPTConfig) -> int:
    """The width of the MLP's hidden layer (``ff.fc_out``'s input): GPT-2's ``4 · emb_dim`` unless ``hidden_dim`` is set."""
    return cfg.ff_hidden


@dataclass(frozen=True)
class Rule:
    """One row of a mapping table: our parameter ↔ the foreign one(s).

    ``theirs`` with several names are concatenated along dim 0 into ours, ``split(cfg)`` giving
    the rows of each in order (the book's W_query, W_key, W_value → our qkv, cut at
    :func:`qkv_sizes`); one name needs no ``split``. ``transpose``: stored as ``(in, out)`` over
    there. ``present(cfg)``: whether we have the parameter; when we do not and
    ``zeros_if_absent``, the other format still stores it, as zeros (GPT-2's qkv bias).
    """

    ours: str
    theirs: tuple[str, ...]
    shape: Callable[[GPTConfig], tuple[int, ...]]  # our shape
    transpose: bool = False
    present: Callable[[GPTConfig], bool] = lambda cfg: True
    zeros_if_absent: bool = False
    split: Optional[Callable[[GPTConfig], tuple[int, ...]]] = None  # rows of ours (dim 0) held by each of theirs

    def __post_init__(self) -> None:
        if len(self.theirs) > 1 and self.split is None:
            raise ValueError(f"Rule {self.ours}: {len(self.theirs)} foreign tensors need split sizes")
        if len(self.theirs) > 1 and self.transpose:
            raise ValueError(f"Rule {self.ours}: a transposed tensor is stored whole, not split")

    def split_sizes(self, cfg: GPTConfig) -> tuple[int, ...]:
        """The rows of ours (dim 0) that each foreign tensor holds, in the order of ``theirs``."""
        rows = self.shape(cfg)[0]
        sizes = tuple(self.split(cfg)) if self.split is not None else (rows,)
        if len(sizes) != len(self.theirs) or sum(sizes) != rows:
            raise ValueError(f"Rule {self.ours}: split sizes {sizes} do not cut {rows} rows into "
                             f"{len(self.theirs)} tensors")
        return sizes

    def their_shapes(self, cfg: GPTConfig) -> tuple[tuple[int, ...], ...]:
        """The shape of each foreign tensor: ours transposed, or ours cut along dim 0 at :meth:`split_sizes`."""
        shape = self.shape(cfg)
        if self.transpose:
            return (tuple(reversed(shape)),)
        return tuple((rows, *shape[1:]) for rows in self.split_sizes(cfg))

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The foreign tensors (their shapes checked) → ours, ``(out, in)`` for a weight."""
        return parts[0].t() if self.transpose else torch.cat(parts, dim=0)

    def cut(self, tensor: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, ...]:
        """Ours → the foreign tensors, in the order of ``theirs``: ``(in, out)`` if transposed, else q, k, v, ..."""
        return (tensor.t(),) if self.transpose else torch.split(tensor, self.split_sizes(cfg), dim=0)


def _vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (cfg.emb_dim,)


def _qkv_weight(cfg: GPTConfig) -> tuple[int, ...]:
    return (sum(qkv_sizes(cfg)), cfg.emb_dim)  # (q + k + v, C)


def _qkv_vec(cfg: GPTConfig) -> tuple[int, ...]:
    return (sum(qkv_sizes(cfg)),)


def _learned(cfg: GPTConfig) -> bool:
    return cfg.pos_emb == "learned"


def _untied(cfg: GPTConfig) -> bool:
    return not cfg.tie_weights


def _qkv_bias(cfg: GPTConfig) -> bool:
    return cfg.qkv_bias


# Hugging Face GPT-2, in transformers' save_pretrained layout. Per-layer rows use "{i}".
# c_attn is Q, K, V fused along its output, as our qkv is: one tensor, transposed whole.
HF_TABLE: tuple[Rule, ...] = (
    Rule("tok_emb.weight", ("transformer.wte.weight",), lambda c: (c.vocab_size, c.emb_dim)),
    Rule("pos_emb.weight", ("transformer.wpe.weight",), lambda c: (c.context_length, c.emb_dim), present=_learned),
    Rule("blocks.{i}.norm1.weight", ("transformer.h.{i}.ln_1.weight",), _vec),
    Rule("blocks.{i}.norm1.bias", ("transformer.h.{i}.ln_1.bias",), _vec),
    Rule("blocks.{i}.attn.qkv.weight", ("transformer.h.{i}.attn.c_attn.weight",), _qkv_weight, transpose=True),
    Rule("blocks.{i}.attn.qkv.bias", ("transformer.h.{i}.attn.c_attn.bias",), _qkv_vec,
         present=_qkv_bias, zeros_if_absent=True),
    Rule("blocks.{i}.attn.out_proj.weight", ("transformer.h.{i}.attn.c_proj.weight",),
         lambda c: (c.emb_dim, c.emb_dim), transpose=True),
    Rule("blocks.{i}.attn.out_proj.bias", ("transformer.h.{i}.attn.c_proj.bias",), _vec),
    Rule("blocks.{i}.norm2.weight", ("transformer.h.{i}.ln_2.weight",), _vec),
    Rule("blocks.{i}.norm2.bias", ("transformer.h.{i}.ln_2.bias",), _vec),
    Rule("blocks.{i}.ff.fc_in.weight", ("transformer.h.{i}.mlp.c_fc.weight",),
         lambda c: (mlp_hidden(c), c.emb_dim), transpose=True),
    Rule("blocks.{i}.ff.fc_in.bias", ("transformer.h.{i}.mlp.c_fc.bias",), lambda c: (mlp_hidden(c),)),
    Rule("blocks.{i}.ff.fc_out.weight", ("transformer.h.{i}.mlp.c_proj.weight",),
         lambda c: (c.emb_dim, mlp_hidden(c)), transpose=True),
    Rule("blocks.{i}.ff.fc_out.bias", ("transformer.h.{i}.mlp.c_proj.bias",), _vec),
    Rule("final_norm.weight", ("transformer.ln_f.weight",), _vec),
    Rule("final_norm.bias", ("transformer.ln_f.bias",), _vec),
    Rule("out_head.weight", ("lm_head.weight",), lambda c: (c.vocab_size, c.emb_dim), present=_untied),
)

# The book's GPTModel (llms_from_scratch.ch04). Its causal-mask buffers are handled apart.
BOOK_TABLE: tuple[Rule, ...] = (
    Rule("tok_emb.weight", ("tok_emb.weight",), lambda c: (c.vocab_size, c.emb_dim)),
    Rule("pos_emb.weight", ("pos_emb.weight",), lambda c: (c.context_length, c.emb_dim)),
    Rule("blocks.{i}.norm1.weight", ("trf_blocks.{i}.norm1.scale",), _vec),
    Rule("blocks.{i}.norm1.bias", ("trf_blocks.{i}.norm1.shift",), _vec),
    Rule("blocks.{i}.attn.qkv.weight",
         ("trf_blocks.{i}.att.W_query.weight", "trf_blocks.{i}.att.W_key.weight", "trf_blocks.{i}.att.W_value.weight"),
         _qkv_weight, split=qkv_sizes),
    Rule("blocks.{i}.attn.qkv.bias",
         ("trf_blocks.{i}.att.W_query.bias", "trf_blocks.{i}.att.W_key.bias", "trf_blocks.{i}.att.W_value.bias"),
         _qkv_vec, present=_qkv_bias, split=qkv_sizes),
    Rule("blocks.{i}.attn.out_proj.weight", ("trf_blocks.{i}.att.out_proj.weight",), lambda c: (c.emb_dim, c.emb_dim)),
    Rule("blocks.{i}.attn.out_proj.bias", ("trf_blocks.{i}.att.out_proj.bias",), _vec),
    Rule("blocks.{i}.norm2.weight", ("trf_blocks.{i}.norm2.scale",), _vec),
    Rule("blocks.{i}.norm2.bias", ("trf_blocks.{i}.norm2.shift",), _vec),
    Rule("blocks.{i}.ff.fc_in.weight", ("trf_blocks.{i}.ff.layers.0.weight",), lambda c: (mlp_hidden(c), c.emb_dim)),
    Rule("blocks.{i}.ff.fc_in.bias", ("trf_blocks.{i}.ff.layers.0.bias",), lambda c: (mlp_hidden(c),)),
    Rule("blocks.{i}.ff.fc_out.weight", ("trf_blocks.{i}.ff.layers.2.weight",), lambda c: (c.emb_dim, mlp_hidden(c))),
    Rule("blocks.{i}.ff.fc_out.bias", ("trf_blocks.{i}.ff.layers.2.bias",), _vec),
    Rule("final_norm.weight", ("final_norm.scale",), _vec),
    Rule("final_norm.bias", ("final_norm.shift",), _vec),
    Rule("out_head.weight", ("out_head.weight",), lambda c: (c.vocab_size, c.emb_dim)),
)


def _expand(table: tuple[Rule, ...], cfg: GPTConfig) -> Iterator[tuple[Rule, str, tuple[str, ...]]]:
    """Every row of ``table`` with ``{i}`` filled in for each layer: ``(rule, ours, theirs)``."""
    for rule in table:
        layers = range(cfg.n_layers) if "{i}" in rule.ours else (None,)
        for i in layers:
            yield rule, rule.ours.format(i=i), tuple(t.format(i=i) for t in rule.theirs)


@dataclass
class _Misfits:
    """What keeps foreign weights from fitting a config, gathered so that one error names all of it."""

    missing: list[str] = dataclasses.field(default_factory=list)
    shapes: list[str] = dataclasses.field(default_factory=list)
    nonzero: list[str] = dataclasses.field(default_factory=list)
    dtypes: list[str] = dataclasses.field(default_factory=list)

    def raise_if_any(self, left: Mapping[str, torch.Tensor], cfg: GPTConfig, source: str) -> None:
        """Raise one CheckpointError naming every misfit, and the keys no rule took (``left``)."""
        problems = []
        if self.missing:
            problems.append(f"missing keys: {_short(self.missing)}")
        if left:
            problems.append(f"unexpected keys: {_short(sorted(left))}")
        if self.shapes:
            problems.append(f"shape mismatches: {_short(self.shapes, sep='; ')}")
        if self.nonzero:
            problems.append(f"non-zero values in {_short(self.nonzero, 4)}, for which this config has no parameter")
        if self.dtypes:
            problems.append(f"weights that are not floating point: {_short(self.dtypes, sep='; ')}")
        if problems:
            raise CheckpointError(f"the weights in {source} do not fit the config "
                                  f"({_config_line(cfg)}):\n  - " + "\n  - ".join(problems))


def _take(left: dict[str, torch.Tensor], keys: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
          required: bool, misfits: _Misfits) -> list[tuple[str, torch.Tensor]]:
    """Remove ``keys`` from ``left`` and return those found, noting any missing (if ``required``),
    misshapen or not floating point in ``misfits``."""
    found = []
    for key, shape in zip(keys, shapes):
        if key not in left:
            if required:
                misfits.missing.append(key)
            continue
        tensor = left.pop(key)
        if not tensor.is_floating_point():
            misfits.dtypes.append(f"{key} ({tensor.dtype})")
        if tuple(tensor.shape) != shape:
            misfits.shapes.append(f"{key} (expected {shape}, found {tuple(tensor.shape)})")
        found.append((key, tensor))
    return found


def _convert_in(table: tuple[Rule, ...], theirs: Mapping[str, torch.Tensor], cfg: GPTConfig,
                source: str) -> dict[str, torch.Tensor]:
    """Foreign state dict → ours through ``table``; every missing, extra or misshapen key is reported."""
    left = dict(theirs)
    ours: dict[str, torch.Tensor] = {}
    misfits = _Misfits()
    for rule, our_key, their_keys in _expand(table, cfg):
        present = rule.present(cfg)
        if not present and not rule.zeros_if_absent:
            continue
        shapes = rule.their_shapes(cfg)
        found = _take(left, their_keys, shapes, present, misfits)
        if not present:  # stored over there, absent here: must be zeros to lose nothing
            misfits.nonzero += [key for key, tensor in found if bool(tensor.any())]
            continue
        if len(found) == len(their_keys) and all(tuple(t.shape) == s for (_, t), s in zip(found, shapes)):
            ours[our_key] = rule.join([t for _, t in found]).contiguous()  # (out, in) for a weight
    misfits.raise_if_any(left, cfg, source)
    return ours


def _convert_out(table: tuple[Rule, ...], ours: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict → the foreign one through ``table`` (a tied head may be stored once or twice)."""
    ours = dict(ours)
    if cfg.tie_weights and "out_head.weight" not in ours and "tok_emb.weight" in ours:
        ours["out_head.weight"] = ours["tok_emb.weight"]
    theirs: dict[str, torch.Tensor] = {}
    used = set()
    dtype = ours["tok_emb.weight"].dtype if "tok_emb.weight" in ours else torch.float32
    for rule, our_key, their_keys in _expand(table, cfg):
        if not rule.present(cfg):
            if rule.zeros_if_absent:
                for key, shape in zip(their_keys, rule.their_shapes(cfg)):
                    theirs[key] = torch.zeros(shape, dtype=dtype)
            continue
        if our_key not in ours:
            raise CheckpointError(f"our state dict lacks {our_key}, which the config ({_config_line(cfg)}) needs")
        tensor = ours[our_key].detach().to("cpu")
        used.add(our_key)
        if tuple(tensor.shape) != rule.shape(cfg):
            raise CheckpointError(f"{our_key} has shape {tuple(tensor.shape)}, the config needs {rule.shape(cfg)}")
        for key, piece in zip(their_keys, rule.cut(tensor, cfg)):  # (in, out), or q, k, v
            theirs[key] = piece.clone(memory_format=torch.contiguous_format)  # own storage, row-major
    unused = sorted(set(ours) - used - {"out_head.weight"})
    if unused:
        raise CheckpointError(f"our state dict has keys the config does not explain: {', '.join(unused[:8])}")
    return theirs


def _config_line(cfg: GPTConfig) -> str:
    return (f"vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, emb_dim={cfg.emb_dim}, "
            f"n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}, head_dim={cfg.head_dim}, "
            f"hidden_dim={cfg.ff_hidden}, qkv_bias={cfg.qkv_bias}, tie_weights={cfg.tie_weights}")


def _modern_refusals(cfg: GPTConfig, family: str) -> dict[str, tuple[bool, str]]:
    """What a GPT-2-shaped format (``family``: GPT-2's, the book's) cannot hold of the modern options."""
    return {
        "norm": (cfg.norm != "layernorm", f"{family} uses LayerNorm"),
        "n_kv_heads": (cfg.kv_heads != cfg.n_heads, f"{family} has a key and value head per query head"),
        "head_size": (cfg.head_dim * cfg.n_heads != cfg.emb_dim, f"{family}'s heads split emb_dim evenly"),
        "hidden_dim": (cfg.ff_hidden != 4 * cfg.emb_dim, f"{family}'s MLP is 4·emb_dim wide"),
        "qk_norm": (cfg.qk_norm, f"{family} has no q/k norms"),
    }


def _state_dict_of(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(_unwrap(model_or_state).state_dict())
    return dict(model_or_state)


# =========================================================================== Hugging Face GPT-2

# The activation GPT-2 uses: GELU with the tanh approximation, under either of its names.
_HF_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: Mapping[str, Any], *, source: str = "the Hugging Face config") -> GPTConfig:
    """A GPTConfig from a GPT-2 ``config.json`` dict; what our GPT cannot compute is refused by name.

    ``reorder_and_upcast_attn`` is accepted: it changes only the order and precision of the
    same arithmetic (the same function in float32).
    """
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type is {hf['model_type']!r}; only 'gpt2' can be imported")
    for name in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if name not in hf:
            raise CheckpointError(f"{source} lacks the field {name!r}; is it a GPT-2 config?")
    refusals = {
        "scale_attn_by_inverse_layer_idx": (bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                                            "per-layer attention scaling has no counterpart here"),
        "add_cross_attention": (bool(hf.get("add_cross_attention", False)), "cross-attention is not part of our GPT"),
        "activation_function": (hf.get("activation_function", "gelu_new") not in _HF_GELU_TANH,
                                f"only the tanh GELU ({' or '.join(_HF_GELU_TANH)}) is implemented"),
        "n_inner": (hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
                    f"the feed-forward width must be 4·n_embd = {4 * hf['n_embd']}"),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            raise CheckpointError(f"{source}: {name}={hf.get(name)!r} cannot be imported: {why}")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
            emb_dim=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            drop_rate=float(hf.get("resid_pdrop", 0.1)),
            qkv_bias=True,
            bias=True,
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            pos_emb="learned",
            scale_attn=bool(hf.get("scale_attn_weights", True)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (ConfigError, TypeError, ValueError) as err:  # float(None), float("abc"), a bad field
        raise CheckpointError(f"{source}: a field cannot be read: {err}; fix the config") from err


def hf_config_from_ours(cfg: GPTConfig, eot_id: Optional[int] = None) -> dict[str, Any]:
    """The GPT-2 ``config.json`` dict for ``cfg``; what GPT-2 cannot represent is refused by name.

    ``eot_id`` (the tokenizer's end-of-text id) becomes ``bos_token_id``/``eos_token_id``;
    by default GPT-2's 50256 where the vocabulary has it, else none.
    """
    _refuse_all("cannot export to GPT-2's format", cfg, {
        "pos_emb": (cfg.pos_emb != "learned", "GPT-2 has learned absolute positions only"),
        "bias": (not cfg.bias, "GPT-2 has biases in every linear layer and LayerNorm"),
        "activation": (cfg.activation != "gelu", "GPT-2's MLP uses GELU"),
        **_modern_refusals(cfg, "GPT-2"),
    })
    hf: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": cfg.scale_attn,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if eot_id is None and cfg.vocab_size > 50256:
        eot_id = 50256  # GPT-2's <|endoftext|>
    hf["bos_token_id"] = hf["eos_token_id"] = eot_id if eot_id is not None and eot_id < cfg.vocab_size else None
    return hf


_HUB_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


def _normalize_hf_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either HF layout → the save_pretrained one: add ``transformer.``, drop the causal-mask buffers."""
    out = {}
    for key, tensor in sd.items():
        if _HUB_BUFFER.match(key):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = tensor
    return out


def hf_to_ours(hf_state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig, *,
               source: str = "the Hugging Face state dict") -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (either layout) → ours, for the config ``cfg`` (see :func:`config_from_hf`)."""
    sd = _normalize_hf_keys(hf_state_dict)
    if cfg.tie_weights:
        sd.pop("lm_head.weight", None)  # some files store the tied head anyway; the tie wins, as in transformers
    return _convert_in(HF_TABLE, sd, cfg, source)


def ours_to_hf(state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict (or model) → GPT-2's, in the save_pretrained layout; zero qkv biases if we have none."""
    hf_config_from_ours(cfg)  # refuses what GPT-2 cannot represent
    return _convert_out(HF_TABLE, _state_dict_of(state_dict), cfg)


def read_hf_dir(directory: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a Hugging Face GPT-2 directory.

    Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
    ``pytorch_model.bin`` (read with ``weights_only=True``), in that order of preference.
    """
    directory = Path(directory)
    _require_dir(directory, "Hugging Face model directory")
    config_path = directory / "config.json"
    _require_file(config_path, "a Hugging Face model directory needs its config.json (as save_pretrained writes it)")
    hf_config = _read_json(config_path)
    if (directory / "model.safetensors").is_file():
        return hf_config, read_safetensors(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(read_safetensors(directory / shard))
        return hf_config, sd
    if (directory / "pytorch_model.bin").is_file():
        sd = _torch_load(directory / "pytorch_model.bin", "a PyTorch state dict")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{directory / 'pytorch_model.bin'} does not hold a state dict")
        return hf_config, sd
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin beside config.json"
    )


def load_hf_model(directory: PathLike) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 directory.

    GPT-2 always stores q, k, v biases; where every one of them is zero (as an export of a model
    without them writes, see :data:`HF_TABLE`), the model gets none (``qkv_bias=False``): the
    same function, and a round trip gives back the model that was exported.
    """
    directory = Path(directory)
    hf_config, hf_sd = read_hf_dir(directory)
    refuse_non_finite(hf_sd, directory, "get a good copy of the weights (download or save them again)")
    cfg = config_from_hf(hf_config, source=str(directory / "config.json"))
    if _all_qkv_biases_zero(_normalize_hf_keys(hf_sd), cfg):
        cfg = dataclasses.replace(cfg, qkv_bias=False)
    model = GPT(cfg)
    sd = hf_to_ours(hf_sd, cfg, source=str(directory))
    model.load_state_dict(_with_tied_head(sd, cfg), strict=True)
    return model.eval()


def _all_qkv_biases_zero(sd: Mapping[str, torch.Tensor], cfg: GPTConfig) -> bool:
    """Whether every layer's ``c_attn.bias`` (save_pretrained layout) is present and all zeros."""
    keys = [f"transformer.h.{i}.attn.c_attn.bias" for i in range(cfg.n_layers)]
    return all(k in sd and sd[k].is_floating_point() and not bool(sd[k].any()) for k in keys)


def save_hf(model: nn.Module, out_dir: PathLike, eot_id: Optional[int] = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
    gpt = _unwrap(model)
    hf_config = hf_config_from_ours(gpt.cfg, eot_id)
    hf_sd = ours_to_hf(gpt, gpt.cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out_dir / "model.safetensors", hf_sd)
    write_text_atomic(out_dir / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def _with_tied_head(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    if cfg.tie_weights:
        sd = {**sd, "out_head.weight": sd["tok_emb.weight"]}
    return sd


# =========================================================================== the book's GPTModel

_BOOK_MASK = re.compile(r"^trf_blocks\.\d+\.att\.mask$")


def _refuse_all(what: str, cfg: GPTConfig, refusals: dict[str, tuple[bool, str]]) -> None:
    """Raise one error naming every setting of ``cfg`` the format cannot hold (``{field: (refused, why)}``),
    so that a user retrains once, not once per reason."""
    reasons = [f"{name}={getattr(cfg, name)!r} ({why})" for name, (refused, why) in refusals.items() if refused]
    if reasons:
        raise CheckpointError(f"{what}: " + "; ".join(reasons))


def book_config_dict(cfg: GPTConfig) -> dict[str, Any]:
    """The book's config dict (``GPT_CONFIG_124M``'s keys) for ``cfg``; refuses what the book cannot compute."""
    refusals = {
        "pos_emb": (cfg.pos_emb != "learned", "the book's GPTModel has learned absolute positions only"),
        "bias": (not cfg.bias, "the book's linear layers and LayerNorms always have biases"),
        "scale_attn": (not cfg.scale_attn, "the book's attention always divides by √d_head"),
        "layer_norm_eps": (cfg.layer_norm_eps != 1e-5, "the book's LayerNorm uses eps=1e-5"),
        "activation": (cfg.activation != "gelu", "the book's FeedForward uses GELU"),
        **_modern_refusals(cfg, "the book's GPTModel"),
    }
    _refuse_all("cannot export to the book's format", cfg, refusals)
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias}


def book_to_ours(sd: Mapping[str, torch.Tensor], n_heads: int, drop_rate: float = 0.1, *,
                 source: str = "the book's state dict") -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The book's ``GPTModel`` state dict → ``(GPTConfig, our state dict)``.

    Sizes come from the tensors' shapes, ``qkv_bias`` from whether ``W_query.bias`` exists,
    ``tie_weights`` from whether ``out_head.weight`` equals ``tok_emb.weight`` (the book ties
    them by assigning one Parameter to both, and its state dict then holds the matrix twice);
    the head count is not in the weights and must be given.
    """
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in sd or sd[key].dim() != 2:
            raise CheckpointError(f"{source} has no 2-D {key}: it is not a state dict of the book's GPTModel")
    vocab, dim = sd["tok_emb.weight"].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    if not isinstance(n_heads, int) or n_heads < 1 or dim % n_heads:
        raise CheckpointError(
            f"n_heads={n_heads!r} does not divide the embedding size emb_dim={dim} of {source}; "
            "give a head count that divides it (--heads N) or the preset the weights were trained with"
        )
    try:
        cfg = GPTConfig(vocab_size=vocab, context_length=sd["pos_emb.weight"].shape[0], emb_dim=dim,
                        n_heads=n_heads, n_layers=max(layers) + 1 if layers else 0, drop_rate=drop_rate,
                        qkv_bias="trf_blocks.0.att.W_query.bias" in sd, bias=True, tie_weights=False,
                        pos_emb="learned", scale_attn=True, layer_norm_eps=1e-5)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err
    weights = {k: v for k, v in sd.items() if not _BOOK_MASK.match(k)}
    ours = _convert_in(BOOK_TABLE, weights, cfg, source)  # every shape checked, the head included
    if torch.equal(ours["out_head.weight"], ours["tok_emb.weight"]):  # one matrix, stored twice: tied
        cfg = dataclasses.replace(cfg, tie_weights=True)
        del ours["out_head.weight"]  # as our files store a tied head: once, as tok_emb.weight
    return cfg, ours


def ours_to_book(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
                 cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our weights → a state dict the book's ``GPTModel(book_config_dict(cfg))`` loads strictly.

    The causal-mask buffers are included; a tied head is written out as its own copy.
    """
    book_config_dict(cfg)  # refuses what the book cannot represent
    sd = _convert_out(BOOK_TABLE, _state_dict_of(model_or_state), cfg)
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
    for i in range(cfg.n_layers):
        sd[f"trf_blocks.{i}.att.mask"] = mask.clone()
    return sd


def read_book_file(path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a book checkpoint: ``torch.save(model.state_dict())``, or a dict with
    ``"model_state_dict"`` (the book's training checkpoints), or a ``.safetensors`` file."""
    path = Path(path)
    _require_file(path, "give the path of a torch.save(model.state_dict()) file of the book's GPTModel")
    kind, looks = _sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        obj = read_safetensors(path)
    elif kind is None:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (.pth/.pt state dict) or safetensors file: {looks}; give the file "
            "torch.save(model.state_dict()) wrote for the book's GPTModel, or a Hugging Face GPT-2 directory")
    else:
        obj = _torch_load(path, "the book's state dict", "give a good copy of the file")
        if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
            obj = obj["model_state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    if "tok_emb.weight" in obj and any(k.startswith("blocks.") for k in obj):  # our names, not the book's
        raise CheckpointError(f"{path} holds llmscratch's own weight names, not the book's: it belongs in a run "
                              "directory (beside its config.json), which needs no import")
    return obj
