"""The command line's handling of bad input: one line naming what is wrong and exit status 2, never a traceback.

Each test calls ``cli.main`` in-process, as the ``llmscratch`` script does, with tiny sizes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llmscratch import cli
from llmscratch.training.config import FILE_SPELLINGS, load_config_file
from llmscratch.store.checkpoint import save_run
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.data.tokenizer import CharTokenizer

CORPUS = "the quick brown fox jumps over the lazy dog, and god said let there be light.\n" * 60


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``llmscratch ARGV``; stderr must be one line when the status is 2."""
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    if status == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return status, err


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return ["train", "--preset", "test", "--tokenizer", "char", "--device", "cpu", "--no-progress", "--steps", "1",
            "--sample-tokens", "0", "--eval-interval", "1", "--eval-windows", "1", "--batch-size", "2",
            "--optimizer", "adamw",
            "--data", str(corpus), "--out-dir", str(tmp_path / "runs"), *extra]


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- model options in a config file


@pytest.mark.parametrize("yaml, message", [
    ("model:\n  rope_base: 0\n  pos_emb: rope\n", r"GPTConfig.rope_base must be greater than 1 \(RoPE's"),
    ("model:\n  layer_norm_eps: -1\n", r"GPTConfig.layer_norm_eps must be a small positive number such as 1e-5"),
    ("model:\n  drop_rate: ten\n", r"GPTConfig.drop_rate must be a finite number, got 'ten' \(option --dropout\)"),
])
def test_bad_model_options_in_a_config_file_name_the_field(tmp_path, capsys, yaml, message):
    status, err = run_main(capsys, *train_args(tmp_path, "--config", write(tmp_path / "m.yaml", yaml)))
    assert status == 2
    assert err.startswith("llmscratch train: error: ")
    assert re.search(message, err), err


def test_a_model_section_that_is_not_a_mapping_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path / "m.yaml", "model: [1, 2]\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2
    assert f"config file {path}: `model:` must be a mapping of model options to values" in err
    assert "got list [1, 2]" in err


def test_yaml_numbers_without_a_dot_reach_the_model_as_numbers(tmp_path, capsys, monkeypatch):
    # YAML 1.1 reads `1e-5` and `1e-1` as strings: they crashed LayerNorm and the drop_rate check before.
    import llmscratch.training.setup
    from llmscratch.errors import LLMScratchError

    built = []

    def build(cfg):  # the model training would build; stop there (the training loop is tested in test_train.py)
        built.append(cfg)
        raise LLMScratchError("stop here")

    monkeypatch.setattr(llmscratch.training.setup, "GPT", build)
    path = write(tmp_path / "m.yaml", "model:\n  layer_norm_eps: 1e-5\n  drop_rate: 1e-1\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert (status, err) == (2, "llmscratch train: error: stop here\n")
    assert (built[0].layer_norm_eps, built[0].drop_rate) == (1e-5, 0.1)


@pytest.mark.parametrize("content, message", [
    ("1: 2\n", "has keys that are not option names: [1]; write option names such as `steps: 100`"),
    ("model:\n  1: 2\n  foo: 3\n", ", under `model:`, has keys that are not option names: [1]"),
])
def test_keys_that_are_not_names_are_a_clear_error(tmp_path, capsys, content, message):
    path = write(tmp_path / "m.yaml", content)
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2 and f"config file {path}" in err and message in err, err


def test_the_cli_options_named_in_gptconfig_errors_are_the_trains_options():
    from llmscratch.nn.model import FIELD_OPTIONS

    from llmscratch.training.config import MODEL_OPTIONS

    assert {field for field, *_ in MODEL_OPTIONS} == set(FIELD_OPTIONS)
    assert FIELD_OPTIONS["scale_attn"] == "--no-scale-attn"
    actions = {o for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions
               for o in a.option_strings}
    assert set(FIELD_OPTIONS.values()) <= actions


# --------------------------------------------------------------------------- a run's config.json


def tiny_run(directory: Path, **changes) -> Path:
    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_text(CORPUS)
    save_run(directory, GPT(GPTConfig.from_preset("test", vocab_size=tokenizer.vocab_size)), tokenizer)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def test_a_run_config_with_a_number_as_a_string_generates(tmp_path, capsys):
    run = tiny_run(tmp_path / "run", layer_norm_eps="1e-5")
    status, err = run_main(capsys, "generate", run, "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu",
                           "--no-cache")
    assert status == 0, err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_run_config_with_a_null_field_names_it(tmp_path, capsys, command):
    run = tiny_run(tmp_path / "run", drop_rate=None)
    corpus = write(tmp_path / "c.txt", CORPUS)
    argv = [run, "--prompt", "the"] if command == "generate" else [run, "--data", corpus]
    status, err = run_main(capsys, command, *argv, "--device", "cpu")
    assert status == 2
    assert f"{run / 'config.json'} has a bad field: GPTConfig.drop_rate must be a finite number, got None" in err


# --------------------------------------------------------------------------- the config file itself


def test_a_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, capsys):
    path = write(tmp_path / "m10.yaml", b"\xff\xfe")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2
    assert f"config file {path} is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8" in err


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    path = write(tmp_path / "c.json", b"\xef\xbb\xbf" + json.dumps({"steps": 7}).encode())
    assert load_config_file(str(path)) == {"steps": 7}


