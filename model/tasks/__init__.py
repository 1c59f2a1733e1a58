"""The tasks a model learns and is used for: sorting letters, plain text, and answers (prompt /
completion pairs and conversations).

A task owns everything that differs between them: its block size, its batches, its
evaluation, how sample.py reads a prompt and prints the model's answer, the demo lines of the
run report, and the prompt of the attention plots. Batches are (x, y) pairs of (B, T) int64
tensors, y being x shifted by one token, with -1 where no loss is taken.
"""

from pathlib import Path

from model.tasks.chat import ChatTask
from model.tasks.sort import SortTask
from model.tasks.text import TextTask

TASKS = {"text": TextTask, "sort": SortTask, "chat": ChatTask}  # the default first


def task_for_training(cfg, start):
    """The task cfg.task names; a .jsonl file (or a folder of them) as the text's data picks 'chat'."""
    data = Path(cfg.data)
    jsonl = data.suffix == ".jsonl" or (data.is_dir() and not any(data.rglob("*.txt")) and any(data.rglob("*.jsonl")))
    return TASKS["chat" if cfg.task == "text" and jsonl else cfg.task].for_training(cfg, start)


def task_from_checkpoint(ckpt, tokenizer, block_size):
    """The task a checkpoint was trained on, for using the model (no training data)."""
    state = ckpt.get("task") or {"type": "text"}
    if state["type"] == "sort":
        return SortTask.from_state(state)
    if state["type"] == "chat":
        return ChatTask.from_state(state, tokenizer, block_size, ckpt["model_args"]["vocab_size"])
    return TextTask(tokenizer, block_size, model_vocab_size=ckpt["model_args"]["vocab_size"])


def chat_task(ckpt, task):
    """The model's chat task: its own (trained on .jsonl), or one made from a Hugging Face folder's
    chat template (kept in the checkpoint as 'chat'); None when it has neither."""
    if isinstance(task, ChatTask):
        return task
    if "chat" in ckpt and getattr(task, "tokenizer", None) is not None:
        return ChatTask.from_state({"template": ckpt["chat"]}, task.tokenizer, task.block_size, task.model_vocab_size)
    return None
