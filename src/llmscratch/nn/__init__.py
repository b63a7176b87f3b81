"""Pure PyTorch: the model, attention, positions, kernels, optimizers. No files, processes or CLI."""
