"""The experiments in their tiny mode: reports, results.json, plots, and the behaviour they demonstrate."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import struct
import tempfile
from pathlib import Path

import pytest

from llmscratch.cli import main
from llmscratch.errors import ConfigError
from llmscratch.tools.experiments import NAMES, run_experiment
from llmscratch.tools.experiments.common import (
    SIZES, fresh_model, load_data, mean_loss, show, synthetic_corpus, train_model, validation_batches,
)
from llmscratch.runtime import setup_runtime


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


PROGRESS: dict[str, list[str]] = {}  # each experiment's progress lines, filled by the `outputs` fixture


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Every experiment run once in tiny mode (batching through the CLI), its progress lines kept in PROGRESS."""
    out = tmp_path_factory.mktemp("experiments")
    for name in ("scaling", "positions", "heads"):
        PROGRESS[name] = []
        run_experiment(name, "tiny", out, device="cpu", seed=3, log=PROGRESS[name].append)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["experiment", "batching", "--tiny", "--out", str(out), "--device", "cpu", "--seed", "3"]) == 0
    PROGRESS["batching"] = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    return out


def results(outputs: Path, name: str) -> dict:
    return json.loads((outputs / name / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_report_shows_exactly_the_numbers_of_results_json(outputs, name):
    folder = outputs / name
    report = (folder / "report.md").read_text(encoding="utf-8")
    data = results(outputs, name)
    assert data["experiment"] == name and data["settings"]["mode"] == "tiny"
    for table in data["tables"]:
        header = "| " + " | ".join(table["columns"]) + " |"
        assert header in report
        for row in table["rows"]:
            assert "| " + " | ".join(show(v) for v in row) + " |" in report  # the row, cell by cell
    assert 2 <= len(data["findings"]) <= 4
    for finding in data["findings"]:
        assert f"- {finding}" in report
    # Every plot is embedded, exists and is a PNG of the figure's size.
    assert data["plots"]
    for file in data["plots"]:
        assert f"]({file})" in report
        width, height = png_size(folder / file)
        assert (width, height) in {(700, 420), (1000, 400), (800, 420)}


def test_findings_are_written_from_the_numbers(outputs):
    data = results(outputs, "heads")
    losses = {row[0]: row[3] for row in data["tables"][0]["rows"]}
    assert all(f"{n} → {loss}" in data["findings"][0] for n, loss in losses.items())


def test_scaling_without_the_factor_spreads_the_scores_by_sqrt_dk(outputs):
    rows = results(outputs, "scaling")["tables"][0]["rows"]
    by = {(r[0], r[2]): r for r in rows}  # (head dim, scaled) → row
    for d in {r[0] for r in rows}:
        ratio = by[d, False][4] / by[d, True][4]  # score std at init, same initial weights
        assert ratio == pytest.approx(math.sqrt(d), rel=0.15)
        for r in (by[d, True], by[d, False]):
            assert 0 < r[6] <= math.log(SIZES["tiny"].context_length)  # entropy within bounds
            assert r[7] > 0 and r[8] > 0  # gradient norms were recorded
    per_layer = results(outputs, "scaling")["tables"][1]["rows"]
    assert len(per_layer) == len(rows) * SIZES["tiny"].n_layers


def test_positions_learned_cannot_go_past_the_context(outputs):
    data = results(outputs, "positions")
    rows = {r[0]: r for r in data["tables"][0]["rows"]}
    assert set(rows) == {"learned", "sinusoidal", "rope", "alibi", "none"}
    assert rows["learned"][3:] == [None, None, None]
    for kind in ("sinusoidal", "rope", "alibi", "none"):
        assert all(isinstance(v, float) and 0 < v < 10 for v in rows[kind][2:])
    assert rows["learned"][1] > rows["rope"][1] == rows["alibi"][1] == rows["none"][1]  # only learned adds weights
    assert "n/a" in (outputs / "positions" / "report.md").read_text(encoding="utf-8")
    by_pos = data["series"]["rope"]["loss_by_position"]
    assert len(by_pos) == 4 * SIZES["tiny"].context_length


def test_heads_diversity_is_a_divergence_and_na_for_one_head(outputs):
    rows = results(outputs, "heads")["tables"][0]["rows"]
    assert [r[0] for r in rows] == [1, 2, 4]
    assert len({r[2] for r in rows}) == 1  # same parameter count at a fixed width
    assert rows[0][4:] == [None] * (len(rows[0]) - 4)
    for r in rows[1:]:
        assert all(0.0 <= v <= 1.0 for v in r[4:])


def test_batching_equal_budget_and_independent_sequences(outputs):
    train, checks = results(outputs, "batching")["tables"]
    assert len({r[2] for r in train["rows"]}) == 1  # every batch size saw the same number of tokens
    assert [r[0] for r in train["rows"]] == [4, 8]
    diffs = {name: diff for name, diff in checks["rows"]}
    control = diffs.pop(next(n for n in diffs if n.startswith("control")))
    assert len(diffs) == 4 and max(diffs.values()) < 1e-5
    assert control > 1e-3


# What names each model in results.json's first table: the column and how the progress label writes it.
MODEL_LABEL = {
    "scaling": lambda row: f"d_k={row[0]} ({row[1]} head{'s' if row[1] > 1 else ''}), "
                           f"{'scaled' if row[2] else 'unscaled'}",
    "positions": lambda row: f"positions={row[0]}",
    "heads": lambda row: f"heads={row[0]} (head dim {row[1]})",
    "batching": lambda row: f"batch={row[0]}",
}


@pytest.mark.parametrize("name", NAMES)
def test_each_model_is_announced_as_it_starts_and_with_its_loss_as_it_ends(outputs, name):
    table = results(outputs, name)["tables"][0]
    rows = table["rows"]  # one row per trained model, in training order
    column = next(i for i, c in enumerate(table["columns"]) if c in ("val loss", f"loss, T = {SIZES['tiny'].context_length}"))
    lines = PROGRESS[name]
    assert len(lines) == 2 * len(rows), lines
    n = len(rows)
    for i, row in enumerate(rows, 1):
        start, end = lines[2 * i - 2], lines[2 * i - 1]
        prefix = f"[{i}/{n}] {MODEL_LABEL[name](row)}: "
        assert start.startswith(prefix) and start.endswith(" ...") and "training" in start, start
        match = re.fullmatch(re.escape(prefix) + r"val loss (\d+\.\d{4}), (\d+\.\d) s", end)
        assert match, end
        assert float(match.group(1)) == pytest.approx(row[column], abs=1e-9)  # the loss the report shows


def test_the_cli_prints_progress_before_the_tables_and_a_library_caller_can_silence_it(tmp_path, capsys):
    assert main(["experiment", "heads", "--tiny", "--out", str(tmp_path), "--device", "cpu", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    n_models = len(results(tmp_path, "heads")["tables"][0]["rows"])
    started = [line for line in out.splitlines() if re.match(r"\[\d+/\d+\] heads=\d+ .*: training ", line)]
    ended = [line for line in out.splitlines() if re.match(r"\[\d+/\d+\] heads=\d+ .*: val loss ", line)]
    assert len(started) == len(ended) == n_models
    assert out.index(ended[-1]) < out.index("**Validation loss") < out.index("findings:")  # the tables come after
    assert f"report: {tmp_path}/heads/report.md" in out

    run_experiment("heads", "tiny", tmp_path / "quiet", device="cpu", seed=3, log=None)
    assert capsys.readouterr().out == ""


def test_training_is_seeded():
    size = SIZES["tiny"]
    runtime = setup_runtime("cpu")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = load_data(size, Path(tmp))
        val = validation_batches(data, size.context_length, 4, seed=0)
        logs = []
        for _ in range(2):
            model = fresh_model(size.model_config(data.vocab_size), 0, runtime)
            untrained = mean_loss(model, val, runtime)
            logs.append(train_model(model, data, runtime, steps=4, batch_size=4, lr=1e-3, seed=0, eval_every=2,
                                    val_batches=val))
    assert logs[0].train_losses == logs[1].train_losses
    assert logs[0].val_losses == logs[1].val_losses
    assert untrained == pytest.approx(math.log(data.vocab_size), abs=0.1)  # about uniform before
    assert logs[0].val_losses[-1] < untrained - 0.05  # four steps lowered it


def test_a_bpe_tokenizer_learns_its_merges_from_the_training_part_only(monkeypatch, tmp_path):
    import dataclasses

    import llmscratch.tools.experiments.common as common
    from llmscratch.data.corpus import split_text

    seen = []
    real = common.build_tokenizer
    monkeypatch.setattr(common, "build_tokenizer", lambda kind, text, **kw: seen.append((kind, text)) or real(kind, text, **kw))
    size = dataclasses.replace(SIZES["tiny"], tokenizer="bpe", vocab_size=300)
    data = load_data(size, tmp_path)
    train_text, val_text = split_text(synthetic_corpus().text, 0.1)
    assert seen == [("bpe", train_text)]  # the held-out tail is never seen, as in `llmscratch train`
    assert data.tokenizer.decode(data.tokenizer.encode(val_text)) == val_text  # byte-level: it still encodes it
    load_data(SIZES["tiny"], tmp_path)
    assert seen[1] == ("char", synthetic_corpus().text)  # characters: the whole corpus, or some could not be encoded


def test_synthetic_corpus_is_deterministic():
    assert synthetic_corpus(2000, seed=1).text == synthetic_corpus(2000, seed=1).text
    assert synthetic_corpus(2000, seed=1).text != synthetic_corpus(2000, seed=2).text


def test_cli_list_and_errors(capsys):
    assert main(["experiment", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(NAMES)
    assert main(["experiment", "bogus", "--tiny"]) == 2
    assert "unknown experiment 'bogus'" in capsys.readouterr().err
    assert main(["experiment"]) == 2
    with pytest.raises(ConfigError, match="mode"):
        run_experiment("heads", "huge")


def test_cli_experiment_refuses_a_seed_numpy_cannot_take(capsys, tmp_path):
    from llmscratch.cli import main

    assert main(["experiment", "heads", "--tiny", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert "--seed must be in [0, 2**32)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_an_output_the_report_cannot_go_to_is_refused_before_training(tmp_path, monkeypatch):
    import llmscratch.tools.experiments.heads as heads

    monkeypatch.setattr(heads, "run", lambda *a, **k: pytest.fail("trained although the report cannot be written"))
    (tmp_path / "heads" / "report.md").mkdir(parents=True)  # a folder where the report goes
    with pytest.raises(ConfigError, match=r"report\.md is a folder"):
        run_experiment("heads", "tiny", tmp_path, device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_experiment("heads", "tiny", tmp_path / "file", device="cpu")
    assert main(["experiment", "heads", "--tiny", "--out", str(tmp_path / "file" / "below")]) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "heads", "report.md"]  # nothing else made


def test_outputs_leave_no_temporary_files(outputs):
    assert not [p for p in outputs.rglob("*") if p.name.startswith(".") and p.name != ".cache"]
    assert not [p for p in outputs.rglob("*.tmp*")]


def test_experiments_keep_their_own_optimizer_whatever_train_s_defaults_are(monkeypatch):
    """docs/experiments.md was measured with AdamW (β 0.9/0.95, weight decay 0.1); the default run's
    later retuning (Muon, …) must not reach the experiments."""
    import llmscratch.training.step as step_module

    seen = []
    real = step_module.build_optimizer
    monkeypatch.setattr(step_module, "build_optimizer",
                        lambda model, cfg, device: seen.append(cfg) or real(model, cfg, device))
    size = SIZES["tiny"]
    runtime = setup_runtime("cpu")
    data = load_data(size, Path(tempfile.mkdtemp()))
    model = fresh_model(size.model_config(data.vocab_size), 0, runtime)
    train_model(model, data, runtime, steps=1, batch_size=2, lr=1e-3, seed=0, eval_every=1,
                val_batches=validation_batches(data, size.context_length, 2, seed=0))
    (cfg,) = seen
    assert (cfg.optimizer, cfg.beta1, cfg.beta2, cfg.weight_decay) == ("adamw", 0.9, 0.95, 0.1)


@pytest.mark.parametrize("name, chars, window", [(n, 100, "64+1" if n == "positions" else "16+1") for n in NAMES] + [("positions", 400, "64+1")])
def test_data_too_short_for_an_experiment_names_the_file_before_training(tmp_path, capsys, name, chars, window):
    # positions also reads windows 4× the context past it: a text long enough for the others is too short there
    text = tmp_path / "short.txt"
    text.write_text(("abc def. " * 100)[:chars], encoding="utf-8")
    status = main(["experiment", name, "--tiny", "--data", str(text), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"the corpus {text} is too small: its validation split has" in err
    assert f"fewer than one window of {window}; use more text" in err
    assert not (tmp_path / "out" / name / "report.md").exists()


def test_experiment_data_in_another_encoding_is_read_with_encoding(tmp_path, capsys):
    text = tmp_path / "latin.txt"
    text.write_bytes("café au lait. ".encode("latin-1") * 5)  # 0xe9 is no UTF-8 text
    args = ["experiment", "heads", "--tiny", "--data", str(text), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == 2
    assert "--encoding latin-1" in capsys.readouterr().err  # the option the message suggests exists here too
    assert main([*args, "--encoding", "latin-1"]) == 2
    assert f"the corpus {text} is too small" in capsys.readouterr().err  # decoded: past the encoding, to the size check
    text.write_bytes("café au lait. ".encode("latin-1") * 3000)  # enough text: the run goes through
    assert main([*args, "--encoding", "latin-1", "--seed", "5"]) == 0
    report = (tmp_path / "out" / "heads" / "report.md").read_text(encoding="utf-8")
    rerun = f"llmscratch experiment heads --tiny --data {text} --encoding latin-1 --seed 5"
    assert f"Rerun: `{rerun}`" in report  # the command that reads the same text the same way
    assert f"- data: {text}" in report and "- encoding: latin-1" in report
