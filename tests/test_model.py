"""Tests of model.py: configuration rules, parameter counts, and what the GPT computes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llmscratch.errors import ConfigError
from llmscratch.nn.model import GPT, PRESETS, GPTConfig, KVCache
from llmscratch.nn.positions import POSITION_KINDS

BOOK_124M = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                 drop_rate=0.1, qkv_bias=False)


def make_model(pos_emb: str = "learned", seed: int = 0, **overrides) -> GPT:
    """A "test" preset GPT (vocab 256, context 32, 2 layers, 4 heads of 8) with weights of std 0.1."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("test", pos_emb=pos_emb, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def tokens(b: int, t: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)


# --------------------------------------------------------------------------- parameter counts


def meta_count(cfg: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg).num_parameters()


def test_gpt2_124m_parameter_counts():
    assert meta_count(GPTConfig.from_preset("gpt2-124m")) == 163_009_536
    assert meta_count(GPTConfig.from_preset("gpt2-124m", tie_weights=True)) == 124_412_160
    # OpenAI's GPT-2 small: qkv biases and tied weights.
    assert meta_count(GPTConfig.from_preset("gpt2-124m", qkv_bias=True, tie_weights=True)) == 124_439_808


def test_parameter_count_matches_the_books_gptmodel():
    from llms_from_scratch.ch04 import GPTModel

    for qkv_bias in (False, True):
        with torch.device("meta"):
            book = GPTModel({**BOOK_124M, "qkv_bias": qkv_bias})
        assert meta_count(GPTConfig(**BOOK_124M | {"qkv_bias": qkv_bias})) == sum(
            p.numel() for p in book.parameters()
        )


def test_parameter_count_on_a_real_model_and_without_embeddings():
    model = GPT(GPTConfig.from_preset("test"))
    cfg = model.cfg
    c, v, t, layers = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.n_layers
    per_block = (3 * c * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c) + 4 * c
    expected = v * c + t * c + layers * per_block + 2 * c + v * c
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - v * c - t * c


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(emb_dim=30, n_heads=4), "emb_dim"),
        (dict(pos_emb="xpos"), "pos_emb"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
        (dict(pos_emb="rope", emb_dim=36, n_heads=4), "pos_emb"),  # head dim 9 is odd
        (dict(attn_backend="flash"), "attn_backend"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(context_length=True), "context_length"),
        (dict(qkv_bias=1), "qkv_bias"),
        (dict(bias="no"), "bias"),
        (dict(tie_weights=None), "tie_weights"),
        (dict(scale_attn=0), "scale_attn"),
        (dict(activation="swish"), "activation"),
    ],
)
def test_config_rules_raise_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        GPTConfig.from_preset("test", **overrides)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = GPTConfig.from_preset("cpu", pos_emb="rope")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 768})


@pytest.mark.parametrize(
    "overrides, message",
    [
        # the wrong type: a config file or config.json can hold anything
        (dict(drop_rate=None), r"GPTConfig.drop_rate must be a finite number, got None \(option --dropout\)"),
        (dict(drop_rate="ten"), r"GPTConfig.drop_rate must be a finite number, got 'ten' \(option --dropout\)"),
        (dict(drop_rate=float("nan")), r"GPTConfig.drop_rate must be a finite number, got nan"),
        (dict(layer_norm_eps="abc"), r"GPTConfig.layer_norm_eps must be a finite number, got 'abc'$"),
        (dict(rope_base="x", pos_emb="rope"), r"GPTConfig.rope_base must be a finite number, got 'x'$"),
        (dict(rope_base=True), r"GPTConfig.rope_base must be a finite number, got True"),
        (dict(n_layers="4"), r"GPTConfig.n_layers must be an integer, got '4' \(option --n-layers\)"),
        (dict(pos_emb=1), r"GPTConfig.pos_emb must be a string, got 1 \(option --pos-emb\)"),
        (dict(activation=["gelu"]), r"GPTConfig.activation must be a string, got \['gelu'\]"),
        # the right type, out of range: these trained into NaN before
        (dict(layer_norm_eps=-1), r"GPTConfig.layer_norm_eps must be a small positive number such as 1e-5 .*got -1"),
        (dict(layer_norm_eps=0.0), r"GPTConfig.layer_norm_eps must be a small positive number"),
        (dict(rope_base=0, pos_emb="rope"), r"GPTConfig.rope_base must be greater than 1 .*got 0$"),
        (dict(rope_base=1.0), r"GPTConfig.rope_base must be greater than 1"),
        (dict(drop_rate=1.5), r"GPTConfig.drop_rate must be in \[0, 1\), got 1.5 \(option --dropout\)"),
        (dict(emb_dim=30, n_heads=4),
         r"GPTConfig.emb_dim \(30\) must be divisible by n_heads \(4\).*--emb-dim, --n-heads"),
    ],
)
def test_every_field_is_checked_for_type_and_range_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_preset("test", **overrides)
    with pytest.raises(ConfigError, match=message):  # config.json's way in: the same rules
        GPTConfig.from_dict({**GPTConfig.from_preset("test").to_dict(), **overrides})


