"""The tasks a model learns and is used for: sorting letters, plain text, and answers (prompt /
completion pairs and conversations).

A task owns everything that differs between them: its block size, its batches, its
evaluation, how sample.py reads a prompt and prints the model's answer, the demo lines of the
run report, and the prompt of the attention plots. Batches are (x, y) pairs of (B, T) int64
tensors, y being x shifted by one token, with -1 where no loss is taken.
"""

from model.tasks.sort import SortTask
from model.tasks.text import TextTask

TASKS = {"text": TextTask, "sort": SortTask}  # the default first


def task_for_training(cfg, start):
    return TASKS[cfg.task].for_training(cfg, start)


def task_from_checkpoint(ckpt, tokenizer, block_size):
    """The task a checkpoint was trained on, for using the model (no training data)."""
    state = ckpt.get("task") or {"type": "text"}
    if state["type"] == "sort":
        return SortTask.from_state(state)
    return TextTask(tokenizer, block_size, model_vocab_size=ckpt["model_args"]["vocab_size"])
