"""The training loop: schedule, optimizer groups, resume bit-exactness, Ctrl-C, NaN, end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmscratch.store import checkpoint as ckpt
from llmscratch.cli import build_parser
from llmscratch.cli.train import train_config_from_args
from llmscratch.errors import ConfigError
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.store.describe import describe_run
from llmscratch.store.rundir import RunDir
from llmscratch.training.config import TrainConfig, lr_at
from llmscratch.training.loop import TrainingDiverged
from llmscratch.training.step import build_optimizer
from llmscratch.training.train import train

TIMEOUT = 1800  # seconds: only a hang fails a test; a slow, shared machine never does

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. "
) * 12


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(corpus), tokenizer="char", preset="test", model={"context_length": 16},
        steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_windows=4,
        log_interval=2, checkpoint_interval=4, sample_tokens=0, device="cpu", progress=False,
        out_dir=str(out), seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_values_at_known_steps():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)  # the end: min_lr
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.from_preset("test", tie_weights=True))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="adamw"), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_parameters()  # the tied matrix appears once


def test_train_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="resume"):
        TrainConfig(resume="a", init_from="b")
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="beta2"):
        TrainConfig(beta2=1.0)
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=-0.1)
    with pytest.raises(ConfigError, match=r"TrainConfig.lr \(--lr\) must be > 0 and TrainConfig.min_lr \(--min-lr\)"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match=r"TrainConfig.progress \(--no-progress\) must be true or false"):
        TrainConfig(progress="yes")
    with pytest.raises(ConfigError, match=r"TrainConfig.loss \(--loss\) must be one of auto, plain, chunked, kernel"):
        TrainConfig(loss="fused")



@pytest.mark.parametrize("field, value, message", [
    ("lr", math.inf, "lr .--lr. must be a finite number, got inf"),
    ("weight_decay", math.nan, "weight_decay .--weight-decay. must be a finite number, got nan"),
    ("time_budget", math.nan, "time_budget .--time-budget. must be a finite number"),
    ("grad_clip", -1.0, r"grad_clip \(--grad-clip\) must be >= 0 \(0: no clipping\)"),
    ("seed", -1, r"seed \(--seed\) must be in \[0, 2\*\*32\)"),
    ("seed", 2**32, r"seed \(--seed\) must be in \[0, 2\*\*32\)"),
    ("stop_at", 0, r"stop_at \(--stop-at\) must be a step >= 1"),
    ("preset", "nosuch", r"unknown preset 'nosuch' \(--preset\); choose one of \['cpu'"),
    ("data", ["a.txt"], r"data .--data. must be a string, got \['a.txt'\]"),
    ("warmup_steps", "5", "warmup_steps .--warmup-steps. must be an integer, got '5'"),
    ("compile", "yes", "compile .--compile. must be true or false"),
    ("model", 5, r"model \(`model:` in --config\) must be a mapping, got 5"),
    ("model", {"n_layerz": 3}, r"unknown model option\(s\) \['n_layerz'\] under `model:`"),
])
def test_train_config_refuses_values_of_the_wrong_kind_up_front(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_a_config_file_number_without_a_dot_is_a_number(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 3e-3\nmin_lr: 1E-4\ngrad_clip: '0.5'\n")  # YAML 1.1 reads 3e-3 as a string
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))
    assert (cfg.lr, cfg.min_lr, cfg.grad_clip) == (3e-3, 1e-4, 0.5)
    cfg_file.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr .--lr. must be a finite number, got 'fast'"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(cfg_file)]))


def test_grad_clip_zero_means_no_clipping(corpus: Path, tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]))
    train(tiny_config(corpus, tmp_path / "a", steps=2, name="off", grad_clip=0.0))
    assert calls == []
    train(tiny_config(corpus, tmp_path / "b", steps=2, name="on", grad_clip=0.5))
    assert calls == [0.5, 0.5]


def test_every_loss_implementation_trains_to_the_same_weights(corpus: Path, tmp_path: Path):
    """--loss plain (the readable path), chunked (the CPU's default) and kernel (on the CPU, the
    Triton kernel's PyTorch reference): the same run to rounding, float32 on the CPU."""
    runs, logs = {}, []
    for loss in ("plain", "chunked", "kernel"):
        runs[loss] = train(tiny_config(corpus, tmp_path / loss, steps=4, name=loss, loss=loss, optimizer="adamw"),
                           log=logs.append)
    plain = ckpt.load_model(runs["plain"]).state_dict()
    for loss in ("chunked", "kernel"):
        for name, value in ckpt.load_model(runs[loss]).state_dict().items():
            torch.testing.assert_close(value, plain[name], rtol=1e-4, atol=1e-5, msg=f"{loss}: {name}")
    named = [loss for loss in ("plain", "chunked", "kernel") if any(f"positions, {loss} loss" in m for m in logs)]
    assert named == ["plain", "chunked", "kernel"]  # the startup line names it; the kernel as its CPU reference:
    assert any("kernel loss (its PyTorch reference: Triton kernels run on CUDA)" in m for m in logs)


def test_training_lowers_loss_and_writes_the_run(corpus: Path, tmp_path: Path):
    run = train(tiny_config(corpus, tmp_path / "runs", steps=40, eval_interval=20, name="r"))
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r and not r.get("final")]
    final = [r for r in records if r.get("final")][0]
    # An untrained model predicts about uniformly: loss ln V. Forty steps must take it well below
    # that (to ~2.4 nats here, from 3.43).
    uniform = math.log(json.loads((run / "config.json").read_text())["vocab_size"])
    first = next(r for r in records if "train_loss" in r)
    assert first["train_loss"] == pytest.approx(uniform, abs=0.15)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and final["val_loss"] < uniform - 0.7
    # Character tokens of ASCII text are one byte each: bits per byte = loss in bits.
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / math.log(2), rel=1e-9)
    for name in ("config.json", "model.safetensors", "training_state.pt", "train_config.json", "loss.png",
                 "tokenizer_config.json", "best/model.safetensors", "best/tokenizer_config.json"):
        assert (run / name).exists(), name
    assert (run.parent / "latest").resolve() == run.resolve()
    info = describe_run(run)
    assert "step 40 of 40" in info and "muon" in info and "bits/byte" in info
    best = min(evals, key=lambda r: r["val_bpb"])
    assert f"training: the best validation weights of the run in {run}, from step {best['step']} " \
           f"({best['val_bpb']:.4f} bits/byte)" in describe_run(run / "best")


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])  # with dropout, torch's own generator must come back too
def test_resume_is_bit_exact(corpus: Path, tmp_path: Path, drop_rate: float):
    model = {"context_length": 16, "drop_rate": drop_rate}
    full = train(tiny_config(corpus, tmp_path / "a", steps=8, name="full", model=model))
    half = train(tiny_config(corpus, tmp_path / "b", steps=8, stop_at=4, name="half", model=model))
    assert ckpt.load_training_state(half)["step"] == 4
    assert (half / "loss.png").stat().st_size > 0  # the curve so far, drawn at a stop too
    torch.manual_seed(999)  # whatever the process did before, the resumed run draws what the full one drew
    resumed = train(TrainConfig(resume=str(half), progress=False))
    assert resumed == half
    m_full, m_res = ckpt.load_model(full), ckpt.load_model(resumed)
    for (name, a), (_, b) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt.load_training_state(resumed)["step"] == 8

    def losses(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}

    assert losses(resumed) == losses(full) and max(losses(full)) == 8


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(corpus: Path, tmp_path: Path, monkeypatch):
    """The mean of micro-batch means is the mean over the batch: split or not, the same gradient and loss.

    Compared before any clipping or optimizer could hide a wrongly scaled gradient (Muon
    normalises its update, AdamW divides by the gradient's size).
    """
    import llmscratch.training.setup as setup_module

    real_build = setup_module.build_optimizer

    def first_step(name: str, **kw) -> tuple[list[torch.Tensor], list[float]]:
        grads: list[list[torch.Tensor]] = []

        def recording_optimizer(model, cfg, device):
            opt = real_build(model, cfg, device)
            step = opt.step

            def recorded_step(*args, **kwargs):
                grads.append([p.grad.clone() for p in model.parameters()])
                return step(*args, **kwargs)

            opt.step = recorded_step
            return opt

        monkeypatch.setattr(setup_module, "build_optimizer", recording_optimizer)
        run = train(tiny_config(corpus, tmp_path, steps=2, log_interval=1, grad_clip=0.0, name=name, **kw))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return grads[0], [r["train_loss"] for r in records if "train_loss" in r]

    whole, whole_losses = first_step("whole", batch_size=4)
    for name, kw in [("micro", dict(batch_size=4, micro_batch=1)), ("accum", dict(batch_size=2, grad_accum=2))]:
        grads, losses = first_step(name, **kw)
        for a, b in zip(grads, whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert losses == pytest.approx(whole_losses, rel=1e-5), name


def test_a_kill_between_the_two_renames_of_a_save_is_finished_on_resume(corpus: Path, tmp_path: Path, monkeypatch):
    """Killed after the step-8 weights were renamed into place, before the training state was: the
    staged state is renamed on the next load, and the run resumes from step 8 as if never cut."""
    full = train(tiny_config(corpus, tmp_path / "a", steps=12, name="full"))
    real = os.replace

    def killed_before_the_state(src, dst):
        if Path(dst).name == ckpt.TRAINING_STATE_FILE and ckpt.weights_tag(Path(dst).parent).get("step") == "8":
            raise SystemExit("killed while saving")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_the_state)
    with pytest.raises(SystemExit):
        train(tiny_config(corpus, tmp_path / "b", steps=12, name="cut"))
    monkeypatch.setattr(ckpt.os, "replace", real)
    run = tmp_path / "b" / "cut"
    assert ckpt.weights_tag(run)["step"] == "8" and (run / (ckpt.PENDING + ckpt.TRAINING_STATE_FILE)).is_file()
    assert ckpt.load_training_state(run)["step"] == 8  # finished: the staged state renamed into place
    assert not (run / (ckpt.PENDING + ckpt.TRAINING_STATE_FILE)).exists()
    train(TrainConfig(resume=str(run), progress=False))
    for (name, a), (_, b) in zip(ckpt.load_model(full).state_dict().items(), ckpt.load_model(run).state_dict().items()):
        assert torch.equal(a, b), name


