"""The Llama family (Llama, Qwen2, Qwen3) against Hugging Face transformers, on tiny random models.

Each model is made by transformers, saved with ``save_pretrained`` and imported through our
real converter; logits, exports and greedy generation are compared with transformers' own.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmscratch.errors import CheckpointError  # noqa: E402
from llmscratch.inference.generate import SamplingConfig, generate  # noqa: E402
from llmscratch.nn.model import GPT, GPTConfig, KVCache  # noqa: E402
from llmscratch.store.checkpoint import load_model, save_hf  # noqa: E402
from llmscratch.store.convert import export_checkpoint, import_checkpoint, load_hf_any  # noqa: E402
from llmscratch.store.hf_llama import config_from_hf_llama, save_hf_llama  # noqa: E402

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def _hf_model(family: str, scale: float = 0.02, **extra):
    """A tiny random transformers model of ``family``, its weights spread by ``scale`` (peaked logits when large)."""
    torch.manual_seed({"llama": 0, "llama-tied": 1, "qwen2": 2, "qwen3": 3}[family])
    if family.startswith("llama"):
        config = transformers.LlamaConfig(**COMMON, rope_theta=500.0, tie_word_embeddings=family == "llama-tied",
                                          rope_scaling=None if family == "llama-tied" else LLAMA3_ROPE, **extra)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, **extra))
    else:  # qwen3: heads of 32 dimensions over a 64-wide stream of 4 heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=32, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


FAMILIES = ["llama", "llama-tied", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def hf_pair(request, tmp_path_factory):
    """(family, transformers model, its save_pretrained folder, our GPT imported from it)."""
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder, load_hf_any(folder)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_logits_equal_transformers(hf_pair):
    family, hf, _, ours = hf_pair
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max() <= 1e-4
    expected = {"llama": (2, False, False, 16), "llama-tied": (2, False, False, 16), "qwen2": (2, True, False, 16),
                "qwen3": (2, False, True, 32)}[family]
    assert (ours.cfg.kv_heads, ours.cfg.qkv_bias, ours.cfg.qk_norm, ours.cfg.head_dim) == expected
    assert ours.cfg.tie_weights == (family == "llama-tied")


def test_llama3_rope_scaling_is_applied(hf_pair):
    """Without the stretch of RoPE's low frequencies the logits differ: the test sees the scaling."""
    family, hf, _, ours = hf_pair
    if family != "llama":
        pytest.skip("only the llama case uses Llama 3's RoPE scaling")
    plain = GPT(dataclasses.replace(ours.cfg, rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    assert (_logits(plain, ids) - _logits(hf, ids)).abs().max() > 1e-3


def test_export_reloads_in_transformers(hf_pair, tmp_path):
    family, hf, _, ours = hf_pair
    name = save_hf_llama(ours, tmp_path / "out")
    assert name == type(hf).__name__
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(hf)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(7))
    assert (_logits(again, ids) - _logits(hf, ids)).abs().max() <= 1e-5


def test_sharded_folder_imports(tmp_path):
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    assert (_logits(load_hf_any(tmp_path), ids) - _logits(hf, ids)).abs().max() <= 1e-4


def _hf_greedy(hf, prompts: list[list[int]], new: int, use_cache: bool) -> list[list[int]]:
    """transformers' greedy generate over left-padded prompts: the new tokens of each row."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                      use_cache=use_cache, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_transformers(use_cache):
    """Token for token, batched with left padding, with and without the KV cache."""
    hf = _hf_model("llama", scale=0.3)
    ours = GPT(config_from_hf_llama(hf.config.to_dict()))
    from llmscratch.store.hf_llama import hf_llama_to_ours

    ours.load_state_dict(hf_llama_to_ours(hf.state_dict(), ours.cfg))
    ours.eval()
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    new = 12
    ours_out = generate(ours, prompts, SamplingConfig(max_new_tokens=new, temperature=0.0), use_cache=use_cache)
    assert ours_out == _hf_greedy(hf, prompts, new, use_cache)


def test_kv_cache_stores_only_the_key_value_heads():
    cfg = GPTConfig.from_preset("test-llama")
    cache = KVCache.for_model(cfg, batch=2, max_len=10)
    assert cache.k.shape == (cfg.n_layers, 2, cfg.kv_heads, 10, cfg.head_dim)
    mha = KVCache.for_model(dataclasses.replace(cfg, n_kv_heads=None), batch=2, max_len=10)
    assert mha.k.numel() == cache.k.numel() * cfg.n_heads // cfg.kv_heads


def test_import_export_through_a_run_directory(tmp_path):
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "run", no_tokenizer=True)
    ours = load_model(tmp_path / "run")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(10))
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max() <= 1e-4
    export_checkpoint(tmp_path / "run", tmp_path / "back", "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (_logits(again, ids) - _logits(hf, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("field, value, named", [
    ("hidden_act", "gelu", "hidden_act"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "llama3"),
    ("mlp_bias", True, "mlp_bias"),
])
def test_what_cannot_be_computed_is_refused_by_name(field, value, named):
    config = _hf_model("llama").config.to_dict()
    config[field] = value
    if field == "rope_scaling":
        config.pop("rope_parameters", None)
    with pytest.raises(CheckpointError, match=named):
        config_from_hf_llama(config, source="cfg.json")


def test_gpt2_formats_refuse_a_modern_model(tmp_path):
    model = GPT(GPTConfig.from_preset("test-llama"))
    with pytest.raises(CheckpointError) as err:
        save_hf(model, tmp_path / "gpt2")
    for field in ("norm=", "n_kv_heads=", "hidden_dim=", "pos_emb="):
        assert field in str(err.value)


def test_old_config_without_the_modern_fields_loads(tmp_path):
    """A run saved before the modern fields existed has none of them: it is a GPT-2-shaped model."""
    from llmscratch.store.checkpoint import save_run

    model = GPT(GPTConfig.from_preset("test"))
    save_run(tmp_path, model)
    data = json.loads((tmp_path / "config.json").read_text())
    for name in ("norm", "n_kv_heads", "head_size", "hidden_dim", "qk_norm", "rope_scaling"):
        del data[name]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_model(tmp_path).cfg == model.cfg


def test_a_modern_config_missing_its_norm_is_refused(tmp_path):
    from llmscratch.store.checkpoint import save_run

    save_run(tmp_path, GPT(GPTConfig.from_preset("test-llama")))
    data = json.loads((tmp_path / "config.json").read_text())
    del data["norm"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lacks 'norm'"):
        load_model(tmp_path)
