"""Attention maps: weights of trained and imported models, PNGs, the offline HTML page, bertviz JSON."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch

from llmscratch.store.checkpoint import load_run, ours_to_book, save_run
from llmscratch.store.convert import import_checkpoint
from llmscratch.cli import main
from llmscratch.tools.inspect import (
    AttentionMaps,
    InspectError,
    attention_entropy,
    attention_html,
    attention_json,
    attention_maps,
    attention_scores,
    head_diversity,
    uniform_entropy,
    write_attention_outputs,
)
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.nn.positions import POSITION_KINDS
from llmscratch.data.tokenizer import build_tokenizer
from tiny_files import write_tiny_gpt2_files

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. </script> & <b>p</b>"
PROMPT = "And God created the heaven, and the earth"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; also checks the signature."""
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def tiny_run(tmp_path: Path, pos_emb: str = "learned", n_heads: int = 2) -> Path:
    tokenizer = build_tokenizer("char", TEXT)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("test", vocab_size=tokenizer.vocab_size, context_length=48, emb_dim=16,
                                n_heads=n_heads, n_layers=2, pos_emb=pos_emb)
    run_dir = tmp_path / f"run-{pos_emb}"
    save_run(run_dir, GPT(cfg), tokenizer)
    return run_dir


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_maps_of_a_saved_run_are_causal_distributions(tmp_path, pos_emb):
    model, tokenizer, _ = load_run(tiny_run(tmp_path, pos_emb))
    maps = attention_maps(model, tokenizer, PROMPT)
    t = len(PROMPT)
    assert maps.tokens == list(PROMPT)  # one character per token
    assert len(maps.weights) == 2
    for w in maps.weights:
        assert w.shape == (1, 2, t, t)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, t))
        assert torch.all(w.triu(diagonal=1) == 0)  # no query sees a later key


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_recomputed_scores_give_the_models_own_weights(tmp_path, pos_emb):
    model, tokenizer, _ = load_run(tiny_run(tmp_path, pos_emb))
    idx = torch.tensor([tokenizer.encode(PROMPT), tokenizer.encode(PROMPT[::-1])])  # (2, T)
    _, weights = model(idx, need_weights=True)
    scores = attention_scores(model, idx)
    for s, w in zip(scores, weights):
        assert s.shape == w.shape
        future = torch.ones(s.shape[-2:], dtype=torch.bool).triu(diagonal=1)  # (T, T)
        assert torch.isinf(s[..., future]).all() and torch.isfinite(s[..., ~future]).all()  # masked before softmax
        torch.testing.assert_close(s.softmax(-1), w, atol=1e-6, rtol=1e-5)


MODERN = {  # the modern family's options, on the test-llama preset (4 heads over 2 key/value heads)
    "gqa": dict(),
    "qk_norm, wide heads, one kv head": dict(qk_norm=True, head_size=12, n_kv_heads=1),
    "mha, rmsnorm, swiglu": dict(n_kv_heads=None),
    "gqa, alibi": dict(pos_emb="alibi"),
}


def modern_run(tmp_path: Path, **overrides) -> Path:
    tokenizer = build_tokenizer("char", TEXT)
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("test-llama", vocab_size=tokenizer.vocab_size, context_length=48, **overrides)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)  # norm scales away from 1, so QK-norm's weights count
    save_run(tmp_path / "run", model, tokenizer)
    return tmp_path / "run"


@pytest.mark.parametrize("overrides", MODERN.values(), ids=MODERN.keys())
def test_maps_and_scores_of_modern_models_have_one_map_per_query_head(tmp_path, overrides):
    model, tokenizer, _ = load_run(modern_run(tmp_path, **overrides))
    h, t = model.cfg.n_heads, len(PROMPT)
    maps = attention_maps(model, tokenizer, PROMPT)
    assert maps.n_heads == h and [w.shape for w in maps.weights] == [(1, h, t, t)] * 2
    for w in maps.weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(1, h, t))
        assert torch.all(w.triu(diagonal=1) == 0)
    idx = torch.tensor([tokenizer.encode(PROMPT), tokenizer.encode(PROMPT[::-1])])  # (2, T)
    with torch.no_grad():
        _, weights = model(idx, need_weights=True)
    for s, w in zip(attention_scores(model, idx), weights):
        assert s.shape == w.shape == (2, h, t, t)
        torch.testing.assert_close(s.softmax(-1), w, atol=1e-6, rtol=1e-5)
    # Query heads that share a key/value head still attend differently: their queries differ.
    if model.cfg.kv_heads < h:
        assert not torch.allclose(maps.weights[0][0, 0], maps.weights[0][0, 1])


