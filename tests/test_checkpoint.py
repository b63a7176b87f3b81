"""The run directory: exact round trips, atomic writes, clear errors on bad files; import/export
tokenizers and the ``llmscratch import`` / ``export`` commands.

Everything is built here: tiny random models, tiny GPT-2-style tokenizer files, broken
files (truncated by half, bytes flipped in the header, garbage). No network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmscratch.store import checkpoint
from llmscratch.store import convert
from llmscratch.store.checkpoint import CONFIG_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE, load_config, load_model, load_run, load_training_state, save_model, save_run, save_training_state
from llmscratch.store.convert import export_checkpoint, import_checkpoint
from llmscratch.errors import CheckpointError, LLMScratchError
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.nn.positions import POSITION_KINDS
from tiny_files import write_tiny_gpt2_files


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("test", **{"vocab_size": 64, "emb_dim": 16, "n_heads": 2, **overrides})
    return GPT(cfg).eval()


def tiny_hf_dir(directory: Path, vocab: int = 300, tied: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=12, n_head=3, n_layer=2, tie_word_embeddings=tied,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_save_load_round_trip_is_exact(tmp_path, pos_emb, tied):
    model = tiny(pos_emb=pos_emb, tie_weights=tied, qkv_bias=pos_emb == "rope", bias=pos_emb != "alibi")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_model(tmp_path, model)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == model.cfg.to_dict()
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert ("out_head.weight" in stored) == (not tied)  # a tied head is stored once

    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg and load_config(tmp_path) == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert (loaded.out_head.weight is loaded.tok_emb.weight) == tied
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_load_model_overrides_runtime_fields_only(tmp_path):
    save_model(tmp_path, tiny(drop_rate=0.1))
    model = load_model(tmp_path, attn_backend="explicit", drop_rate=0.0)
    assert model.cfg.attn_backend == "explicit" and model.cfg.drop_rate == 0.0 and not model.training
    with pytest.raises(CheckpointError, match=r"cannot override \['emb_dim'\]"):
        load_model(tmp_path, emb_dim=32)


def test_save_model_unwraps_compiled_and_wrapped_models(tmp_path):
    model = tiny()
    wrapper = torch.nn.Module()
    wrapper.module = model  # the shape of DistributedDataParallel
    save_model(tmp_path / "wrapped", wrapper)
    assert torch.equal(load_model(tmp_path / "wrapped").tok_emb.weight, model.tok_emb.weight)
    compiled = torch.compile(wrapper, backend="eager")  # an OptimizedModule around the wrapper: _orig_mod
    save_model(tmp_path / "compiled", compiled)
    loaded = load_model(tmp_path / "compiled").state_dict()
    assert set(loaded) == set(model.state_dict())  # no "_orig_mod." or "module." prefixes
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="expected an llmscratch GPT, got Linear"):
        save_model(tmp_path / "other", torch.compile(torch.nn.Linear(2, 2), backend="eager"))


def test_training_state_round_trip(tmp_path):
    model = tiny().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(7)
    state = {"step": 12, "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state(),
             "data": generator.get_state()}, "best_val": 3.25, "note": None, "tokens_seen": [1, 2]}
    assert load_training_state(tmp_path) is None
    save_training_state(tmp_path, state)
    back = load_training_state(tmp_path)
    assert back["step"] == 12 and back["best_val"] == 3.25 and back["tokens_seen"] == [1, 2]
    assert torch.equal(back["rng"]["data"], generator.get_state())
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for a, b in zip(fresh.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_training_state_refuses_what_weights_only_cannot_load(tmp_path):
    np = pytest.importorskip("numpy")
    with pytest.raises(CheckpointError, match=r"training_state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_training_state(tmp_path, {"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / TRAINING_STATE_FILE).exists()


def test_save_run_and_load_run(tmp_path):
    from llmscratch.data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("hello world")
    model = tiny(vocab_size=tokenizer.vocab_size)
    save_run(tmp_path / "run", model, tokenizer, {"step": 3})
    loaded, tok, state = load_run(tmp_path / "run")
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    assert tok.encode("hello") == tokenizer.encode("hello") and state == {"step": 3}
    save_model(tmp_path / "bare", model)
    assert load_run(tmp_path / "bare")[1:] == (None, None)


# --------------------------------------------------------------------------- atomic writes


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("where", ["os.replace", "the writer"])
def test_a_crash_while_saving_keeps_the_previous_files(tmp_path, monkeypatch, where):
    save_model(tmp_path, tiny(seed=1))
    save_training_state(tmp_path, {"step": 1})
    before = _snapshot(tmp_path)

    if where == "os.replace":
        def crash(*args, **kwargs):
            raise OSError("simulated crash before the rename")
        monkeypatch.setattr(checkpoint.os, "replace", crash)
    else:
        from safetensors import torch as st

        real = st.save_file

        def crash(tensors, filename, metadata=None):  # half a file, then the crash
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError("simulated crash mid-write")
        monkeypatch.setattr(st, "save_file", crash)
        monkeypatch.setattr(torch, "save", lambda *a, **k: crash({}, a[1]))

    with pytest.raises(OSError, match="simulated crash"):
        save_model(tmp_path, tiny(seed=2))
    with pytest.raises(OSError, match="simulated crash"):
        save_training_state(tmp_path, {"step": 2})
    assert _snapshot(tmp_path) == before  # same files, same bytes, no temporary file left behind
    monkeypatch.undo()
    assert torch.equal(load_model(tmp_path).tok_emb.weight, tiny(seed=1).tok_emb.weight)
    assert load_training_state(tmp_path) == {"step": 1}


# --------------------------------------------------------------------------- bad run directories


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match=f"run directory {tmp_path / 'nope'} does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config.json is missing.*llmscratch import"):
        load_model(tmp_path)
    save_model(tmp_path, tiny())
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        load_model(tmp_path)


def _killed_run(run: Path) -> Path:
    """What a training run killed (SIGKILL) before its first checkpoint leaves: no config.json, no weights."""
    from llmscratch.data.tokenizer import CharTokenizer

    CharTokenizer.from_text("hello world").save(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    (run / "train_config.json").write_text('{"steps": 100}\n')
    return run


def test_a_run_killed_before_its_first_checkpoint_says_so_not_that_config_json_is_missing(tmp_path):
    run = _killed_run(tmp_path / "run")
    for load in (load_config, load_model, load_run, convert.load_pretrained,
                 lambda d: export_checkpoint(d, tmp_path / "out", "hf")):
        with pytest.raises(CheckpointError) as err:
            load(run)
        message = str(err.value)
        assert message.startswith(f"{run} holds a training run that stopped before its first checkpoint"), message
        assert "no weights, so there is nothing to load" in message and "train it again" in message
        assert "save_model" not in message and "llmscratch import" not in message
    save_model(run / "best", tiny())  # the best weights are saved before the first checkpoint
    with pytest.raises(CheckpointError, match=f"load the best weights it saved, in {run / 'best'}, or train it again"):
        load_model(run)
    save_model(tmp_path / "cut", tiny())  # killed between writing the weights and config.json
    (tmp_path / "cut" / "train_config.json").write_text("{}")
    (tmp_path / "cut" / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"config.json is missing beside .*model.safetensors: the training "
                                              r"run's first checkpoint was cut short"):
        load_model(tmp_path / "cut")
    with pytest.raises(CheckpointError) as err:  # any other folder: no internal function names
        load_model(tmp_path)
    assert "is not a run directory" in str(err.value) and "save_model" not in str(err.value)


def test_a_dangling_latest_link_names_its_missing_target(tmp_path):
    import shutil

    save_run(tmp_path / "runs" / "r1", tiny())
    (tmp_path / "runs" / "latest").symlink_to("r1")
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "gone")
    shutil.rmtree(tmp_path / "runs" / "r1")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "runs" / "latest")
    assert str(err.value) == (
        f"run directory {tmp_path / 'runs' / 'latest'} is a link to {tmp_path / 'runs' / 'r1'}, which no longer "
        f"exists (deleted or moved); `latest` points at the newest run in {tmp_path / 'runs'} that saved a "
        f"checkpoint: give another run there by its own name (ls {tmp_path / 'runs'}), or train a new one")
    with pytest.raises(CheckpointError, match=f"is a link to {tmp_path / 'gone'}, which does not exist"):
        load_run(tmp_path / "runs" / "link")


def test_load_run_that_needs_a_tokenizer_says_which_files_are_missing_and_what_to_do(tmp_path):
    save_run(tmp_path / "run", tiny())
    assert load_run(tmp_path / "run")[1] is None  # optional unless asked for
    with pytest.raises(CheckpointError) as err:
        load_run(tmp_path / "run", need_tokenizer="the prompt")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'run'} has no tokenizer files (tokenizer_config.json with "
                              "tokenizer.json, chars.json or vocab.bpe + encoder.json; or vocab.json + merges.txt), "
                              "so the prompt cannot be turned into tokens; copy them from"), message
    assert f"`llmscratch import SOURCE {tmp_path / 'run'} --force`, without --no-tokenizer" in message


def test_a_run_whose_tokenizer_json_is_missing_names_it_and_says_what_to_do(tmp_path):
    from llmscratch.data.tokenizer import BPETokenizer

    save_run(tmp_path / "run", tiny(vocab_size=300), BPETokenizer.train("the heaven and the earth " * 20, 300))
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(LLMScratchError) as err:
        load_run(tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 'run' / 'tokenizer.json'} is missing: "
                                     f"{tmp_path / 'run' / 'tokenizer_config.json'} says the tokenizer is 'bpe'")
    assert "copy the tokenizer's files (tokenizer.json, tokenizer_config.json)" in str(err.value)


def _complete(**changes) -> str:
    """The config.json of :func:`tiny` with ``changes``."""
    return json.dumps({**tiny().cfg.to_dict(), **changes})


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config.json is not valid JSON \(line 1, column 2"),
    ("[1, 2]", r"config.json must hold a JSON object"),
    (_complete(emb_dim=-4), r"config.json has a bad field: GPTConfig.emb_dim must be a positive integer"),
    ('{"n_embd": 8}', r"config.json has a bad field: unknown GPTConfig field\(s\) \['n_embd'\]"),
    (_complete(emb_dim=30, n_heads=4), r"has a bad field: .*emb_dim \(30\) must be divisible by n_heads \(4\)"),
])
def test_bad_config_json(tmp_path, text, message):
    save_model(tmp_path, tiny())
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_config_name_every_field(tmp_path):
    save_model(tmp_path, tiny(qkv_bias=True, tie_weights=False))
    wrong = {**tiny().cfg.to_dict(), "vocab_size": 80, "emb_dim": 32, "n_layers": 3, "qkv_bias": False,
             "tie_weights": True, "pos_emb": "rope", "bias": False}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert f"{tmp_path / WEIGHTS_FILE} does not match {tmp_path / CONFIG_FILE}" in message
    for line in [
        "vocab_size: the config says 80 but the weights say 64 (tok_emb.weight has 64 rows)",
        "emb_dim: the config says 32 but the weights say 16",
        "n_layers: the config says 3 but the weights say 2",
        "pos_emb: the config says 'rope' but the weights say 'learned' (pos_emb.weight is present)",
        "qkv_bias: the config says False but the weights say True",
        "bias: the config says False but the weights say True",
        "tie_weights: the config says True but the weights say False (out_head.weight is stored separately)",
        "missing keys: blocks.2.",
        "unexpected keys: ",
        "shape mismatches: ",
    ]:
        assert line in message, line


def test_context_length_mismatch_of_learned_positions(tmp_path):
    save_model(tmp_path, tiny())
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["context_length"] = 64
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="context_length: the config says 64 but the weights say 32"):
        load_model(tmp_path)
    # Positions that are not learned leave no trace of the context length: any is fine.
    save_model(tmp_path, tiny(pos_emb="rope"))
    assert load_model(tmp_path, context_length=128).cfg.context_length == 128


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(10, 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _huge_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _header_pointing_past_the_end(path: Path) -> None:
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10_000
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + header_len:])


@pytest.mark.parametrize("damage, message", [
    (_truncate_half, "truncated or corrupted"),
    (_flip_header, "not a readable safetensors file"),
    (_huge_header, "its header claims 1099511627776 bytes"),
    (_header_pointing_past_the_end, "not a readable safetensors file"),
    (lambda p: p.write_bytes(b"garbage" * 50), "truncated or corrupted"),
    (lambda p: p.write_bytes(b"abc"), "too short to be a safetensors file"),
    (lambda p: p.write_bytes(b""), "too short to be a safetensors file"),
])
def test_corrupted_weights_raise_a_clear_error(tmp_path, damage, message):
    save_model(tmp_path, tiny())
    damage(tmp_path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(tmp_path)
    assert str(tmp_path / WEIGHTS_FILE) in str(err.value)


@pytest.mark.parametrize("damage", [_truncate_half, lambda p: p.write_bytes(b"\x80\x04garbage" * 20),
                                    lambda p: p.write_bytes(b""), _flip_header])
def test_corrupted_training_state_raises_a_clear_error(tmp_path, damage):
    save_training_state(tmp_path, {"step": 5, "weights": torch.randn(1000)})
    damage(tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="training_state.pt could not be read as a training state"):
        load_training_state(tmp_path)


def test_training_state_that_is_not_a_dict(tmp_path):
    torch.save([1, 2], tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="must hold a dict, got list"):
        load_training_state(tmp_path)


def test_pickled_objects_are_refused_in_training_state(tmp_path):
    torch.save({"step": 1, "path": Path("x")}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_training_state(tmp_path)


def test_a_training_state_that_is_not_a_torch_file_says_so_without_unsafe_advice(tmp_path):
    (tmp_path / TRAINING_STATE_FILE).write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"training_state.pt could not be read as a training state: it is "
                                              r"not a file torch.save wrote \(it is text \(it begins 'not a "
                                              r"checkpoint'\)\)"):
        load_training_state(tmp_path)
    torch.save({"step": 1, "thing": Path("x")}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match=r"\(UnpicklingError: Unsupported global: GLOBAL pathlib.PosixPath "
                                              r"was not an allowed global by default.\)") as err:
        load_training_state(tmp_path)
    assert "weights_only` set to `False" not in str(err.value) and "Re-running" not in str(err.value)


# --------------------------------------------------------------------------- import: tokenizers


def test_hf_import_carries_the_directory_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    vocab = write_tiny_gpt2_files(tmp_path / "hf")
    tiny_hf_dir(tmp_path / "hf", vocab=vocab)
    model, tokenizer = import_checkpoint(tmp_path / "hf", tmp_path / "run")
    assert tokenizer is not None and tokenizer.vocab_size == vocab
    _, reloaded, _ = load_run(tmp_path / "run")
    text = "the theory <|endoftext|> ok"
    assert reloaded.encode(text) == tokenizer.encode(text) and reloaded.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(" the") == [258] and tokenizer.eot_id == 259  # Ġt + he: the last merge


def test_hf_import_without_tokenizer_files(tmp_path):
    pytest.importorskip("transformers")
    tiny_hf_dir(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"has no usable tokenizer.*--no-tokenizer"):
        import_checkpoint(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written before the tokenizer was found
    model, tokenizer = import_checkpoint(tmp_path / "hf", tmp_path / "run", no_tokenizer=True)
    assert tokenizer is None and not checkpoint.has_tokenizer_files(tmp_path / "run")


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    pytest.importorskip("transformers")
    write_tiny_gpt2_files(tmp_path / "hf")
    tiny_hf_dir(tmp_path / "hf", vocab=100)
    with pytest.raises(CheckpointError, match="has 260 tokens but the model only 100"):
        import_checkpoint(tmp_path / "hf", tmp_path / "run")


@pytest.fixture
def no_gpt2_files(tmp_path, monkeypatch):
    """No GPT-2 tokenizer anywhere: empty tiktoken cache, no $LLMSCRATCH_GPT2_DIR."""
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))


def _book_file(path: Path, vocab: int = 260) -> Path:
    from llmscratch.store.checkpoint import ours_to_book

    model = tiny(vocab_size=vocab)
    torch.save(ours_to_book(model, model.cfg), path)
    return path


def test_book_import_gets_gpt2_bpe(tmp_path, no_gpt2_files, monkeypatch):
    source = _book_file(tmp_path / "model.pth")
    write_tiny_gpt2_files(tmp_path / "openai", names=("encoder.json", "vocab.bpe"))
    _, tokenizer = import_checkpoint(source, tmp_path / "run1", heads=2, tokenizer_dir=tmp_path / "openai")
    assert tokenizer.encode(" the") == [258]
    assert load_run(tmp_path / "run1")[1].encode(" the the") == [258, 258]

    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(tmp_path / "openai"))
    _, tokenizer = import_checkpoint(source, tmp_path / "run2", heads=2)
    assert tokenizer.vocab_size == 260


def test_book_import_without_gpt2_files_says_where_to_put_them(tmp_path, no_gpt2_files):
    source = _book_file(tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(source, tmp_path / "run", heads=2)
    assert str(err.value) == (
        f"the book's format carries no tokenizer, and GPT-2's tokenizer files are not in tiktoken's cache "
        f"({tmp_path / 'empty-cache'}): give the folder that holds them (encoder.json + vocab.bpe, or vocab.json + "
        f"merges.txt) with --tokenizer-dir, e.g. `llmscratch import {source} {tmp_path / 'run'} --heads 2 "
        f"--tokenizer-dir DIR`, or import without a tokenizer (--no-tokenizer)")  # one line, not a paragraph
    assert not (tmp_path / "run").exists()
    model, tokenizer = import_checkpoint(source, tmp_path / "run", heads=2, no_tokenizer=True)
    assert tokenizer is None and (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_import_does_not_overwrite_a_run(tmp_path):
    source = _book_file(tmp_path / "model.pth")
    save_model(tmp_path / "run", tiny(seed=9))
    with pytest.raises(CheckpointError, match=r"already holds a run \(config.json, model.safetensors\)"):
        import_checkpoint(source, tmp_path / "run", heads=2, no_tokenizer=True)
    model, _ = import_checkpoint(source, tmp_path / "run", heads=2, no_tokenizer=True, overwrite=True)
    assert torch.equal(load_model(tmp_path / "run").tok_emb.weight, model.tok_emb.weight)


def test_import_over_a_run_removes_what_belonged_to_the_old_model_but_only_once_the_source_is_read(tmp_path):
    write_tiny_gpt2_files(tmp_path / "openai", names=("encoder.json", "vocab.bpe"))
    run = tmp_path / "run"
    import_checkpoint(_book_file(tmp_path / "model.pth"), run, heads=2, tokenizer_dir=tmp_path / "openai")
    save_training_state(run, {"step": 5})
    for name in ("metrics.jsonl", "train_config.json", "chars.json"):
        (run / name).write_text("{}\n")
    save_model(run / "best", tiny(seed=3))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(CheckpointError):  # a bad source changes nothing
        import_checkpoint(tmp_path / "missing.pth", run, heads=2, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before
    import_checkpoint(_book_file(tmp_path / "other.pth"), run, heads=2, no_tokenizer=True, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no stale tokenizer or state


def test_export_never_overwrites(tmp_path):
    source = _book_file(tmp_path / "model.pth")
    import_checkpoint(source, tmp_path / "run", heads=2, no_tokenizer=True)
    weights = (tmp_path / "run" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="is the run being exported"):
        export_checkpoint(tmp_path / "run", tmp_path / "run" / ".." / "run", "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_checkpoint(tmp_path / "run", tmp_path / "taken", "hf")
    (tmp_path / "book.pth").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists; choose a new file name"):
        export_checkpoint(tmp_path / "run", tmp_path / "book.pth", "book")
    assert (tmp_path / "book.pth").read_text() == "keep me" and (tmp_path / "run" / WEIGHTS_FILE).read_bytes() == weights
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "nowhere")  # a link, a FIFO: replaced, they were lost
    os.mkfifo(tmp_path / "fifo.pth")
    for taken in ("dangling.pth", "fifo.pth"):
        with pytest.raises(CheckpointError, match="exists; choose a new file name"):
            export_checkpoint(tmp_path / "run", tmp_path / taken, "book")
    assert (tmp_path / "dangling.pth").is_symlink() and not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    export_checkpoint(tmp_path / "run", tmp_path / "empty", "hf")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def test_written_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        save_run(tmp_path / "run", tiny(), None)
        save_training_state(tmp_path / "run", {"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_unknown_source(tmp_path):
    with pytest.raises(CheckpointError, match="neither a Hugging Face directory, a GGUF file, a book state-dict file"):
        import_checkpoint(tmp_path / "missing.pth", tmp_path / "run")


@pytest.mark.parametrize("content, looks", [
    (bytes(range(7, 250)) * 9, "it begins with the bytes 07 08 09 0a 0b 0c 0d 0e, as neither format does"),
    (b"hello there\n", "it is text (it begins 'hello there\\n')"),
    (b"", "it is empty"),
], ids=["binary", "text", "empty"])
@pytest.mark.parametrize("heads", [None, 4])
def test_book_import_of_a_file_that_is_no_checkpoint_says_so_before_asking_for_heads(tmp_path, content, looks, heads):
    (tmp_path / "binary.bin").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(tmp_path / "binary.bin", tmp_path / "run", heads=heads, no_tokenizer=True)
    assert str(err.value) == (
        f"{tmp_path / 'binary.bin'} is not a PyTorch checkpoint (.pth/.pt state dict) or safetensors file: {looks}; "
        "give the file torch.save(model.state_dict()) wrote for the book's GPTModel, or a Hugging Face GPT-2 directory")
    assert not (tmp_path / "run").exists()


def test_book_import_of_a_pickle_with_code_never_suggests_weights_only_false(tmp_path):
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04" + bytes(range(60, 120)) * 5)  # a pickle's start, then garbage
    torch.save({"model": Path("x")}, tmp_path / "objects.pth")  # an object that weights_only refuses
    for name in ("evil.pth", "objects.pth"):
        with pytest.raises(CheckpointError, match=f"{tmp_path / name} could not be read as the book's state") as err:
            import_checkpoint(tmp_path / name, tmp_path / "run", heads=2, no_tokenizer=True)
        assert "weights_only` set to `False" not in str(err.value) and "Re-running" not in str(err.value)
        assert "\n" not in str(err.value)


def test_book_import_reads_a_safetensors_file_whatever_its_name(tmp_path):
    model = tiny(vocab_size=260, tie_weights=False)
    checkpoint._write_safetensors(tmp_path / "book.bin", checkpoint.ours_to_book(model, model.cfg))
    imported, _ = import_checkpoint(tmp_path / "book.bin", tmp_path / "run", heads=2, no_tokenizer=True)
    assert torch.equal(imported.tok_emb.weight, model.tok_emb.weight)


def test_export_as_a_run_needs_a_run_and_a_place_outside_it(tmp_path):
    import_checkpoint(_book_file(tmp_path / "model.pth"), tmp_path / "run", heads=2, no_tokenizer=True)
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(CheckpointError, match="is inside the run"):  # copytree would recurse into its own copy
        export_checkpoint(run, run / "exported" / "full", "run")
    with pytest.raises(CheckpointError, match="is the run being exported"):
        export_checkpoint(run, tmp_path / "run" / ".." / "run", "run")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing created inside it
    (tmp_path / "empty").mkdir()
    for not_a_run in (tmp_path / "empty", tmp_path / "missing", tmp_path):
        with pytest.raises(CheckpointError):
            export_checkpoint(not_a_run, tmp_path / "out", "run")
        assert not (tmp_path / "out").exists()
    (tmp_path / "half").mkdir()
    shutil.copyfile(run / CONFIG_FILE, tmp_path / "half" / CONFIG_FILE)  # a config, no weights
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export_checkpoint(tmp_path / "half", tmp_path / "out", "run")
    export_checkpoint(run, tmp_path / "copy", "run")
    assert torch.equal(load_model(tmp_path / "copy").tok_emb.weight, load_model(run).tok_emb.weight)


def test_hf_export_carries_gpt2_tokenizer_files(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    write_tiny_gpt2_files(tmp_path / "openai", names=("encoder.json", "vocab.bpe"))
    source = _book_file(tmp_path / "model.pth")
    import_checkpoint(source, tmp_path / "run", heads=2, tokenizer_dir=tmp_path / "openai")
    export_checkpoint(tmp_path / "run", tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (tmp_path / "openai" / "encoder.json").read_bytes()
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (tmp_path / "openai" / "vocab.bpe").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(" the the") == [258, 258]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 259  # the tokenizer's <|endoftext|>


# --------------------------------------------------------------------------- the commands


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=1800)  # only a guard against a hang


def test_cli_import_and_export(tmp_path):
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    vocab = write_tiny_gpt2_files(tmp_path / "hf")
    tiny_hf_dir(tmp_path / "hf", vocab=vocab, tied=False)

    done = _cli("import", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "parameters; vocab 260, context 16, 12 dims, 3 heads, 2 layers" in done.stdout
    assert "tokenizer" not in done.stdout.splitlines()[-1]  # "no tokenizer" would be said there
    assert (tmp_path / "run" / "tokenizer_config.json").exists()

    done = _cli("export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "hf")
    assert done.returncode == 0, done.stderr
    ours, ref = load_model(tmp_path / "run"), GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)

    done = _cli("export", str(tmp_path / "run"), str(tmp_path / "book.pth"), "--format", "book")
    assert done.returncode == 0, done.stderr
    assert "GPTModel({'vocab_size': 260" in done.stdout
    book = ch04.GPTModel(checkpoint.book_config_dict(ours.cfg)).eval()
    book.load_state_dict(torch.load(tmp_path / "book.pth", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(book(idx), ours(idx), atol=1e-5, rtol=1e-5)

    done = _cli("import", str(tmp_path / "book.pth"), str(tmp_path / "run2"), "--no-tokenizer")
    assert done.returncode == 2 and "--heads N" in done.stderr and "Traceback" not in done.stderr

    (tmp_path / "afile").write_text("")
    done = _cli("export", str(tmp_path / "run"), str(tmp_path / "afile" / "out.pth"), "--format", "book")
    assert done.returncode == 2 and "afile" in done.stderr  # the OS names the path at fault
    assert "Traceback" not in done.stderr


def test_cli_generate_with_a_model_vocabulary_larger_than_its_tokenizer(tmp_path):
    """Padded vocabularies (nanoGPT's 50,304 for GPT-2's 50,257): ids the tokenizer lacks are never drawn."""
    pytest.importorskip("transformers")
    vocab = write_tiny_gpt2_files(tmp_path / "hf")
    tiny_hf_dir(tmp_path / "hf", vocab=vocab + 40)
    assert _cli("import", str(tmp_path / "hf"), str(tmp_path / "run")).returncode == 0
    done = _cli("generate", str(tmp_path / "run"), "--prompt", " the", "--max-new-tokens", "40",
                "--temperature", "3", "--seed", "1", "--ignore-eos")
    assert done.returncode == 0, done.stderr


def test_hf_import_names_a_config_field_it_cannot_read_and_refuses_integer_weights(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    source = tiny_hf_dir(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="Hugging Face directory.*--heads, --tokenizer-dir .* cannot apply"):
        import_checkpoint(source, tmp_path / "run", heads=2, tokenizer_dir=tmp_path, no_tokenizer=True)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "resid_pdrop": None}))
    with pytest.raises(CheckpointError, match="config.json: a field cannot be read"):
        import_checkpoint(source, tmp_path / "run", no_tokenizer=True)
    (source / "config.json").write_text(json.dumps(config))
    weights = load_file(source / "model.safetensors")
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"].long()  # all zeros once cast back
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not floating point: transformer.wte.weight \(torch.int64\)"):
        import_checkpoint(source, tmp_path / "run", no_tokenizer=True)
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_a_file_or_directory_of_the_wrong_kind_is_named_with_what_to_do(tmp_path):
    pytest.importorskip("transformers")
    source = tiny_hf_dir(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"a Hugging Face GPT-2 config, not a run's: .*llmscratch import"):
        load_config(source)
    save_model(tmp_path / "run", tiny())
    with pytest.raises(CheckpointError, match="llmscratch's own weight names, not the book's"):
        import_checkpoint(tmp_path / "run" / WEIGHTS_FILE, tmp_path / "imported", heads=2, no_tokenizer=True)


def test_book_import_with_a_preset_of_another_size_says_so(tmp_path):
    source = _book_file(tmp_path / "model.pth")  # emb_dim 16, 2 layers
    with pytest.raises(CheckpointError, match="was not trained with preset gpt2-124m: emb_dim: preset gpt2-124m has "
                                              "768, the weights have 16; n_layers: preset gpt2-124m has 12, the weights have 2"):
        import_checkpoint(source, tmp_path / "run", preset="gpt2-124m", no_tokenizer=True)


def test_cli_import_gpt2_offline_says_how_to_use_a_local_directory(tmp_path):
    done = _cli("import", "gpt2", str(tmp_path / "run"), cwd=tmp_path,
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert done.returncode == 2
    assert "could not download gpt2 from the Hugging Face hub" in done.stderr
    assert "llmscratch import DIR RUN_DIR" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_cli_commands_on_a_run_killed_before_its_first_checkpoint(tmp_path):
    run = _killed_run(tmp_path / "run")
    for args in (["generate", str(run), "--prompt", "hi"], ["info", str(run)],
                 ["export", str(run), str(tmp_path / "out")]):
        done = _cli(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (f"llmscratch {args[0]}: error: {run} holds a training run that stopped before its first "
                               f"checkpoint: it has train_config.json but no config.json and no weights, so there is "
                               f"nothing to load here; train it again (delete {run}, or choose another --name)\n")


def test_cli_help():
    for name in ("import", "export"):
        done = _cli(name, "--help")
        assert done.returncode == 0 and "usage: llmscratch " + name in done.stdout


# --------------------------------------------------------------------------- config.json must be complete


def _drop_from_config(run: Path, *names: str) -> None:
    config = json.loads((run / CONFIG_FILE).read_text())
    for name in names:
        del config[name]
    (run / CONFIG_FILE).write_text(json.dumps(config))


def test_a_config_without_its_activation_is_refused_not_run_as_gelu(tmp_path, capsys):
    from llmscratch.cli import main

    model = tiny(activation="relu2")
    write_tiny_gpt2_files(tmp_path / "run")  # a tokenizer, so that generate gets as far as the model
    save_model(tmp_path / "run", model)
    _drop_from_config(tmp_path / "run", "activation")
    message = (f"{tmp_path / 'run' / CONFIG_FILE} lacks 'activation', which the weights cannot show: add "
               f"\"activation\": \"gelu\" or \"relu2\" (train's --activation; runs saved before the field existed "
               f"used \"gelu\")")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "run")
    assert str(err.value).startswith(message) and "restore config.json from a backup" in str(err.value)
    (tmp_path / "text.txt").write_text("the theory of the thing " * 20)
    for args in (["generate", str(tmp_path / "run"), "--prompt", " the", "--max-new-tokens", "2"],
                 ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "text.txt"), "--device", "cpu"],
                 ["info", str(tmp_path / "run")]):
        assert main(args) == 2, args
        err_text = capsys.readouterr().err
        assert err_text.startswith(f"llmscratch {args[0]}: error: {message}") and err_text.count("\n") == 1, err_text


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_what_the_weights_show_is_read_from_them_when_config_json_lacks_it(tmp_path, pos_emb):
    model = tiny(pos_emb=pos_emb, qkv_bias=True, tie_weights=True, bias=False, attn_backend="explicit")
    save_model(tmp_path, model)
    shown = ["vocab_size", "emb_dim", "n_layers", "qkv_bias", "bias", "tie_weights"]
    shown += ["pos_emb", "context_length", "rope_base"] if pos_emb == "learned" else []  # RoPE's base unused there
    _drop_from_config(tmp_path, *shown, "attn_backend", "pad_vocab_multiple")  # these two change no number
    loaded = load_model(tmp_path)
    expected = {**model.cfg.to_dict(), "attn_backend": "fused"}
    assert loaded.cfg.to_dict() == expected
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))


@pytest.mark.parametrize("pos_emb, dropped, named", [
    ("rope", ["pos_emb"], ["pos_emb"]),  # no pos_emb.weight: rope, sinusoidal, alibi or none?
    ("rope", ["pos_emb", "rope_base"], ["pos_emb", "rope_base"]),  # RoPE's base matters if it is rope
    ("rope", ["context_length"], ["context_length"]),  # only a learned table shows it
    ("rope", ["rope_base"], ["rope_base"]),
    ("learned", ["n_heads", "scale_attn", "layer_norm_eps", "drop_rate"],
     ["n_heads", "drop_rate", "scale_attn", "layer_norm_eps"]),
])
def test_what_the_weights_cannot_show_is_refused_by_name(tmp_path, pos_emb, dropped, named):
    save_model(tmp_path, tiny(pos_emb=pos_emb))
    _drop_from_config(tmp_path, *dropped)
    with pytest.raises(CheckpointError) as err:
        load_config(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / CONFIG_FILE} lacks {', '.join(map(repr, named))}, which the "
                                     "weights cannot show: add ")
    for name in named:
        assert f'"{name}": ' in str(err.value)


def test_a_config_from_before_the_activation_field_is_told_what_to_add(tmp_path):
    """config.json has always held every field but `activation`, added later (those runs used GELU): such a file
    is refused with the line to add, since it cannot be told from one that lost the key."""
    save_model(tmp_path, tiny())
    _drop_from_config(tmp_path, "activation")
    with pytest.raises(CheckpointError, match=r"runs saved before the field existed used \"gelu\""):
        load_model(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "activation": "gelu"}))
    assert load_model(tmp_path).cfg == tiny().cfg


# --------------------------------------------------------------------------- weights holding NaN or infinities


def _poison(path: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[name].view(-1)[:3] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("value, said", [(float("nan"), "NaN (3 of 768 values)"),
                                         (float("-inf"), "infinite values (3 of 768)")])
def test_weights_holding_nan_or_inf_name_the_file_and_tensor_and_say_what_to_load_instead(tmp_path, value, said):
    run = tmp_path / "run"
    save_model(run, tiny())
    save_model(run / "best", tiny(seed=1))
    _poison(run / WEIGHTS_FILE, "blocks.0.attn.qkv.weight", value)
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    assert str(err.value) == (
        f"{run / WEIGHTS_FILE}: tensor blocks.0.attn.qkv.weight holds {said}, which no saved model does: the file is "
        f"damaged; load the run's best weights, {run / 'best'}, instead (to train on: `llmscratch train --init-from "
        f"{run / 'best'}`), or restore the file from a backup or a previous checkpoint")
    load_model(run / "best")  # untouched: loads


def test_generate_on_weights_holding_nan_says_so_in_one_line(tmp_path, capsys):
    from llmscratch.cli import main

    run = tmp_path / "run"
    write_tiny_gpt2_files(run)
    save_model(run, tiny(vocab_size=260))
    _poison(run / WEIGHTS_FILE, "final_norm.weight", float("nan"))
    assert main(["generate", str(run), "--prompt", " the", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmscratch generate: error: {run / WEIGHTS_FILE}: tensor final_norm.weight holds NaN")
    assert err.count("\n") == 1 and "restore it from a backup or a previous checkpoint" in err


def test_imports_of_weights_holding_nan_are_refused(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    source = _book_file(tmp_path / "model.pth")
    sd = torch.load(source, weights_only=True)
    sd["trf_blocks.1.ff.layers.0.weight"][0, 0] = float("nan")
    torch.save(sd, source)
    with pytest.raises(CheckpointError, match=r"model.pth: tensor trf_blocks.1.ff.layers.0.weight holds NaN \(1 of"):
        import_checkpoint(source, tmp_path / "run", heads=2, no_tokenizer=True)
    hf = tiny_hf_dir(tmp_path / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    weights["transformer.h.0.ln_1.bias"][1] = float("inf")
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"hf: tensor transformer.h.0.ln_1.bias holds infinite values"):
        import_checkpoint(hf, tmp_path / "run", no_tokenizer=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- a full disk


def _free(n: int):
    """A stand-in for shutil.disk_usage: a disk with ``n`` bytes free."""
    from types import SimpleNamespace

    return lambda path: SimpleNamespace(total=10**12, used=10**12 - n, free=n)


def test_a_checkpoint_the_disk_has_no_room_for_removes_what_it_staged_and_keeps_the_previous_one(tmp_path,
                                                                                                  monkeypatch):
    from llmscratch.files import DiskFullError

    model = tiny()
    checkpoint.save_checkpoint(tmp_path, model, {"step": 4, "optimizer": {"m": torch.zeros(1000)}})
    before = _snapshot(tmp_path)
    real_save = torch.save

    def no_room(obj, f, *args, **kwargs):  # torch.save's zip writer, out of room, says only this
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(checkpoint.torch, "save", no_room)
    monkeypatch.setattr(shutil, "disk_usage", _free(1000))
    with pytest.raises(DiskFullError) as err:
        checkpoint.save_checkpoint(tmp_path, tiny(seed=1), {"step": 8, "optimizer": {"m": torch.ones(1000)}})
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path))}: the disk is full \(no space left on device\): the checkpoint of step 8 needs "
        r"about [\d.]+ kB there and 1\.0 kB are free: free at least [\d.]+ kB \(delete old runs or other files\); "
        rf"nothing was lost: the checkpoint of step 4 is still whole there; continue from it with `llmscratch train "
        rf"--resume {re.escape(str(tmp_path))}` once there is room", str(err.value)), str(err.value)
    assert _snapshot(tmp_path) == before  # the staged weights are gone, the step-4 pair is as it was
    assert load_training_state(tmp_path)["step"] == 4


_TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
         "darkness was upon the face of the deep. And God said, Let there be light: and there was light. ") * 12


def _train_args(tmp_path: Path, name: str, *more: str) -> list[str]:
    """A tiny training run, seconds on a CPU, as the command line gives it."""
    (tmp_path / "tiny.txt").write_text(_TEXT, encoding="utf-8")
    return ["train", "--data", str(tmp_path / "tiny.txt"), "--tokenizer", "char", "--preset", "test",
            "--context-length", "16", "--steps", "8", "--batch-size", "4", "--warmup-steps", "2", "--eval-windows", "4",
            "--eval-interval", "100", "--checkpoint-interval", "4", "--sample-tokens", "0", "--device", "cpu",
            "--no-progress", "--out-dir", str(tmp_path / "runs"), "--name", name, "--seed", "7", *more]


def _fill_the_disk_at_the_checkpoint(monkeypatch, which: str) -> None:
    """The disk fills up while a checkpoint's weights (safetensors) or training state (torch.save) is staged."""
    import safetensors.torch

    real_save_file, real_save = safetensors.torch.save_file, torch.save

    def save_file(tensors, filename, *args, **kwargs):
        if which == "weights" and checkpoint.PENDING in str(filename):
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if which == "state" and checkpoint.PENDING in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", _free(2000))


