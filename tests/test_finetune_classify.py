"""Classification fine-tuning, checked against the book's chapter 6 (``llms_from_scratch.ch06``).

The same tiny model (a book ``GPTModel`` converted with the project's converter, with the
book's two-class head), the same data (balanced and split with the book's own pandas code,
padded by its ``SpamDataset``) give the same accuracy and loss; the last real token is read
on padded rows; a tiny run learns a separable task end to end; the commands print what they
should; bad data names its file and line.
"""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

from llmscratch import cli
from llmscratch.data import labelled as lab
from llmscratch.nn.classifier import GPTClassifier, pad_batch
from llmscratch.runtime import setup_runtime
from llmscratch.training.classify import ClassScores, score

ch04 = pytest.importorskip("llms_from_scratch.ch04")
ch06 = pytest.importorskip("llms_from_scratch.ch06")  # imports pandas
pd = pytest.importorskip("pandas")

BOOK_CFG = dict(vocab_size=260, context_length=64, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=True)
WORDS = "the cat sat on a mat while rain fell over old hills and new towns far away".split()


def spam_frame(n_ham: int = 40, n_spam: int = 13, seed: int = 0) -> "pd.DataFrame":
    """A small SMS-spam-shaped table (Label, Text): more ham than spam, texts of varied length."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n_ham + n_spam):
        label = "ham" if i < n_ham else "spam"
        rows.append((label, " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 8)))))
    rnd.shuffle(rows)
    return pd.DataFrame(rows, columns=["Label", "Text"])


class ByteTokenizer:
    """Bytes as token ids (0-255); id 256 is the padding the book appends (its 50256)."""

    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def book_classifier(seed: int = 0):
    """The book's GPTModel, all parameters random, with its chapter 6 head ``Linear(emb_dim, 2)``."""
    torch.manual_seed(seed)
    book = ch04.GPTModel(BOOK_CFG)
    with torch.no_grad():
        for name, p in book.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith(".scale") else 0.3 * torch.randn_like(p))
    return book


def ours_from_book(book, pool: str) -> GPTClassifier:
    """Our classifier with the book model's weights: converted by the project's converter, the head copied."""
    from llmscratch.nn.model import GPT
    from llmscratch.store.checkpoint import book_to_ours

    cfg, state = book_to_ours(book.state_dict(), n_heads=BOOK_CFG["n_heads"], drop_rate=0.0)
    gpt = GPT(cfg)
    gpt.load_state_dict(state, strict=False)
    ours = GPTClassifier.from_gpt(gpt, 2, pool=pool, pad_id=ByteTokenizer.eot_id)
    head = torch.nn.Linear(BOOK_CFG["emb_dim"], 2)
    with torch.no_grad():
        head.weight.copy_(0.5 * torch.randn(2, BOOK_CFG["emb_dim"]))
        head.bias.copy_(torch.randn(2))
        ours.class_head.load_state_dict(head.state_dict())
    book.out_head = head  # the book's chapter 6 swap
    return ours.eval()


def examples_from(frame) -> list[lab.Example]:
    return [lab.Example(t, label, "frame", i + 2) for i, (label, t) in enumerate(zip(frame["Label"], frame["Text"]))]


def test_balance_and_split_reproduce_the_books_rows(tmp_path):
    frame = spam_frame()
    book_balanced = ch06.create_balanced_dataset(frame)
    book_train, book_val, book_test = ch06.random_split(book_balanced, 0.7, 0.1)
    ours = lab.split(lab.balance(examples_from(frame), seed=123), 0.7, 0.1, seed=123)
    for theirs, mine in zip((book_train, book_val, book_test), ours):
        assert [e.text for e in mine] == list(theirs["Text"])
        assert [e.label for e in mine] == list(theirs["Label"])
    assert [len(p) for p in ours] == [18, 2, 6]  # 26 balanced texts: 70 % / 10 % / the rest