def test_cli_draws_a_grouped_query_model_per_query_head(tmp_path, capsys):
    run = modern_run(tmp_path)
    out = tmp_path / "maps"
    assert main(["attention", str(run), "--prompt", "the earth", "--out", str(out), "--json", "--head", "3",
                 "--device", "cpu"]) == 0
    data = json.loads((out / "attention.json").read_text())
    assert [torch.tensor(a).shape for a in data["attention"]] == [(1, 4, 9, 9)] * 2
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "grid.png", "layer0_head3.png", "layer1_head3.png"]
    assert "9 tokens, 2 layers × 4 heads" in capsys.readouterr().out


def test_cli_names_the_prompt_the_tokenizer_cannot_encode(tmp_path, capsys):
    assert main(["attention", str(modern_run(tmp_path)), "--prompt", "the zebra", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmscratch attention: error: --prompt 'the zebra': ")
    assert "'z'" in err and "leave those characters out" in err


def test_scores_follow_the_scale_setting(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("test", vocab_size=50, emb_dim=32, n_heads=2)
    scaled = GPT(cfg)
    unscaled = GPT(GPTConfig.from_preset("test", vocab_size=50, emb_dim=32, n_heads=2, scale_attn=False))
    unscaled.load_state_dict(scaled.state_dict())
    idx = torch.randint(0, 50, (2, 10))
    a, b = attention_scores(scaled, idx)[0], attention_scores(unscaled, idx)[0]  # layer 0: the same input
    visible = torch.isfinite(a)
    torch.testing.assert_close(b[visible], a[visible] * math.sqrt(16))


def test_entropy_and_head_diversity_measures():
    t = 6
    uniform = torch.tril(torch.ones(t, t))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 2, t, t)  # (1, 2, T, T)
    assert attention_entropy(uniform) == pytest.approx(uniform_entropy(t))
    assert head_diversity(uniform) == pytest.approx(0.0, abs=1e-7)  # identical heads
    first = torch.zeros(t, t)
    first[:, 0] = 1.0  # attend to the first token
    diag = torch.eye(t)  # attend to oneself
    disjoint = torch.stack([first, diag]).unsqueeze(0)  # (1, 2, T, T)
    assert attention_entropy(disjoint) == pytest.approx(0.0, abs=1e-6)  # one-hot rows
    assert head_diversity(disjoint) == pytest.approx(1.0)  # rows 1.. never overlap: 1 bit
    assert head_diversity(uniform[:, :1]) is None  # one head has no pair


def test_png_grid_and_head_pictures(tmp_path):
    model, tokenizer, _ = load_run(tiny_run(tmp_path))
    maps = attention_maps(model, tokenizer, "the earth was void")
    written = write_attention_outputs(maps, tmp_path / "out", layers=[1], heads=[0, 1])
    names = sorted(p.name for p in written)
    assert names == ["grid.png", "layer1_head0.png", "layer1_head1.png"]
    # grid: (2.0 + 2.2 per head) × (1.4 + 2.2 per layer) inches at 100 dpi (room for the colour bar and axis names)
    assert png_size(tmp_path / "out" / "grid.png") == (round(100 * (2.0 + 2.2 * 2)), round(100 * (1.4 + 2.2 * 2)))
    side = 3.0 + 0.28 * 18
    assert png_size(tmp_path / "out" / "layer1_head0.png") == (round(100 * (side + 1.2)), round(100 * side))
    with pytest.raises(InspectError, match="layer 5 does not exist"):
        write_attention_outputs(maps, tmp_path / "bad", layers=[5])
    assert not (tmp_path / "bad").exists()  # refused before anything is created
    (tmp_path / "a_file.txt").write_text("keep me")
    with pytest.raises(InspectError, match="a_file.txt is a file; the attention maps go into a folder"):
        write_attention_outputs(maps, tmp_path / "a_file.txt")
    assert (tmp_path / "a_file.txt").read_text() == "keep me"


def check_heatmap(ax, t: int) -> None:
    """``ax`` draws one head: its cells above the diagonal (future keys) masked, drawn in the grey for masked."""
    from matplotlib.colors import to_rgba

    from llmscratch.tools.inspect import MASKED_GREY

    image = ax.images[0]
    mask = image.get_array().mask  # (T, T)
    future = torch.ones(t, t, dtype=torch.bool).triu(diagonal=1).numpy()
    assert mask.shape == (t, t) and (mask == future).all()
    assert tuple(image.cmap.get_bad()) == to_rgba(MASKED_GREY)
    assert image.cmap(0.0) != to_rgba(MASKED_GREY)  # a zero weight is not drawn as masked


def test_pictures_have_a_colour_bar_named_axes_and_grey_masked_cells(tmp_path):
    from llmscratch.tools.inspect import attention_grid_figure, attention_head_figure

    model, tokenizer, _ = load_run(tiny_run(tmp_path))
    maps = attention_maps(model, tokenizer, "the earth")
    t = len(maps.tokens)
    grid = attention_grid_figure(maps)
    heads = [ax for ax in grid.axes if ax.images]
    assert len(heads) == maps.n_layers * maps.n_heads
    colour_bars = [ax for ax in grid.axes if ax.get_ylabel() == "attention weight"]
    assert len(colour_bars) == 1 and colour_bars[0] not in heads
    assert {"key (attended to)", "query (attending)"} <= {text.get_text() for text in grid.texts}
    assert "grey: masked future keys" in grid.texts[-1].get_text()
    for ax in heads:
        check_heatmap(ax, t)
    one = attention_head_figure(maps, 1, 0)
    (head,) = [ax for ax in one.axes if ax.images]
    assert (head.get_xlabel(), head.get_ylabel()) == ("key (attended to)", "query (attending)")
    assert [ax.get_ylabel() for ax in one.axes if ax is not head] == ["attention weight"]
    check_heatmap(head, t)


def test_html_page_opens_on_the_first_layer_and_head_asked_for(tmp_path):
    model, tokenizer, _ = load_run(tiny_run(tmp_path, n_heads=4))
    maps = attention_maps(model, tokenizer, "the earth")

    def selected(page: str) -> dict:
        data = re.search(r'<script id="attention-data" type="application/json">(.*?)</script>', page, re.S).group(1)
        return json.loads(data)["selected"]

    assert selected(attention_html(maps)) == {"layer": 0, "head": 0}
    for layers, heads, expected in (([1], [3, 2], (1, 3)), (None, [2], (0, 2)), ([1], None, (1, 0))):
        out = tmp_path / f"out-{layers}-{heads}"
        write_attention_outputs(maps, out, layers=layers, heads=heads, html_page=True)
        assert selected((out / "attention.html").read_text(encoding="utf-8")) == dict(zip(("layer", "head"), expected))
    with pytest.raises(InspectError, match="layer 2 does not exist: the model has layers 0..1"):
        attention_html(maps, layer=2)


def test_a_title_with_dollar_signs_is_drawn_as_text(tmp_path):
    # `Attention of RUN on PROMPT`: matplotlib reads $…$ as mathtext, and `$\\nosuch$` does not parse
    model, tokenizer, _ = load_run(tiny_run(tmp_path))
    maps = attention_maps(model, tokenizer, "the earth")
    write_attention_outputs(maps, tmp_path / "out", layers=[0], heads=[0], title=r"Attention of a$\nosuch$b")
    assert png_size(tmp_path / "out" / "grid.png")[0] > 0


def test_long_prompts_get_subsampled_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from llmscratch.tools.inspect import _label_step

    assert _label_step(20, 24) == 1 and _label_step(48, 24) == 2 and _label_step(100, 16) == 7
    model, tokenizer, _ = load_run(tiny_run(tmp_path))
    maps = attention_maps(model, tokenizer, TEXT[:48])
    write_attention_outputs(maps, tmp_path / "long", layers=[0], heads=[0])
    assert png_size(tmp_path / "long" / "grid.png")[0] > 0


def test_html_page_is_self_contained_and_holds_every_layer_and_head(tmp_path):
    model, tokenizer, _ = load_run(tiny_run(tmp_path, "rope", n_heads=4))
    maps = attention_maps(model, tokenizer, "</script> & <b>void</b>")
    page = attention_html(maps, title="a <test>")
    for needle in ("http", "//cdn", "<link", " src=", "@import", "url("):
        assert needle not in page.lower()
    assert "<title>a &lt;test&gt;</title>" in page
    assert page.count("</script>") == 2  # the token "</script>" is escaped inside the data
    data = json.loads(re.search(r'<script id="attention-data" type="application/json">(.*?)</script>', page, re.S)
                      .group(1))
    assert data["tokens"] == maps.tokens
    assert len(data["attention"]) == 2  # every layer
    assert all(len(layer[0]) == 4 for layer in data["attention"])  # every head
    torch.testing.assert_close(torch.tensor(data["attention"][1]), maps.weights[1], atol=1e-4, rtol=0)
    assert 'id="layer"' in page and 'id="head"' in page and "mouseenter" in page


def test_json_is_bertviz_head_view_layout():
    t, h = 5, 3
    weights = [torch.softmax(torch.randn(1, h, t, t), -1) for _ in range(2)]
    maps = AttentionMaps(list("abcde"), weights)
    data = json.loads(json.dumps(attention_json(maps)))
    assert set(data) == {"tokens", "attention"}
    assert data["tokens"] == list("abcde")
    # bertviz: head_view(attention=[tensor (batch, heads, T, T) per layer], tokens=[...])
    tensors = [torch.tensor(layer) for layer in data["attention"]]
    assert [x.shape for x in tensors] == [(1, h, t, t)] * 2
    torch.testing.assert_close(tensors[0], weights[0], atol=1e-5, rtol=0)


def test_prompt_errors_say_what_to_do(tmp_path):
    model, tokenizer, _ = load_run(tiny_run(tmp_path))
    with pytest.raises(InspectError, match="empty"):
        attention_maps(model, tokenizer, "")
    with pytest.raises(InspectError, match="shorter prompt"):
        attention_maps(model, tokenizer, TEXT)  # longer than the context of 48
    with pytest.raises(InspectError, match="no tokenizer"):
        attention_maps(model, None, "the")


# --------------------------------------------------------------------------- imported models


def test_cli_on_a_model_imported_from_hugging_face(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    vocab = write_tiny_gpt2_files(hf)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=12, n_head=3, n_layer=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    import_checkpoint(hf, tmp_path / "run")
    out = tmp_path / "maps"
    code = main(["attention", str(tmp_path / "run"), "--prompt", "the heaven and the earth", "--out", str(out),
                 "--head", "2", "--html", "--json"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.html", "attention.json", "grid.png", "layer0_head2.png", "layer1_head2.png"]
    data = json.loads((out / "attention.json").read_text())
    assert "".join(data["tokens"]) == "the heaven and the earth"
    assert " the" in data["tokens"]  # the merges were applied: GPT-2 tokens, not bytes
    assert [torch.tensor(a).shape for a in data["attention"]] == [(1, 3, len(data["tokens"]), len(data["tokens"]))] * 2
    # The weights equal transformers' own attention probabilities.
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf, attn_implementation="eager").eval()
    ids = torch.tensor([load_run(tmp_path / "run")[1].encode("the heaven and the earth")])
    with torch.no_grad():
        theirs = ref(ids, output_attentions=True).attentions
    for ours, their in zip(data["attention"], theirs):
        torch.testing.assert_close(torch.tensor(ours), their, atol=1e-4, rtol=0)
    assert "grid.png" in capsys.readouterr().out


def test_model_imported_from_the_books_format(tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    vocab = write_tiny_gpt2_files(gpt2_dir, names=("encoder.json", "vocab.bpe"))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test", vocab_size=vocab, emb_dim=16, n_heads=2, qkv_bias=False))
    torch.save(ours_to_book(model, model.cfg), tmp_path / "book.pth")
    import_checkpoint(tmp_path / "book.pth", tmp_path / "run", heads=2, tokenizer_dir=gpt2_dir)
    loaded, tokenizer, _ = load_run(tmp_path / "run")
    maps = attention_maps(loaded, tokenizer, "the earth")
    expected = attention_maps(model, tokenizer, "the earth")
    assert maps.tokens == expected.tokens
    for a, b in zip(maps.weights, expected.weights):
        torch.testing.assert_close(a, b)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    run_dir = tiny_run(tmp_path)
    assert main(["attention", str(run_dir), "--prompt", "the", "--layer", "7", "--out", str(tmp_path / "x")]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