def test_a_kill_while_a_save_is_staged_leaves_the_previous_checkpoint_whole(corpus: Path, tmp_path: Path, monkeypatch):
    """Killed while the step-8 files were still being written: the step-4 pair is untouched and resumes."""
    full = train(tiny_config(corpus, tmp_path / "a", steps=8, name="full"))
    real = ckpt._write_torch

    def killed_while_writing(path, obj):
        if isinstance(obj, dict) and obj.get("step") == 8:
            Path(path).write_bytes(b"half a training st")  # what a kill mid-write can leave
            raise SystemExit("killed while saving")
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", killed_while_writing)
    with pytest.raises(SystemExit):
        train(tiny_config(corpus, tmp_path / "b", steps=8, name="cut"))
    monkeypatch.setattr(ckpt, "_write_torch", real)
    run = tmp_path / "b" / "cut"
    assert ckpt.weights_tag(run)["step"] == "4" and ckpt.load_training_state(run)["step"] == 4
    train(TrainConfig(resume=str(run), progress=False))
    for (name, a), (_, b) in zip(ckpt.load_model(full).state_dict().items(), ckpt.load_model(run).state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.name.startswith(ckpt.PENDING) for p in run.iterdir())


def test_resume_refuses_weights_and_state_from_two_saves(corpus: Path, tmp_path: Path):
    """Files copied together from two checkpoints: refused, and the resume changes nothing."""
    run = train(tiny_config(corpus, tmp_path, steps=8, stop_at=4, name="mixed"))
    old_state = (run / ckpt.TRAINING_STATE_FILE).read_bytes()
    train(TrainConfig(resume=str(run), progress=False))
    (run / ckpt.TRAINING_STATE_FILE).write_bytes(old_state)  # step 4's state beside step 8's weights
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match=r"\(step 8\) and .*training_state.pt \(step 4\) are not from "
                                                   r"the same save.*--init-from"):
        train(TrainConfig(resume=str(run), progress=False))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing changed