@pytest.mark.parametrize("batch_size", [8, 26])
def test_accuracy_and_loss_equal_the_books_on_its_padded_data(tmp_path, batch_size):
    """pool="end" (position -1 of rows padded to the longest training text) is the book's code: equal numbers."""
    frame = spam_frame(n_ham=30, n_spam=30, seed=1)
    frame["Label"] = frame["Label"].map({"ham": 0, "spam": 1})
    frame.to_csv(tmp_path / "train.csv", index=None)
    tok = ByteTokenizer()
    dataset = ch06.SpamDataset(tmp_path / "train.csv", tok, max_length=None, pad_token_id=tok.eot_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    book = book_classifier()
    ours = ours_from_book(book, pool="end")
    book.eval()
    ids = [tok.encode(t) for t in frame["Text"]]
    data = lab.Encoded(ids, list(frame["Label"]), 0)
    got = score(ours, data, setup_runtime("cpu", "fp32"), batch_size=batch_size, pad_to=dataset.max_length)
    assert got.accuracy == ch06.calc_accuracy_loader(loader, book, "cpu")
    if len(frame) % batch_size == 0:  # the book averages batch means; equal to ours when all are full
        assert got.loss == pytest.approx(ch06.calc_loss_loader(loader, book, "cpu"), rel=1e-5)
    assert 0.2 < got.accuracy < 0.8  # a random model: a test that could tell the two apart


def test_last_pooling_reads_the_last_real_token_not_the_padding():
    """Right padding changes the book's position -1 state but not the last real token's (causal attention):
    pool="last" on a padded batch equals the book's model on each text alone."""
    book = book_classifier(seed=2)
    ours = ours_from_book(book, pool="last")
    book.eval()
    tok = ByteTokenizer()
    texts = ["a cat", "the rain fell over old hills", "on"]
    rows = [tok.encode(t) for t in texts]
    with torch.no_grad():
        alone = torch.cat([book(torch.tensor([r]))[:, -1, :] for r in rows])  # (3, 2): no padding
        padded = ours(pad_batch(rows))  # (3, 2)
        book_padded = book(pad_batch(rows).clamp_min(0).masked_fill(pad_batch(rows) < 0, tok.eot_id))[:, -1, :]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(book_padded[0], alone[0], atol=1e-3)  # the book's -1 on a padded row differs


def test_mean_pooling_averages_real_tokens_only():
    book = book_classifier(seed=3)
    ours = ours_from_book(book, pool="mean")
    rows = [[5, 6, 7], [8, 9]]
    with torch.no_grad():
        batch = ours(pad_batch(rows))
        single = torch.cat([ours(torch.tensor([r])) for r in rows])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_precision_recall_and_confusion_by_hand():
    scores = ClassScores(loss=0.0, accuracy=0.0, confusion=[[5, 1, 0], [2, 3, 1], [0, 0, 0]])
    (p0, r0), (p1, r1), (p2, r2) = scores.precision_recall()
    assert (p0, r0) == (5 / 7, 5 / 6)
    assert (p1, r1) == (3 / 4, 3 / 6)
    assert math.isnan(r2) and p2 == 0.0


# ----------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "text,kind\nhello,x\n", "a.csv, line 1: no column 'label'"),
    ("b.jsonl", '{"text": "hi", "label": "x"}\n{"text": "ho"}\n', "b.jsonl, line 2: no 'label' field"),
    ("c.csv", "text,label\nhello,x\n  ,y\n", "c.csv, line 3: the text ('text') is empty"),
    ("d.tsv", "text\tlabel\nhello\t\n", "d.tsv, line 2: the label ('label') is empty"),
    ("e.csv", b"text,label\nhello,x\ncaf\xe9,y\n", "e.csv, line 3: not valid UTF-8"),
    ("f.txt", "hello\n", "f.txt: unknown format .txt"),
    ("g.jsonl", '{"text": "hi", "label": "x"}\nnot json\n', "g.jsonl, line 2: not JSON"),
])
def test_bad_data_names_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(lab.LabelledDataError) as err:
        lab.read_labelled(path)
    assert message in str(err.value)