def test_a_number_written_as_a_string_is_read_as_the_number():
    # YAML 1.1 (PyYAML) reads `drop_rate: 1e-1` (no dot) as the string "1e-1"; TrainConfig.from_dict accepts that too.
    cfg = GPTConfig.from_dict({**GPTConfig.from_preset("test").to_dict(), "drop_rate": "1e-1",
                               "layer_norm_eps": "1e-5", "rope_base": "5e5"})
    assert (cfg.drop_rate, cfg.layer_norm_eps, cfg.rope_base) == (0.1, 1e-5, 5e5)
    assert GPTConfig.from_preset("test", layer_norm_eps="1e-6").layer_norm_eps == 1e-6  # training's way in
    with pytest.raises(ConfigError, match="n_layers must be an integer"):  # only float fields, as TrainConfig
        GPTConfig.from_preset("test", n_layers="2")


def test_from_dict_refuses_what_is_not_a_mapping_of_field_names():
    with pytest.raises(ConfigError, match=r"a GPTConfig is a mapping of field names to values, got list \[1, 2\]"):
        GPTConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) \[1, 'foo'\]"):  # not a TypeError from sorted
        GPTConfig.from_dict({1: 2, "foo": 3})
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) \['n_embd'\]"):  # via a preset too
        GPTConfig.from_preset("test", n_embd=8)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="gpt2-124m"):
        GPTConfig.from_preset("gpt5")


def test_presets_are_small_deltas_from_the_base():
    base = GPTConfig()
    assert dataclasses.asdict(GPTConfig.from_preset("gpt2-124m")) == dataclasses.asdict(base)
    assert (base.vocab_size, base.context_length, base.emb_dim, base.n_heads, base.n_layers,
            base.drop_rate, base.qkv_bias) == tuple(BOOK_124M.values())
    for name, (dim, layers, heads) in {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
                                       "gpt2-xl": (1600, 48, 25)}.items():
        assert PRESETS[name] == dict(emb_dim=dim, n_layers=layers, n_heads=heads)
        cfg = GPTConfig.from_preset(name)
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.context_length) == (
            dim, layers, heads, 50257, 1024
        )
    assert GPTConfig.from_preset("gpt2-xl", n_layers=2).n_layers == 2  # overrides win


