"""Prompts alone, for reinforcement learning from rewards (GRPO, model/align.py): TRL's prompt
formats in .jsonl, {"prompt": "305"} or {"prompt": [messages]}, any other columns of a line passed
to the reward functions (e.g. an "answer" the reward checks against). The model answers already
(it has a chat template); its replies are what the rewards score.
"""

from pathlib import Path

import torch

from model.data import TextSource
from model.errors import UserError
from model.tasks.chat import ChatTask, answering_task
from model.tasks.records import held_out, prompt_row, read_records

ANSWER_COLUMNS = ("completion", "answer")  # a reply to compare with, when a line has one


class PromptTask:
    """Rows {"ids": the prompt's ids as the template writes them, "prompt": the line's prompt
    (a string or messages, as TRL passes it to rewards), and the line's other columns}; a seeded
    val_fraction of them is held out. When every line has an answer column, greedy replies to the
    held-out prompts are scored against it (heldout_acc)."""

    EVAL_LIMIT = 2000
    examples_name = "prompts"

    def __init__(self, chat, rows, is_val, source):
        self.chat, self.source = chat, source
        self.tokenizer, self.block_size, self.rules = chat.tokenizer, chat.block_size, chat.rules
        self.model_vocab_size = chat.model_vocab_size
        self.rows = {"train": [r for r, v in zip(rows, is_val) if not v], "val": [r for r, v in zip(rows, is_val) if v]}
        self.exact_match = all(any(isinstance(r.get(c), str) for c in ANSWER_COLUMNS) for r in rows)

    @classmethod
    def for_training(cls, settings, start):
        if start.mode == "scratch":
            raise UserError("reinforcement learning (GRPO) starts from a trained model: give it with --init_from")
        chat = answering_task(start, "reinforcement learning (GRPO)")
        rows = []
        for n, (messages, record) in enumerate(read_records(TextSource.at(settings.data, ".jsonl"), read=prompt_row)):
            ids = chat.encode_messages(messages, settings.drop_unknown)
            if len(ids) >= chat.block_size:
                raise UserError(f"{settings.data}, prompt {n + 1} is {len(ids)} tokens, no room for an answer in "
                                f"block_size={chat.block_size}; shorten it")
            rows.append({**record, "ids": ids, "prompt": record.get("prompt", messages)})
        if not rows:
            raise UserError(f"{settings.data} holds no prompts: one JSON object a line")
        return cls(chat, rows, held_out(len(rows), settings.val_fraction, settings.seed), Path(settings.data))

    def draw_prompts(self, split, n, generator):
        """n rows of the split, drawn with the generator's random numbers."""
        rows = self.rows[split]
        return [rows[i] for i in torch.randint(len(rows), (n,), generator=generator).tolist()]

    def answers(self, split):
        """(prompt ids, the answer's ids with the end of turn) of the split's rows (up to EVAL_LIMIT)."""
        if not self.exact_match:
            return []
        out = []
        for r in self.rows[split][:self.EVAL_LIMIT]:
            answer = next(r[c] for c in ANSWER_COLUMNS if isinstance(r.get(c), str))
            out.append((r["ids"], self.tokenizer.encode(answer, drop_unknown=True) + [self.chat.end]))
        return out

    def encode_prompt(self, text, drop_unknown=False):
        return self.chat.encode_prompt(text, drop_unknown)

    def describe(self, config):
        return f"prompts from {config.get('data')}, learned from rewards ({config.get('reward')})"

    def state(self):
        return {**self.chat.state(), "type": "prompts"}

    @classmethod
    def from_state(cls, state, tokenizer, block_size, model_vocab_size):
        return ChatTask.from_state(state, tokenizer, block_size, model_vocab_size)
