"""Every command on a modern (Llama-shaped) model, end to end, from a tiny Hugging Face folder.

The folder is what transformers writes for a LlamaForCausalLM (grouped-query attention) with a
ChatML tokenizer; the commands run in-process through ``llmscratch.cli.main``, and what they
write is read back by transformers where it is a foreign format.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

from llmscratch.cli import main  # noqa: E402
from llmscratch.store.checkpoint import load_model, load_run  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. 1234 5678. ") * 8
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT], trainer=trainer)
    return backend


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    backend = _tokenizer()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                         chat_template=CHATML).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run(hf_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny-llama"
    assert main(["import", str(hf_dir), str(run)]) == 0
    return run


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_import_keeps_the_tokenizer_and_its_chat_template(run, hf_dir, capsys):
    _, tokenizer, _ = load_run(run)
    assert tokenizer.kind == "hf" and tokenizer.chat_template == CHATML
    assert tokenizer.eot_id == tokenizer.backend.token_to_id("<|im_end|>")
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "n_kv_heads: 2" in out and "tokenizer: hf" in out


def test_generate_batched_and_chat(run, capsys):
    assert main(["generate", str(run), "--prompt", "In the", "--prompt", "And the earth", "--greedy",
                 "--max-new-tokens", "6", "--device", "cpu", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert "In the" in out and "And the earth" in out
    assert main(["generate", str(run), "--chat", "Who created the earth?", "--max-new-tokens", "6", "--seed", "3",
                 "--device", "cpu"]) == 0


def test_eval_attention_and_explain(run, hf_dir, tmp_path, capsys):
    assert main(["eval", str(run), "--data", str(hf_dir / "text.txt"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["attention", str(run), "--prompt", "In the beginning", "--out", str(tmp_path / "maps")]) == 0
    assert main(["explain", "--run", str(run), "In the beginning", "--max-values", "0"]) == 0
    assert "H_kv=2" in capsys.readouterr().out


def test_continued_pretraining_from_the_imported_run(run, hf_dir, tmp_path):
    out_dir = tmp_path / "runs"
    (tmp_path / "more.txt").write_text(TEXT * 6, encoding="utf-8")
    assert main(["train", "--init-from", str(run), "--data", str(tmp_path / "more.txt"), "--out-dir", str(out_dir),
                 "--name", "more", "--steps", "2", "--batch-size", "2", "--no-progress",
                 "--eval-interval", "2", "--eval-windows", "2", "--sample-tokens", "0", "--device", "cpu"]) == 0
    trained = load_model(out_dir / "more")
    assert trained.cfg.kv_heads == 2 and trained.cfg.norm == "rmsnorm"


def test_export_gguf_loads_in_transformers_and_imports_back(run, hf_dir, tmp_path):
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    assert main(["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "f32"]) == 0
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                                  dtype=torch.float32).eval()
    assert (_logits(from_gguf, ids) - _logits(reference, ids)).abs().max() <= 1e-4
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    back, tokenizer, _ = load_run(tmp_path / "back")
    assert (_logits(back, ids) - _logits(reference, ids)).abs().max() <= 1e-4
    assert tokenizer.encode(TEXT[:80]) == load_run(run)[1].encode(TEXT[:80])
    assert tokenizer.chat_template == CHATML


def test_export_hf_folder_with_its_tokenizer(run, hf_dir, tmp_path):
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "hf"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode(TEXT[:60], add_special_tokens=False) == load_run(run)[1].encode(TEXT[:60])
    ids = torch.tensor([tok.encode("In the beginning", add_special_tokens=False)])
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max() <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 2
