"""Text to token ids: corpora, tokenizers, token files, batches."""
