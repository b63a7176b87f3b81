"""Multi-process training on the CPU with gloo, over loopback: DDP, FSDP, two "nodes", failures.

Every job is a real ``python -m torch.distributed.run`` (torchrun) launch of ``llmscratch train``
through a small runner script that can record each rank's window starts (to check that the
ranks read disjoint parts of the global batch) or make one rank fail. Each result is compared
with a single-process run of the same global batch, trained in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmscratch.store import checkpoint as ckpt
from llmscratch.training import distributed as dist
from llmscratch.store import sharded
from llmscratch.cli import main as cli_main
from llmscratch.errors import ConfigError
from llmscratch.inference.generate import SamplingConfig, generate
from llmscratch.training.config import TrainConfig
from llmscratch.training.train import train

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. "
) * 12

# Runs `llmscratch` as torchrun's entry point. LLMSCRATCH_TEST_STARTS: a folder where each rank
# writes the window starts of every micro-batch; LLMSCRATCH_TEST_FAIL_RANK: that rank raises
# on its third forward pass; LLMSCRATCH_TEST_TZ: each rank's time zone, comma-separated.
RUNNER = '''
import json, os, sys, time
import llmscratch.nn.model, llmscratch.training.tasks
from llmscratch.cli import main

rank = int(os.environ.get("RANK", "0"))
zones = os.environ.get("LLMSCRATCH_TEST_TZ")
if zones:
    os.environ["TZ"] = zones.split(",")[rank]
    time.tzset()
folder = os.environ.get("LLMSCRATCH_TEST_STARTS")
if folder:
    real_gather = llmscratch.training.tasks.gather_windows
    def recording_gather(tokens, starts, context_length):
        with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(starts.tolist()) + "\\n")
        return real_gather(tokens, starts, context_length)
    llmscratch.training.tasks.gather_windows = recording_gather
if os.environ.get("LLMSCRATCH_TEST_FAIL_RANK") == str(rank):
    real_loss, calls = llmscratch.nn.model.GPT.loss, []
    def failing_loss(self, x, targets):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError(f"rank {rank} failed on purpose")
        return real_loss(self, x, targets)
    llmscratch.nn.model.GPT.loss = failing_loss
sys.exit(main())
'''

TIMEOUT = 1800  # seconds for one launch: only a hang fails a test, never a slow, shared machine


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory):
    """A corpus, a tokenizer cache shared by every run, and the runner script."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    runner = root / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    old = os.environ.get("LLMSCRATCH_CACHE")
    os.environ["LLMSCRATCH_CACHE"] = str(root / "cache")
    yield {"root": root, "corpus": corpus, "runner": runner}
    if old is None:
        os.environ.pop("LLMSCRATCH_CACHE", None)
    else:
        os.environ["LLMSCRATCH_CACHE"] = old


SETTINGS = dict(
    tokenizer="char", preset="test", steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
    eval_interval=4, eval_windows=6, log_interval=2, checkpoint_interval=4, sample_tokens=0, device="cpu",
    seed=7,
)


def single(space, name: str, **kw) -> Path:
    """The reference: one process, in this one."""
    settings = {**SETTINGS, "model": {"context_length": 16}, **kw}
    return train(TrainConfig(data=str(space["corpus"]), out_dir=str(space["root"] / "runs"), name=name,
                             progress=False, **settings), log=lambda *a: None)


def cli_args(space, name: str, **kw) -> list[str]:
    settings = {**SETTINGS, "context_length": 16, **kw}
    args = ["train", "--data", str(space["corpus"]), "--out-dir", str(space["root"] / "runs"), "--name", name,
            "--no-progress"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "LLMSCRATCH_DEVICE": "cpu", **extra}


def torchrun_command(space, args: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
                     port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port or free_port()}",
            "--rdzv-id=llmscratch-test", "--local-addr=127.0.0.1", "--monitor-interval=0.2",
            str(space["runner"]), *args]


