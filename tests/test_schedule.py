"""The learning-rate schedule (nanoGPT's): values computed by hand."""

import math

import pytest

from model.config import TrainConfig
from model.schedule import get_lr

CFG = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=4, lr_decay_iters=14, decay_lr=True)


@pytest.mark.parametrize("it,expected", [
    (0, 1e-3 * 1 / 5), (1, 1e-3 * 2 / 5), (3, 1e-3 * 4 / 5),  # linear warmup: lr (it + 1) / (warmup + 1)
    (4, 1e-3),  # the peak, once warmup is over
    (9, 1e-4 + 0.5 * 9e-4),  # half way through the decay: cos(pi / 2) = 0
    (6, 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.2)) * 9e-4),
    (14, 1e-4), (15, 1e-4), (10_000, 1e-4),  # the min_lr floor from lr_decay_iters on
])
def test_warmup_cosine_and_floor(it, expected):
    assert get_lr(it, CFG) == pytest.approx(expected, rel=1e-12), f"lr at iteration {it}"


def test_decay_lr_false_is_constant():
    cfg = TrainConfig(learning_rate=3e-3, decay_lr=False, warmup_iters=10)
    assert [get_lr(it, cfg) for it in (0, 5, 10, 5000)] == [3e-3] * 4
