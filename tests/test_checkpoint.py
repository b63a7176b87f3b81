"""The run directory: exact round trips, atomic writes, clear errors on bad files; import/export
tokenizers and the ``llmscratch import`` / ``export`` commands.

Everything is built here: tiny random models, tiny GPT-2-style tokenizer files, broken
files (truncated by half, bytes flipped in the header, garbage). No network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmscratch import checkpoint
from llmscratch.checkpoint import (
    CONFIG_FILE,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    export_checkpoint,
    import_checkpoint,
    load_config,
    load_model,
    load_run,
    load_training_state,
    save_model,
    save_run,
    save_training_state,
)
from llmscratch.errors import CheckpointError, LLMScratchError
from llmscratch.model import GPT, GPTConfig
from llmscratch.positions import POSITION_KINDS
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
    from llmscratch.tokenizer import CharTokenizer

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
    from llmscratch.tokenizer import CharTokenizer

    CharTokenizer.from_text("hello world").save(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    (run / "train_config.json").write_text('{"steps": 100}\n')
    return run


def test_a_run_killed_before_its_first_checkpoint_says_so_not_that_config_json_is_missing(tmp_path):
    run = _killed_run(tmp_path / "run")
    for load in (load_config, load_model, load_run, checkpoint.load_pretrained,
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
    from llmscratch.tokenizer import BPETokenizer

    save_run(tmp_path / "run", tiny(vocab_size=300), BPETokenizer.train("the heaven and the earth " * 20, 300))
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(LLMScratchError) as err:
        load_run(tmp_path / "run")
    assert str(err.value).startswith(f"{tmp_path / 'run' / 'tokenizer.json'} is missing: "
                                     f"{tmp_path / 'run' / 'tokenizer_config.json'} says the tokenizer is 'bpe'")
    assert "copy the tokenizer's files (tokenizer.json, tokenizer_config.json)" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config.json is not valid JSON \(line 1, column 2"),
    ("[1, 2]", r"config.json must hold a JSON object"),
    ('{"emb_dim": -4}', r"config.json has a bad field: GPTConfig.emb_dim must be a positive integer"),
    ('{"n_embd": 8}', r"config.json has a bad field: unknown GPTConfig field\(s\) \['n_embd'\]"),
    ('{"emb_dim": 30, "n_heads": 4}', r"has a bad field: .*emb_dim \(30\) must be divisible by n_heads \(4\)"),
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
    from llmscratch.checkpoint import ours_to_book

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
    for part in ("the book's format carries no tokenizer", "--tokenizer-dir DIR", "LLMSCRATCH_GPT2_DIR",
                 "--no-tokenizer", "empty-cache"):
        assert part in str(err.value), part
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
    with pytest.raises(CheckpointError, match="neither a Hugging Face directory, a book state-dict file"):
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
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


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