def torchrun(space, args: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun_command(space, args, nproc), capture_output=True, text=True,
                       env=environment(**env), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model(run).state_dict()


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def records(run: Path, key: str) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r and not r.get("final")]


def recorded_starts(folder: Path, rank: int) -> list[list[int]]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def record_single_starts(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    import llmscratch.training.tasks as tasks_module

    seen: list[list[int]] = []
    real = tasks_module.gather_windows

    def recording(tokens, starts, context_length):
        seen.append(starts.tolist())
        return real(tokens, starts, context_length)

    monkeypatch.setattr(tasks_module, "gather_windows", recording)
    return seen


# =========================================================================== the pieces, in one process


def test_micro_batches_split_the_global_batch_into_disjoint_equal_parts():
    starts = torch.arange(24)  # a global batch of 24 window starts
    parts = [dist.local_micro_batches(starts, r, 3, micro=4) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2] and all(len(m) == 4 for p in parts for m in p)
    assert torch.equal(torch.cat([m for p in parts for m in p]), starts)  # each start once, in order
    assert [m.tolist() for m in dist.local_micro_batches(starts, 0, 1, micro=8)] == [
        list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_accumulation_adapts_to_the_world_size():
    # batch 16 × accumulation 4 = 64 windows a step, whatever the world size
    assert dist.micro_batch_size(16, 4, 1) == 16  # 4 micro-steps of 16
    assert dist.micro_batch_size(16, 4, 2) == 16  # 2 micro-steps of 16 on each rank
    assert dist.micro_batch_size(16, 4, 8) == 8  # 1 micro-step of 8 on each rank
    assert dist.micro_batch_size(16, 4, 2, micro_batch=4) == 4  # 8 micro-steps of 4
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        dist.micro_batch_size(16, 4, 3)
    with pytest.raises(ConfigError, match="micro-batch that divides 32"):
        dist.micro_batch_size(16, 4, 2, micro_batch=5)


def test_evaluation_batches_are_padded_to_the_same_count_on_every_rank():
    batches = [(torch.full((2, 3), i), torch.full((2, 3), i)) for i in range(3)]
    group0, group1 = dist.Group(0, 0, 2, "gloo"), dist.Group(1, 0, 2, "gloo")
    mine0, mine1 = dist.shard_batches(batches, group0), dist.shard_batches(batches, group1)
    assert len(mine0) == len(mine1) == 2
    assert [int(x[0, 0]) for x, _ in mine0] == [0, 2] and int(mine1[0][0][0, 0]) == 1
    assert (mine1[1][1] == -100).all()  # the padding batch's targets are ignored


def test_every_rank_passes_the_tokenizer_barrier_even_when_the_cache_is_already_there(tmp_path):
    """The race behind a hang on a fresh cache: rank 0 trains and saves the tokenizer, then waits
    in a barrier; a rank that only then looked at the cache used to find the tokenizer there and
    skip that barrier, so every later collective paired up wrongly."""
    import llmscratch.training.setup as setup_module

    class CountingGroup(dist.Group):
        barriers = 0

        def barrier(self) -> None:
            self.barriers += 1

    cfg = TrainConfig(tokenizer="char")
    main, other = CountingGroup(rank=0, world_size=2), CountingGroup(rank=1, world_size=2)
    made = setup_module.prepare_tokenizer(cfg, TEXT, tmp_path, main)  # rank 0 first: builds and saves
    found = setup_module.prepare_tokenizer(cfg, TEXT, tmp_path, other)  # rank 1 late: the cache is there
    again = setup_module.prepare_tokenizer(cfg, TEXT, tmp_path, main)  # a later run: rank 0 finds it too
    assert (main.barriers, other.barriers) == (2, 1)
    assert made.encode(TEXT[:40]) == found.encode(TEXT[:40]) == again.encode(TEXT[:40])


def test_a_rank_whose_machine_lacks_the_cached_tokenizer_names_the_cache_and_its_key(tmp_path, monkeypatch):
    """Rank 0 trains the tokenizer into its machine's cache; a rank on a machine with another cache
    (a different $LLMSCRATCH_CACHE, or one prepared from other inputs) finds nothing there."""
    import llmscratch.training.setup as setup_module

    class QuietGroup(dist.Group):
        def barrier(self) -> None:
            pass

    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "node1-cache"))
    cfg = TrainConfig(tokenizer="bpe", vocab_size=300)
    with pytest.raises(ConfigError) as err:
        setup_module.prepare_tokenizer(cfg, TEXT, tmp_path / "node1-cache", QuietGroup(rank=1, world_size=2))
    message = str(err.value)
    assert "rank 1 of 2 cannot find the tokenizer that rank 0 trained" in message
    assert f"$LLMSCRATCH_CACHE, here {tmp_path / 'node1-cache'}" in message
    assert all(option in message for option in ("--tokenizer", "--vocab-size", "--val-fraction", "corpus text"))


