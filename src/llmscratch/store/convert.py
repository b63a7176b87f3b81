"""Import and export: a run directory from or to Hugging Face GPT-2 folders, the book's state
dicts, the GPT-2 download, and pretrained weights for ``--init-from``.

The tables that map weight names live beside the run directory's own code (``checkpoint.py``);
this module is what the ``import`` and ``export`` commands call: it reads a foreign source,
checks it, and writes an ordinary run directory (or the reverse).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..errors import CheckpointError, ConfigError, LLMScratchError
from ..files import PathLike
from ..nn.lora import has_lora, merge_lora
from ..nn.model import GPT, GPTConfig
from . import sharded
from .checkpoint import (
    _read_json, _require_dir, _with_tied_head, _write_torch,
    book_config_dict, book_to_ours, describe, load_hf_model, load_model, ours_to_book, read_book_file,
    refuse_non_finite, save_hf, save_model, save_run,
)
from .hf_llama import is_llama_family, load_hf_llama, save_hf_llama
from .lora import base_run_of, is_adapter
from .rundir import (
    BEST_DIR, CONFIG_FILE, METRICS_FILE, PLOT_FILE, TRAIN_CONFIG_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE,
)


GPT2_HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
_TRUE = ("1", "true", "yes", "on")


def download_gpt2(name: str) -> Path:
    """The local directory of OpenAI's GPT-2 ``name`` from the Hugging Face hub (or its cache)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    how = (f"download it where the network is reachable (`hf download {GPT2_HUB_MODELS[name]} "
           f"{' '.join(_HUB_FILES)} --local-dir DIR`, or `huggingface-cli download …` with huggingface_hub "
           "before 1.0), then run `llmscratch import DIR RUN_DIR`; "
           "any directory with config.json and model.safetensors (or pytorch_model.bin) works")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(GPT2_HUB_MODELS[name], allow_patterns=_HUB_FILES, local_files_only=offline))
    except ImportError as err:
        raise CheckpointError(f"downloading {name} needs huggingface_hub (pip install huggingface_hub); "
                              f"or {how}") from err
    except Exception as err:  # offline, DNS, HTTP, missing cache: all end here
        state = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else f"{type(err).__name__}: {err}"
        raise CheckpointError(f"could not download {name} from the Hugging Face hub ({state}); {how}") from err


def _gpt2_bpe_tokenizer(tokenizer_dir: Optional[PathLike], command: str) -> Any:
    """GPT-2's BPE for a model that came without a tokenizer (the book's format).

    Read from ``tokenizer_dir`` when given (it must hold the files), else from
    ``$LLMSCRATCH_GPT2_DIR`` or tiktoken's cache (see ``tokenizer.find_gpt2_files``). Where
    none has them, the error is one line: the option to give and ``command`` (the import
    as the user would type it) with that option added.
    """
    from ..errors import TokenizerError
    from ..data.tokenizer import GPT2_ENV, GPT2Tokenizer, find_gpt2_files, load_tokenizer, tiktoken_cache_dir

    if tokenizer_dir is not None:
        _require_dir(Path(tokenizer_dir), "--tokenizer-dir")
        try:
            return load_tokenizer(tokenizer_dir)
        except LLMScratchError as err:
            raise CheckpointError(f"--tokenizer-dir {tokenizer_dir}: {err}; give the folder that holds GPT-2's "
                                  "encoder.json + vocab.bpe (or vocab.json + merges.txt)") from err
    try:
        files = find_gpt2_files()
    except TokenizerError as err:
        looked = ([f"${GPT2_ENV} ({os.environ[GPT2_ENV]})"] if os.environ.get(GPT2_ENV) else []) \
            + [f"tiktoken's cache ({tiktoken_cache_dir()})"]
        raise CheckpointError(
            f"the book's format carries no tokenizer, and GPT-2's tokenizer files are not in {' nor '.join(looked)}: "
            f"give the folder that holds them (encoder.json + vocab.bpe, or vocab.json + merges.txt) with "
            f"--tokenizer-dir, e.g. `{command} --tokenizer-dir DIR`, or import without a tokenizer (--no-tokenizer)"
        ) from err
    return GPT2Tokenizer.from_files(*files)


