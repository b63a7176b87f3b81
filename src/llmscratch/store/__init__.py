"""Everything on disk about a model: run directories, checkpoints, foreign weight formats."""