def test_the_summary_names_the_rank_that_stopped_answering_not_the_one_that_waited():
    """torchrun's failures, as run_torchrun receives them: rank 0 gave up waiting and said for whom in its
    error file; rank 1, stopped, was ended by torchrun. Without that file, a rank that outlived torchrun's
    SIGTERM (killed with SIGKILL) is named as one that had stopped answering."""
    from types import SimpleNamespace

    def failure(exitcode, facts=None, name=""):
        return SimpleNamespace(exitcode=exitcode, signal_name=lambda: name,
                               error_file_data={"message": "…", **({"llmscratch": facts} if facts else {})})

    facts = {"silent": [1], "timeout_s": 5.0, "waiting": 0, "world_size": 2}
    line = dist.summarize_failures({0: failure(2, facts), 1: failure(-9, name="SIGKILL")}, 0, 2)
    assert line.startswith("rank 1 of 2 stopped answering: rank 0 waited 5 s (--dist-timeout, default 600 s"), line
    assert "torchrun stopped rank 1" not in line and "rank 0 of 2 exited" not in line
    line = dist.summarize_failures({0: failure(-6, name="SIGABRT"), 1: failure(-9, name="SIGKILL")}, 0, 2)
    assert "rank 1 did not end when torchrun asked (SIGTERM) and was killed" in line, line
    line = dist.summarize_failures({1: failure(1), 0: failure(-15, name="SIGTERM")}, 1, 2)
    assert line == "rank 1 of 2 exited with code 1 (its error is above); torchrun stopped rank 0"


def test_optimizer_state_keys_convert_between_numbers_and_names():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                             {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}])
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    by_name = dist._names_for_ids(model, opt, saved)
    assert by_name["param_groups"][0]["params"] == ["0.weight", "1.weight"]
    back = sharded._ids_for_names(by_name)
    assert back["param_groups"] == saved["param_groups"]
    for i, s in saved["state"].items():
        assert all(torch.equal(s[k], back["state"][i][k]) for k in s)


# =========================================================================== DDP


