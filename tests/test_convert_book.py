"""The book's ``GPTModel`` ⇄ llmscratch, checked against ``llms_from_scratch.ch04`` itself.

Tiny book models with every parameter random (LayerNorm scale/shift included), with and
without qkv biases, are saved as the book saves them (``torch.save(model.state_dict())``),
imported through the real converter and compared logit by logit; exports are loaded back
into the book's model with its strict ``load_state_dict``.
"""

from __future__ import annotations

import pytest
import torch

ch04 = pytest.importorskip("llms_from_scratch.ch04")

from llmscratch.store.checkpoint import book_config_dict, book_to_ours, load_model, ours_to_book, save_model
from llmscratch.store.convert import export_checkpoint, import_checkpoint
from llmscratch.errors import CheckpointError  # noqa: E402
from llmscratch.nn.model import GPT, GPTConfig  # noqa: E402

# The book's config dicts (GPT_CONFIG_124M's keys), tiny.
CONFIGS = [
    dict(vocab_size=53, context_length=12, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=False),
    dict(vocab_size=53, context_length=12, emb_dim=24, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True),
    dict(vocab_size=31, context_length=7, emb_dim=10, n_heads=5, n_layers=3, drop_rate=0.0, qkv_bias=True),
    dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False),
]


def tiny_book(cfg: dict, seed: int = 0) -> "ch04.GPTModel":
    torch.manual_seed(seed)
    model = ch04.GPTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def tokens(cfg: dict, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"C{c['emb_dim']}-H{c['n_heads']}-qkv{int(c['qkv_bias'])}")
def test_book_import_matches_the_books_model(tmp_path, cfg):
    book = tiny_book(cfg)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    model, tokenizer = import_checkpoint(tmp_path / "model.pth", tmp_path / "run", heads=cfg["n_heads"],
                                         no_tokenizer=True)
    assert tokenizer is None
    assert model.cfg.qkv_bias == cfg["qkv_bias"] and not model.cfg.tie_weights
    assert model.num_parameters() == sum(p.numel() for p in book.parameters())
    idx = tokens(cfg)
    with torch.no_grad():
        expected = book(idx)
        torch.testing.assert_close(model.eval()(idx), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "run", attn_backend="explicit")(idx), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["explicit", "fused"])
def test_training_mode_dropout_matches_the_books_model_draw_for_draw(backend):
    """Dropout on the embeddings, on the attention weights and on both residual branches, as the book
    places it: with the same seed the two models drop the same units, so their outputs agree."""
    cfg = dict(vocab_size=50, context_length=12, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.3, qkv_bias=True)
    book = tiny_book(cfg).train()
    ours_cfg, state = book_to_ours(book.state_dict(), n_heads=3, drop_rate=0.3)
    ours_cfg.attn_backend = backend
    ours = GPT(ours_cfg)
    ours.load_state_dict(state, strict=False)
    ours.train()
    idx = tokens(cfg, batch=2)
    torch.manual_seed(5)
    got = ours(idx)
    torch.manual_seed(5)
    expected = book(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(ours(idx), expected, atol=1e-3)  # another seed drops other units


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"C{c['emb_dim']}-H{c['n_heads']}-qkv{int(c['qkv_bias'])}")
def test_export_back_loads_strictly_into_the_books_model(tmp_path, cfg):
    book = tiny_book(cfg, seed=2)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    import_checkpoint(tmp_path / "model.pth", tmp_path / "run", heads=cfg["n_heads"], no_tokenizer=True)
    export_checkpoint(tmp_path / "run", tmp_path / "back.pth", "book")
    again = ch04.GPTModel(cfg).eval()
    again.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    for (name, a), (_, b) in zip(book.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    idx = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(again(idx), book(idx))


@pytest.mark.parametrize("tied", [True, False])
def test_our_model_exports_to_the_book(tied):
    torch.manual_seed(4)
    cfg = GPTConfig(vocab_size=40, context_length=10, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=tied)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    book = ch04.GPTModel(book_config_dict(cfg)).eval()
    book.load_state_dict(ours_to_book(model, cfg), strict=True)
    assert torch.equal(book.trf_blocks[1].att.mask, torch.triu(torch.ones(10, 10), diagonal=1))
    idx = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), book(idx), atol=1e-5, rtol=1e-5)


def test_book_to_ours_infers_the_config():
    cfg_dict = CONFIGS[2]
    cfg, sd = book_to_ours(tiny_book(cfg_dict).state_dict(), n_heads=5, drop_rate=0.0)
    assert book_config_dict(cfg) == cfg_dict
    assert sd["blocks.0.attn.qkv.weight"].shape == (30, 10)


