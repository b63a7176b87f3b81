"""Small things the tests build themselves (nothing is downloaded): a GPT-2-style BPE, a tiny GPT."""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (as in OpenAI's encoder.py), written independently."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_tiny_gpt2_files(directory: Path, names=("vocab.json", "merges.txt")) -> int:
    """A GPT-2-style byte-level BPE: 256 bytes, three merges, <|endoftext|>; returns its size."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / names[0]).write_text(json.dumps(vocab), encoding="utf-8")
    (directory / names[1]).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


def varied_gpt(seed: int = 0, **overrides):
    """A "test" preset GPT (context 32) in eval mode, its matrices drawn with std 0.1: large enough
    that positions and prompts change the output (the usual 0.02 gives nearly flat logits)."""
    import torch

    from llmscratch.nn.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("test", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model.eval()
