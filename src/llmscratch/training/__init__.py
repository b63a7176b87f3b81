"""The training loop, its configuration, and the DDP/FSDP wiring."""
