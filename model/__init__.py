"""A small GPT you can read: the model (gpt.py), its NumPy twin (reference.py), and the
pieces train.py and sample.py are built from."""

from model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