def test_resume_applies_what_may_change_even_at_its_default_and_refuses_what_may_not(corpus, tmp_path):
    half = train(tiny_config(corpus, tmp_path, steps=8, stop_at=4, name="half"))
    with pytest.raises(ConfigError, match=r"cannot change: --data 'other.txt' \(the run has .*\), --seed 5 \(the run has 7\)"):
        train(TrainConfig(resume=str(half), data="other.txt", seed=5, progress=False))
    train(TrainConfig(resume=str(half), steps=1400, stop_at=6, progress=False),  # 1400: the default, but given
          given={"resume", "steps", "stop_at", "progress"})
    assert ckpt.read_json(half / "train_config.json")["steps"] == 1400
    assert ckpt.load_training_state(half)["step"] == 6


def test_resume_refuses_a_corpus_that_changed_since_the_run_started(corpus: Path, tmp_path: Path):
    half = train(tiny_config(corpus, tmp_path, steps=8, stop_at=4, name="half"))
    corpus.write_text(TEXT[: len(TEXT) // 2], encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tiny.txt is not what .*half started on .*--init-from"):
        train(TrainConfig(resume=str(half), progress=False))
    corpus.write_text(TEXT, encoding="utf-8")
    assert ckpt.load_training_state(train(TrainConfig(resume=str(half), progress=False)))["step"] == 8


def test_init_from_starts_from_the_weights_and_refuses_options_it_cannot_apply(corpus: Path, tmp_path: Path):
    source = train(tiny_config(corpus, tmp_path, steps=4, name="source"))
    given = {"data", "steps", "batch_size", "device", "progress", "out_dir", "name", "init_from", "sample_tokens"}
    child = train(tiny_config(corpus, tmp_path, steps=2, name="child", init_from=str(source)), given=given)
    assert ckpt.load_config(child) == ckpt.load_config(source)
    assert ckpt.load_training_state(child)["step"] == 2
    before, after = ckpt.load_model(source).state_dict(), ckpt.load_model(child).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained from there
    with pytest.raises(ConfigError, match=r"brings its own model and tokenizer; model options, --tokenizer cannot"):
        train(tiny_config(corpus, tmp_path, steps=2, name="child2", init_from=str(source)),
              given=given | {"tokenizer", "model"})


def test_resume_of_a_run_saved_before_the_optimizer_option_continues_with_adamw(corpus: Path, tmp_path: Path):
    full = train(tiny_config(corpus, tmp_path / "a", name="full", optimizer="adamw"))
    half = train(tiny_config(corpus, tmp_path / "b", stop_at=4, name="half", optimizer="adamw"))
    config = json.loads((half / "train_config.json").read_text())
    del config["optimizer"]  # as written by llmscratch before Muon
    (half / "train_config.json").write_text(json.dumps(config))
    train(TrainConfig(resume=str(half), progress=False))
    for (name, a), (_, b) in zip(ckpt.load_model(full).state_dict().items(), ckpt.load_model(half).state_dict().items()):
        assert torch.equal(a, b), name


def poison_loss_after(monkeypatch: pytest.MonkeyPatch, good_calls: int) -> None:
    """Make GPT.loss NaN from its call ``good_calls + 1`` on (a run that diverges there)."""
    calls = {"n": 0}
    real_loss = GPT.loss

    def poisoned(self, x, targets):
        calls["n"] += 1
        out = real_loss(self, x, targets)
        return out * float("nan") if calls["n"] > good_calls else out

    monkeypatch.setattr(GPT, "loss", poisoned)


def test_a_new_run_that_fails_before_saving_anything_leaves_no_folder_and_latest_unmoved(corpus, tmp_path,
                                                                                         monkeypatch):
    """Diverged at step 2 (before any checkpoint or best/ weights): the folder, which would hold only a
    tokenizer, is removed, ``latest`` still points at the last run that saved, and the name is free again."""
    out = tmp_path / "runs"
    good = train(tiny_config(corpus, out, steps=4, name="good"))
    assert (out / "latest").resolve() == good.resolve()
    real_loss = GPT.loss
    monkeypatch.setattr(GPT, "loss", lambda self, x, t: real_loss(self, x, t) * float("nan"))
    lines: list[str] = []
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(tiny_config(corpus, out, steps=8, log_interval=2, eval_interval=100, name="bad"), log=lines.append)
    assert not (out / "bad").exists()
    assert any(f"removed {out / 'bad'}" in line for line in lines)
    assert (out / "latest").resolve() == good.resolve()
    monkeypatch.setattr(GPT, "loss", real_loss)
    assert train(tiny_config(corpus, out, steps=4, name="bad")) == out / "bad"  # the name can be used again
    assert (out / "latest").resolve() == (out / "bad").resolve()


def test_a_new_run_that_saved_best_weights_before_failing_keeps_them(corpus, tmp_path, monkeypatch):
    poison_loss_after(monkeypatch, 8)  # 3 steps and one evaluation of 4 windows are fine
    cfg = tiny_config(corpus, tmp_path, steps=12, log_interval=4, eval_interval=2, eval_windows=1,
                      checkpoint_interval=100, name="kept")
    with pytest.raises(TrainingDiverged, match=r"no checkpoint was written \(the best weights so far are in .*best"):
        train(cfg)
    assert ckpt.load_model(tmp_path / "kept" / "best") is not None


def test_resuming_or_reusing_a_folder_without_a_checkpoint_says_so(corpus, tmp_path):
    """A folder a killed run left before its first checkpoint (SIGKILL: no clean-up possible)."""
    leftover = tmp_path / "left"
    leftover.mkdir()
    (leftover / "train_config.json").write_text(json.dumps(tiny_config(corpus, tmp_path, name="left").to_dict()))
    with pytest.raises(ConfigError, match=r"left already exists;.*delete it: it holds no checkpoint to continue"):
        train(tiny_config(corpus, tmp_path, name="left"))
    with pytest.raises(ckpt.CheckpointError, match=r"no training_state.pt to resume from: the run stopped before"):
        train(TrainConfig(resume=str(leftover), progress=False))


def test_a_damaged_cached_tokenizer_is_trained_again_not_a_dead_end(corpus, tmp_path):
    first = train(tiny_config(corpus, tmp_path, steps=2, name="one"))
    (cached,) = (tmp_path / "cache" / "tokenizers").iterdir()
    (cached / "chars.json").write_text("{not json")
    with pytest.warns(UserWarning, match=f"cached tokenizer in {cached} could not be read"):
        second = train(tiny_config(corpus, tmp_path, steps=2, name="two"))
    assert (second / "chars.json").read_text() == (first / "chars.json").read_text()


def test_nan_loss_stops_with_the_first_bad_step_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    poison_loss_after(monkeypatch, 5)  # training steps 1..5 are fine
    cfg = tiny_config(corpus, tmp_path / "runs", steps=12, log_interval=4, eval_interval=100,
                      checkpoint_interval=4, name="nan")
    with pytest.raises(TrainingDiverged, match=r"at step 6;.*last good checkpoint \(step 4\)"):
        train(cfg)
    state = ckpt.load_training_state(tmp_path / "runs" / "nan")
    assert state["step"] == 4
    model = ckpt.load_model(tmp_path / "runs" / "nan")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_config_file_with_command_line_overrides(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 33\nlr: 0.01\nloss: chunked\nmodel:\n  n_layers: 3\n  pos_emb: rope\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.002", "--n-heads", "2",
                                      "--loss", "plain"])
    cfg = train_config_from_args(args)
    assert cfg.steps == 33 and cfg.lr == 0.002 and cfg.loss == "plain"
    assert cfg.model == {"n_layers": 3, "pos_emb": "rope", "n_heads": 2}


def _cli(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT, **kw)


def test_end_to_end_train_then_generate_and_eval(corpus: Path, tmp_path: Path):
    env = {**os.environ, "LLMSCRATCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "runs"
    r = _cli("train", "--data", str(corpus), "--tokenizer", "char", "--preset", "test", "--steps", "6",
             "--batch-size", "4", "--context-length", "16", "--eval-interval", "3", "--log-interval", "3",
             "--device", "cpu", "--out-dir", str(out), "--no-progress", "--sample-tokens", "8",
             "--sample-prompt", "And God", env=env)
    assert r.returncode == 0, r.stderr
    assert "generated text" in r.stdout and "bits/byte" in r.stdout
    run = out / "latest"
    g = _cli("generate", str(run), "--prompt", "And God", "--max-new-tokens", "10", "--seed", "3", env=env)
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("And God") and len(g.stdout.strip()) > len("And God")
    g2 = _cli("generate", str(run), "--prompt", "And God", "--max-new-tokens", "10", "--seed", "3", env=env)
    assert g.stdout == g2.stdout  # seeded
    g4 = _cli("generate", str(run), "--prompt", "And God", "--max-new-tokens", "10", "--seed", "4", env=env)
    many = _cli("generate", str(run), "--prompt", "And God", "--max-new-tokens", "10", "--seed", "3",
                "--num-samples", "2", env=env)
    assert many.returncode == 0, many.stderr
    assert many.stdout == f"--- sample 1 (seed 3) ---\n{g.stdout}--- sample 2 (seed 4) ---\n{g4.stdout}"  # one batch, seeds 3 and 4
    e = _cli("eval", str(run), "--data", str(corpus), env=env)
    assert e.returncode == 0, e.stderr
    assert "bits per byte" in e.stdout
    i = _cli("info", str(run), env=env)
    assert i.returncode == 0 and "parameters:" in i.stdout
    bad = _cli("generate", str(run), "--prompt", "Zebra \u00e9", env=env)
    assert bad.returncode == 2 and "not in the vocabulary" in bad.stderr and "Traceback" not in bad.stderr


def test_the_sample_after_training_never_fails_a_run_that_trained(corpus: Path, tmp_path: Path):
    env = {**os.environ, "LLMSCRATCH_CACHE": str(tmp_path / "cache")}
    for name, prompt in (("unseen", "Zebra \u00e9"), ("empty", "")):  # characters the char tokenizer never saw
        r = _cli("train", "--data", str(corpus), "--tokenizer", "char", "--preset", "test", "--steps", "2",
                 "--batch-size", "2", "--context-length", "16", "--device", "cpu", "--out-dir", str(tmp_path),
                 "--name", name, "--no-progress", "--sample-tokens", "4", "--sample-prompt", prompt, env=env)
        assert r.returncode == 0 and "generated text" in r.stdout, r.stderr
        sample = r.stdout.split("--- generated text ---")[1]
        assert "Zebra" not in sample  # the sample shows what it started from, not a prompt it could not use
        assert ("cannot be encoded by this tokenizer" in r.stdout) == (name == "unseen")  # said, not silent


def test_a_named_run_never_writes_into_another(corpus: Path, tmp_path: Path):
    train(tiny_config(corpus, tmp_path, steps=2, name="same"))
    with pytest.raises(ConfigError, match=r"same already exists; .*--resume"):
        train(tiny_config(corpus, tmp_path, steps=2, name="same", tokenizer="bpe", vocab_size=300))
    assert len(ckpt.read_text(tmp_path / "same" / "metrics.jsonl").splitlines()) > 0


def test_info_and_resume_survive_a_half_written_metrics_line_and_name_a_bad_train_config(corpus, tmp_path):
    run = train(tiny_config(corpus, tmp_path, steps=8, stop_at=4, name="r"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    with open(run / "metrics.jsonl", "a") as f:  # a run killed after its checkpoint, while it wrote a line
        f.write('{"step": 6, "train_loss": 3.0}\n{"step": 7, "train_lo')
    assert "best validation" in describe_run(run)
    train(TrainConfig(resume=str(run), progress=False))
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[: len(lines)] == lines  # what came before the checkpoint, as it was
    steps = [json.loads(line)["step"] for line in after[len(lines):]]  # every line whole again
    assert steps == sorted(steps) and min(steps) > 4 and steps.count(6) == 1  # step 6 once: this run's
    assert '"train_loss": 3.0' not in "".join(after)
    (run / "train_config.json").write_text('{"steps": 8,')
    with pytest.raises(ckpt.CheckpointError, match="train_config.json is not valid JSON"):
        describe_run(run)
    with pytest.raises(ckpt.CheckpointError, match="train_config.json is not valid JSON"):
        train(TrainConfig(resume=str(run), progress=False))


@pytest.mark.parametrize("batch", [0, -1])
def test_eval_refuses_a_batch_size_below_one(corpus: Path, tmp_path: Path, batch):
    from llmscratch.training.evaluate import evaluate_text

    run = train(tiny_config(corpus, tmp_path, steps=2, name="e"))
    with pytest.raises(ConfigError, match=f"--batch-size.*got {batch}"):
        evaluate_text(run, str(corpus), device="cpu", batch_size=batch)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(corpus: Path, tmp_path: Path):
    env = {**os.environ, "LLMSCRATCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmscratch", "train", "--data", str(corpus), "--tokenizer", "char",
         "--preset", "test", "--steps", "100000", "--batch-size", "4", "--context-length", "16",
         "--log-interval", "1", "--eval-interval", "100000", "--checkpoint-interval", "100000",
         "--device", "cpu", "--out-dir", str(out), "--name", "sig", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics = out / "sig" / "metrics.jsonl"
    deadline = time.time() + TIMEOUT  # the loop is running (its handler installed) once it has logged
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr  # saved, then stopped as an interrupted command: `&&` goes no further
    assert "stopped by Ctrl-C" in stdout and "generated text" not in stdout
    assert "interrupted" not in stderr  # the log has said what was saved: no bare word after it
    state = ckpt.load_training_state(out / "sig")
    assert state["step"] >= 3
    ckpt.load_model(out / "sig")  # the checkpoint loads


def test_char_tokenizer_covers_characters_seen_only_in_the_validation_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT + "[Zq]" * 30, encoding="utf-8")  # '[', ']', 'Z', 'q' only in the tail
    run = train(tiny_config(corpus, tmp_path / "runs", steps=2, eval_interval=2, name="c", val_fraction=0.1))
    assert (run / "model.safetensors").exists()


def test_a_sample_prompt_the_char_tokenizer_cannot_encode_is_said_once_not_replaced_silently(corpus, tmp_path):
    logs: list[str] = []
    run = train(tiny_config(corpus, tmp_path, steps=4, name="p", sample_tokens=4, sample_prompt="Zürich ☃"),
                log=logs.append)
    warned = [m for m in logs if "--sample-prompt 'Zürich ☃' cannot be encoded" in m]
    assert len(warned) == 1 and "characters not in the vocabulary" in warned[0] and "start from token" in warned[0]
    assert ckpt.load_training_state(run)["step"] == 4  # the run itself is not affected
    quiet: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=2, name="q", sample_tokens=4, sample_prompt=TEXT[:5]), log=quiet.append)
    assert not any("--sample-prompt" in m for m in quiet)


def test_time_budget_stops_saves_and_resumes(corpus: Path, tmp_path: Path):
    logs: list[str] = []
    run = train(tiny_config(corpus, tmp_path, steps=8, name="timed", time_budget=1e-6), log=logs.append)
    assert any("stopped by time budget at step 1" in m and f"--resume {run}" in m for m in logs), logs[-3:]
    assert ckpt.load_training_state(run)["step"] == 1
    assert not any('"final": true' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    train(TrainConfig(resume=str(run), progress=False), log=lambda _: None)  # no budget now: runs to the end
    assert ckpt.load_training_state(run)["step"] == 8


def test_eval_of_a_text_is_every_token_s_cross_entropy_once(corpus: Path, tmp_path: Path):
    """`llmscratch eval` against the same sum written out: each window's logits, F.cross_entropy over
    every token after the first exactly once (the last window shorter), bytes of ASCII characters."""
    from llmscratch.training.evaluate import evaluate_text

    run = train(tiny_config(corpus, tmp_path, steps=4, name="e"))
    text = TEXT[:203]  # 202 targets: 12 windows of 16 and a tail of 10
    (tmp_path / "other.txt").write_text(text, encoding="utf-8")
    got = evaluate_text(run, str(tmp_path / "other.txt"), device="cpu", batch_size=5)
    model, tok, _ = ckpt.load_run(run)
    ids = torch.tensor(tok.encode(text))
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            x, y = ids[start:start + 16], ids[start + 1:start + 17]
            x = x[: len(y)]
            nats += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
    assert got["tokens"] == got["bytes"] == len(text) - 1
    assert got["loss"] == pytest.approx(nats / (len(text) - 1), rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / (len(text) - 1), rel=1e-5)


def test_resume_refuses_steps_it_has_already_taken_and_names_the_built_in_corpus(corpus: Path, tmp_path: Path):
    run = train(tiny_config(corpus, tmp_path, steps=4, name="r"))
    for steps in (2, 4):
        with pytest.raises(ConfigError, match=rf"already at step 4, so --steps {steps} leaves nothing to train"):
            train(TrainConfig(resume=str(run), steps=steps, progress=False), given={"resume", "steps"})
    builtin = tmp_path / "b"
    (builtin / "train_config.json").parent.mkdir()
    saved = json.loads((run / "train_config.json").read_text())
    (builtin / "train_config.json").write_text(json.dumps({**saved, "data": None}))
    with pytest.raises(ConfigError, match=r"--data '.*tiny.txt' \(the run has \(the built-in corpus\)\)"):
        train(TrainConfig(resume=str(builtin), data=str(corpus), progress=False), given={"resume", "data"})


def test_resume_from_another_folder_names_a_relative_data_path(corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    run = train(tiny_config(Path(corpus.name), tmp_path / "runs", steps=2, name="rel"))
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"started with --data tiny.txt, a path relative to the folder it was "
                                          r"started in, which is not .*: resume from that folder"):
        train(TrainConfig(resume=str(run), steps=4, progress=False), given={"resume", "steps"})


def test_the_sample_after_a_resumed_run_follows_the_run_s_settings(corpus: Path, tmp_path: Path):
    env = {**os.environ, "LLMSCRATCH_CACHE": str(tmp_path / "cache")}
    base = ["--data", str(corpus), "--tokenizer", "char", "--preset", "test", "--batch-size", "4",
            "--context-length", "16", "--device", "cpu", "--out-dir", str(tmp_path), "--no-progress"]
    first = _cli("train", *base, "--steps", "2", "--name", "quiet", "--sample-tokens", "0", env=env)
    assert first.returncode == 0 and "generated text" not in first.stdout, first.stderr
    resumed = _cli("train", "--resume", str(tmp_path / "quiet"), "--steps", "3", "--no-progress", env=env)
    assert resumed.returncode == 0 and "generated text" not in resumed.stdout, resumed.stderr  # the run's 0 holds
    loud = _cli("train", "--resume", str(tmp_path / "quiet"), "--steps", "4", "--no-progress",
                "--sample-tokens", "8", env=env)
    assert loud.returncode == 0 and "generated text" in loud.stdout, loud.stderr  # a display option may change


def test_fsdp_in_one_process_says_it_trains_unsharded(corpus: Path, tmp_path: Path):
    logs: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=1, name="f", fsdp=True, optimizer="adamw"), log=logs.append)
    assert any("--fsdp shards over the processes torchrun starts; this is one process" in m for m in logs)


@pytest.mark.parametrize("name", ["a/b", "../escaped", "..", ".", "latest", ""])
def test_a_run_name_is_one_folder_inside_out_dir(name):
    with pytest.raises(ConfigError, match="must be one folder name"):
        TrainConfig(name=name)


def test_negative_sample_tokens_are_refused_not_read_as_zero():
    with pytest.raises(ConfigError, match=r"sample_tokens \(--sample-tokens\) must be >= 0"):
        TrainConfig(sample_tokens=-5)


def test_info_reports_missing_or_damaged_weights_and_an_unreadable_training_state(corpus, tmp_path):
    run = train(tiny_config(corpus, tmp_path, steps=4, name="info"))
    size = (run / "model.safetensors").stat().st_size
    assert f"weights: model.safetensors, {size / 1e6:,.1f} MB, saved at step 4" in describe_run(run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:1000])  # truncated
    assert "weights: damaged:" in describe_run(run)
    (run / "model.safetensors").unlink()
    assert "weights: none (model.safetensors is missing)" in describe_run(run)
    (run / "model.safetensors").write_bytes(data)
    (run / "training_state.pt").write_bytes(b"not a checkpoint")
    info = describe_run(run)  # the rest of the summary still stands
    assert "training: the state cannot be read, so the run cannot be resumed" in info and "bits/byte" in info


