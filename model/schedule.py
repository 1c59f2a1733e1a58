"""The learning-rate schedule, nanoGPT's: linear warmup, then cosine decay to min_lr.
Plain Python, so the trainer and the NumPy reference use the very same function."""

import math


def get_lr(it, cfg):
    """Learning rate for iteration `it` (0-based). cfg needs learning_rate, min_lr, decay_lr,
    warmup_iters and lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
