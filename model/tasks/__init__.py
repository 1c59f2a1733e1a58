"""The tasks a model learns: sorting letters, plain text, answers (prompt / completion pairs
and conversations), preferences between two answers (DPO) and prompts scored by rewards (GRPO). A task describes data, nothing else: how examples become tokens and a loss
mask, what a batch is, how a prompt is encoded, and what a right answer is. What is done with a
model (decoding, scoring, printing, plotting) lives with its callers.
"""

from pathlib import Path
from typing import Protocol

from model.engine import Rules
from model.data import TextSource
from model.tasks.chat import ChatTask
from model.tasks.preference import PreferenceTask
from model.tasks.prompts import PromptTask
from model.tasks.records import first_keys
from model.tasks.sort import SortTask
from model.tasks.text import TextTask


class Task(Protocol):
    """What every task gives. Batches are (x, y) pairs of (B, T) int64 tensors, y being x shifted
    by one token, with -1 where no loss is taken. Tasks learned from rewards (the sorter, prompts)
    give draw_prompts(split, n, generator) instead: rows {"ids", "prompt", columns}."""
    tokenizer: object  # text <-> ids (None for a nanoGPT checkpoint without its meta.pkl: ids only)
    block_size: int  # the longest sequence the model reads
    model_vocab_size: int  # the model's ids (a subword vocabulary is padded past its tokenizer's)
    rules: Rules  # how its model decodes: what is never drawn, where a reply stops
    exact_match: bool  # whether answers() are the one right answers, scored by greedy exact match

    def get_batch(self, split: str, batch_size: int, generator) -> tuple:
        """split 'train' or 'val' -> (x, y), drawn with the generator's random numbers."""

    def encode_prompt(self, text: str, drop_unknown: bool = False) -> list:
        """A prompt's ids, for the model to continue; UserError for one it cannot read."""

    def answers(self, split: str) -> list:
        """(prompt ids, answer ids) of the split's examples whose answer is known; [] for none."""

    def describe(self, config: dict) -> str:
        """One line saying what the data is, for the run's report."""

    def state(self) -> dict:
        """Plain data for the checkpoint; from_state(state, tokenizer, block_size, model_vocab_size) reads it."""


TASKS = {"text": TextTask, "sort": SortTask, "chat": ChatTask, "preference": PreferenceTask,
         "prompts": PromptTask}  # the default first
NAMED = ("text", "sort", "chat")  # what --task names; preference pairs and prompts follow from the data and --reward


def task_for_training(settings, start, rewarded=False):
    """The task settings.task names (model.data.DataSettings); a .jsonl file (or a folder of them)
    as the text's data picks 'chat', or 'preference' when its lines have chosen and rejected
    answers. Learning from rewards: a sorter's own inputs (its split kept), else 'prompts'."""
    if rewarded:
        if start.ckpt is not None and (start.ckpt.task or {}).get("type") == "sort":
            return SortTask.from_state(start.ckpt.task)
        return PromptTask.for_training(settings, start)
    data = Path(settings.data)
    jsonl = data.suffix == ".jsonl" or (data.is_dir() and not any(data.rglob("*.txt")) and any(data.rglob("*.jsonl")))
    if settings.task in ("text", "chat") and jsonl and {"chosen", "rejected"} <= set(first_keys(TextSource.at(data, ".jsonl"))):
        return PreferenceTask.for_training(settings, start)
    return TASKS["chat" if settings.task == "text" and jsonl else settings.task].for_training(settings, start)


def end_of_text(chat, tokenizer):
    """The id that ends a text, as transformers' eos_token (lm-eval's, vLLM's): a chat model's end of
    turn, else <|endoftext|>; None when the vocabulary has neither."""
    return chat.end if chat is not None else tokenizer.special_id("<|endoftext|>")


def task_from_checkpoint(ckpt, tokenizer):
    """The task a checkpoint (model.checkpoint.Checkpoint) was trained on, for using the model."""
    state = ckpt.task or {"type": "text"}
    config = ckpt.model_config
    return TASKS[state["type"]].from_state(state, tokenizer, config.block_size, config.vocab_size)


def chat_task(ckpt, task):
    """The model's chat task: its own (trained on .jsonl), or one made from a Hugging Face folder's
    chat template (kept in the checkpoint as `chat`); None when it has neither."""
    if isinstance(task, ChatTask):
        return task
    if ckpt.chat and getattr(task, "tokenizer", None) is not None:
        return ChatTask.from_state({"template": ckpt.chat}, task.tokenizer, task.block_size, task.model_vocab_size)
    return None
