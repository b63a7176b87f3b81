"""llmscratch: a GPT-style language model built from first principles on PyTorch."""

__version__ = "0.1.0"
