"""Multiple-choice evaluation (training/multiple_choice.py) against lm-evaluation-harness's ``hf`` backend.

A tiny GPT-2-shaped run with a GPT-2-style BPE is exported with our Hugging Face exporter;
lm-evaluation-harness scores a task it reads from a YAML and a JSONL written here (no
downloads: everything offline), and must give the same per-ending log-likelihoods, ``acc`` and
``acc_norm`` as ``llmscratch eval RUN --task``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmscratch.errors import ConfigError
from llmscratch.runtime import setup_runtime
from llmscratch.store.checkpoint import load_run, save_model
from llmscratch.training.multiple_choice import (
    Question, encode_pair, evaluate_choices, loglikelihoods, read_task,
)
from tiny_files import varied_gpt, write_tiny_gpt2_files

WORDS = "the then there he she ate a mat hat cat sat on in of light dark earth heaven".split()


def questions(n: int = 14, seed: int = 0) -> list[dict]:
    """Varied questions: 2 to 4 endings of 1 to 6 words, some contexts ending in a space, one
    longer than the model's window, one empty, labels as integers and as HellaSwag's strings."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        if i % 5 == 1:
            context += " "
        if i == 3:
            context = " ".join(rng.choice(WORDS) for _ in range(40))  # past the 32-token window
        if i == 6:
            context = ""
        endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + rng.choice([".", ""])
                   for _ in range(rng.randint(2, 4))]
        label = rng.randrange(len(endings))
        out.append({"context": context, "endings": endings, "label": str(label) if i % 4 == 0 else label})
    return out


@pytest.fixture()
def task_run(tmp_path):
    """A run (model + GPT-2-style tokenizer files) and a task file of :func:`questions`."""
    model = varied_gpt(seed=3, vocab_size=260, qkv_bias=True)
    save_model(tmp_path / "run", model)
    write_tiny_gpt2_files(tmp_path / "run")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(q) + "\n" for q in questions()), encoding="utf-8")
    return tmp_path / "run", task


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label | int}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_same_loglikelihoods_acc_and_acc_norm_as_lm_evaluation_harness(task_run, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmscratch.cli import main
    from llmscratch.store.convert import export_checkpoint

    run, task = task_run
    export_checkpoint(run, tmp_path / "hf", "hf")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=task, cache=tmp_path / "cache"))
    lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], log_samples=True,
                                     task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    metrics = theirs["results"]["tiny_mc"]
    samples = sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    their_lls = [[r[0][0] for r in s["resps"]] for s in samples]

    model, tokenizer, _ = load_run(run)
    result = evaluate_choices(model, tokenizer, read_task(task), setup_runtime("cpu", "fp32"), batch_size=5)
    for ours, lls in zip(result.scores, their_lls):
        assert ours == pytest.approx(lls, abs=1e-4)
    assert result.acc == pytest.approx(metrics["acc,none"])
    assert result.acc_norm == pytest.approx(metrics["acc_norm,none"])
    assert result.acc_stderr == pytest.approx(metrics["acc_stderr,none"])
    assert result.acc_norm_stderr == pytest.approx(metrics["acc_norm_stderr,none"])
    assert result.acc != result.acc_norm  # the task tells the two apart: the comparison means something
    assert main(["eval", str(run), "--task", str(task), "--details", str(tmp_path / "d.jsonl")]) == 0
    details = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    for d, scores in zip(details, result.scores, strict=True):  # another batch size: equal to rounding
        assert d["loglikelihoods"] == pytest.approx(scores, abs=1e-4)


def test_scores_are_the_sum_of_the_endings_token_log_probabilities(task_run):
    """Against the model run once per pair, written out: no batching, no padding, no truncation tricks."""
    run, _ = task_run
    model, tokenizer, _ = load_run(run)
    pairs = [encode_pair(tokenizer, "the cat", " sat on the mat"), encode_pair(tokenizer, "he", " ate"),
             encode_pair(tokenizer, "then there", " was light.")]
    got = loglikelihoods(model, pairs, setup_runtime("cpu", "fp32"), batch_size=2)
    for (context, continuation), value in zip(pairs, got):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0], dim=-1)  # (T-1, V)
        expected = sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(continuation))
        assert value == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_spaces_and_cuts_after_the_contexts_own_encoding(task_run):
    run, _ = task_run
    _, tokenizer, _ = load_run(run)
    context, continuation = encode_pair(tokenizer, "on the ", "mat")
    assert context == tokenizer.encode("on the") and context + continuation == tokenizer.encode("on the mat")
    context, continuation = encode_pair(tokenizer, "", " the")
    assert context == [tokenizer.eot_id] and continuation == tokenizer.encode(" the")


def test_acc_norm_divides_by_the_endings_characters(task_run, monkeypatch):
    """Two endings scored -6 and -10: acc picks the first, acc_norm the longer second (-10/10 > -6/3)."""
    import llmscratch.training.multiple_choice as mc

    run, _ = task_run
    model, tokenizer, _ = load_run(run)
    monkeypatch.setattr(mc, "loglikelihoods", lambda *a, **k: [-6.0, -10.0])
    result = mc.evaluate_choices(model, tokenizer, [Question("x", ("abc", "abcdefghij"), 1)], setup_runtime("cpu"))
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


@pytest.mark.parametrize("line, named", [
    ("not json", "not JSON"), ('{"context": 1, "endings": ["a", "b"], "label": 0}', "context"),
    ('{"context": "c", "endings": ["a"], "label": 0}', "endings"),
    ('{"context": "c", "endings": ["a", "b"], "label": 2}', "label"),
    ('{"ctx": "c", "endings": ["a", "b"], "label": "x"}', "label"),
])
def test_bad_task_lines_are_named_with_their_line(tmp_path, line, named):
    path = tmp_path / "t.jsonl"
    path.write_text('{"ctx": "c", "endings": ["a", "b"], "label": "1"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"t\.jsonl, line 3.*{named}|t\.jsonl, line 3 is {named}"):
        read_task(path)


def test_read_task_limit_and_hellaswag_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"ctx": "c", "endings": ["a", "b"], "label": "1"}\n{"context": "d", "endings": ["e", "f"], '
                    '"label": 0}\n', encoding="utf-8")
    assert read_task(path) == [Question("c", ("a", "b"), 1), Question("d", ("e", "f"), 0)]
    assert len(read_task(path, limit=1)) == 1