def _check_tokenizer_fits(tokenizer: Any, cfg: GPTConfig, where: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer from {where} has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} (vocab_size): they do not belong together; give the model's own tokenizer"
        )


# What a run directory may hold besides config.json and model.safetensors: an import over a
# run (--force) removes them, so no old tokenizer, optimizer state or metrics outlive its model.
_RUN_LEFTOVERS = (TRAINING_STATE_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, PLOT_FILE, BEST_DIR,
                  "tokenizer_config.json", "tokenizer.json", "chars.json", "vocab.json", "merges.txt",
                  "encoder.json", "vocab.bpe")


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file; give a directory for the run")
    taken = [n for n in (CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE) if (run_dir / n).exists()]
    if taken and not overwrite:
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(taken)}); choose another directory, "
            "delete it, or replace it with --force (overwrite=True in Python)"
        )


def _clear_leftovers(run_dir: Path) -> None:
    """Before a run's model is replaced (--force): remove what belonged to the old one."""
    for name in _RUN_LEFTOVERS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _hub_or_path(source: PathLike, log: Callable[[str], None]) -> Path:
    """``source`` as a local path: one of :data:`GPT2_HUB_MODELS` that is no local path is downloaded."""
    path = Path(source)
    if not path.exists() and str(source) in GPT2_HUB_MODELS:
        log(f"downloading {GPT2_HUB_MODELS[str(source)]} from the Hugging Face hub (or its cache)")
        path = download_gpt2(str(source))
    return path


def _import_hf_dir(path: Path, *, heads: Optional[int], preset: Optional[str], tokenizer_dir: Optional[PathLike],
                   no_tokenizer: bool, log: Callable[[str], None]) -> tuple[GPT, Any]:
    """The model and tokenizer of a Hugging Face GPT-2 directory; the book's options are refused by name."""
    moot = [name for name, value in (("--heads", heads), ("--preset", preset), ("--tokenizer-dir", tokenizer_dir))
            if value is not None]
    if moot:
        raise CheckpointError(f"{path} is a Hugging Face directory: its config.json gives the shape and its own "
                              f"files the tokenizer, so {', '.join(moot)} (for the book's format) cannot apply; "
                              "drop them")
    model = load_hf_any(path)
    log(f"read the Hugging Face {_hf_kind(path)} directory {path}")
    if no_tokenizer:
        return model, None
    from ..data.pretrained_tokenizer import PretrainedTokenizer
    from ..data.tokenizer import load_tokenizer

    try:  # a modern model's tokenizer brings its special tokens, BOS rule, stop ids and chat template
        tokenizer = PretrainedTokenizer.from_hf_dir(path) if _is_llama_shaped(model.cfg) else load_tokenizer(path)
    except LLMScratchError as err:
        raise CheckpointError(
            f"{path} has no usable tokenizer ({err}); copy its vocab.json + merges.txt (or "
            "tokenizer.json) there, or import without a tokenizer (--no-tokenizer)"
        ) from err
    _check_tokenizer_fits(tokenizer, model.cfg, str(path))
    return model, tokenizer


def _is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file: its first four bytes are ``GGUF`` (or its name ends in ``.gguf``)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    return magic == b"GGUF" or path.suffix.lower() == ".gguf"


def _refuse_book_options(path: Path, what: str, heads: Optional[int], preset: Optional[str],
                         tokenizer_dir: Optional[PathLike]) -> None:
    moot = [name for name, value in (("--heads", heads), ("--preset", preset), ("--tokenizer-dir", tokenizer_dir))
            if value is not None]
    if moot:
        raise CheckpointError(f"{path} is {what}: it records its own shape and tokenizer, so {', '.join(moot)} "
                              "(for the book's format) cannot apply; drop them")