def test_two_processes_with_accumulation_match_one_then_resume_on_one(space, monkeypatch):
    """DDP, 2 ranks, global batch 4 × 2 = 8 windows: one process runs 2 micro-batches of 4, each
    rank 2 micro-batches of 2 (``--micro-batch 2``), gradients synced on the last. After 4 of 8
    steps the weights are those of one process and the ranks read disjoint halves of every
    global batch; the checkpoint loads and generates in one process, and resuming it there
    reaches the one-process weights, step count and schedule."""
    seen = record_single_starts(monkeypatch)
    ref_half = single(space, "ref-half", grad_accum=2, stop_at=4)
    monkeypatch.undo()
    ref_full = single(space, "ref-full", grad_accum=2)
    folder = space["root"] / "starts-ddp"
    folder.mkdir()
    r = torchrun(space, cli_args(space, "ddp", grad_accum=2, micro_batch=2, stop_at=4),
                 LLMSCRATCH_TEST_STARTS=str(folder))
    run = space["root"] / "runs" / "ddp"
    assert "2 process(es)" in r.stdout and "stopped by --stop-at at step 4" in r.stdout
    assert "8 windows per step, 2 per forward pass on each process" in r.stdout
    assert_same_weights(run, ref_half)

    rank0, rank1 = recorded_starts(folder, 0), recorded_starts(folder, 1)
    assert len(seen) == len(rank0) == len(rank1) == 8  # 4 steps × 2 micro-batches
    assert all(len(s) == 4 for s in seen) and all(len(s) == 2 for s in rank0 + rank1)
    for step in range(4):  # rank 0 ran the first half of the step's global batch, rank 1 the second
        global_batch = seen[2 * step] + seen[2 * step + 1]
        assert rank0[2 * step] + rank0[2 * step + 1] == global_batch[:4]
        assert rank1[2 * step] + rank1[2 * step + 1] == global_batch[4:]

    model, tokenizer, state = ckpt.load_run(run)
    assert state["step"] == 4 and not (run / dist.SHARDED_DIR).exists()
    new = generate(model, [tokenizer.encode("And God")], SamplingConfig(max_new_tokens=8, seed=1))[0]
    assert len(new) == 8 and isinstance(tokenizer.decode(new), str)

    resumed = train(TrainConfig(resume=str(run), progress=False), log=lambda *a: None)  # one process now
    assert ckpt.load_training_state(resumed)["step"] == 8
    assert_same_weights(resumed, ref_full)
    got, want = records(resumed, "lr"), records(ref_full, "lr")  # the schedule continued
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in want])


