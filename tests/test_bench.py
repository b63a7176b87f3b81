"""Tests of bench.py and `llmscratch bench`: the arithmetic, the rows and the JSON (never the timings)."""

from __future__ import annotations

import json

import pytest
import torch

from llmscratch.tools import bench
from llmscratch.cli import main
from llmscratch.nn.model import GPT, GPTConfig

CPU = torch.device("cpu")


def test_flops_per_token_is_nanogpts_formula():
    cfg = GPTConfig.from_preset("nanogpt-124m")
    n = 124_000_000
    assert bench.flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 1024 * 768


def test_matmul_params_leave_out_the_position_table_only():
    cfg = GPTConfig.from_preset("test", tie_weights=True)
    c = bench.build_contender("ours", cfg, CPU)
    model = c.model
    assert c.matmul_params == model.num_parameters() - model.pos_emb.weight.numel()


def test_book_peer_shares_the_head_when_tied():
    pytest.importorskip("llms_from_scratch")
    cfg = GPTConfig.from_preset("test", tie_weights=True)
    c = bench.build_contender("book", cfg, CPU)
    assert c.model.out_head.weight is c.model.tok_emb.weight


def test_train_rows_have_the_numbers_and_the_ratio():
    cfg = GPTConfig.from_preset("test")
    rows = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours"],
                             steps=1, repeats=1, warmup=1, log=lambda _: None)
    (row,) = rows
    assert row["model"] == "llmscratch"
    assert row["tokens_per_s"] > 0 and row["ours_over_this"] == 1.0
    assert row["mfu_measured_peak"] is None  # no GPU peak measured on the CPU
    assert torch.isfinite(torch.tensor(row["loss"]))
    assert "tokens/s" in bench.format_train(rows)


def test_train_rows_keep_every_run_and_the_median_of_them():
    cfg = GPTConfig.from_preset("test")
    rows = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours"],
                             steps=1, repeats=3, warmup=1, log=lambda _: None)
    (row,) = rows
    runs = row["step_ms_runs"]
    assert len(runs) == 3 and all(ms > 0 for ms in runs)
    assert row["step_ms"] == sorted(runs)[1]
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["step_ms"] / 1000))


def test_mfu_is_nanogpt_s_flops_per_token_times_tokens_per_second_over_the_peak(monkeypatch):
    monkeypatch.setattr(bench, "datasheet_tflops", lambda device: 2.0)  # a made-up 2 TFLOP/s "datasheet"
    cfg = GPTConfig.from_preset("test")  # learned positions: their table does no matrix product
    (row,) = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours"],
                               steps=1, repeats=1, warmup=1, log=lambda _: None)
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()  # the tied head counted once
    assert row["flops_per_token"] == 6 * n + 12 * cfg.n_layers * 16 * cfg.emb_dim  # 6·N + 12·L·T·C, T = 16
    assert row["mfu_datasheet"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 2e12)


def test_the_loss_implementation_is_named_in_the_row():
    cfg = GPTConfig.from_preset("test")
    rows = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours"],
                             steps=1, repeats=1, warmup=1, log=lambda _: None, loss_impl="plain")
    assert rows[0]["model"] == "llmscratch, plain loss" and rows[0]["loss_impl"] == "plain"
    default = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours"],
                                steps=1, repeats=1, warmup=1, log=lambda _: None)
    assert default[0]["model"] == "llmscratch" and default[0]["loss_impl"] == "chunked"