def _import_gguf(path: Path, *, no_tokenizer: bool, log: Callable[[str], None]) -> tuple[GPT, Any]:
    """The model and tokenizer of a GGUF file (llama.cpp's format), dequantized to float32."""
    from .checkpoint import config_from_hf, hf_to_ours
    from .gguf import read_gguf
    from .hf_llama import config_from_hf_llama, hf_llama_to_ours

    contents = read_gguf(path)
    if is_llama_family(contents.hf_config):
        cfg = config_from_hf_llama(contents.hf_config, source=str(path))
        ours = hf_llama_to_ours(contents.state_dict, cfg, source=str(path))
    else:
        cfg = config_from_hf(contents.hf_config, source=str(path))
        ours = hf_to_ours(contents.state_dict, cfg, source=str(path))
    refuse_non_finite(ours, path, "get a good copy of the file")
    model = GPT(cfg)
    model.load_state_dict(_with_tied_head(ours, cfg), strict=True)
    model.eval()
    kinds = sorted(set(contents.tensor_types.values()))
    log(f"read the GGUF file {path} ({contents.architecture}; {', '.join(kinds)} tensors, dequantized to float32)")
    if no_tokenizer:
        return model, None
    from ..data.pretrained_tokenizer import PretrainedTokenizer

    tokenizer = PretrainedTokenizer.from_gguf_metadata(contents.metadata, source=str(path))
    _check_tokenizer_fits(tokenizer, cfg, str(path))
    return model, tokenizer


def _check_book_preset(sd: dict[str, torch.Tensor], path: Path, preset: str) -> GPTConfig:
    """Preset ``preset``, once the book's weights ``sd`` are seen to have its width and depth.

    Checked before the config is built: its own rules would hide the real cause.
    """
    try:
        base = GPTConfig.from_preset(preset)
    except ConfigError as err:
        raise CheckpointError(str(err)) from err
    emb = sd["tok_emb.weight"].shape[-1] if "tok_emb.weight" in sd else base.emb_dim
    indices = {int(m.group(1)) for k in sd if (m := re.match(r"trf_blocks\.(\d+)\.", k))}
    layers = max(indices) + 1 if indices else base.n_layers  # as book_to_ours counts them
    differ = [f"{f}: preset {preset} has {getattr(base, f)}, the weights have {theirs}"
              for f, theirs in (("emb_dim", emb), ("n_layers", layers)) if getattr(base, f) != theirs]
    if differ:
        raise CheckpointError(f"{path} was not trained with preset {preset}: " + "; ".join(differ))
    return base


def _import_book_file(path: Path, command: str, *, heads: Optional[int], preset: Optional[str],
                      tokenizer_dir: Optional[PathLike], no_tokenizer: bool,
                      log: Callable[[str], None]) -> tuple[GPT, Any]:
    """The model of a book state-dict file, and GPT-2's BPE for it (the format carries no tokenizer).

    The head count comes from ``heads`` or ``preset`` (the weights do not record it);
    ``command`` is the import as the user typed it, for the error that asks for a tokenizer.
    """
    sd = read_book_file(path)  # first: a file that is no state dict needs no head count
    refuse_non_finite(sd, path, "give a good copy of the file")
    if heads is None and preset is None:
        raise CheckpointError(
            f"{path}: the book's format does not record the number of attention heads; give --heads N "
            "or --preset NAME (the book's GPT-2 sizes: gpt2-124m = 12 heads, gpt2-medium = 16, "
            "gpt2-large = 20, gpt2-xl = 25)"
        )
    drop_rate = 0.1
    if preset is not None:
        base = _check_book_preset(sd, path, preset)
        heads = heads if heads is not None else base.n_heads
        drop_rate = base.drop_rate
    cfg, ours = book_to_ours(sd, heads, drop_rate, source=str(path))
    model = GPT(cfg)
    model.load_state_dict(_with_tied_head(ours, cfg), strict=True)
    model.eval()
    log(f"read the book's GPTModel state dict {path}")
    if no_tokenizer:
        return model, None
    tokenizer = _gpt2_bpe_tokenizer(tokenizer_dir, command)
    _check_tokenizer_fits(tokenizer, model.cfg, str(tokenizer_dir or "GPT-2's files"))
    return model, tokenizer


