"""LoRA (nn/lora.py) against the book's ``llms_from_scratch.appendix_e`` and Hugging Face PEFT.

The adapters are given the same ``A`` and ``B`` as the reference's and the outputs compared:
a layer against the book's ``LinearWithLoRA``, a whole model against the book's ``GPTModel``
with ``replace_linear_with_lora`` (scaling ``alpha``, the book's), tiny GPT-2 and Llama models
against PEFT's ``get_peft_model`` (scaling ``alpha/rank``, PEFT's). Then the properties:
``B = 0`` changes nothing, merged weights give the adapters' logits, training moves the
adapters and leaves every base weight bit-identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmscratch.errors import CheckpointError, ConfigError
from llmscratch.nn.lora import (
    DEFAULT_TARGETS, TARGETS, LoRAAdapter, LoRAConfig, LoRALinear, add_lora, has_lora, load_lora_state_dict,
    lora_layers, lora_state_dict, merge_lora,
)
from llmscratch.nn.model import GPT, Linear
from tiny_files import varied_gpt

ALL_GPT2 = ("qkv", "out", "mlp_in", "mlp_out")
ALL_LLAMA = ("query", "key", "value", "out", "gate", "up", "mlp_out")


def randomize_b(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give every adapter a non-zero B (a fresh one is zero, and would hide any mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for adapter in layer.lora.values():
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * std)


def ids(vocab: int, shape=(2, 12), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the book's appendix E

appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")


def test_a_fresh_adapter_draws_the_books_A_and_B():
    torch.manual_seed(7)
    book = appendix_e.LoRALayer(24, 40, rank=4, alpha=8)
    torch.manual_seed(7)
    ours = LoRAAdapter(24, 0, 40, rank=4, scale=8.0)
    assert torch.equal(ours.A, book.A) and torch.equal(ours.B, book.B) and not ours.B.any()
    assert ours.A.abs().max() <= 1 / 4 ** 0.5  # kaiming_uniform_(a=√5) over (in, r): U(±1/√r)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_the_books_linear_with_lora(bias):
    torch.manual_seed(0)
    base = Linear(24, 40, bias=bias)
    book = appendix_e.LinearWithLoRA(base, rank=4, alpha=8)
    with torch.no_grad():
        book.lora.B.normal_()
    ours = LoRALinear(base)
    ours.lora["mlp_in"] = LoRAAdapter(24, 0, 40, rank=4, scale=LoRAConfig(4, 8, scaling="alpha").scale)
    with torch.no_grad():
        ours.lora["mlp_in"].A.copy_(book.lora.A)
        ours.lora["mlp_in"].B.copy_(book.lora.B)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), book(x), atol=1e-6, rtol=1e-6)
    assert ours.weight is base.weight  # the base is shared, not copied


def test_whole_model_equals_the_books_gpt_with_lora():
    """The book's GPTModel after ``replace_linear_with_lora`` (every Linear, the head included) against
    ours with adapters on q, k, v, out, mlp_in, mlp_out and the book's scaling. The book's head
    adapter keeps B = 0, so it adds nothing; ours has no head adapter."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    from llmscratch.store.checkpoint import book_to_ours

    cfg = dict(vocab_size=53, context_length=12, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(0)
    book = ch04.GPTModel(cfg).eval()
    ours_cfg, sd = book_to_ours(book.state_dict(), n_heads=3, drop_rate=0.0)
    ours = GPT(ours_cfg).eval()
    ours.load_state_dict(sd, strict=False)
    appendix_e.replace_linear_with_lora(book, rank=4, alpha=2)
    add_lora(ours, rank=4, alpha=2, targets=("query", "key", "value", "out", "mlp_in", "mlp_out"), scaling="alpha")
    randomize_b(ours)
    theirs = {"query": "att.W_query", "key": "att.W_key", "value": "att.W_value", "out": "att.out_proj",
              "mlp_in": "ff.layers.0", "mlp_out": "ff.layers.2"}
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            for target, path in theirs.items():
                mine = block.get_submodule(TARGETS[target]).lora[target]
                lora = book.trf_blocks[i].get_submodule(path).lora
                mine.A.copy_(lora.A)
                lora.B.copy_(mine.B)
    x = ids(53)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("overrides", [{}, dict(activation="swiglu", norm="rmsnorm", pos_emb="rope", n_kv_heads=2)],
                         ids=["gpt2", "llama"])
def test_zero_B_changes_nothing_and_merging_gives_the_adapters_logits(overrides):
    model = varied_gpt(**overrides)
    targets = ALL_LLAMA if overrides else ALL_GPT2
    x = ids(model.cfg.vocab_size)
    with torch.no_grad():
        before = model(x)
        names = {k: v.clone() for k, v in model.state_dict().items()}
        info = add_lora(model, rank=3, alpha=6, targets=targets)
        assert torch.equal(model(x), before)  # B = 0
        randomize_b(model)
        adapted = model(x)
        assert not torch.allclose(adapted, before, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, atol=2e-5, rtol=2e-5)
    assert not has_lora(model) and set(model.state_dict()) == set(names)
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, Linear))
    assert all(p.requires_grad for p in model.parameters())
    assert info.adapters == len(targets) * model.cfg.n_layers