def test_a_bad_option_in_a_runs_train_config_is_reported_with_that_file(corpus, tmp_path):
    run = train(tiny_config(corpus, tmp_path, steps=8, stop_at=4, name="cfg"))
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, "batch_size": "x"}))
    with pytest.raises(ConfigError, match=r"cfg/train_config.json: TrainConfig.batch_size .* must be an integer"):
        train(TrainConfig(resume=str(run), progress=False))


def test_init_from_a_folder_that_does_not_exist_names_it(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"--init-from .*nowhere: no such folder; give a run directory"):
        train(TrainConfig(init_from=str(tmp_path / "nowhere"), out_dir=str(tmp_path), progress=False))


def _kill_self_on(marker: str, signum: int = signal.SIGTERM):
    """A log function that sends this process ``signum`` when a line starts with ``marker``."""
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith(marker):
            os.kill(os.getpid(), signum)

    return log, lines


def test_sigterm_in_the_loop_saves_at_the_end_of_the_step_and_stops(corpus, tmp_path):
    from llmscratch.errors import Stopped

    log, lines = _kill_self_on("step 4: train loss")  # without a bar the loss is logged: the loop is running
    with pytest.raises(Stopped) as stopped:
        train(tiny_config(corpus, tmp_path, steps=50, checkpoint_interval=100, eval_interval=100, name="term"),
              log=log)
    assert (stopped.value.signum, stopped.value.saved) == (signal.SIGTERM, True)
    assert any(line.startswith("stopped by SIGTERM at step 5; checkpoint saved") for line in lines), "\n".join(lines)
    assert ckpt.load_training_state(tmp_path / "term")["step"] == 5  # the flag is read at the next step's end
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_sigterm_before_the_first_checkpoint_removes_the_new_run(corpus, tmp_path):
    from llmscratch.errors import Stopped

    log, _ = _kill_self_on("run directory:")  # the folder is written, training has not started
    with pytest.raises(Stopped) as stopped:
        train(tiny_config(corpus, tmp_path, steps=50, name="gone"), log=log)
    assert (stopped.value.signum, stopped.value.saved) == (signal.SIGTERM, False)
    assert not (tmp_path / "gone").exists()  # no half-written run directory left behind