def _typed_command(source: PathLike, run_dir: Path, heads: Optional[int], preset: Optional[str]) -> str:
    """The ``llmscratch import`` command as the user typed it (the book's options included), for errors."""
    options = [f"--{name} {shlex.quote(str(value))}" for name, value in (("heads", heads), ("preset", preset))
               if value is not None]
    return " ".join(["llmscratch import", shlex.quote(str(source)), shlex.quote(str(run_dir))] + options)


def import_checkpoint(
    source: PathLike,
    run_dir: PathLike,
    *,
    heads: Optional[int] = None,
    preset: Optional[str] = None,
    tokenizer_dir: Optional[PathLike] = None,
    no_tokenizer: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[GPT, Any]:
    """Turn ``source`` into a run directory and return ``(model, tokenizer or None)``.

    ``source`` is a Hugging Face GPT-2 directory, a book state-dict file (``.pt``/``.pth``/
    ``.bin``/``.safetensors``), or one of :data:`GPT2_HUB_MODELS` (downloaded). The run gets
    a tokenizer: the directory's own (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``),
    or for the book's format GPT-2's BPE (from ``tokenizer_dir``, ``$LLMSCRATCH_GPT2_DIR`` or
    tiktoken's cache). A missing tokenizer is an error, found before anything is written,
    unless ``no_tokenizer``: a run without one can be inspected but not prompted with text.
    """
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, overwrite)
    path = _hub_or_path(source, log)
    if str(source) == "smollm2" and not path.exists():
        from .gguf import find_smollm2

        path = find_smollm2()
    if path.is_file() and _is_gguf(path):
        _refuse_book_options(path, "a GGUF file", heads, preset, tokenizer_dir)
        model, tokenizer = _import_gguf(path, no_tokenizer=no_tokenizer, log=log)
    elif path.is_dir():
        model, tokenizer = _import_hf_dir(path, heads=heads, preset=preset, tokenizer_dir=tokenizer_dir,
                                          no_tokenizer=no_tokenizer, log=log)
    elif path.is_file():
        command = _typed_command(source, run_dir, heads, preset)
        model, tokenizer = _import_book_file(path, command, heads=heads, preset=preset, tokenizer_dir=tokenizer_dir,
                                             no_tokenizer=no_tokenizer, log=log)
    else:
        raise CheckpointError(
            f"{source} is neither a Hugging Face directory, a GGUF file, a book state-dict file, nor one of "
            f"{', '.join(GPT2_HUB_MODELS)} or smollm2; check the path"
        )
    if overwrite and run_dir.is_dir():  # only now that the source has been read whole
        _clear_leftovers(run_dir)
    save_run(run_dir, model, tokenizer)
    log(f"wrote {run_dir}: " + describe(model) + ("" if tokenizer is not None else "; no tokenizer"))
    return model, tokenizer