# --------------------------------------------------------------------------- what the model computes


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_fused_equals_explicit(pos_emb):
    fused = make_model(pos_emb, attn_backend="fused")
    explicit = make_model(pos_emb, attn_backend="explicit")
    explicit.load_state_dict(fused.state_dict())
    idx = tokens(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(fused(idx), explicit(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_later_tokens_do_not_change_earlier_logits(pos_emb):
    model = make_model(pos_emb)
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 10:] = tokens(2, 6, seed=1)
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_rows_of_a_batch_are_independent(pos_emb):
    model = make_model(pos_emb)
    idx = tokens(4, 12)
    with torch.no_grad():
        batched = model(idx)
        for row in range(4):
            torch.testing.assert_close(batched[row], model(idx[row : row + 1])[0], atol=1e-5, rtol=1e-5)


def test_learned_positions_refuse_sequences_past_the_context():
    model = make_model("learned")
    with pytest.raises(ValueError, match="context length 32"):
        model(tokens(1, 33))
    with pytest.raises(ValueError, match="position 32"):
        model(tokens(1, 4), positions=torch.tensor([29, 30, 31, 32]))


@pytest.mark.parametrize("pos_emb", ["rope", "alibi", "none"])
def test_relative_positions_past_the_context_depend_only_on_distance(pos_emb):
    """The same 30 tokens at positions 50-79, past the 32-token context, give what they give at
    0-29: RoPE and ALiBi see only distances (a position clamped or wrapped would not)."""
    model = make_model(pos_emb)
    x = tokens(1, 30)
    with torch.no_grad():
        near = model(x)  # positions 0..29
        far = model(x, positions=torch.arange(50, 80))  # (1, 30, V)
        whole = model(tokens(1, 80))  # (1, 80, V): a window longer than the context runs too
    torch.testing.assert_close(far, near, rtol=1e-4, atol=1e-4)
    assert whole.shape == (1, 80, 256) and torch.isfinite(whole).all()


def test_sinusoidal_positions_past_the_context_are_the_formula():
    from llmscratch.nn.model import INIT_STD

    model = make_model("sinusoidal").eval()
    idx = tokens(1, 80)
    captured = {}
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        model(idx)
        added = (captured["x"] - model.tok_emb(idx))[0] / INIT_STD  # (T, C): what the positions added
    dim = model.cfg.emb_dim
    for p in (31, 32, 79):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert added[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-4)
            assert added[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-4)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_need_weights_returns_one_normalised_map_per_layer(pos_emb):
    model = make_model(pos_emb)
    with torch.no_grad():
        logits, weights = model(tokens(2, 9), need_weights=True)
    assert logits.shape == (2, 9, 256)
    assert len(weights) == model.cfg.n_layers
    for w in weights:
        assert w.shape == (2, 4, 9, 9)  # (B, H, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
        assert torch.all(torch.triu(w, diagonal=1) == 0)  # nothing attends to the future


def test_relu2_feed_forward_is_the_squared_relu():
    """The relu2 MLP is fc_out(relu(fc_in(x))²), written out by hand; gelu stays GPT-2's tanh GELU."""
    relu2 = make_model(activation="relu2").blocks[0].ff
    gelu = make_model().blocks[0].ff
    gelu.load_state_dict(relu2.state_dict())
    x = torch.randn(2, 5, relu2.fc_in.in_features)
    h = x @ relu2.fc_in.weight.T + relu2.fc_in.bias
    expected = (h.clamp_min(0) ** 2) @ relu2.fc_out.weight.T + relu2.fc_out.bias
    torch.testing.assert_close(relu2(x), expected)
    gelu_expected = F.gelu(h, approximate="tanh") @ relu2.fc_out.weight.T + relu2.fc_out.bias
    torch.testing.assert_close(gelu(x), gelu_expected)
    assert not torch.allclose(relu2(x), gelu(x))


def test_relu2_model_is_causal_and_trains():
    model = make_model("rope", activation="relu2")
    idx = tokens(2, 16)
    full = model(idx)  # (B, T, V)
    torch.testing.assert_close(model(idx[:, :9]), full[:, :9])
    model.train()
    loss = model(idx, tokens(2, 16, seed=1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # The MLP is fc_out(max(0, fc_in(x))²), written here with clamp and a product.
    ff = model.blocks[0].ff
    x = torch.randn(2, 5, model.cfg.emb_dim)
    h = ff.fc_in(x).clamp(min=0)
    torch.testing.assert_close(ff(x), ff.fc_out(h * h))
    # And it learns: twenty AdamW steps on one batch take its loss well down.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    targets = tokens(2, 16, seed=1)
    first = model(idx, targets).item()
    for _ in range(20):
        optimizer.zero_grad()
        model(idx, targets).backward()
        optimizer.step()
    assert model(idx, targets).item() < first - 1.0


def test_tied_weights_are_really_shared():
    model = GPT(GPTConfig.from_preset("test", tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight
    with torch.no_grad():
        model.tok_emb.weight[3, 0] = 42.0
    assert model.out_head.weight[3, 0].item() == 42.0
    untied = GPT(GPTConfig.from_preset("test", tie_weights=False))
    assert untied.out_head.weight is not untied.tok_emb.weight
    c, v = model.cfg.emb_dim, model.cfg.vocab_size
    assert untied.num_parameters() - model.num_parameters() == v * c


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_gradient_reaches_every_parameter(pos_emb):
    model = make_model(pos_emb, drop_rate=0.1, qkv_bias=True, tie_weights=True).train()
    loss = model(tokens(2, 10), targets=tokens(2, 10, seed=1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_loss_equals_cross_entropy_and_ignores_minus_100():
    model = make_model("rope")
    idx, targets = tokens(2, 10), tokens(2, 10, seed=1)
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets=targets)
        torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)))
        masked = targets.clone()
        masked[:, :4] = -100
        expected = F.cross_entropy(logits[:, 4:].reshape(-1, 256), targets[:, 4:].reshape(-1))
        torch.testing.assert_close(model(idx, targets=masked), expected)


def test_dropout_only_in_training():
    model = make_model("learned", drop_rate=0.5)
    idx = tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx))
        model.train()
        assert not torch.allclose(model(idx), model(idx))


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_kv_cache_prefill_then_steps_equals_full_forward(pos_emb):
    model = make_model(pos_emb)
    idx = tokens(2, 12)
    cache = KVCache.for_model(model.cfg, batch=2)
    with torch.no_grad():
        full = model(idx)
        parts = [model(idx[:, :5], cache=cache)]
        for t in range(5, 12):
            parts.append(model(idx[:, t : t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    model = make_model("rope")
    cache = KVCache.for_model(model.cfg, batch=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(tokens(1, 5), cache=cache)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_left_padding_with_mask_and_positions_equals_the_row_alone(pos_emb):
    model = make_model(pos_emb)
    row = tokens(1, 5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)  # (1, 8)
    mask = torch.tensor([[False] * 3 + [True] * 5])  # (1, 8)
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])  # (1, 8)
    with torch.no_grad():
        out = model(padded, positions=positions, key_padding_mask=mask)
        torch.testing.assert_close(out[:, 3:], model(row), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_sinusoidal_positions_are_scaled_to_the_token_embeddings():
    from llmscratch.nn.model import INIT_STD
    from llmscratch.nn.positions import sinusoidal_embedding

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test", pos_emb="sinusoidal")).eval()
    idx = torch.randint(0, 256, (1, 10))
    captured = {}
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        model(idx)
    expected = model.tok_emb(idx) + INIT_STD * sinusoidal_embedding(torch.arange(10), model.cfg.emb_dim)
    torch.testing.assert_close(captured["x"], expected)
    # Neither signal swamps the other at initialisation: their sizes are within a factor of two.
    ratio = (INIT_STD * sinusoidal_embedding(torch.arange(10), 32)).std() / model.tok_emb.weight.std()
    assert 0.5 < ratio.item() < 2.0


# --------------------------------------------------------------------------- weight layout


def test_a_weight_stored_column_major_keeps_its_values_shape_and_parameter(tmp_path):
    from llmscratch.store.checkpoint import load_model, save_model
    from llmscratch.nn.model import store_weight, weight_layout

    model = make_model(tie_weights=True)
    x = tokens(2, 12)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = {shape: [layer.weight for layer in layers] for shape, layers in model.linear_layers().items()}
    head = model.out_head.weight
    assert sum(w is head for ws in groups.values() for w in ws) == 1  # the tied head once
    assert {shape for shape in groups} == {(96, 32), (32, 32), (128, 32), (32, 128), (256, 32)}
    for weights in groups.values():
        for w in weights:
            store_weight(w, "column")
    assert all(weight_layout(w) == "column" and not w.is_contiguous() for ws in groups.values() for w in ws)
    assert model.out_head.weight is head and model.tok_emb.weight is head  # still one tied parameter
    assert head.stride() == (1, 256)  # the memory holds the (32, 256) transpose row by row
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    save_model(tmp_path / "run", model)  # safetensors takes contiguous copies
    again = load_model(tmp_path / "run")
    assert all(weight_layout(layer.weight) == "row" for ls in again.linear_layers().values() for layer in ls)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k
    store_weight(head, "row")
    assert weight_layout(head) == "row" and head.is_contiguous() and torch.equal(head, state["tok_emb.weight"])


def test_store_weight_refuses_what_has_no_layout():
    from llmscratch.nn.model import store_weight

    model = make_model()
    with pytest.raises(ValueError, match="one of"):
        store_weight(model.out_head.weight, "diagonal")
    with pytest.raises(ValueError, match="only a matrix"):
        store_weight(model.final_norm.weight, "column")


# --------------------------------------------------------------------------- packed weights for decoding

packable = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
                              reason="this PyTorch build has no oneDNN weight packing")


@packable
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_what_f_linear_computes(bias):
    from llmscratch.nn.model import Linear

    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    assert layer.pack(rows=4)
    for shape in [(1, 48), (4, 48), (3, 7, 48), (200, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(48, 5).t()  # a transposed, non-contiguous input
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@packable
def test_a_packed_copy_is_used_only_while_it_is_current_and_without_gradients(monkeypatch):
    import llmscratch.nn.model as model_module
    from llmscratch.nn.model import Linear

    used = []
    real = model_module._packed_product
    monkeypatch.setattr(model_module, "_packed_product", lambda *a: used.append(1) or real(*a))
    torch.manual_seed(0)
    layer = Linear(16, 8)
    assert layer.pack()
    used.clear()  # pack() checks a product of its own
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer(x)
    assert len(used) == 1
    used.clear()
    out = layer(x)  # recording gradients: F.linear, so the weight gets its gradient
    out.sum().backward()
    assert not used and layer.weight.grad is not None
    assert layer.is_packed()
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place update (an optimizer step): the copy is stale
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not used and not layer.is_packed()
    assert layer.pack()
    used.clear()  # pack() checks a product of its own
    layer.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.zeros(8)})
    with torch.no_grad():
        assert torch.equal(layer(x), torch.zeros(2, 8))  # loaded weights, not the packed ones
    assert layer.pack()
    used.clear()  # pack() checks a product of its own
    layer.to(torch.float64)  # new memory
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64
    assert not used
    layer.to(torch.float32)
    assert layer.pack()
    used.clear()  # pack() checks a product of its own
    with torch.no_grad():  # traced by torch.compile: the plain product, which the compiler understands
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), F.linear(x, layer.weight, layer.bias))
    assert not used
    layer.unpack()
    with torch.no_grad():
        layer(x)
    assert not used and layer.packed is None


@packable
def test_a_model_with_packed_weights_copies_saves_and_names_as_before(tmp_path):
    import copy
    import io

    model = make_model(tie_weights=True)
    names = list(model.state_dict())
    x = tokens(2, 12)
    with torch.no_grad():
        before = model(x)
    layers = [layer for ls in model.linear_layers().values() for layer in ls]
    assert len(layers) == 2 * 4 + 1 and all(layer.pack(rows=2) for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == names and model.out_head.weight is model.tok_emb.weight
    twin = copy.deepcopy(model)  # oneDNN's opaque copies are not copied: they are made again by pack()
    assert all(layer.packed is None for ls in twin.linear_layers().values() for layer in ls)
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), before, rtol=1e-5, atol=1e-5)
    model.unpack_weights()
    assert all(layer.packed is None for layer in layers)


def test_pack_refuses_off_the_cpu():
    from llmscratch.nn.model import Linear

    with torch.device("meta"):
        layer = Linear(4, 4)
    assert not layer.pack() and layer.packed is None


def test_initialisation_is_gpt2_s():
    """N(0, 0.02) everywhere, residual projections N(0, 0.02/√(2·layers)) (GPT-2's paper, section 2.3),
    zero biases, LayerNorm gains of one."""
    torch.manual_seed(0)
    layers = 8
    model = GPT(GPTConfig(vocab_size=4096, context_length=64, emb_dim=256, n_layers=layers, n_heads=4,
                          bias=True, pos_emb="learned"))
    residual = 0.02 / math.sqrt(2 * layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "norm" in name:
            assert torch.all(p == 1), name
        else:
            want = residual if name.endswith(("attn.out_proj.weight", "ff.fc_out.weight")) else 0.02
            assert p.mean().abs() < 0.1 * want and p.std().item() == pytest.approx(want, rel=0.03), name
    assert sum(name.endswith(("attn.out_proj.weight", "ff.fc_out.weight")) for name, _ in model.named_parameters()) \
        == 2 * layers


def test_the_trace_hook_sees_what_attention_computes():
    """Per-head q, k, v (after RoPE), the weights and the context, layer by layer: the weights are
    those ``need_weights`` returns, softmax(q·kᵀ/√d + causal mask) of the traced q and k, and the
    context is weights·v. The inspection tools read attention through this hook."""
    import math

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0,
                    pos_emb="rope")
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (2, 7))
    seen: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        logits, weights = model(idx, need_weights=True, trace=lambda layer, name, t: seen.__setitem__((layer, name), t))
        plain = model(idx)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # tracing changes nothing
    assert sorted({name for _, name in seen}) == ["context", "k", "output", "q", "v", "weights"]
    for layer in range(cfg.n_layers):
        q, k, v = (seen[(layer, n)] for n in "qkv")
        assert q.shape == k.shape == v.shape == (2, cfg.n_heads, 7, cfg.head_dim)
        scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(seen[(layer, "weights")], torch.softmax(scores, dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen[(layer, "weights")], weights[layer])
        torch.testing.assert_close(seen[(layer, "context")], weights[layer] @ v, rtol=1e-5, atol=1e-6)