def test_peers_are_compared_with_our_model_in_their_configuration():
    """With relu2 and RoPE, which the peers lack, our model also runs as the peers do, and the
    peers' ratios use that row, so a ratio always compares identical configurations."""
    pytest.importorskip("llms_from_scratch")
    cfg = GPTConfig.from_preset("test", activation="relu2", pos_emb="rope")
    rows = bench.bench_train(cfg, CPU, batch=2, context=16, precision="fp32", names=["ours", "book"],
                             steps=1, repeats=1, warmup=1, log=lambda _: None)
    ours, same, book = rows
    assert (ours["model"], ours["same_as_peers"]) == ("llmscratch", False)
    assert same["model"].startswith("llmscratch (as the peers") and same["same_as_peers"]
    assert book["model"] == "book GPTModel"
    assert book["ours_over_this"] == pytest.approx(same["tokens_per_s"] / book["tokens_per_s"])
    assert book["eager_over_this"] == book["ours_over_this"]  # nothing compiled in this run
    assert "eager_over_this" not in ours and not ours["compiled"]
    assert ours["ours_over_this"] == pytest.approx(max(ours["tokens_per_s"], same["tokens_per_s"]) / ours["tokens_per_s"])
    assert bench.peer_config(cfg) == GPTConfig.from_preset("test")


def test_a_failing_contender_becomes_an_error_row_on_the_cpu(monkeypatch):
    """The CPU interleaves the models; one that fails to build or to run (a compiler missing,
    say) is reported in its row, and the others are still measured."""
    real = bench.build_contender

    def failing(name, cfg, device, compile=False, **kw):
        if compile:
            raise RuntimeError("no C++ compiler")
        return real(name, cfg, device, compile=compile, **kw)

    monkeypatch.setattr(bench, "build_contender", failing)
    rows = bench.bench_train(GPTConfig.from_preset("test"), CPU, batch=2, context=16, precision="fp32",
                             names=["ours"], compile=True, steps=1, repeats=1, warmup=1, log=lambda _: None)
    errors = [r for r in rows if "error" in r]
    assert [r["model"] for r in errors] == ["llmscratch (compiled)"] and "no C++ compiler" in errors[0]["error"]
    assert [r["model"] for r in rows if "error" not in r] == ["llmscratch"]
    assert "error: RuntimeError" in bench.format_train(rows)


def test_a_failing_peer_is_named_in_its_error_row_as_in_a_good_one(monkeypatch):
    real = bench._peer_decode_runner

    def failing(name, *args, **kw):
        if name == "book":
            raise ImportError("no module named llms_from_scratch")
        return real(name, *args, **kw)

    monkeypatch.setattr(bench, "_peer_decode_runner", failing)
    cfg = GPTConfig.from_preset("test")
    rows = bench.bench_decode(cfg, CPU, batches=(1,), new_tokens=2, repeats=1, modes=["cache"], peers=["book"],
                              log=lambda _: None)
    errors = [r for r in rows if "error" in r]
    assert [r["mode"] for r in errors] == [bench.DECODE_PEER_LABELS["book"]] == ["book GPTModel, no cache"]
    assert "llms_from_scratch" in errors[0]["error"]


def test_decode_rows_cover_every_mode_and_batch():
    cfg = GPTConfig.from_preset("test")
    rows = bench.bench_decode(cfg, CPU, batches=(1, 2), new_tokens=3, repeats=1, log=lambda _: None)
    modes = {(r["mode"], r["batch"]) for r in rows if "error" not in r}
    assert modes == {(f"llmscratch {m}", b) for m in ("no cache", "cache", "cache, weights laid out", "static")
                     for b in (1, 2)}
    assert all(r["first_token_ms"] is not None for r in rows)
    laid_out = [r for r in rows if r["mode"] == "llmscratch cache, weights laid out"]
    assert all(set(r["weight_layout"]) == {"96x32", "32x32", "128x32", "32x128", "256x32"} for r in laid_out)
    assert all(set(r["weight_layout"].values()) <= {"row", "column", "packed"} for r in laid_out)
    assert "first token" in bench.format_decode(rows)


def test_a_decode_mode_the_model_cannot_run_is_a_row_with_its_reason():
    cfg = GPTConfig.from_preset("test", pos_emb="alibi")  # the static cache has no ALiBi
    rows = bench.bench_decode(cfg, CPU, batches=(1,), new_tokens=3, repeats=1, modes=["cache", "static"],
                              log=lambda _: None)
    assert [r["mode"] for r in rows if "error" not in r] == ["llmscratch cache"]
    (static,) = [r for r in rows if "error" in r]
    assert static["mode"] == "llmscratch static" and "alibi" in static["error"]
    assert "alibi" in bench.format_decode(rows)


