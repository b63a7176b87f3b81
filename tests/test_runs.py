"""``llmscratch runs`` and ``llmscratch info runs/``: a line per run, from tiny runs trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmscratch.store import checkpoint as ckpt
from llmscratch.cli import main
from llmscratch.errors import CheckpointError
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.store.runs import format_runs, is_runs_folder, list_runs
from llmscratch.store.rundir import RunDir
from llmscratch.training.config import TrainConfig
from llmscratch.training.train import train

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And God said, Let there be light: and there was light. ") * 12


@pytest.fixture()
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of runs: two tiny trainings (``latest`` → the second, stopped at step 4 of 8), an import, a run
    stopped before its first checkpoint, a folder of notes, and a file."""
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "runs"
    base = dict(data=str(tmp_path / "tiny.txt"), tokenizer="char", preset="test", model={"context_length": 16},
                steps=8, batch_size=4, warmup_steps=2, eval_interval=4, eval_windows=4, log_interval=4,
                checkpoint_interval=4, sample_tokens=0, device="cpu", progress=False, out_dir=str(out), seed=7)
    log = lambda message: None  # noqa: E731
    train(TrainConfig(**base, name="first"), log=log)
    train(TrainConfig(**base, name="second", stop_at=4), log=log)
    ckpt.save_run(out / "imported", GPT(GPTConfig.from_preset("test")))
    (out / "stopped").mkdir()
    (out / "stopped" / "train_config.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("try a wider model")
    (out / "README.txt").write_text("my runs")
    return out


def test_the_listing_has_a_row_per_run_with_its_numbers_and_says_what_other_folders_are(runs):
    rows = {r.name: r for r in list_runs(runs)}
    assert set(rows) == {"first", "second", "imported", "stopped", "notes"}  # no row for latest or a file
    first, second = rows["first"], rows["second"]
    assert (first.kind, first.step, first.steps, first.latest) == ("run", 8, 8, False)
    assert (second.kind, second.step, second.steps, second.latest) == ("run", 4, 8, True)
    best = min(r["val_bpb"] for r in RunDir(runs / "first").read_metrics()
               if "val_bpb" in r and not r.get("final"))
    assert first.best_bpb == best and second.best_bpb is not None
    assert first.size == sum(p.stat().st_size for p in (runs / "first").rglob("*") if p.is_file())
    assert first.saved == (runs / "first" / ckpt.WEIGHTS_FILE).stat().st_mtime
    assert (rows["imported"].kind, rows["imported"].step, rows["imported"].steps) == ("run", None, None)
    assert rows["stopped"].kind == "a training run that stopped before its first checkpoint"
    assert rows["notes"].kind == "not a run: no config.json"
    assert [r.kind == "run" for r in list_runs(runs)] == [True, True, True, False, False]  # runs first

    text = format_runs(list_runs(runs), runs)
    lines = text.splitlines()
    assert lines[0] == f"runs in {runs}:" and lines[1].split() == ["name", "step", "best", "val", "bpb", "size",
                                                                   "saved"]
    by_name = {line.split()[0]: line for line in lines[2:]}
    assert by_name["second"].split()[1:4] == ["4", "of", "8"] and by_name["second"].endswith("  latest")
    assert by_name["first"].split()[1:5] == ["8", "of", "8", f"{best:.4f}"] and "latest" not in by_name["first"]
    assert by_name["imported"].split()[1:3] == ["imported", "-"]
    assert by_name["stopped"].endswith("(a training run that stopped before its first checkpoint)")
    assert by_name["notes"].endswith("(not a run: no config.json)")


def test_runs_and_info_on_the_runs_folder_print_the_same_listing(runs, capsys):
    assert main(["runs", str(runs)]) == 0
    listing = capsys.readouterr().out
    assert listing == format_runs(list_runs(runs), runs) + "\n"
    assert main(["info", str(runs)]) == 0
    assert capsys.readouterr().out == listing
    assert main(["info", str(runs / "first")]) == 0  # a run itself: described as before
    assert "training: step 8 of 8" in capsys.readouterr().out


def test_runs_lists_the_runs_folder_by_default(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs.parent)
    assert main(["runs"]) == 0
    assert capsys.readouterr().out.startswith("runs in runs:\n")


def test_a_dangling_latest_and_folders_that_hold_no_runs(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert not is_runs_folder(tmp_path / "runs")  # empty: `info` keeps its own message
    assert format_runs(list_runs(tmp_path / "runs"), tmp_path / "runs").startswith(f"no runs in {tmp_path / 'runs'}")
    (tmp_path / "runs" / "latest").symlink_to("gone")
    assert is_runs_folder(tmp_path / "runs")
    [row] = list_runs(tmp_path / "runs")
    assert row.name == "latest" and row.kind == "a link to gone, which no longer exists"
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist: give the folder runs are saved in" in capsys.readouterr().err
    ckpt.save_model(tmp_path / "run", GPT(GPTConfig.from_preset("test")))
    with pytest.raises(CheckpointError, match=r"is a run, not a folder of runs: `llmscratch info"):
        list_runs(tmp_path / "run")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert ckpt.folder_kind(tmp_path / "hf").startswith("a Hugging Face GPT-2 directory")