def test_one_label_only_and_a_label_the_run_lacks_are_refused(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\na,x\nb,x\n")
    examples = lab.read_labelled(path)
    with pytest.raises(lab.LabelledDataError, match="every text has the label 'x'"):
        lab.label_map(examples, str(path))
    with pytest.raises(lab.LabelledDataError, match=r"one.csv, line 2: label 'x' is not one of .*\['a', 'b'\]"):
        lab.encode(examples, ByteTokenizer(), ["a", "b"], max_tokens=10)


def test_texts_longer_than_the_context_are_cut_and_counted():
    examples = [lab.Example("abcdef", "x", "f", 2), lab.Example("ab", "y", "f", 3), lab.Example("abcd", "x", "f", 4)]
    enc = lab.encode(examples, ByteTokenizer(), ["x", "y"], max_tokens=3)
    assert enc.cut == 2 and [len(r) for r in enc.ids] == [3, 2, 3] and enc.labels == [0, 1, 0]


def test_testament_labels_old_and_new_at_matthew():
    verses = lab.testament_examples()
    assert len(verses) == 31_102 or len(verses) == 31_103
    first_new = next(i for i, e in enumerate(verses) if e.label == "New")
    assert verses[first_new].text.startswith("The book of the generation of Jesus Christ")
    assert all(e.label == "Old" for e in verses[:first_new]) and all(e.label == "New" for e in verses[first_new:])
    balanced = lab.balance(verses, seed=123)
    assert sum(e.label == "Old" for e in balanced) == sum(e.label == "New" for e in balanced) == len(verses) - first_new


# ----------------------------------------------------------------------------- end to end

FRUIT, METAL = "apple pear plum fig grape melon".split(), "iron steel copper tin zinc lead".split()


def write_separable(path, n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        label = "fruit" if i % 2 else "metal"
        words = FRUIT if label == "fruit" else METAL
        rows.append((" ".join(rnd.choice(words) for _ in range(rnd.randint(2, 6))), label))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "kind"])
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny base run (random "test" GPT, BPE on the data's words), fine-tuned for 40 steps on fruit vs metal."""
    from llmscratch.data.tokenizer import build_tokenizer
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.store.checkpoint import save_run

    root = tmp_path_factory.mktemp("classify")
    rows = write_separable(root / "data.csv")
    tok = build_tokenizer("bpe", "\n".join(t for t, _ in rows) * 3, vocab_size=300)
    torch.manual_seed(0)
    save_run(root / "base", GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size)), tok)
    status = cli.main(["finetune", str(root / "base"), "--task", "classify", "--data", str(root / "data.csv"),
                       "--text-column", "sentence", "--label-column", "kind", "--out-dir", str(root / "runs"),
                       "--name", "c", "--steps", "40", "--lr", "1e-3", "--eval-every", "20", "--no-progress",
                       "--device", "cpu"])
    assert status == 0
    return root, rows


@pytest.mark.slow
def test_a_tiny_run_learns_a_separable_task(classifier_run):
    root, _ = classifier_run
    run = root / "runs" / "c"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "test_accuracy" in r][-1]
    assert final["test_accuracy"] >= 0.9 and final["step"] == 40
    labels = json.loads((run / "labels.json").read_text())
    assert labels["classes"] == ["fruit", "metal"] and labels["text_column"] == "sentence"
    assert labels["base"] == str((root / "base").resolve())
    assert json.loads((run / "finetune.json").read_text())["task"] == "classify"