def test_training_checkpoint_with_model_state_dict(tmp_path):
    """The book's chapter 5 saves {"model_state_dict": ..., "optimizer_state_dict": ...}."""
    cfg = CONFIGS[0]
    book = tiny_book(cfg)
    optimizer = torch.optim.AdamW(book.parameters())
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    model, _ = import_checkpoint(tmp_path / "model_and_optimizer.pth", tmp_path / "run", heads=3, no_tokenizer=True)
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), book(idx), atol=1e-5, rtol=1e-5)


def test_heads_come_from_a_preset(tmp_path):
    preset = GPTConfig.from_preset("test")  # 32 wide, 2 layers, 4 heads, no dropout
    cfg = dict(vocab_size=11, context_length=6, emb_dim=preset.emb_dim, n_heads=preset.n_heads,
               n_layers=preset.n_layers, drop_rate=0.0, qkv_bias=False)
    book = tiny_book(cfg)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    model, _ = import_checkpoint(tmp_path / "model.pth", tmp_path / "run", preset="test", no_tokenizer=True)
    assert (model.cfg.n_heads, model.cfg.drop_rate) == (preset.n_heads, preset.drop_rate)
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), book(idx), atol=1e-5, rtol=1e-5)


def test_preset_of_another_size_is_refused(tmp_path):
    torch.save(tiny_book(CONFIGS[0]).state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="emb_dim: preset gpt2-124m has 768, the weights have 24"):
        import_checkpoint(tmp_path / "model.pth", tmp_path / "run", preset="gpt2-124m", no_tokenizer=True)


def test_heads_must_divide_the_width(tmp_path):
    torch.save(tiny_book(CONFIGS[0]).state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"n_heads=5 does not divide the embedding size emb_dim=24"):
        import_checkpoint(tmp_path / "model.pth", tmp_path / "run", heads=5, no_tokenizer=True)
    with pytest.raises(CheckpointError, match="--heads N"):
        import_checkpoint(tmp_path / "model.pth", tmp_path / "run", no_tokenizer=True)
    assert not (tmp_path / "run").exists()


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_book(CONFIGS[1]).state_dict()
    del sd["trf_blocks.1.ff.layers.2.bias"]
    sd["trf_blocks.0.att.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        book_to_ours(sd, n_heads=4)
    assert "missing keys: trf_blocks.1.ff.layers.2.bias" in str(err.value)
    assert "unexpected keys: trf_blocks.0.att.extra.weight" in str(err.value)


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        import_checkpoint(tmp_path / "list.pth", tmp_path / "run", heads=1, no_tokenizer=True)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a pickle" * 10)
    with pytest.raises(CheckpointError, match=r"garbage.pth is not a PyTorch checkpoint \(.pth/.pt state dict\) or safetensors"):
        import_checkpoint(tmp_path / "garbage.pth", tmp_path / "run", heads=1, no_tokenizer=True)


@pytest.mark.parametrize("field, value", [("pos_emb", "rope"), ("bias", False), ("scale_attn", False),
                                          ("layer_norm_eps", 1e-6), ("activation", "relu2")])
def test_export_refuses_what_the_book_cannot_represent(tmp_path, field, value):
    save_model(tmp_path / "run", GPT(GPTConfig.from_preset("test", **{field: value})))
    with pytest.raises(CheckpointError, match=field):
        export_checkpoint(tmp_path / "run", tmp_path / "model.pth", "book")
    assert not (tmp_path / "model.pth").exists()


@pytest.mark.parametrize("how", ["one Parameter", "equal copies"])
def test_a_book_model_whose_head_is_its_token_embedding_imports_tied(tmp_path, how):
    """The book ties the head by assigning tok_emb's Parameter to it (its GPT-2 loader does too); the state
    dict then holds the matrix under both names, which the import recognises."""
    cfg = CONFIGS[1]
    book = tiny_book(cfg)
    if how == "one Parameter":
        book.out_head.weight = book.tok_emb.weight
    else:
        with torch.no_grad():
            book.out_head.weight.copy_(book.tok_emb.weight)
    torch.save(book.state_dict(), tmp_path / "book.pth")
    model, _ = import_checkpoint(tmp_path / "book.pth", tmp_path / "run", heads=cfg["n_heads"], no_tokenizer=True)
    assert model.cfg.tie_weights and model.out_head.weight is model.tok_emb.weight
    from safetensors.torch import load_file

    assert "out_head.weight" not in load_file(str(tmp_path / "run" / "model.safetensors"))  # stored once
    reloaded = load_model(tmp_path / "run")
    assert reloaded.cfg.tie_weights and reloaded.num_parameters() == model.num_parameters()
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), book(idx), atol=1e-5, rtol=1e-5)
    # Exported back, the book's model gets the head as its own copy of the same values.
    export_checkpoint(tmp_path / "run", tmp_path / "again.pth", "book")
    again = ch04.GPTModel(cfg).eval()
    again.load_state_dict(torch.load(tmp_path / "again.pth", weights_only=True), strict=True)
    assert torch.equal(again.out_head.weight, book.tok_emb.weight)