def test_the_training_loss_is_logged_without_a_progress_bar(corpus, tmp_path):
    lines: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=4, log_interval=2, name="quiet"), log=lines.append)
    logged = [line for line in lines if " train loss " in line]
    records = [json.loads(r) for r in (tmp_path / "quiet" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert [line.split(":")[0] for line in logged] == ["step 2", "step 4"]
    assert [float(line.split("train loss ")[1].split(",")[0]) for line in logged] == pytest.approx(losses, abs=1e-4)


def test_stop_at_past_the_last_step_is_refused():
    with pytest.raises(ConfigError, match=r"TrainConfig.stop_at \(--stop-at\) 40 is past the run's last step"):
        TrainConfig(steps=30, stop_at=40)


@pytest.mark.parametrize("kind", ["missing", "file", "imported"])
def test_resume_of_something_that_is_no_run_says_what_it_is(corpus, tmp_path, kind):
    target = tmp_path / "x"
    if kind == "file":
        target.write_text("{}")
    elif kind == "imported":
        from llmscratch.store.checkpoint import save_run

        save_run(target, GPT(GPTConfig.from_preset("test")), None)
    message = {"missing": "no such folder", "file": "is a file; give the run directory",
               "imported": "were not trained by `llmscratch train`.*--init-from"}[kind]
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(resume=str(target), progress=False))


def test_an_out_dir_that_is_a_file_is_named(corpus, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="--out-dir .*afile is a file"):
        train(tiny_config(corpus, tmp_path / "afile", name="n"))


def test_a_bpe_vocabulary_smaller_than_asked_for_is_said(corpus, tmp_path):
    lines: list[str] = []
    run = train(tiny_config(corpus, tmp_path, steps=1, name="small", tokenizer="bpe", vocab_size=5000),
                log=lines.append)
    size = ckpt.load_run(run)[1].vocab_size
    assert size < 5000  # this little text has far fewer merges to learn
    assert f"note: --vocab-size 5000 asks for more tokens than BPE finds merges for in this corpus: the tokenizer " \
           f"has {size}" in "\n".join(lines)


def test_a_warmup_longer_than_the_run_is_said(corpus, tmp_path):
    lines: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=4, warmup_steps=10, lr=1e-3, name="long-warmup"), log=lines.append)
    assert "note: the warmup (--warmup-steps 10) is longer than the run (--steps 4): the learning rate rises to " \
           "0.0004, never to --lr 0.001, and never decays" in "\n".join(lines)  # 1e-3 · 4/10 at the last step
    lines.clear()
    train(tiny_config(corpus, tmp_path, steps=4, warmup_steps=2, name="short-warmup"), log=lines.append)
    assert "note: the warmup" not in "\n".join(lines)