def test_dashed_keys_are_read_as_the_options_at_the_top_and_under_model(tmp_path):
    # `batch-size` as on the command line: both levels read it (the model's keys were refused as unknown)
    path = write(tmp_path / "c.yaml", "batch-size: 3\nmodel:\n  drop-rate: 0.25\n  n_layers: 2\n")
    assert load_config_file(str(path)) == {"batch_size": 3, "model": {"drop_rate": 0.25, "n_layers": 2}}
    from llmscratch.training.config import TrainConfig

    assert TrainConfig.from_dict(load_config_file(str(path))).model == {"drop_rate": 0.25, "n_layers": 2}


@pytest.mark.parametrize("content, message", [
    ("n-layers: 2\n", "`n-layers`: it is a model option: put it under `model:`"),
    ("no-progress: true\n", "`no-progress`: write `progress: false`"),
    ("learning_rate: 0.1\n", "`learning_rate`: write `lr:`"),
    ("stepz: 3\n", "`stepz`: did you mean `steps`?"),
    ("zzz: 3\n", "`zzz`: known: batch_size, beta1,"),
    ("model:\n  n_layer: 2\n", "`n_layer` under `model:`: did you mean `n_layers`?"),
    ("n_layer: 2\n", "`n_layer`: did you mean `n_layers` under `model:`?"),  # misspelt and misplaced
    ("model:\n  batch_sise: 2\n", "`batch_sise` under `model:`: did you mean `batch_size` at the top level?"),
    ("model:\n  batch-size: 2\n", "`batch-size` under `model:`: it is a training option: put it at the top level"),
    ("model:\n  no_scale_attn: true\n", "`no_scale_attn` under `model:`: write `scale_attn: false` under `model:`"),
])
def test_an_unknown_config_key_is_named_as_written_with_what_to_write(tmp_path, capsys, content, message):
    path = write(tmp_path / "m.yaml", content)
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2 and f"config file {path} has unknown option(s): {message}" in err, err


def test_every_unknown_config_key_is_named_at_once(tmp_path, capsys):
    path = write(tmp_path / "m.yaml", "nproc: 2\nmodel:\n  dropout: 0.1\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2
    assert "`nproc`: --nproc launches processes: give it on the command line; `dropout` under `model:`: " \
           "write `drop_rate:` under `model:`" in err, err


def test_the_config_file_spellings_named_in_hints_are_options():
    # each hint names a real spelling: a flag of `train` for the key it replaces, and the field it asks for
    import dataclasses

    from llmscratch.training.config import TrainConfig

    actions = {o for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions
               for o in a.option_strings}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(GPTConfig)}
    for key, hint in FILE_SPELLINGS.items():
        assert key not in fields
        for written in re.findall(r"`(\w+):", hint):
            assert written in fields, (key, hint)
    assert {"--no-progress", "--no-scale-attn", "--dropout", "--nproc", "--config"} <= actions


def test_a_bad_value_from_the_config_file_names_the_file(tmp_path, capsys):
    path = write(tmp_path / "m.yaml", "lr: abc\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2 and f"error: config file {path}: TrainConfig.lr (--lr) must be a finite number, got 'abc'" in err
    # min_lr from the file against the command line's lr: the file's value is the one to change
    path = write(tmp_path / "n.yaml", "min_lr: 0.5\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path, "--lr", "0.1"))
    assert status == 2 and f"error: config file {path}: TrainConfig.lr (--lr) must be > 0" in err, err
    # the command line wrong on its own: no file named, whatever the file holds
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path, "--warmup-steps", "-1"))
    assert status == 2 and "error: TrainConfig.warmup_steps (--warmup-steps) must be >= 0, got -1" in err, err
    assert str(path) not in err