@pytest.mark.parametrize("which", ["weights", "state"])
def test_a_resume_that_fills_the_disk_says_where_and_how_much_and_loses_nothing(tmp_path, monkeypatch, capsys, which):
    from llmscratch.cli import main

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    assert main(_train_args(tmp_path, "run", "--stop-at", "4")) == 0
    run = tmp_path / "runs" / "run"
    before = _snapshot(run)
    capsys.readouterr()
    _fill_the_disk_at_the_checkpoint(monkeypatch, which)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"llmscratch train: error: {re.escape(str(run))}: the disk is full \(no space left on device\): the "
        r"checkpoint of step 8 needs about [\d.]+ kB there and 2\.0 kB are free: free at least [\d.]+ kB \(delete "
        r"old runs or other files\); nothing was lost: the checkpoint of step 4 is still whole there; continue from "
        rf"it with `llmscratch train --resume {re.escape(str(run))}` once there is room\n", err), err
    monkeypatch.undo()
    assert not any(p.name.startswith((checkpoint.PENDING, ".")) for p in run.iterdir())  # nothing staged is left
    for name in (WEIGHTS_FILE, TRAINING_STATE_FILE, CONFIG_FILE):
        assert (run / name).read_bytes() == before[name], name
    assert checkpoint.weights_tag(run)["step"] == "4" and load_training_state(run)["step"] == 4
    load_model(run)
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # with room again, it goes on
    assert load_training_state(run)["step"] == 8