def test_cached_peers_decode_past_their_context_length():
    """200 new tokens on the cpu preset run past its 64 positions: the cached peers get a position
    table long enough (transformers used to fail with an IndexError there)."""
    pytest.importorskip("transformers")
    cfg = GPTConfig.from_preset("test", context_length=16)
    rows = bench.bench_decode(cfg, CPU, batches=(1,), new_tokens=12, prompt_len=8, repeats=1, modes=["cache"],
                              peers=["hf"], log=lambda _: None)
    hf = [r for r in rows if r["mode"].startswith("transformers")]
    assert len(hf) == 1 and "error" not in hf[0], hf


def test_decode_matches_eager_on_the_uncompiled_static_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test"))
    prompt = torch.randint(0, 256, (2, 4))
    assert bench.decode_matches_eager(model, prompt, 8, compile=False)


def test_attention_rows_name_every_variant():
    rows = bench.bench_attention(CPU, batch=1, heads=2, tokens=16, head_dim=8, repeats=1, iters=1)
    assert [r["variant"] for r in rows] == ["explicit", "fused", *bench.SDPA_BACKENDS]
    assert rows[0]["ms"] is not None and rows[1]["ms"] is not None
    assert bench.fastest_sdpa_backend(CPU, 1, 2, 16, 8, torch.float32) is None  # PyTorch's choice on CPU


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "attention", "--preset", "test", "--batch", "1", "--device", "cpu",
                 "--repeats", "1", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["environment"]["torch"] == torch.__version__
    assert record["attention"][0]["variant"] == "explicit"
    assert "fwd+bwd" in capsys.readouterr().out
    code = main(["bench", "attention", "--preset", "test", "--batch", "1", "--device", "cpu", "--precision", "bf16",
                 "--repeats", "1", "--json", str(tmp_path / "bf16.json")])
    record = json.loads((tmp_path / "bf16.json").read_text())
    assert code == 0 and record["precision"] == "bf16"
    assert {row["dtype"] for row in record["attention"]} == {"torch.bfloat16"}  # what the record says it measured
    assert "causal, bf16, fwd+bwd" in capsys.readouterr().out