def test_yaml_numbers_without_a_dot_are_saved_as_numbers(tmp_path):
    from llmscratch.training.config import TrainConfig

    path = write(tmp_path / "m.yaml", "lr: 3e-3\nmodel:\n  layer_norm_eps: 1e-5\n")
    cfg = TrainConfig.from_dict(load_config_file(str(path)))
    assert (cfg.lr, cfg.model) == (3e-3, {"layer_norm_eps": 1e-5})  # train_config.json holds to_dict()
    assert json.loads(json.dumps(cfg.to_dict()))["model"]["layer_norm_eps"] == 1e-5


def test_a_config_path_that_is_a_folder_says_so(tmp_path, capsys):
    folder = tmp_path / "somefolder"
    folder.mkdir()
    status, err = run_main(capsys, *train_args(tmp_path, "--config", folder))
    assert status == 2
    assert f"config file {folder} is a folder: give the path of a YAML or JSON file (--config)" in err
    assert "does not exist" not in err


# --------------------------------------------------------------------------- text that is not UTF-8


@pytest.mark.parametrize("argv, what", [
    (["generate", "RUN", "--prompt", "the \udcff"], "--prompt"),
    (["attention", "RUN", "--prompt", "the \udcff"], "--prompt"),
    (["explain", "the \udcff"], "the sentence"),
    (["explain", "the \udcff", "--run", "RUN"], "the sentence"),
])
def test_a_prompt_that_is_not_utf8_names_the_byte_and_its_position(tmp_path, capsys, argv, what):
    # What Python makes of `--prompt $'the \xff'`: the byte 0xff becomes the lone surrogate U+DCFF.
    run = tiny_run(tmp_path / "run")
    status, err = run_main(capsys, *[str(run) if a == "RUN" else a for a in argv])
    assert status == 2
    assert f"{what} is not valid UTF-8: byte 0xff at position 4 (after 'the '); give the text as UTF-8" in err


def test_a_sample_prompt_that_is_not_utf8_is_refused_before_training(tmp_path, capsys):
    status, err = run_main(capsys, *train_args(tmp_path, "--sample-prompt", "a\udcc3"))
    assert status == 2
    assert "--sample-prompt is not valid UTF-8: byte 0xc3 at position 1" in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- out of memory


def test_sizes_past_the_cpus_memory_are_one_line_naming_the_options(capsys):
    # 3 × 10^17 floats: more than any address space holds, so the CPU allocator refuses it at once.
    status, err = run_main(capsys, "explain", "--d-out", str(10**17), "--heads", "1")
    assert status == 2
    assert err.startswith("llmscratch explain: error: out of memory on the CPU (one allocation of ")
    assert "try a smaller --d-out, a smaller --batch or a shorter sentence" in err


def fake_command(monkeypatch, error: BaseException) -> None:
    add, _ = cli.COMMANDS["eval"]

    def run(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "eval", (add, run))