@pytest.mark.parametrize("warmup, reached_at", [(4, "step 4 of 4 (the last)"), (3, "step 3 of 4")])
def test_a_warmup_that_leaves_no_step_to_decay_says_the_lr_reaches_its_peak_and_stays(corpus, tmp_path, warmup,
                                                                                      reached_at):
    """With --warmup-steps as long as the run, the last step is the warmup's last: the lr is --lr there (not
    "never --lr"); one step shorter, the decay starts at the last step from --lr itself. Neither decays."""
    cfg = tiny_config(corpus, tmp_path, steps=4, warmup_steps=warmup, lr=1e-3, name=f"warmup-{warmup}")
    assert lr_at(3, cfg) == 1e-3 and lr_at(warmup - 1, cfg) == 1e-3 and lr_at(warmup - 2, cfg) < 1e-3
    lines: list[str] = []
    train(cfg, log=lines.append)
    log = "\n".join(lines)
    assert f"note: the warmup (--warmup-steps {warmup}) leaves the run (--steps 4) no step to decay: the learning " \
           f"rate reaches --lr 0.001 at {reached_at} and never decays" in log, log
    assert "never to --lr" not in log
    last_lr = [r["lr"] for r in RunDir(tmp_path / f"warmup-{warmup}").read_metrics() if "lr" in r][-1]
    assert last_lr == pytest.approx(1e-3)  # what the last step trained with