@pytest.mark.slow
def test_two_nodes_over_a_c10d_rendezvous(space):
    """Two torchrun launchers, one process each, meeting at 127.0.0.1:PORT as two "nodes"."""
    ref = single(space, "ref-nodes", stop_at=3)
    port = free_port()
    args = cli_args(space, "nodes", stop_at=3)
    procs = [subprocess.Popen(torchrun_command(space, args, nproc=1, nnodes=2, node_rank=n, port=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
             for n in (0, 1)]
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
    assert any("2 process(es)" in out for out, _ in outputs)
    assert_same_weights(space["root"] / "runs" / "nodes", ref)


# =========================================================================== FSDP


SHARDED_BUILD = '''
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from llmscratch.training import distributed as dist
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.runtime import Runtime

group = dist.init("cpu")
cfg = GPTConfig.from_preset("test", pos_emb="alibi", tie_weights=True)
built = []

def whole():
    built.append(group.rank)
    torch.manual_seed(3)
    return GPT(cfg)

model = dist.sharded_model(group, Runtime(torch.device("cpu"), "fp32"), full=whole)
torch.manual_seed(3)
ref = GPT(cfg)  # the reference, built here after the fact
assert dist.is_sharded(model) and model.cfg == cfg
shares = [(p.to_local().numel(), p.numel()) for p in model.parameters()]
assert sum(local for local, _ in shares) < sum(whole for _, whole in shares), shares
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if group.is_main:
    for name, value in ref.state_dict().items():
        assert torch.equal(state[name], value), name
assert torch.equal(model.alibi_slopes, ref.alibi_slopes)  # a buffer, recomputed after to_empty
x = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.testing.assert_close(model(x), ref(x))
print(f"rank {group.rank}: whole model built by {built}", flush=True)
dist.cleanup(group)
'''


@pytest.mark.slow
def test_a_sharded_model_is_whole_on_rank_0_alone_and_holds_the_same_weights(tmp_path):
    """FSDP: rank 0 builds the model whole (as one process would) and sends each rank its shards;
    the other ranks build it on the meta device only, so no rank but 0 ever holds it whole."""
    script = tmp_path / "sharded_build.py"
    script.write_text(SHARDED_BUILD, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1", str(script)]
    r = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "rank 0: whole model built by [0]" in r.stdout and "rank 1: whole model built by []" in r.stdout


@pytest.mark.slow
def test_fsdp_matches_one_process_consolidates_and_resumes_on_any_world_size(space, capsys):
    """fully_shard with a float32 MixedPrecisionPolicy (tied head): the same weights as one process,
    consolidated at the end. `llmscratch export --format run` consolidates shards that never
    were; one process resumes from the shards alone; then two FSDP ranks in bf16 resume that
    one-process checkpoint, and their consolidated run loads and generates."""
    config = space["root"] / "tied.yaml"
    config.write_text("model:\n  tie_weights: true\n")
    tied = {"context_length": 16, "tie_weights": True}
    ref_4 = single(space, "ref-fsdp-4", model=tied, stop_at=4, optimizer="adamw")  # Muon needs whole matrices
    ref_6 = single(space, "ref-fsdp-6", model=tied, stop_at=6, optimizer="adamw")
    ref_8 = single(space, "ref-fsdp-8", model=tied, optimizer="adamw")
    torchrun(space, cli_args(space, "fsdp", fsdp=True, stop_at=4, config=str(config), optimizer="adamw"))
    run = space["root"] / "runs" / "fsdp"
    assert (run / dist.SHARDED_DIR / ".metadata").is_file()
    assert not sharded.latest_is_sharded(run)  # consolidated at the end
    assert_same_weights(run, ref_4)
    assert_same_weights(run / "best", ref_4)

    # As if the job had crashed after its last sharded save: only the shards are current.
    crashed = space["root"] / "runs" / "fsdp-crashed"
    shutil.copytree(run, crashed)
    (crashed / ckpt.WEIGHTS_FILE).unlink()
    (crashed / ckpt.TRAINING_STATE_FILE).unlink()
    assert sharded.latest_is_sharded(crashed)
    out = space["root"] / "runs" / "fsdp-exported"
    assert cli_main(["export", str(crashed), str(out), "--format", "run"]) == 0
    assert "consolidated the sharded checkpoint of step 4" in capsys.readouterr().out
    assert_same_weights(out, run, atol=0, rtol=0)  # the same numbers as the end-of-run consolidation
    assert ckpt.load_training_state(out)["optimizer"]["state"] and not (out / dist.SHARDED_DIR).exists()

    train(TrainConfig(resume=str(crashed), stop_at=6, progress=False), log=lambda *a: None)  # 2 ranks → 1
    assert ckpt.load_training_state(crashed)["step"] == 6
    assert_same_weights(crashed, ref_6)

    torchrun(space, ["train", "--resume", str(crashed), "--precision", "bf16", "--no-progress"])  # 1 → 2
    state = ckpt.load_training_state(crashed)
    assert state["step"] == 8 and state["optimizer"]["state"]  # consolidated, with the optimizer
    assert_same_weights(crashed, ref_8, atol=2e-2, rtol=2e-2)  # bf16 arithmetic, float32 master weights
    model, tokenizer, _ = ckpt.load_run(crashed)
    assert model.cfg.tie_weights
    new = generate(model, [tokenizer.encode("And")], SamplingConfig(max_new_tokens=5, seed=2))[0]
    assert len(new) == 5


@pytest.mark.slow
def test_ranks_with_different_clocks_write_one_run_directory(space):
    """No --name: the run is named by the date and time, which rank 0 reads and sends to the others.
    Here the two ranks live in time zones nine hours apart, so names of their own would differ and
    FSDP's shards would go to two folders."""
    out = space["root"] / "zoned"
    args = [a for a in cli_args(space, "unused", fsdp=True, optimizer="adamw", steps=2, eval_interval=2,
                                checkpoint_interval=2) if a not in ("--name", "unused")]
    args[args.index("--out-dir") + 1] = str(out)
    torchrun(space, args, LLMSCRATCH_TEST_TZ="UTC0,JST-9")
    runs = [p for p in out.iterdir() if p.name != "latest"]
    assert len(runs) == 1, runs
    assert not sharded.latest_is_sharded(runs[0]) and ckpt.load_training_state(runs[0])["step"] == 2  # consolidated


# =========================================================================== failures


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_in_the_terminal_saves_one_checkpoint_for_all_ranks_and_it_resumes(space, how):
    """`llmscratch train --nproc 2`, then Ctrl-C as a terminal sends it: SIGINT to the launcher's
    whole process group (llmscratch and torchrun; torchrun starts the ranks in sessions of their
    own and passes the signal on). Every rank stops at the same step, one checkpoint of that step
    is saved, the launcher waits for it, and one process resumes it. Or SIGTERM to the launcher
    alone (`kill`, `timeout`, a job scheduler), which it passes on to torchrun as that Ctrl-C."""
    name = how
    run = space["root"] / "runs" / name
    args = cli_args(space, name, steps=100_000, log_interval=1, eval_interval=100_000,
                    checkpoint_interval=100_000) + ["--nproc", "2"]
    log = space["root"] / f"{how}.log"
    with open(log, "w") as out:
        # torchrun's grace for the ranks to save and end after it passed the signal on: as long as the test's
        # own, so that a slow machine never turns a save into a kill
        launcher = subprocess.Popen([sys.executable, "-m", "llmscratch", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=environment(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(TIMEOUT)),
                                    start_new_session=True)
        try:
            metrics = run / "metrics.jsonl"
            deadline = time.time() + TIMEOUT
            while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
                assert launcher.poll() is None and time.time() < deadline, log.read_text()[-5000:]
                time.sleep(0.1)
            if how == "ctrl-c":
                os.killpg(launcher.pid, signal.SIGINT)
            else:
                os.kill(launcher.pid, signal.SIGTERM)
            rc = launcher.wait(timeout=TIMEOUT)
        finally:
            if launcher.poll() is None:  # a failed test must not leave a job running: torchrun stops its ranks on SIGTERM
                os.killpg(launcher.pid, signal.SIGTERM)
                launcher.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert rc == (130 if how == "ctrl-c" else 143), text[-5000:]
    # Once per rank that torchrun passed it to (a rank may have stopped at the other's request and ended
    # before its own arrived), never twice; one that arrives after its rank stopped is the same request.
    said = text.count("Ctrl-C: saving a checkpoint") + text.count("Ctrl-C: the run is stopping already")
    assert 1 <= said <= 2, text[-5000:]
    assert "interrupted" not in text and "Traceback" not in text, text[-5000:]  # no rank cut short
    assert ("waiting for the processes to save a checkpoint" if how == "ctrl-c" else
            "SIGTERM: the processes save a checkpoint and stop") in text
    step = int(re.search(r"stopped by Ctrl-C at step (\d+); checkpoint saved", text).group(1))
    state = ckpt.load_training_state(run)
    assert state["step"] == step >= 5
    model, _, _ = ckpt.load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    train(TrainConfig(resume=str(run), stop_at=step + 2, progress=False), log=lambda *a: None)
    assert ckpt.load_training_state(run)["step"] == step + 2


def test_a_failing_rank_ends_the_job_with_its_error(space):
    r = subprocess.run(torchrun_command(space, cli_args(space, "fails")), capture_output=True, text=True,
                       env=environment(LLMSCRATCH_TEST_FAIL_RANK="1"), timeout=TIMEOUT)  # a hang would time out
    assert r.returncode != 0
    assert "rank 1 failed on purpose" in r.stdout + r.stderr


def test_load_sharded_names_what_is_missing_and_where_to_resume_from(tmp_path):
    from llmscratch.errors import CheckpointError

    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        sharded.load_sharded(run)
    (run / dist.SHARDED_DIR).mkdir(parents=True)
    (run / dist.SHARDED_DIR / ".metadata").write_bytes(b"")  # the save was cut before its training state
    with pytest.raises(CheckpointError, match="interrupted") as err:
        sharded.load_sharded(run)
    assert f"the ordinary checkpoint in {run}" in str(err.value) and "{run_dir}" not in str(err.value)


def test_a_run_left_with_only_its_sharded_checkpoint_says_how_to_make_it_whole(tmp_path):
    """An --fsdp job stopped before its end leaves sharded/ only: info names the step, and loading the
    weights points at `export --format run` instead of just "model.safetensors is missing"."""
    from llmscratch.errors import CheckpointError
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.store.describe import describe_run

    run = tmp_path / "run"
    ckpt.save_model(run, GPT(GPTConfig.from_preset("test")))
    (run / dist.SHARDED_DIR).mkdir()
    ckpt.save_training_state(run / dist.SHARDED_DIR, {"step": 300, "tokens_seen": 1200, "rng": {}})
    (run / ckpt.WEIGHTS_FILE).unlink()
    info = describe_run(run)
    assert "training: step 300" in info and "--format run` makes it whole" in info
    with pytest.raises(CheckpointError, match=r"holds only a sharded checkpoint .* --format run"):
        ckpt.load_model(run)


# =========================================================================== the launcher (`--nproc`)


def launcher_command(space, args: list[str], program: list[str] | None = None) -> list[str]:
    """``llmscratch train … --nproc 2`` as a user types it, or with ``program`` run by each process instead."""
    if program is None:
        return [sys.executable, "-m", "llmscratch", *args, "--nproc", "2"]
    code = ("import sys; from llmscratch.training.distributed import launch_torchrun; "
            f"sys.exit(launch_torchrun(2, {args!r}, program={program!r}))")
    return [sys.executable, "-c", code]


def test_a_bad_option_under_nproc_is_reported_once_and_nothing_is_launched(space):
    r = subprocess.run(launcher_command(space, cli_args(space, "bad", preset="nosuch")), capture_output=True,
                       text=True, env=environment(), timeout=TIMEOUT)
    assert r.returncode == 2
    assert r.stderr.count("unknown preset 'nosuch'") == 1, r.stderr
    assert "launching" not in r.stdout


def test_a_failing_rank_under_the_launcher_is_reported_in_one_line_not_a_torchrun_traceback(space):
    r = subprocess.run(launcher_command(space, cli_args(space, "fails-launched"), program=[str(space["runner"])]),
                       capture_output=True, text=True, env=environment(LLMSCRATCH_TEST_FAIL_RANK="1"), timeout=TIMEOUT)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-5000:]  # the failed rank's own exit status (an uncaught exception)
    assert "RuntimeError: rank 1 failed on purpose" in out  # the rank's error stands
    assert "llmscratch: rank 1 of 2 exited with code 1 (its error is above); torchrun stopped rank 0" in out
    assert "ChildFailedError" not in out and "torch/distributed/run.py" not in out, out[-5000:]
    assert "failed (exitcode" not in out  # torchrun's own log line of the same fact
    assert "Setting OMP_NUM_THREADS" not in out  # the launcher chose it (this machine's cores / 2)


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ranks' environments in /proc")
def test_a_rank_that_stops_answering_is_named_in_the_summary_with_the_timeout_option(space):
    """Rank 1 is paused (SIGSTOP) mid-run: rank 0's collective times out after --dist-timeout and it says
    that rank 1 stopped answering, and so does the launcher's summary line, instead of blaming rank 0."""
    name = "paused"
    args = cli_args(space, name, steps=100_000, log_interval=1, eval_interval=100_000, checkpoint_interval=100_000,
                    dist_timeout=10)
    launcher = subprocess.Popen(launcher_command(space, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=environment(),
                                start_new_session=True)
    ranks: list[int] = []
    try:
        metrics, deadline = space["root"] / "runs" / name / "metrics.jsonl", time.time() + TIMEOUT
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        (torchrun_pid,) = _children(launcher.pid)
        ranks = _children(torchrun_pid)
        (paused,) = [pid for pid in ranks if _rank_of(pid) == 1]
        os.kill(paused, signal.SIGSTOP)
        out, _ = launcher.communicate(timeout=TIMEOUT)
    finally:
        for pid in ranks:  # a failed test must not leave a job behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0, out[-5000:]
    said = "rank 1 of 2 stopped answering: rank 0 waited 10 s (--dist-timeout, default 600 s"
    assert f"llmscratch train (rank 0 of 2): error: {said}" in out, out[-5000:]  # the waiting rank's own error
    assert f"llmscratch: {said}" in out, out[-5000:]  # the launcher's summary
    assert "rank 0 of 2 exited with code" not in out and "Traceback" not in out, out[-5000:]


def test_describe_failure_names_the_rank_the_job_size_and_the_signal():
    assert dist.describe_failure(1, 2, 1, "") == "rank 1 of 2 exited with code 1 (its error is above)"
    assert dist.describe_failure(0, 4, -9, "SIGKILL") == "rank 0 of 4 was killed by SIGKILL (out of memory?)"
    assert dist.describe_failure(3, 0, -15, "SIGTERM") == "rank 3 was killed by SIGTERM"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), zombies left out."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, …
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.parametrize("victims", ["the launcher", "the launcher and torchrun"])
def test_killing_the_launcher_outright_stops_torchrun_and_every_rank(space, victims):
    """SIGKILL cannot be caught or passed on, and torchrun starts each rank in a session of its own:
    without the parent-death signal the ranks would go on training with no one to collect them."""
    name = "killed-" + victims.replace(" ", "-")
    run = space["root"] / "runs" / name
    args = cli_args(space, name, steps=100_000, log_interval=1, eval_interval=100_000, checkpoint_interval=100_000)
    launcher = subprocess.Popen(launcher_command(space, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=environment(), start_new_session=True)
    ranks: list[int] = []
    try:
        metrics, deadline = run / "metrics.jsonl", time.time() + TIMEOUT
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        (torchrun_pid,) = _children(launcher.pid)
        ranks = _children(torchrun_pid)
        assert len(ranks) == 2
        if victims == "the launcher":
            launcher.kill()
        else:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's process group: it and torchrun
        launcher.wait(timeout=TIMEOUT)
        deadline = time.time() + TIMEOUT
        while any(_alive(pid) for pid in [torchrun_pid, *ranks]) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in [torchrun_pid, *ranks])
    finally:
        for pid in ranks:  # a failed test must not leave a job training
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("cut", ["the new folder whole", "the new folder half-written"])
def test_a_sharded_save_cut_between_its_two_renames_is_completed_on_load(tmp_path, cut):
    """save_checkpoint (FSDP) moves sharded/ aside, then the new folder into place: a kill between the
    two leaves no sharded/ at all. Loading puts the new one in place if it was whole, else the old one."""
    run = tmp_path / "run"
    ckpt.save_training_state(run / sharded.SHARDED_OLD, {"step": 4})  # the previous save, moved aside
    ckpt.save_training_state(run / sharded.SHARDED_TMP, {"step": 8})  # the new one
    if cut == "the new folder half-written":
        (run / sharded.SHARDED_TMP / ckpt.TRAINING_STATE_FILE).unlink()  # written last: not reached
    state = sharded.load_training_state(run)
    assert state["step"] == (8 if cut == "the new folder whole" else 4)
    assert (run / dist.SHARDED_DIR / ckpt.TRAINING_STATE_FILE).is_file()