# Tokenizer files a GPT-2 export carries, and their names on the Hugging Face side
# (OpenAI's encoder.json / vocab.bpe are the same files as vocab.json / merges.txt).
_HF_TOKENIZER_FILES = {"vocab.json": "vocab.json", "merges.txt": "merges.txt", "tokenizer.json": "tokenizer.json",
                       "encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}


def _saved_eot_id(run_dir: Path) -> Optional[int]:
    """The end-of-text id the run's tokenizer recorded in ``tokenizer_config.json``, if any."""
    try:
        value = json.loads((run_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("eot_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse_export_target(run_dir: Path, out: Path, fmt: str) -> None:
    """Refuse, before the model is read, an ``out`` that is the run itself or would mix with other files."""
    if out.exists() and out.resolve() == run_dir.resolve():
        raise CheckpointError(f"{out} is the run being exported; give a new path for the export")
    if fmt == "hf" and out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new directory or delete it "
                              "(an export never mixes its files with others)")
    if fmt in ("book", "gguf") and (out.is_symlink() or (out.exists() and not out.is_dir())):  # a file, a link
        raise CheckpointError(f"{out} exists; choose a new file name or delete it")


def _is_llama_shaped(cfg: GPTConfig) -> bool:
    """Whether ``cfg`` exports as the Llama family (RMSNorm or SwiGLU) rather than as GPT-2."""
    return cfg.norm == "rmsnorm" or cfg.activation == "swiglu"


def _export_hf(model: GPT, run_dir: Path, out: Path, log: Callable[[str], None]) -> None:
    """Write ``out`` for transformers' ``from_pretrained`` (GPT-2 or the Llama family), with the run's tokenizer files."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; the Hugging Face format is a directory")
    if _is_llama_shaped(model.cfg):
        tokenizer = _run_tokenizer(run_dir)
        name = save_hf_llama(model, out, bos_id=getattr(tokenizer, "bos_id", None),
                             eos_id=getattr(tokenizer, "eot_id", None))
        if tokenizer is not None and tokenizer.kind == "hf":
            tokenizer.save(out)  # tokenizer.json + a tokenizer_config.json transformers reads
        log(f"wrote {out} for transformers.{name}.from_pretrained: {describe(model)}"
            + ("" if tokenizer is not None and tokenizer.kind == "hf" else "; no Hugging Face tokenizer in the run"))
        return
    save_hf(model, out, eot_id=_saved_eot_id(run_dir))
    copied = []
    for name, hf_name in _HF_TOKENIZER_FILES.items():
        if (run_dir / name).is_file() and not (out / hf_name).exists():
            shutil.copyfile(run_dir / name, out / hf_name)
            copied.append(hf_name)
    log(f"wrote {out} for transformers.GPT2LMHeadModel.from_pretrained: {describe(model)}"
        + (f"; tokenizer files {', '.join(copied)}" if copied else "; no GPT-2 tokenizer files in the run"))


def _run_tokenizer(run_dir: Path) -> Any:
    """The run's tokenizer, or None where it has none."""
    from ..data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(run_dir)
    except LLMScratchError:
        return None


def _export_gguf(model: GPT, run_dir: Path, out: Path, dtype: str, log: Callable[[str], None]) -> None:
    """Write ``out``: a GGUF file (llama.cpp, Ollama) of a GPT-2- or Llama-shaped run, with its BPE tokenizer."""
    from ..data.pretrained_tokenizer import gguf_tokenizer_metadata
    from .checkpoint import hf_config_from_ours, ours_to_hf
    from .gguf import write_gguf
    from .hf_llama import hf_llama_config_from_ours, ours_to_hf_llama

    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; a GGUF export is one file (e.g. model.gguf)")
    tokenizer = _run_tokenizer(run_dir)
    if tokenizer is None:
        raise CheckpointError(f"{run_dir} has no tokenizer, and a GGUF file must carry one (llama.cpp reads its "
                              "vocabulary from the file); export a run that has its tokenizer files")
    try:
        meta = gguf_tokenizer_metadata(tokenizer)
    except LLMScratchError as err:
        raise CheckpointError(f"cannot export {run_dir} to GGUF: {err}") from err
    cfg = model.cfg
    if _is_llama_shaped(cfg):
        hf_config = hf_llama_config_from_ours(cfg, tokenizer.bos_id, tokenizer.eot_id)
        state = ours_to_hf_llama(model, cfg)
    else:
        hf_config, state = hf_config_from_ours(cfg, tokenizer.eot_id), ours_to_hf(model, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, hf_config, state, meta, dtype=dtype, name=run_dir.resolve().name)
    log(f"wrote {out} ({hf_config['model_type']}, {dtype}): {describe(model)}; {tokenizer.vocab_size} tokens")


def _export_book(model: GPT, out: Path, log: Callable[[str], None]) -> None:
    """Write ``out``: a ``torch.save`` state dict for the book's ``GPTModel`` (refusing what it cannot compute)."""
    book_cfg = book_config_dict(model.cfg)
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; the book's format is one file (e.g. model.pth)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_torch(out, ours_to_book(model, model.cfg))
    log(f"wrote {out}: {describe(model)}\nload it with: model = GPTModel({book_cfg}); "
        f"model.load_state_dict(torch.load({str(out)!r}, weights_only=True))")


EXPORT_FORMATS = ("hf", "gguf", "book", "run")


def export_checkpoint(run_dir: PathLike, out: PathLike, fmt: str = "hf",
                      log: Callable[[str], None] = lambda message: None, dtype: str = "f16",
                      merge: bool = False) -> Path:
    """Write the run's model as ``fmt``: ``"hf"`` (a directory for transformers' ``from_pretrained``:
    GPT-2, or Llama/Qwen2/Qwen3 for a modern model, with the run's tokenizer files), ``"gguf"``
    (one file for llama.cpp and Ollama, in ``dtype`` ``"f16"`` or ``"f32"``), ``"book"`` (a
    ``torch.save`` state dict for the book's ``GPTModel``) or ``"run"`` (an ordinary run
    directory, consolidated from the sharded checkpoint of an FSDP run). Returns the path written.

    ``merge``: a LoRA run's adapters are folded into its base weights first (``W + scaling·(A·B)ᵀ``),
    and the plain model that results is what every format writes; a LoRA run is refused without it.
    """

    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in ("f16", "f32"):
        raise CheckpointError(f"unknown GGUF precision {dtype!r}; choose f16 or f32 (no quantization on export)")
    run_dir, out = Path(run_dir), Path(out)
    if fmt == "run" and not is_adapter(run_dir):
        return sharded.consolidate(run_dir, out, log=log)
    _refuse_export_target(run_dir, out, fmt)
    model = sharded.load_sharded(run_dir)[0] if sharded.latest_is_sharded(run_dir) else load_model(run_dir)
    _merge_adapters(model, run_dir, merge, log)
    if fmt == "run":
        _export_merged_run(model, run_dir, out, log)
    elif fmt == "hf":
        _export_hf(model, run_dir, out, log)
    elif fmt == "gguf":
        _export_gguf(model, run_dir, out, dtype, log)
    else:
        _export_book(model, out, log)
    return out


def _merge_adapters(model: GPT, run_dir: Path, merge: bool, log: Callable[[str], None]) -> None:
    """Fold a LoRA run's adapters into the base weights (``merge``), or refuse to export them unmerged."""
    if not has_lora(model):
        if merge:
            log(f"note: {run_dir} holds no LoRA adapters; --merge has nothing to fold in")
        return
    base = base_run_of(model)
    if not merge:
        raise CheckpointError(f"{run_dir} holds LoRA adapters on the base run {base}, and the formats hold whole "
                              "weights: add --merge to fold the adapters into the base weights first")
    merge_lora(model)
    log(f"merged the LoRA adapters of {run_dir} into the weights of {base}")


def _export_merged_run(model: GPT, run_dir: Path, out: Path, log: Callable[[str], None]) -> None:
    """Write ``out``: a plain run directory (config, merged weights, the run's tokenizer)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new directory or delete it")
    save_model(out, model)
    tokenizer = _run_tokenizer(run_dir)
    if tokenizer is not None:
        tokenizer.save(out)
    log(f"wrote {out}, a run directory: {describe(model)}")


def _hf_kind(directory: Path) -> str:
    """The ``model_type`` of a Hugging Face directory's ``config.json`` ("gpt2" where it says none), or ``""``."""
    config = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    return str(config.get("model_type", "gpt2")) if "model_type" in config or "n_embd" in config else ""


def load_hf_any(directory: PathLike) -> GPT:
    """Our GPT from a Hugging Face directory of GPT-2 or the Llama family (Llama, Qwen2, Qwen3)."""
    directory = Path(directory)
    _require_dir(directory, "Hugging Face model directory")
    config = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    if is_llama_family(config):
        return load_hf_llama(directory)
    kind = config.get("model_type", "gpt2")
    if kind != "gpt2":
        raise CheckpointError(f"{directory / 'config.json'}: model_type {kind!r} cannot be imported; llmscratch "
                              "reads gpt2, llama, qwen2 and qwen3 models")
    return load_hf_model(directory)


def load_pretrained(source: PathLike, device: Union[str, torch.device] = "cpu") -> GPT:
    """Weights to start a new run from: one of our run directories or a Hugging Face directory (GPT-2, Llama, Qwen)."""
    source = Path(source)
    _require_dir(source, "--init-from directory")
    if _hf_kind(source):
        return load_hf_any(source).to(device)
    return load_model(source, device=device)
