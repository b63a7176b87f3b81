"""Hugging Face GPT-2 ⇄ llmscratch, checked against ``transformers.GPT2LMHeadModel`` itself.

Tiny random GPT-2s (odd head counts, tied and untied heads, unscaled attention) are written
with ``save_pretrained`` or in the hub's published layout, imported through the real
converter, and compared logit by logit and token by token; exports are loaded back with
``from_pretrained``. Everything is float32 on the CPU, a few seconds in all.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from llmscratch.store.checkpoint import config_from_hf, hf_config_from_ours, hf_to_ours, load_hf_model, load_model, ours_to_hf, save_hf, save_model
from llmscratch.store.convert import export_checkpoint, import_checkpoint
from llmscratch.errors import CheckpointError  # noqa: E402
from llmscratch.nn.model import GPT, GPTConfig  # noqa: E402

transformers.logging.set_verbosity_error()

# (vocab, context, width, heads, layers, tied, scaled attention)
SHAPES = [
    (61, 16, 24, 3, 2, True, True),
    (97, 32, 20, 5, 3, False, True),
    (50, 8, 16, 1, 1, True, False),
    (40, 12, 18, 3, 2, False, False),
]


def tiny_hf(vocab, ctx, dim, heads, layers, tied=True, scaled=True, seed=0, eps=1e-5) -> GPT2LMHeadModel:
    """A GPT-2 with every parameter random (biases and LayerNorms included), dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=ctx, n_embd=dim, n_head=heads, n_layer=layers,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
        scale_attn_weights=scaled, bos_token_id=vocab - 1, eos_token_id=vocab - 1, layer_norm_epsilon=eps,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def greedy(logits_fn, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Append the argmax token ``steps`` times, recomputing the whole sequence each time."""
    ids = prompt
    for _ in range(steps):
        next_id = logits_fn(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def assert_same_model(ours: GPT, ref: GPT2LMHeadModel, vocab: int, ctx: int) -> None:
    ours.eval()
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (3, ctx))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)
        prompt = idx[:, : ctx // 2]
        steps = ctx - prompt.shape[1]
        assert torch.equal(greedy(ours, prompt, steps), greedy(lambda x: ref(x).logits, prompt, steps))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[0]}-T{s[1]}-C{s[2]}-H{s[3]}-L{s[4]}"
                         f"-{'tied' if s[5] else 'untied'}-{'scaled' if s[6] else 'unscaled'}")
def test_save_pretrained_import_matches_transformers(tmp_path, shape):
    vocab, ctx, dim, heads, layers, tied, scaled = shape
    ref = tiny_hf(*shape)
    ref.save_pretrained(tmp_path / "hf")
    model, tokenizer = import_checkpoint(tmp_path / "hf", tmp_path / "run", no_tokenizer=True)
    assert tokenizer is None
    cfg = model.cfg
    sizes = (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers)
    assert sizes == (vocab, ctx, dim, heads, layers)
    assert cfg.qkv_bias and cfg.bias and cfg.tie_weights == tied and cfg.scale_attn == scaled
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert_same_model(model, ref, vocab, ctx)
    # The run directory reloads to the same model, with either attention backend.
    for backend in ("fused", "explicit"):
        assert_same_model(load_model(tmp_path / "run", attn_backend=backend), ref, vocab, ctx)


def test_layer_norm_epsilon_reaches_the_arithmetic(tmp_path):
    # 1e-2 against activations of variance ~0.04: a model that kept 1e-5 would be visibly off.
    ref = tiny_hf(50, 8, 16, 2, 2, eps=1e-2)
    ref.save_pretrained(tmp_path / "hf")
    model, _ = import_checkpoint(tmp_path / "hf", tmp_path / "run", no_tokenizer=True)
    assert model.cfg.layer_norm_eps == 1e-2
    assert_same_model(model, ref, 50, 8)
    assert_same_model(load_model(tmp_path / "run"), ref, 50, 8)


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
@pytest.mark.parametrize("tied", [True, False])
def test_hub_layout_import(tmp_path, writer, tied):
    """The hub's files: no ``transformer.`` prefix, attn.bias / attn.masked_bias buffers."""
    vocab, ctx, dim, heads, layers = 53, 16, 24, 3, 2
    ref = tiny_hf(vocab, ctx, dim, heads, layers, tied=tied, seed=3)
    hub = {}
    for key, tensor in ref.state_dict().items():
        if key == "lm_head.weight":
            if not tied:
                hub[key] = tensor.clone()
            continue
        hub[key.removeprefix("transformer.")] = tensor.clone()
    for i in range(layers):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(ctx, ctx, dtype=torch.uint8)).view(1, 1, ctx, ctx)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    directory = tmp_path / "hub"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(ref.config.to_dict()))
    if writer == "safetensors":
        save_file(hub, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(hub, directory / "pytorch_model.bin")
    model = load_hf_model(directory)
    assert_same_model(model, ref, vocab, ctx)


def test_hf_to_ours_and_back_is_exact():
    ref = tiny_hf(61, 16, 24, 3, 2, tied=False)
    hf_sd = ref.state_dict()
    cfg = config_from_hf(ref.config.to_dict())
    ours = hf_to_ours(hf_sd, cfg)
    assert ours["blocks.0.attn.qkv.weight"].shape == (72, 24)  # (3C, C): Conv1D's (C, 3C) transposed
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], hf_sd["transformer.h.1.attn.c_attn.weight"].t())
    back = ours_to_hf(ours, cfg)
    assert set(back) == set(hf_sd)
    for key, tensor in hf_sd.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("scale_attn", [True, False])