def test_query_adapter_changes_only_the_query_rows():
    model = varied_gpt(n_kv_heads=2)
    add_lora(model, rank=2, alpha=2, targets=("query",))
    randomize_b(model)
    layer = model.blocks[0].attn.qkv
    x = torch.randn(2, 5, model.cfg.emb_dim)
    with torch.no_grad():
        delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)  # (2, 5, q + 2·kv)
    q = model.cfg.n_heads * model.cfg.head_dim
    assert delta[..., :q].abs().max() > 1e-3 and not delta[..., q:].any()


def test_counts_and_freezing():
    model = varied_gpt()
    total_before = model.num_parameters()
    info = add_lora(model, rank=4, alpha=8)
    c = model.cfg
    per_layer = 2 * 4 * (c.emb_dim + c.emb_dim)  # query and value: r·(in + rows) each
    assert info.trainable == per_layer * c.n_layers == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.total == total_before + info.trainable
    assert info.config.targets == DEFAULT_TARGETS == ("query", "value")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and all(".lora." in n for n in trainable)
    assert "trainable" in str(info)


def test_scalings():
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0  # PEFT, the LoRA paper
    assert LoRAConfig(rank=8, alpha=16, scaling="alpha").scale == 16.0  # the book


@pytest.mark.parametrize("kwargs, named", [
    (dict(rank=0, alpha=1), "--lora-rank"), (dict(rank=2, alpha=0), "--lora-alpha"),
    (dict(rank=2, alpha=1, dropout=1.0), "--lora-dropout"), (dict(rank=2, alpha=1, targets=("q",)), "'q'"),
    (dict(rank=2, alpha=1, targets=("qkv", "value")), "overlap"), (dict(rank=2, alpha=1, targets=()), "target"),
    (dict(rank=2, alpha=1, scaling="sqrt"), "--lora-scaling"),
])
def test_bad_configs_are_refused_by_name(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        LoRAConfig(**kwargs)


def test_swiglu_halves_need_a_swiglu_model_and_adapters_are_not_stacked():
    with pytest.raises(ConfigError, match="SwiGLU"):
        add_lora(varied_gpt(), rank=2, alpha=2, targets=("gate",))
    model = varied_gpt()
    add_lora(model, rank=2, alpha=2)
    with pytest.raises(ConfigError, match="already"):
        add_lora(model, rank=2, alpha=2)


def test_targets_given_as_one_string():
    assert LoRAConfig(rank=2, alpha=2, targets="query, key").targets == ("query", "key")


def test_state_dict_round_trip_and_mismatch():
    model = varied_gpt()
    add_lora(model, rank=2, alpha=4, targets=("query", "mlp_out"))
    randomize_b(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert set(sd) == {f"blocks.{i}.{p}" for i in range(2) for p in
                       ("attn.qkv.lora.query.A", "attn.qkv.lora.query.B", "ff.fc_out.lora.mlp_out.A",
                        "ff.fc_out.lora.mlp_out.B")}
    other = varied_gpt(seed=5)
    add_lora(other, rank=2, alpha=4, targets=("query", "mlp_out"))
    load_lora_state_dict(other, sd)
    assert all(torch.equal(v, lora_state_dict(other)[k]) for k, v in sd.items())
    wrong = varied_gpt()
    add_lora(wrong, rank=3, alpha=4, targets=("query", "mlp_out"))
    with pytest.raises(CheckpointError, match="shape"):
        load_lora_state_dict(wrong, sd)


# ----------------------------------------------------------------------------- Hugging Face PEFT

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _copy_to_peft(ours: GPT, peft_model, names: dict[str, str], layer_path: str) -> None:
    """PEFT keeps ``lora_A.weight (r, in)`` and ``lora_B.weight (out, r)``: ours transposed."""
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            for target, theirs in names.items():
                mine = block.get_submodule(TARGETS[target]).lora[target]
                module = modules[layer_path.format(i=i, name=theirs)]
                module.lora_A["default"].weight.copy_(mine.A.t())
                module.lora_B["default"].weight.copy_(mine.B.t())


@pytest.mark.slow
def test_gpt2_with_adapters_equals_peft(tmp_path):
    """GPT-2's c_attn is fused as our qkv: PEFT's one adapter on it is our target ``qkv``."""
    from llmscratch.store.checkpoint import save_hf

    model = varied_gpt(seed=2, qkv_bias=True)
    save_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True)
    hf = peft.get_peft_model(hf, config).eval()
    add_lora(model, rank=4, alpha=8, targets=ALL_GPT2)
    randomize_b(model, std=0.5)
    names = {"qkv": "attn.c_attn", "out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
    _copy_to_peft(model, hf, names, "base_model.model.transformer.h.{i}.{name}")
    x = ids(model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()(x).logits
        theirs = hf(x).logits
        assert (theirs - base).abs().max() > 1e-2  # the adapters do something
        torch.testing.assert_close(model(x), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ALL_LLAMA], ids=["default", "all"])
def test_llama_with_per_projection_adapters_equals_peft(tmp_path, targets):
    """A Llama keeps q_proj, k_proj, v_proj (and gate_proj, up_proj) apart; our adapters on the
    query, key, value, gate and up rows of the fused layers compute what PEFT's adapters on them do."""
    from llmscratch.store.convert import load_hf_any

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    ours = load_hf_any(tmp_path)
    names = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
             "out": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "mlp_out": "mlp.down_proj"}
    names = {t: names[t] for t in targets}
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=[n.split(".")[1] for n in names.values()]))
    add_lora(ours, rank=4, alpha=16, targets=targets)
    randomize_b(ours, std=0.3)
    _copy_to_peft(ours, peft_model, names, "base_model.model.model.layers.{i}.{name}")
    x = ids(300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model.eval()(x).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- training, saving, export

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And God said, Let there be light: and there was light. ") * 12


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(corpus, out, **kw):
    from llmscratch.training.config import TrainConfig

    base = dict(data=str(corpus), tokenizer="char", preset="test", model={"context_length": 16}, steps=4,
                batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=2, eval_windows=2, log_interval=2,
                checkpoint_interval=2, sample_tokens=0, device="cpu", progress=False, out_dir=str(out), seed=7)
    if "init_from" in kw or "resume" in kw:  # the model and tokenizer come from the run
        for name in ("tokenizer", "preset", "model"):
            base.pop(name)
    return TrainConfig(**{**base, **kw})


@pytest.fixture()
def base_run(corpus, tmp_path):
    from llmscratch.training.train import train

    return train(tiny_config(corpus, tmp_path, name="base"), log=lambda m: None)


def test_lora_training_moves_only_the_adapters_and_saves_them_with_the_base_reference(corpus, tmp_path, base_run):
    from safetensors.torch import load_file

    from llmscratch.store.checkpoint import load_model
    from llmscratch.training.train import train

    lines = []
    run = train(tiny_config(corpus, tmp_path, name="lora", init_from=str(base_run), lora_rank=2,
                            lora_targets="query,value,mlp_out"), log=lines.append)
    said = "\n".join(lines)
    assert "trainable of" in said and "AdamW on the adapters" in said and "peak memory:" in said
    saved = load_file(str(run / "model.safetensors"))
    assert saved and all(".lora." in k for k in saved)  # the adapters alone
    assert json.loads((run / "adapter.json").read_text())["base_run"] == str(base_run.resolve())
    base, adapted = load_model(base_run), load_model(run)
    assert has_lora(adapted) and not has_lora(base)
    base_sd = base.state_dict()
    for name, tensor in adapted.state_dict().items():
        if ".lora." in name:
            continue
        assert torch.equal(tensor, base_sd[name]), name  # bit-identical: frozen, and no weight decay on it
    assert any(v.abs().max() > 0 for k, v in saved.items() if k.endswith(".B"))  # B left zero: it trained
    assert (run / "best" / "adapter.json").is_file()


def test_the_optimizer_of_a_lora_model_is_adamw_over_the_adapters_alone():
    from llmscratch.training.config import TrainConfig
    from llmscratch.training.step import build_optimizer

    model = varied_gpt()
    add_lora(model, rank=2, alpha=2)
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    handed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert handed == {id(p) for p in model.parameters() if p.requires_grad} and len(handed) == 4 * model.cfg.n_layers


def json_of(path):
    return json.loads(path.read_text())


def test_lora_resume_is_bit_exact(corpus, tmp_path, base_run):
    from llmscratch.store.checkpoint import load_model
    from llmscratch.training.train import train

    quiet = dict(log=lambda m: None)
    whole = train(tiny_config(corpus, tmp_path, name="whole", init_from=str(base_run), lora_rank=2), **quiet)
    half = train(tiny_config(corpus, tmp_path, name="half", init_from=str(base_run), lora_rank=2, stop_at=2), **quiet)
    train(tiny_config(corpus, tmp_path, resume=str(half), out_dir=str(tmp_path)), **quiet)
    a, b = lora_state_dict(load_model(whole)), lora_state_dict(load_model(half))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_options_are_checked(corpus, tmp_path, base_run):
    from llmscratch.training.train import train

    with pytest.raises(ConfigError, match="--init-from"):
        tiny_config(corpus, tmp_path, lora_rank=2)
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        tiny_config(corpus, tmp_path, init_from=str(base_run), lora_rank=2, lora_targets="query,wq")
    with pytest.raises(ConfigError, match="lora_rank"):
        tiny_config(corpus, tmp_path, init_from=str(base_run), lora_rank=-1)
    run = train(tiny_config(corpus, tmp_path, name="a", init_from=str(base_run), lora_rank=2, steps=1),
                log=lambda m: None)
    with pytest.raises(ConfigError, match="holds LoRA adapters already"):
        train(tiny_config(corpus, tmp_path, name="b", init_from=str(run), lora_rank=2, steps=1), log=lambda m: None)


def test_adapter_save_and_load_round_trip(tmp_path):
    from llmscratch.store.checkpoint import load_model, save_model
    from llmscratch.store.lora import save_adapter

    base = varied_gpt()
    save_model(tmp_path / "base", base)
    add_lora(base, rank=3, alpha=5, dropout=0.1, targets=("key", "out"), scaling="alpha")
    randomize_b(base)
    save_adapter(base, tmp_path / "adapter", tmp_path / "base")
    assert json_of(tmp_path / "adapter" / "adapter.json")["lora"] == {
        "rank": 3, "alpha": 5, "dropout": 0.1, "targets": ["key", "out"], "scaling": "alpha"}
    again = load_model(tmp_path / "adapter")
    x = ids(base.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(x), base.eval()(x))
    # the base moved along with the adapter (the runs folder renamed): found by the relative path
    (tmp_path / "runs").mkdir()
    (tmp_path / "base").rename(tmp_path / "runs" / "base")
    (tmp_path / "adapter").rename(tmp_path / "runs" / "adapter")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "runs" / "adapter")(x), base(x))
    (tmp_path / "runs" / "base").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="not there"):
        load_model(tmp_path / "runs" / "adapter")