def test_info_says_why_a_tokenizer_cannot_be_loaded(corpus, tmp_path):
    from llmscratch.store.checkpoint import save_run

    run = train(tiny_config(corpus, tmp_path, steps=1, name="t"))
    assert "tokenizer: char, " in describe_run(run)
    (run / "chars.json").unlink()  # the char tokenizer's vocabulary
    assert "tokenizer: cannot be loaded (" in describe_run(run) and "chars.json" in describe_run(run)
    save_run(tmp_path / "bare", GPT(GPTConfig.from_preset("test")), None)
    assert "tokenizer: none (no tokenizer files" in describe_run(tmp_path / "bare")


def test_the_batch_size_help_says_what_the_log_says_a_step_is(corpus, tmp_path):
    """A step is batch-size × grad-accum windows: the log says "N windows per step", and so does the help."""
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train_parser._actions}
    assert "batch-size × grad-accum windows" in helps["batch_size"] and "windows per step" in helps["batch_size"]
    assert "sequences" not in helps["batch_size"]
    assert "batch-size × grad-accum" in helps["grad_accum"]
    lines: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=1, batch_size=4, grad_accum=2, name="b"), log=lines.append)
    assert "8 windows per step, 4 per forward pass on each process" in "\n".join(lines)


def _print_config(argv: list[str], capsys) -> str:
    from llmscratch.cli import main

    capsys.readouterr()
    assert main(["train", *argv, "--print-config"]) == 0
    return capsys.readouterr().out


def test_print_config_prints_the_resolved_options_that_config_gives_back(corpus, tmp_path, capsys):
    """Defaults, a --config file and the command line merged, printed as YAML; fed back through --config
    alone, the same TrainConfig. Nothing is trained. A --resume prints the settings the run continues with."""
    from llmscratch.training.config import load_config_file

    given = tmp_path / "given.yaml"
    given.write_text("steps: 33\nlr: 3e-3\nsample_prompt: 'Zürich: \"ok\"'\nmodel:\n  n_layers: 3\n  pos_emb: rope\n")
    argv = ["--config", str(given), "--lr", "0.002", "--n-heads", "2", "--data", str(corpus), "--time-budget", "90",
            "--out-dir", str(tmp_path / "runs"), "--name", "printed"]
    printed = tmp_path / "printed.yaml"
    printed.write_text(_print_config(argv, capsys))
    want = train_config_from_args(build_parser().parse_args(["train", *argv]))
    got = train_config_from_args(build_parser().parse_args(["train", "--config", str(printed)]))
    assert got.to_dict() == want.to_dict()
    assert set(load_config_file(str(printed))) == set(want.to_dict())  # every option, not only those given
    assert not (tmp_path / "runs").exists()

    run = train(tiny_config(corpus, tmp_path, steps=2, name="to-resume"))
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(_print_config(["--resume", str(run), "--steps", "5"], capsys))
    options = load_config_file(str(resumed))
    assert options["steps"] == 5 and options["tokenizer"] == "char" and options["resume"] == str(run)
    from llmscratch.training.setup import resolved_options

    back = train_config_from_args(build_parser().parse_args(["train", "--config", str(resumed)]))
    assert resolved_options(back, set(options)) == options  # the same run, no option refused