def test_export_loads_in_transformers(tmp_path, tied, qkv_bias, scale_attn):
    """Our own random model (no qkv bias → zero biases over there) → from_pretrained → same logits."""
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=71, context_length=16, emb_dim=30, n_heads=5, n_layers=2, drop_rate=0.0,
                    qkv_bias=qkv_bias, tie_weights=tied, scale_attn=scale_attn)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(tmp_path / "run", model)
    export_checkpoint(tmp_path / "run", tmp_path / "hf", "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["architectures"] == ["GPT2LMHeadModel"]
    assert saved["scale_attn_weights"] is scale_attn and saved["tie_word_embeddings"] is tied
    ref = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.tie_word_embeddings == tied
    if not qkv_bias:
        assert not ref.transformer.h[0].attn.c_attn.bias.any()
    assert_same_model(model, ref, 71, 16)


def test_import_then_export_reproduces_the_original(tmp_path):
    ref = tiny_hf(97, 32, 20, 5, 3, tied=False, seed=7)
    ref.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "run", no_tokenizer=True)
    export_checkpoint(tmp_path / "run", tmp_path / "out", "hf")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    for (name, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("field, value", [
    ("scale_attn_by_inverse_layer_idx", True),
    ("activation_function", "relu"),
    ("n_inner", 50),
    ("add_cross_attention", True),
    ("model_type", "gpt_neo"),
])
def test_unrepresentable_hf_configs_are_refused_by_name(field, value):
    hf = GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_layer=1).to_dict()
    hf[field] = value
    with pytest.raises(CheckpointError, match=field):
        config_from_hf(hf)


def test_reorder_and_upcast_attn_is_the_same_function():
    hf = GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_layer=1, reorder_and_upcast_attn=True)
    assert config_from_hf(hf.to_dict()).emb_dim == 16


def test_config_mapping_fields():
    hf = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
              resid_pdrop=0.05, layer_norm_epsilon=1e-6, scale_attn_weights=False)
    cfg = config_from_hf(hf)
    assert cfg.qkv_bias and cfg.bias and cfg.tie_weights and cfg.pos_emb == "learned"
    assert (cfg.drop_rate, cfg.layer_norm_eps, cfg.scale_attn) == (0.05, 1e-6, False)
    back = hf_config_from_ours(cfg)
    assert {k: back[k] for k in hf} == {**hf}
    assert back["eos_token_id"] == 50256


@pytest.mark.parametrize("field, value", [("pos_emb", "rope"), ("pos_emb", "alibi"), ("pos_emb", "sinusoidal"),
                                          ("pos_emb", "none"), ("bias", False), ("activation", "relu2")])