@pytest.mark.parametrize("fmt", ["run", "hf"])
def test_export_merge_gives_the_adapted_logits(tmp_path, fmt):
    from llmscratch.store.checkpoint import load_model, save_model
    from llmscratch.store.convert import export_checkpoint, load_pretrained
    from llmscratch.store.lora import save_adapter

    base = varied_gpt()
    save_model(tmp_path / "base", base)
    add_lora(base, rank=2, alpha=4, targets=("qkv", "mlp_in"))
    randomize_b(base)
    save_adapter(base, tmp_path / "adapter", tmp_path / "base")
    with pytest.raises(CheckpointError, match="--merge"):
        export_checkpoint(tmp_path / "adapter", tmp_path / "out", fmt)
    export_checkpoint(tmp_path / "adapter", tmp_path / "out", fmt, merge=True)
    merged = load_pretrained(tmp_path / "out")
    assert not has_lora(merged)
    x = ids(base.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), base.eval()(x), atol=2e-5, rtol=2e-5)
        assert not torch.allclose(merged(x), load_model(tmp_path / "base")(x), atol=1e-3)


@pytest.mark.slow
def test_lora_end_to_end_on_the_command_line(corpus, tmp_path, base_run, capsys):
    """train --init-from --lora-rank, then generate, info, eval --task and export --merge on the LoRA run."""
    from llmscratch.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--init-from", str(base_run), "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets",
                 "query,key,value,out,mlp_in,mlp_out", "--data", str(corpus), "--steps", "3", "--batch-size", "4",
                 "--device", "cpu", "--out-dir", str(out), "--name", "lora", "--no-progress",
                 "--sample-tokens", "0"]) == 0
    said = capsys.readouterr().out
    assert "trainable of" in said and "peak memory:" in said
    run = out / "lora"
    assert main(["generate", str(run), "--prompt", "And God", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("And God")
    assert main(["info", str(run)]) == 0
    assert "LoRA adapters: rank 4" in capsys.readouterr().out
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "And God said", "endings": ["light", "void"], "label": 0})
                    + "\n", encoding="utf-8")
    assert main(["eval", str(run), "--task", str(task)]) == 0
    assert "acc_norm" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "plain"), "--format", "run"]) == 2
    assert "--merge" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "plain"), "--format", "run", "--merge"]) == 0
    from llmscratch.store.checkpoint import load_model

    merged, adapted = load_model(tmp_path / "plain"), load_model(run)
    x = ids(merged.cfg.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=2e-5, rtol=2e-5)