@pytest.mark.slow
def test_classify_command_prints_label_and_probability(classifier_run, capsys):
    root, _ = classifier_run
    run = str(root / "runs" / "c")
    assert cli.main(["classify", run, "pear fig apple", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    label, prob = out.split(" (")
    assert label == "fruit" and 50.0 < float(prob.rstrip("%)")) <= 100.0
    (root / "texts.txt").write_text("zinc tin iron\n\ngrape melon\n", encoding="utf-8")
    assert cli.main(["classify", run, "--file", str(root / "texts.txt"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["metal", "fruit"]
    assert [line.split("\t")[2] for line in lines] == ["zinc tin iron", "grape melon"]
    assert cli.main(["classify", str(root / "base"), "x"]) == 2  # not a classifier: a one-line error
    assert "not a classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_reports_the_confusion_matrix_of_the_classify_predictions(classifier_run, capsys):
    """eval's confusion matrix, precision and recall equal those counted by hand from classify's labels."""
    root, _ = classifier_run
    run = str(root / "runs" / "c")
    rnd = random.Random(7)
    rows = [(" ".join(rnd.choice(FRUIT + METAL) for _ in range(3)), rnd.choice(["fruit", "metal"])) for _ in range(30)]
    with open(root / "mixed.csv", "w", newline="") as f:
        csv.writer(f).writerows([("sentence", "kind"), *rows])
    assert cli.main(["classify", "--device", "cpu", run, *[t for t, _ in rows]]) == 0
    predicted = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    classes = ["fruit", "metal"]
    cm = [[sum(1 for (_, t), p in zip(rows, predicted) if t == a and p == b) for b in classes] for a in classes]
    assert cli.main(["eval", run, "--data", str(root / "mixed.csv"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    accuracy = (cm[0][0] + cm[1][1]) / len(rows)
    assert f"30 texts: accuracy {100 * accuracy:.2f}%" in out
    table = out.split("columns: predicted)")[1].strip().splitlines()
    assert [[int(v) for v in line.split()[1:]] for line in table[1:]] == cm
    for name, row, col in zip(classes, cm, zip(*cm)):
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        precision = f"{100 * row[classes.index(name)] / sum(col):.1f}%" if sum(col) else "n/a"
        assert line.split()[1] == precision and line.split()[2] == f"{100 * row[classes.index(name)] / sum(row):.1f}%"


FINETUNE = ["--task", "classify", "--text-column", "sentence", "--label-column", "kind", "--lr", "1e-3",
            "--eval-every", "20", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_same_weights(classifier_run):
    """--stop-at 20 then --resume to 40 gives the weights of the uninterrupted 40-step run (same batches, same optimizer)."""
    from llmscratch.store.checkpoint import read_safetensors

    root, _ = classifier_run
    args = [str(root / "base"), "--data", str(root / "data.csv"), *FINETUNE, "--out-dir", str(root / "runs")]
    assert cli.main(["finetune", *args, "--name", "r", "--steps", "40", "--stop-at", "20"]) == 0
    # no --task: a resumed run keeps the task it was fine-tuned for; another task is refused
    assert cli.main(["finetune", "--resume", str(root / "runs" / "r"), "--task", "instruct", "--no-progress"]) == 2
    assert cli.main(["finetune", "--resume", str(root / "runs" / "r"), "--no-progress"]) == 0
    resumed, whole = read_safetensors(root / "runs" / "r" / "model.safetensors"), read_safetensors(
        root / "runs" / "c" / "model.safetensors")
    assert sorted(resumed) == sorted(whole)
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0)


@pytest.mark.slow
def test_lora_classifier_saves_adapters_and_head_and_loads_merged(classifier_run, capsys):
    from llmscratch.store.checkpoint import read_safetensors
    from llmscratch.store.classifier import load_classifier
    from llmscratch.training.classify import evaluate_labelled

    root, _ = classifier_run
    assert cli.main(["finetune", str(root / "base"), "--data", str(root / "data.csv"), *FINETUNE, "--out-dir",
                     str(root / "runs"), "--name", "l", "--steps", "30", "--train", "lora", "--lora-rank", "4",
                     "--lr", "3e-3"]) == 0
    run = root / "runs" / "l"
    saved = read_safetensors(run / "model.safetensors")
    assert {k for k in saved if ".lora." not in k} == {"class_head.weight", "class_head.bias"}
    model, _, info = load_classifier(run)
    torch.testing.assert_close(model.class_head.weight, saved["class_head.weight"])
    base = read_safetensors(root / "base" / "model.safetensors")
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base["blocks.0.attn.qkv.weight"])  # merged
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    in_run = [r for r in records if "test_accuracy" in r][-1]
    scores, _, _ = evaluate_labelled(run, str(root / "data.csv"), device="cpu")
    assert scores.accuracy >= in_run["test_accuracy"] - 0.25  # the whole file, of which the test split is a fifth
    assert scores.accuracy > 0.7


def test_separate_validation_file_and_default_split(tmp_path):
    from llmscratch.training.classify import prepare_splits

    write_separable(tmp_path / "data.csv", n=50)
    write_separable(tmp_path / "val.csv", n=6, seed=5)
    cols = {"text_column": "sentence", "label_column": "kind"}
    split = prepare_splits(cols, str(tmp_path / "data.csv"), ByteTokenizer(), 64, seed=123)
    assert [len(p.ids) for p in (split.train, split.val, split.test)] == [35, 5, 10]  # 70/10/20
    assert split.classes == ["fruit", "metal"]
    given = prepare_splits({**cols, "val_data": str(tmp_path / "val.csv")}, str(tmp_path / "data.csv"),
                           ByteTokenizer(), 64, seed=123)
    assert [len(p.ids) for p in (given.train, given.val, given.test)] == [40, 6, 10]  # the test fifth still cut
    rows = list(csv.reader(open(tmp_path / "val.csv")))[1:]
    assert given.val.ids == [list(t.encode()) for t, _ in rows]