def test_export_refuses_what_gpt2_cannot_represent(tmp_path, field, value):
    cfg = GPTConfig.from_preset("test", **{field: value})
    save_model(tmp_path / "run", GPT(cfg))
    with pytest.raises(CheckpointError, match=field):
        export_checkpoint(tmp_path / "run", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_of_the_default_preset_names_every_reason_at_once(tmp_path):
    """The cpu preset has RoPE and a squared-ReLU MLP: both are named, so one retraining suffices."""
    save_model(tmp_path / "run", GPT(GPTConfig.from_preset("cpu")))
    for out, fmt, what in ((tmp_path / "hf", "hf", "GPT-2's format"), (tmp_path / "b.pth", "book", "the book's format")):
        with pytest.raises(CheckpointError, match=rf"cannot export to {what}: pos_emb='rope' .*; activation='relu2'"):
            export_checkpoint(tmp_path / "run", out, fmt)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    ref = tiny_hf(61, 16, 24, 3, 2)
    ref.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["n_embd"] = 30
    config["n_layer"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_hf_model(tmp_path / "hf")
    message = str(err.value)
    assert "missing keys: transformer.h.2." in message
    assert "shape mismatches: transformer.wte.weight (expected (61, 30), found (61, 24))" in message


def test_non_zero_qkv_bias_cannot_be_dropped():
    ref = tiny_hf(50, 8, 16, 2, 1)
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=False,
                    tie_weights=True)
    with pytest.raises(CheckpointError, match="c_attn.bias"):
        hf_to_ours(ref.state_dict(), cfg)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2Config(n_layer=1).to_dict()))
    with pytest.raises(CheckpointError, match="model.safetensors.*pytorch_model.bin"):
        load_hf_model(tmp_path)


def test_save_hf_layout_matches_save_pretrained(tmp_path):
    ref = tiny_hf(61, 16, 24, 3, 2, tied=True)
    model = load_hf_model(_saved(ref, tmp_path / "hf"))
    save_hf(model, tmp_path / "ours")
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "hf" / "model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():  # a transposed square Conv1D (c_proj is C × C) shows only here
        assert mine[name].dtype == tensor.dtype and mine[name].shape == tensor.shape, name
        assert torch.equal(mine[name], tensor), name


def _saved(model: GPT2LMHeadModel, directory):
    model.save_pretrained(directory)
    return directory


def test_init_from_a_hugging_face_directory_starts_from_its_weights(tmp_path):
    """``--init-from`` takes a directory as transformers saves it (load_pretrained's GPT-2 branch)."""
    from llmscratch.store.convert import load_pretrained

    ref = tiny_hf(61, 16, 24, 3, 2, tied=True).eval()
    model = load_pretrained(_saved(ref, tmp_path / "hf"))
    assert isinstance(model, GPT) and model.cfg.vocab_size == 61 and model.cfg.n_layers == 2
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), ref(idx).logits, rtol=1e-4, atol=1e-4)


def test_a_model_without_qkv_biases_comes_back_without_them(tmp_path):
    """GPT-2's format always stores q, k, v biases, so the export writes zeros; the import recognises them."""
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=71, context_length=16, emb_dim=30, n_heads=5, n_layers=2, drop_rate=0.0,
                    qkv_bias=False, tie_weights=False)
    model = GPT(cfg).eval()
    save_model(tmp_path / "run", model)
    export_checkpoint(tmp_path / "run", tmp_path / "hf", "hf")
    back, _ = import_checkpoint(tmp_path / "hf", tmp_path / "back", no_tokenizer=True)
    assert not back.cfg.qkv_bias and back.cfg == load_model(tmp_path / "back").cfg
    assert json.loads((tmp_path / "back" / "config.json").read_text())["qkv_bias"] is False
    assert set(back.state_dict()) == set(model.state_dict())  # no attn.qkv.bias
    assert back.num_parameters() == model.num_parameters()
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    # A GPT-2 whose q, k, v biases are not all zero keeps them.
    ref = tiny_hf(50, 8, 16, 2, 2)
    ref.save_pretrained(tmp_path / "hf2")
    assert import_checkpoint(tmp_path / "hf2", tmp_path / "back2", no_tokenizer=True)[0].cfg.qkv_bias