@pytest.mark.parametrize("n, runs, steps, tokens", [
    ("1", "1 run", "1 step", "1 new token"),
    ("3", "3 runs", "3 steps", "3 new tokens"),
])
def test_cli_bench_counts_in_the_singular_for_one(monkeypatch, capsys, n, runs, steps, tokens):
    for measure in ("bench_train", "bench_decode", "bench_attention"):  # the headers, not the measurements
        monkeypatch.setattr(bench, measure, lambda *args, **kwargs: [])
    assert main(["bench", "all", "--preset", "test", "--device", "cpu", "--repeats", n, "--steps", n,
                 "--new-tokens", n]) == 0
    out = capsys.readouterr().out
    assert f"(median of {runs} of {steps}):" in out
    assert f"prompt 8 tokens, {tokens} (median of {runs}, timed in interleaved rounds" in out
    assert "4 heads, T 32" in out
    assert bench.count(1, "head") == "1 head" and bench.count(0, "run") == "0 runs"


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["train", "--repeats", "-2"], "--repeats must be at least 1, got -2"),
    (["train", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["train", "--context", "0"], "--context must be at least 1, got 0"),
    (["train", "--threads", "-1"], "--threads must be at least 1, got -1"),
    (["decode", "--decode-batches", "0", "1", "--new-tokens", "4"], "--decode-batches must be at least 1, got 0"),
    (["decode", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    (["decode"], "--new-tokens 200 and the 8-token prompt do not fit the 32-token context of preset test"),
])
def test_cli_bench_refuses_bad_numbers_before_measuring(argv, message, capsys):
    from llmscratch.cli import main

    assert main(["bench", *argv, "--preset", "test"]) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_refuses_a_json_path_it_cannot_write_before_measuring(tmp_path, capsys):
    from llmscratch.cli import main

    assert main(["bench", "train", "--preset", "test", "--json", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["bench", "train", "--preset", "test", "--json", str(tmp_path / "afile" / "b.json")]) == 2
    assert "does not exist (or is a file)" in capsys.readouterr().err


def _measuring_fails(monkeypatch):
    """Make every benchmark raise: a test that passes with it in place measured nothing."""
    def fail(*args, **kwargs):
        raise AssertionError("measured although the --json path cannot be written")

    for name in ("bench_attention", "bench_train", "bench_decode"):
        monkeypatch.setattr(bench, name, fail)


def test_cli_bench_refuses_a_read_only_folder_before_measuring(tmp_path, monkeypatch, capsys):
    """A folder on a read-only file system: ``os.access`` says so even to root (EROFS), which is
    what the check relies on; here it is told so, since tests cannot mount a read-only disk."""
    import os

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.realpath(path) == str(read_only.resolve()) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    _measuring_fails(monkeypatch)
    assert main(["bench", "attention", "--preset", "test", "--device", "cpu", "--json", str(read_only / "b.json")]) == 2
    err = capsys.readouterr().err
    assert f"the folder {read_only} cannot be written" in err and "read-only file system" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into a folder without write permission")
def test_cli_bench_refuses_a_folder_without_write_permission_before_measuring(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _measuring_fails(monkeypatch)
        assert main(["bench", "train", "--preset", "test", "--device", "cpu", "--json", str(locked / "b.json")]) == 2
        assert f"the folder {locked} cannot be written" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def _failing_writes(monkeypatch, tmp_path):
    """The --json file cannot be written once measuring is over (a disk that filled up meanwhile);
    the fallback copy goes to ``tmp_path / "tmp"``. Returns that folder."""
    import errno
    import tempfile

    from llmscratch import files

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_text_atomic", full_disk)
    fallback = tmp_path / "tmp"
    fallback.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback))
    return fallback


def test_cli_bench_keeps_the_results_when_the_json_cannot_be_written(tmp_path, monkeypatch, capsys):
    fallback = _failing_writes(monkeypatch, tmp_path)
    out = tmp_path / "bench.json"
    assert main(["bench", "attention", "--preset", "test", "--batch", "1", "--device", "cpu",
                 "--repeats", "1", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    (saved,) = fallback.glob("llmscratch-bench-*.json")
    assert f"could not write --json {out}: No space left on device" in err
    assert "results measured are in the tables above" in err and f"saved to {saved} instead" in err
    assert "Traceback" not in err and not out.exists()
    assert json.loads(saved.read_text())["attention"][0]["variant"] == "explicit"  # the whole record


def test_cli_bench_prints_the_table_before_a_json_write_fails(tmp_path, monkeypatch, capsys):
    _failing_writes(monkeypatch, tmp_path)
    assert main(["bench", "attention", "--preset", "test", "--batch", "1", "--device", "cpu",
                 "--repeats", "1", "--json", str(tmp_path / "bench.json")]) == 2
    captured = capsys.readouterr()
    assert "| explicit" in captured.out and "fwd+bwd" in captured.out  # the table the error points to
    assert "tables above" in captured.err


def test_cli_bench_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ("--preset", "--batch", "--context", "--precision", "--peers", "--json", "--compile", "--loss"):
        assert option in text


def test_tables_keep_their_columns_where_a_value_is_missing():
    attention = bench.format_attention([{"variant": "cudnn", "ms": None, "vs_best_sdpa": None, "error": "no kernel"},
                                        {"variant": "math", "ms": 1.5, "vs_best_sdpa": 1.0}])
    assert all(line.count("|") == 4 for line in attention.splitlines()), attention  # 3 cells in every row
    row = {"model": "llmscratch", "tokens_per_s": 10.0, "step_ms": 1.0, "mfu_measured_peak": None,
           "mfu_datasheet": 0.25, "peak_memory_gb": None}
    table = bench.format_train([row])
    assert "-%" not in table and "25.0%" in table
    assert len({line.count("|") for line in table.splitlines()}) == 1, table


# ---------------------------------------------------------------------------- decoding modern models


def _peaked_llama(seed: int = 0) -> GPT:
    """A tiny Llama-shaped GPT (``test-llama``: RMSNorm, SwiGLU, 4 query heads over 2 K/V heads) whose weights
    are spread wide enough that its greedy tokens are not decided by rounding (random init gives near-flat logits)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("test-llama"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(25.0)
    return model.eval()


def test_kv_cache_bytes_per_token_are_two_layers_kv_heads_head_dim_bytes():
    cfg = GPTConfig.from_preset("smollm2-135m")
    kv = bench.kv_cache_bytes(cfg)  # measured on the cache our KVCache allocates
    assert kv["bytes_per_token"] == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv["mha_bytes_per_token"] == 2 * 30 * 9 * 64 * 4  # a key and a value for every query head
    assert kv["fraction_of_mha"] == pytest.approx(1 / 3)
    assert bench.kv_cache_bytes(cfg, torch.bfloat16)["bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    plain = bench.kv_cache_bytes(GPTConfig.from_preset("test"))
    assert plain["bytes_per_token"] == plain["mha_bytes_per_token"] == 2 * 2 * 4 * 8 * 4


def test_decode_of_a_llama_config_runs_transformers_llama_with_our_weights():
    """The hf peer of a Llama-shaped model is transformers' LlamaForCausalLM holding our weights: the same
    greedy tokens, its tokens/s beside ours with the ratio; the book's GPT-2 blocks are skipped, with the reason."""
    pytest.importorskip("transformers")
    model = _peaked_llama()
    rows = bench.bench_decode(model.cfg, CPU, batches=(1, 2), new_tokens=5, repeats=1, modes=["cache", "static"],
                              peers=["book", "hf"], log=lambda _: None, model=model)
    for batch in (1, 2):
        at = {r["mode"]: r for r in rows if r["batch"] == batch}
        assert set(at) == {"llmscratch cache", "llmscratch static", "book GPTModel, no cache",
                           "transformers generate (LlamaForCausalLM, cache)"}
        skipped = at["book GPTModel, no cache"]
        assert "tokens_per_s" not in skipped and "SwiGLU" in skipped["skipped"] and "grouped-query" in skipped["skipped"]
        hf = at["transformers generate (LlamaForCausalLM, cache)"]
        assert hf["tokens_per_s"] > 0 and hf["same_weights"] and hf["same_tokens"], hf
        assert hf["tokens_compared_with"] == "llmscratch cache" and at["llmscratch cache"]["tokens_reference"]
        assert at["llmscratch static"]["same_tokens"]
        ours = at["llmscratch cache"]
        assert ours["over_transformers"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    table = bench.format_decode(rows, bench.kv_cache_bytes(model.cfg))
    assert "skipped: the book's GPTModel" in table and "× transformers" in table and "ref. |" in table
    measured = [line for line in table.splitlines() if line.startswith("| llmscratch") or "(LlamaForCausalLM" in line]
    assert len(measured) == 6 and {line.count("|") for line in measured} == {9}, table  # 8 cells in every row
    assert "KV cache per token (one row, float32): 256 bytes" in table and "512 bytes, 2.00 × ours" in table


def test_decode_ratios_over_transformers_are_also_taken_round_by_round():
    """Run i of every row is round i (interleaved): each round's ratio is transformers' seconds over ours,
    the same number of tokens; the table shows their median and range."""
    ours = {"mode": "llmscratch cache", "batch": 1, "tokens_per_s": 10.0, "first_token_ms": 1.0,
            "runs_s": [1.0, 4.0, 2.0], "tokens_reference": True}
    hf = {"mode": "transformers generate (LlamaForCausalLM, cache)", "batch": 1, "tokens_per_s": 5.0,
          "first_token_ms": None, "runs_s": [1.5, 5.0, 3.0], "same_tokens": True}
    other = {"mode": "llmscratch cache", "batch": 8, "tokens_per_s": 1.0, "first_token_ms": 1.0, "runs_s": [1.0]}
    bench.add_decode_ratios([ours, hf, other], (1, 8))
    assert ours["over_transformers_rounds"] == [1.5, 1.25, 1.5] and ours["over_transformers_round_median"] == 1.5
    assert ours["over_transformers"] == 2.0  # the ratio of the medians need not be the median of the ratios
    assert hf["over_transformers_rounds"] == [1.0, 1.0, 1.0]
    assert "over_transformers_rounds" not in other  # no transformers row at batch 8
    table = bench.format_decode([ours, hf, other])
    assert " 1.50 (1.25–1.50) |" in table and "by round" in table


def test_the_gpt2_peers_have_other_weights_so_their_tokens_are_not_compared():
    pytest.importorskip("transformers")
    rows = bench.bench_decode(GPTConfig.from_preset("test"), CPU, batches=(1,), new_tokens=3, repeats=1,
                              modes=["cache"], peers=["hf"], log=lambda _: None)
    hf = next(r for r in rows if r["mode"].startswith("transformers"))
    assert hf["mode"] == "transformers generate (cache)" and not hf["same_weights"] and "same_tokens" not in hf


def test_token_agreement_names_the_first_new_token_that_differs():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench.token_agreement(a, a.clone()) is None
    b = a.clone()
    b[1, 2] = 0
    b[0, 3] = 0
    assert bench.token_agreement(b, a) == 2


def test_cli_bench_decode_of_a_run_reports_the_kv_cache(tmp_path, capsys):
    """`llmscratch bench decode --run RUN_DIR`: the run's config and weights, the KV cache's bytes per token
    (ours and multi-head attention's) in the table and the JSON."""
    from llmscratch.store.checkpoint import save_model

    pytest.importorskip("transformers")
    save_model(tmp_path / "run", _peaked_llama())
    out = tmp_path / "bench.json"
    assert main(["bench", "decode", "--run", str(tmp_path / "run"), "--device", "cpu", "--new-tokens", "3",
                 "--decode-batches", "1", "--repeats", "1", "--decode-modes", "cache", "laid-out", "--peers", "hf",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"run {tmp_path / 'run'}" in printed and "KV cache per token" in printed
    record = json.loads(out.read_text())
    assert record["run"] == str(tmp_path / "run") and record["preset"] is None and record["peers"] == ["hf"]
    cfg = GPTConfig.from_preset("test-llama")
    assert record["decode_kv_cache"]["bytes_per_token"] == 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * 4
    assert record["decode_kv_cache"]["mha_bytes_per_token"] == 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4
    modes = [r["mode"] for r in record["decode"]]
    assert modes == ["llmscratch cache", "llmscratch cache, weights laid out",
                     "transformers generate (LlamaForCausalLM, cache)"]
    assert all(r["same_tokens"] for r in record["decode"][1:])  # the run's own weights, in transformers too


@pytest.mark.parametrize("argv, message", [
    (["train", "--run", "RUN"], "--run measures a run's own model decoding, not 'train'"),
    (["decode", "--run", "RUN", "--preset", "test"], "--run RUN and --preset test both name the model"),
    (["decode", "--run", "no/such/run"], "no/such/run"),
])
def test_cli_bench_refuses_run_where_it_does_not_apply(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_decode_modes_are_the_benchs():
    """The CLI lists the decode modes without importing torch; the list must be bench.DECODE_MODES."""
    from llmscratch.cli.app import build_parser

    parser = build_parser()
    bench_parser = parser._subparsers._group_actions[0].choices["bench"]
    (action,) = [a for a in bench_parser._actions if a.dest == "decode_modes"]
    assert list(action.choices) == list(bench.DECODE_MODES)