def test_the_closing_sample_is_printed_once_at_the_end(corpus, tmp_path):
    """Each evaluation prints a sample, except the last step's: the closing sample follows it, once."""
    lines: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=6, eval_interval=3, sample_tokens=4, name="s"), log=lines.append)
    text = "\n".join(lines)
    assert text.count("  sample: ") == 1 and text.count("--- generated text ---") == 1, text
    assert text.index("step 3: val loss") < text.index("  sample: ") < text.index("final (whole validation split")
    assert text.index("final (whole validation split") < text.index("--- generated text ---")


class _FakeClock:
    """A clock that moves only when told: a step, a save or a sample takes the seconds the test gives it."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def strftime(self, fmt: str, *args) -> str:
        return time.strftime(fmt, *args)


def test_the_time_budget_counts_the_checkpoint_and_the_closing_sample(corpus, tmp_path, monkeypatch):
    """A step takes 1 s, a checkpoint 10 s and a sample 3 s (on a fake clock): the run stops early enough
    that its last checkpoint and the closing sample still end within --time-budget."""
    import llmscratch.training.distributed as dist_module
    import llmscratch.inference.generate as generate_module
    import llmscratch.training.loop as loop_module
    import llmscratch.training.tasks as tasks_module
    import llmscratch.training.train as train_module

    clock = _FakeClock()
    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(loop_module, "time", clock)
    real_gather, real_save, real_generate = (tasks_module.gather_windows, dist_module.save_checkpoint,
                                             generate_module.generate)

    def slow(real, seconds):
        def call(*args, **kwargs):
            clock.now += seconds
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(tasks_module, "gather_windows", slow(real_gather, 1.0))  # one micro-batch a step
    monkeypatch.setattr(dist_module, "save_checkpoint", slow(real_save, 10.0))
    import llmscratch.inference.engine as engine_module

    monkeypatch.setattr(engine_module, "generate_ids", slow(real_generate, 3.0))  # the closing sample's decode
    lines: list[str] = []
    start = clock.now
    run = train(tiny_config(corpus, tmp_path, steps=100, eval_interval=2, checkpoint_interval=2, sample_tokens=4,
                            time_budget=40.0, name="budget"), log=lines.append)
    text = "\n".join(lines)
    assert "stopped by time budget" in text and text.count("--- generated text ---") == 1, text
    assert clock.now - start <= 40.0, text  # the checkpoint and the sample after the last step included
    assert ckpt.load_training_state(run)["step"] >= 2


def test_the_data_preparation_says_each_phase_it_runs(corpus, tmp_path):
    lines: list[str] = []
    train(tiny_config(corpus, tmp_path, steps=1, name="fresh"), log=lines.append)
    phases = [line for line in lines if line.startswith("data: ")]
    assert [p.split(" ")[1] for p in phases] == ["reading", "training", "tokenizing"], phases
    assert str(corpus) in phases[0] and "char tokenizer" in phases[1]
    lines.clear()
    train(tiny_config(corpus, tmp_path, steps=1, name="cached"), log=lines.append)  # both caches are there now
    assert [line for line in lines if line.startswith("data: ")] == [phases[0]]


def test_the_progress_bar_shows_the_log_s_tokens_per_second(corpus, tmp_path, monkeypatch, capsys):
    """The bar's rate is the log's (tokens/s over the last --log-interval steps), not tqdm's steps/s."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run = train(tiny_config(corpus, tmp_path, steps=4, log_interval=2, name="bar", progress=True))
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    last = [r for r in RunDir(run).read_metrics() if "tokens_per_s" in r][-1]
    assert f"loss {last['train_loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s" in bar, bar
    assert "step/s" not in bar and "it/s" not in bar and "s/step" not in bar, bar


def test_a_ctrl_c_that_arrives_after_another_rank_s_stopped_the_loop_is_the_same_request(corpus, tmp_path,
                                                                                         monkeypatch, capsys):
    """Under torchrun a terminal's Ctrl-C reaches the ranks one after another: a rank may stop at another's
    request and get its own only afterwards, while it saves and closes. That one is said and absorbed: the
    run ends as stopped and saved, not with a KeyboardInterrupt in the middle of its last steps."""
    from llmscratch.training import distributed as dist_module
    from llmscratch.errors import Stopped

    agreed = []

    def any_rank(self, *flags):  # at step 3, another rank's Ctrl-C: all ranks stop
        agreed.append(flags)
        return (flags[0], flags[1] or len(agreed) == 3)

    monkeypatch.setattr(dist_module.Group, "any", any_rank)
    log, lines = _kill_self_on("stopped by Ctrl-C at step 3", signal.SIGINT)  # then this rank's own, late
    try:
        train(tiny_config(corpus, tmp_path, steps=50, checkpoint_interval=100, eval_interval=100, name="late"),
              log=log)
        ended = None
    except (Stopped, KeyboardInterrupt) as err:  # a bare KeyboardInterrupt is what this guards against
        ended = err
    assert isinstance(ended, Stopped) and ended.saved, repr(ended)
    assert ckpt.load_training_state(tmp_path / "late")["step"] == 3
    assert "Ctrl-C: the run is stopping already, its checkpoint saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_dist_timeout_is_positive_seconds_and_a_resume_may_change_it(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig.dist_timeout \(--dist-timeout\) must be positive seconds"):
        TrainConfig(dist_timeout=0)
    run = train(tiny_config(corpus, tmp_path, steps=2, name="t"))
    resumed = train(TrainConfig(resume=str(run), steps=3, dist_timeout=30.0, progress=False), given={"resume", "steps",
                                                                                                    "dist_timeout"})
    assert ckpt.load_training_state(resumed)["step"] == 3