def test_a_new_run_that_fills_the_disk_at_its_first_checkpoint_says_so_and_leaves_no_folder(tmp_path, monkeypatch,
                                                                                             capsys):
    from llmscratch.cli import main

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    assert main(_train_args(tmp_path, "good", "--steps", "4")) == 0
    _fill_the_disk_at_the_checkpoint(monkeypatch, "weights")
    assert main(_train_args(tmp_path, "new")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"llmscratch train: error: {tmp_path / 'runs' / 'new'}: the disk is full (no space left "
                          "on device): the checkpoint of step 4 needs about ")
    assert err.endswith("no earlier checkpoint was there to lose; start the training again once there is room\n")
    assert not (tmp_path / "runs" / "new").exists()  # nothing saved: the new run's folder is removed again
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / "good").resolve()
    monkeypatch.undo()
    load_model(tmp_path / "runs" / "good")


def test_cli_import_of_a_book_file_without_a_tokenizer_says_in_one_line_how_to_give_one(tmp_path, no_gpt2_files,
                                                                                        capsys):
    from llmscratch.cli import main

    source = _book_file(tmp_path / "model.pth")
    assert main(["import", str(source), str(tmp_path / "run"), "--heads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--tokenizer-dir, e.g. `llmscratch import {source} {tmp_path / 'run'} --heads 2 --tokenizer-dir DIR`" in err
    write_tiny_gpt2_files(tmp_path / "gpt2", names=("encoder.json", "vocab.bpe"))
    assert main(["import", str(source), str(tmp_path / "run"), "--heads", "2", "--tokenizer-dir",
                 str(tmp_path / "gpt2")]) == 0


# ---------------------------------------------------------------------------- the Rule tables' split sizes


def test_the_tables_take_the_qkv_and_mlp_sizes_from_the_config():
    """Both tables read Q, K, V and the MLP width from qkv_sizes and mlp_hidden, which match our model."""
    cfg = GPTConfig.from_preset("test", emb_dim=24, n_heads=3)
    block = GPT(cfg).blocks[0]
    assert sum(checkpoint.qkv_sizes(cfg)) == block.attn.qkv.weight.shape[0]
    assert checkpoint.mlp_hidden(cfg) == block.ff.fc_in.weight.shape[0] == block.ff.fc_out.weight.shape[1]
    rules = {(table, rule.ours): rule for table in ("hf", "book")
             for rule in (checkpoint.HF_TABLE if table == "hf" else checkpoint.BOOK_TABLE)}
    q, k, v = checkpoint.qkv_sizes(cfg)
    assert rules["book", "blocks.{i}.attn.qkv.weight"].their_shapes(cfg) == ((q, 24), (k, 24), (v, 24))
    assert rules["book", "blocks.{i}.attn.qkv.bias"].split_sizes(cfg) == (q, k, v)
    assert rules["hf", "blocks.{i}.attn.qkv.weight"].their_shapes(cfg) == ((24, q + k + v),)  # fused, (in, out)
    hidden = checkpoint.mlp_hidden(cfg)
    assert rules["hf", "blocks.{i}.ff.fc_in.weight"].their_shapes(cfg) == ((24, hidden),)
    assert rules["book", "blocks.{i}.ff.fc_out.weight"].their_shapes(cfg) == ((24, hidden),)


def _gqa_rule() -> checkpoint.Rule:
    """A fused qkv whose K and V are half as wide as Q (two query heads per key/value head)."""
    def sizes(c: GPTConfig) -> tuple[int, int, int]:
        return c.emb_dim, c.emb_dim // 2, c.emb_dim // 2  # q, k, v

    return checkpoint.Rule("qkv.weight", ("q.weight", "k.weight", "v.weight"), lambda c: (2 * c.emb_dim, c.emb_dim),
                           split=sizes)


def test_a_rule_cuts_where_its_split_sizes_say_both_ways():
    cfg = GPTConfig.from_preset("test", emb_dim=8, n_heads=2)
    rule = _gqa_rule()
    qkv = torch.arange(16 * 8, dtype=torch.float32).view(16, 8)  # (q + k + v, C) = (8 + 4 + 4, 8)
    theirs = checkpoint._convert_out((rule,), {"qkv.weight": qkv}, cfg)
    assert {key: tuple(t.shape) for key, t in theirs.items()} == {"q.weight": (8, 8), "k.weight": (4, 8),
                                                                  "v.weight": (4, 8)}
    assert torch.equal(theirs["q.weight"], qkv[:8]) and torch.equal(theirs["k.weight"], qkv[8:12])
    assert torch.equal(theirs["v.weight"], qkv[12:])
    back = checkpoint._convert_in((rule,), theirs, cfg, "the test")
    assert torch.equal(back["qkv.weight"], qkv)


def test_equal_thirds_do_not_fit_a_rule_with_unequal_sizes():
    cfg = GPTConfig.from_preset("test", emb_dim=8, n_heads=2)
    thirds = dict(zip(("q.weight", "k.weight", "v.weight"), torch.randn(16, 8).tensor_split(3)))  # 6, 5, 5 rows
    with pytest.raises(CheckpointError, match=r"q\.weight \(expected \(8, 8\), found \(6, 8\)\)"):
        checkpoint._convert_in((_gqa_rule(),), thirds, cfg, "the test")


def test_a_rule_of_several_tensors_needs_sizes_that_add_up():
    with pytest.raises(ValueError, match="need split sizes"):
        checkpoint.Rule("qkv.weight", ("q.weight", "k.weight"), lambda c: (2 * c.emb_dim, c.emb_dim))
    wrong = checkpoint.Rule("qkv.weight", ("q.weight", "k.weight"), lambda c: (2 * c.emb_dim, c.emb_dim),
                            split=lambda c: (c.emb_dim, 1))
    with pytest.raises(ValueError, match="do not cut"):
        wrong.split_sizes(GPTConfig.from_preset("test"))