def test_gpu_out_of_memory_is_one_line_naming_the_options(monkeypatch, capsys):
    fake_command(monkeypatch, torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"))
    status, err = run_main(capsys, "eval", "RUN", "--data", "x.txt")
    assert status == 2
    assert err == ("llmscratch eval: error: out of memory on the GPU (one allocation of 2.00 GiB failed): the sizes "
                   "asked for do not fit this machine; try a smaller --batch-size\n")


def test_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    fake_command(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        cli.main(["eval", "RUN", "--data", "x.txt"])


def test_a_model_vocabulary_larger_than_the_tokenizers_samples_only_ids_it_can_decode(tmp_path, capsys):
    """Allowed on purpose (nanoGPT pads GPT-2's 50,257 to 50,304): the samples during and after
    training draw only the tokenizer's ids, and the finished run exits 0."""
    path = write(tmp_path / "big.yaml", "model:\n  vocab_size: 400\n")
    status = cli.main([str(a) for a in train_args(tmp_path, "--config", path, "--steps", "2", "--sample-tokens", "12",
                                                  "--name", "big")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "no sample" not in out + err and "outside the vocabulary" not in out + err
    assert "--- generated text ---" in out and "saved in" in out


# --------------------------------------------------------------------------- --nproc


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_is_refused(tmp_path, capsys, nproc):
    status, err = run_main(capsys, *train_args(tmp_path, "--nproc", nproc))
    assert status == 2
    assert err == f"llmscratch train: error: --nproc is the number of processes to launch: at least 1, got {nproc}\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "3"], "the global batch of 2 windows (batch_size 2 × grad_accum 1) does not split evenly over 3 processes"),
    (["--nproc", "2", "--batch-size", "8", "--micro-batch", "3"], "gets 4 windows per step, which micro-batches of 3"),
])
def test_a_batch_the_processes_cannot_share_is_refused_before_launching(tmp_path, capsys, monkeypatch, extra, message):
    import llmscratch.training.distributed as dist

    monkeypatch.setattr(dist, "launch_torchrun", lambda *a, **k: pytest.fail("launched"))
    status, err = run_main(capsys, *train_args(tmp_path, *extra))
    assert status == 2 and err.count(message) == 1, err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- generate: several prompts, prompt files


def generated(capsys, run: Path, *argv: str) -> str:
    status = cli.main(["generate", str(run), "--max-new-tokens", "12", "--device", "cpu", "--top-k", "5",
                       *map(str, argv)])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


def test_several_prompts_decode_as_one_batch_and_each_row_is_its_prompt_alone(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    both = generated(capsys, run, "--prompt", "the quick", "--prompt", "god said let", "--seed", "5")
    alone = [generated(capsys, run, "--prompt", "the quick", "--seed", "5").rstrip("\n"),
             generated(capsys, run, "--prompt", "god said let", "--seed", "6").rstrip("\n")]
    blocks = re.split(r"^--- (.*) ---\n", both, flags=re.M)[1:]
    assert blocks[0::2] == ["prompt 1 (seed 5)", "prompt 2 (seed 6)"]
    assert [b.rstrip("\n") for b in blocks[1::2]] == alone  # row i: its prompt alone with seed + i
    assert alone[0] != "the quick" and alone[1].startswith("god said let")


def test_prompts_and_samples_are_numbered_prompt_by_prompt(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    out = generated(capsys, run, "--prompt", "the", "--prompt", "god", "--num-samples", "2", "--seed", "1")
    assert re.findall(r"^--- (.*) ---$", out, re.M) == [
        "prompt 1, sample 1 (seed 1)", "prompt 1, sample 2 (seed 2)",
        "prompt 2, sample 1 (seed 3)", "prompt 2, sample 2 (seed 4)"]


def test_a_prompt_file_is_one_prompt_with_its_newlines_and_dash_reads_standard_input(tmp_path, capsys, monkeypatch):
    import io

    run = tiny_run(tmp_path / "run")
    text = "the lazy dog,\nand god said"
    from_file = generated(capsys, run, "--prompt-file", write(tmp_path / "p.txt", "\ufeff" + text), "--greedy")
    assert from_file == generated(capsys, run, "--prompt", text, "--greedy")  # the byte-order mark is not text
    assert from_file.startswith(text) and len(from_file) > len(text) + 1
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    assert generated(capsys, run, "--prompt-file", "-", "--greedy") == from_file


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "--prompt-file {path} does not exist"),
    (lambda d: d, "--prompt-file {path} is a folder"),
    (lambda d: write(d / "latin1.txt", "caf\xe9".encode("latin-1")),
     "--prompt-file {path} is not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_a_prompt_file_that_cannot_be_read_is_named(tmp_path, capsys, make, message):
    run = tiny_run(tmp_path / "run")
    path = make(tmp_path)
    status, err = run_main(capsys, "generate", run, "--prompt-file", path, "--device", "cpu")
    assert status == 2 and message.format(path=path) in err, err


def test_standard_input_is_one_prompt(tmp_path, capsys):
    status, err = run_main(capsys, "generate", tiny_run(tmp_path / "run"), "--prompt-file", "-", "--prompt-file", "-")
    assert status == 2 and "standard input, which holds one prompt: give it once" in err


def test_version_names_the_package_torch_and_python(capsys):
    import platform
    from importlib.metadata import version

    import llmscratch

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"llmscratch {llmscratch.__version__} (torch {version('torch')}, Python {platform.python_version()})"
    assert version("llmscratch") == llmscratch.__version__  # the installed metadata reads the one version


def test_prompts_are_numbered_in_the_order_given_whichever_option_gives_them(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    path = write(tmp_path / "p.txt", "god said")
    mixed = generated(capsys, run, "--prompt-file", path, "--prompt", "the quick", "--seed", "2")
    assert re.findall(r"^--- (.*) ---\n(god said|the quick)", mixed, re.M) == [
        ("prompt 1 (seed 2)", "god said"), ("prompt 2 (seed 3)", "the quick")]


def test_a_prompt_file_may_be_a_pipe(tmp_path, capsys):
    import os
    import threading

    run = tiny_run(tmp_path / "run")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("god said", encoding="utf-8"))
    writer.start()
    out = generated(capsys, run, "--prompt-file", fifo, "--greedy")
    writer.join(timeout=10)
    assert out == generated(capsys, run, "--prompt", "god said", "--greedy")


def test_a_prompt_the_tokenizer_cannot_encode_is_named_in_a_batch(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    status, err = run_main(capsys, "generate", run, "--prompt", "the", "--prompt", "Zürich", "--device", "cpu")
    assert status == 2 and "--prompt 'Zürich' (prompt 2): characters not in the vocabulary: 'Z', 'ü'" in err, err


def test_a_config_key_given_in_both_spellings_is_refused(tmp_path, capsys):
    for content, where in [("batch_size: 4\nbatch-size: 8\n", ""),
                           ("model:\n  drop_rate: 0.1\n  drop-rate: 0.2\n", ", under `model:`,")]:
        path = write(tmp_path / "both.yaml", content)
        status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
        name = "drop_rate" if where else "batch_size"
        assert status == 2 and f"config file {path}{where} sets {name} twice, as '{name}' and " \
                                f"'{name.replace('_', '-')}': keep one" in err, err


def test_every_command_the_readme_and_docs_show_parses():
    # the README's and the docs' examples are what users copy: a renamed or misspelt option there must fail here
    import shlex

    root = Path(__file__).resolve().parents[1]
    commands_in = {}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        commands_in[page.name] = [part.strip() for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
                                  for line in block.splitlines() for part in re.split(r"&&|\|", line)
                                  if part.strip().startswith("llmscratch ")]
    assert len(commands_in["README.md"]) >= 15, commands_in["README.md"]
    commands = [command for page in commands_in.values() for command in page]
    assert len(commands) >= 40, commands
    parser = cli.build_parser()
    for command in commands:
        argv = shlex.split(re.split(r"\s+#\s", command)[0])[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exit:
            assert exit.code == 0, command  # --help and --version exit 0; a bad option exits 2


def test_the_defaults_train_help_states_are_the_configs():
    import dataclasses

    from llmscratch.training.config import TrainConfig

    defaults = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    checked = 0
    for action in parser._actions:
        found = re.search(r'\(default (?:"([^"]*)"|([^;:),\s]+))', action.help or "")
        if not found or action.dest not in fields or found.group(0).startswith("(default --"):
            continue  # "(default --batch-size)": another option's value
        stated, actual = found.group(1) if found.group(1) is not None else found.group(2), getattr(defaults, action.dest)
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            assert float(stated) == actual, (action.dest, stated, actual)
        else:
            assert stated == actual, (action.dest, stated, actual)
        checked += 1
    assert checked >= 20, checked
    # every option of TrainConfig is on the command line, and every model option too
    flags = {o for a in parser._actions for o in a.option_strings}
    from llmscratch.nn.model import FIELD_OPTIONS
    from llmscratch.training.config import flag_of

    assert {flag_of(f) for f in fields if f != "model"} | set(FIELD_OPTIONS.values()) <= flags


def test_greedy_with_a_temperature_is_refused(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    status, err = run_main(capsys, "generate", run, "--prompt", "the", "--greedy", "--temperature", "0.5")
    assert status == 2 and "--greedy is temperature 0 (always the most likely token), so --temperature 0.5" in err


def test_greedy_equals_temperature_zero(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    outputs = []
    for option in (["--greedy"], ["--temperature", "0"]):
        assert cli.main(["generate", str(run), "--prompt", "the", "--max-new-tokens", "8", "--device", "cpu",
                         "--seed", str(len(outputs)), *option]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_a_config_file_of_another_kind_is_named(tmp_path, capsys):
    path = write(tmp_path / "c.toml", "steps = 3\n")
    status, err = run_main(capsys, *train_args(tmp_path, "--config", path))
    assert status == 2 and f"config file {path}: a config file is YAML (.yaml, .yml) or JSON (.json)" in err


def test_the_package_s_own_warnings_are_one_line(capsys):
    import warnings

    shown = []
    before = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, *rest: shown.append((message, filename))
    try:
        cli.app._one_line_warnings("train")
        warnings.showwarning("the cache was damaged", UserWarning, cli.app.__file__, 12)
        assert capsys.readouterr().err == "llmscratch train: warning: the cache was damaged\n"
        warnings.showwarning("from elsewhere", UserWarning, "/elsewhere/lib.py", 3)
        assert shown == [("from elsewhere", "/elsewhere/lib.py")]  # passed on to the handler it replaced
    finally:
        warnings.showwarning = before
