"""Preferences: two answers to one prompt, the chosen and the rejected, in TRL's formats (.jsonl):

    {"prompt": "305", "chosen": "三百零五。", "rejected": "三百零五"}

for preference tuning (DPO, model/align.py). The model answers already (it has a chat template);
each answer is encoded as the template writes it after its prompt, and only the answer's tokens
(with its end of turn) are in the loss, as in supervised fine-tuning.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from model.data import TextSource
from model.errors import UserError
from model.tokenizer import UnknownCharacters
from model.tasks.chat import ChatTask, answering_task, first_answer, padded_batch
from model.tasks.records import held_out, preference, read_records


def encode_answer(chat, prompt, answer, drop_unknown, where):
    """(ids, in_loss) of the prompt followed by the answer, in_loss only on the answer's tokens."""
    try:
        prompt_ids = chat.encode_messages(prompt, drop_unknown)
        ids, in_loss = chat.template.encode(chat.tokenizer, prompt + answer, drop_unknown=drop_unknown)
    except UnknownCharacters as e:  # the model's vocabulary is the reference's: it cannot grow here
        raise UserError(f"{where}: {e}") from None
    if ids[:len(prompt_ids)] != prompt_ids:
        raise UserError(f"{where}: the chat template writes the prompt differently once it is answered, so the "
                        f"answer's tokens cannot be told apart")
    in_loss[:len(prompt_ids)] = [False] * len(prompt_ids)
    return np.array(ids, dtype=np.int64), np.array(in_loss, dtype=bool)


class PreferenceTask:
    """Pairs of answers to one prompt. A batch of B pairs is x, y (2B, T): the chosen answers in
    rows [0, B), the rejected answers of the same prompts in rows [B, 2B), padded as ChatTask's.
    A model tuned on it is used as the chat model it is (from_state gives its ChatTask)."""

    EVAL_LIMIT = 2000
    examples_name = "pairs"
    exact_match = True  # greedy replies are scored against the chosen answers

    def __init__(self, chat, pairs, is_val, source):
        self.chat, self.source = chat, source
        self.tokenizer, self.block_size, self.rules = chat.tokenizer, chat.block_size, chat.rules
        self.model_vocab_size = chat.model_vocab_size
        self.pairs = {"train": [p for p, v in zip(pairs, is_val) if not v], "val": [p for p, v in zip(pairs, is_val) if v]}
        if not self.pairs["train"]:
            raise UserError(f"no preference pair of {source} fits block_size={self.block_size}; raise --block_size")

    @classmethod
    def for_training(cls, settings, start):
        """settings.data's pairs, encoded with the starting model's template (read whole: preference
        data is small), those longer than block_size + 1 tokens left out with a notice."""
        if start.mode == "scratch":
            raise UserError("preference tuning (DPO) starts from a trained model: give it with --init_from")
        chat = answering_task(start, "preference tuning (DPO)")
        source = TextSource.at(settings.data, ".jsonl")
        pairs, fits = [], []
        for n, (prompt, chosen, rejected) in enumerate(read_records(source, read=preference)):
            where = f"{settings.data}, pair {n + 1}"
            pair = tuple(encode_answer(chat, prompt, answer, settings.drop_unknown, where) for answer in (chosen, rejected))
            pairs.append(pair)
            fits.append(all(len(ids) <= chat.block_size + 1 for ids, _ in pair))
        if not pairs:
            raise UserError(f"{settings.data} holds no preference pairs: one JSON object a line")
        if not all(fits):
            print(f"notice: {fits.count(False)} pairs are longer than block_size + 1 = {chat.block_size + 1} tokens and "
                  f"are left out; raise --block_size to keep them", file=sys.stderr)
        is_val = held_out(len(pairs), settings.val_fraction, settings.seed)
        kept = [i for i, f in enumerate(fits) if f]
        return cls(chat, [pairs[i] for i in kept], is_val[kept], Path(settings.data))

    def get_batch(self, split, batch_size, generator):
        pairs = self.pairs[split] or self.pairs["train"]  # nothing held out: the val loss is the training pairs'
        return self.batch_of([pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=generator).tolist()])

    def batch_of(self, pairs):
        """[(chosen, rejected), ...] -> x, y (2B, T)."""
        return padded_batch([p[0] for p in pairs] + [p[1] for p in pairs], self.chat.end)

    def answers(self, split):
        """(prompt ids, the chosen answer's ids) of the split's pairs (up to EVAL_LIMIT)."""
        return [first_answer(*chosen) for chosen, _ in self.pairs[split][:self.EVAL_LIMIT]]

    def encode_prompt(self, text, drop_unknown=False):
        return self.chat.encode_prompt(text, drop_unknown)

    def describe(self, config):
        return f"preferences: chosen/rejected pairs from {config.get('data')} (end of turn {self.chat.template.end_of_turn})"

    def state(self):
        return {**self.chat.state(), "type": "preference"}

    @classmethod
    def from_state(cls, state, tokenizer, block_size, model_vocab_size):
        return ChatTask.from_state(state, tokenizer, block_size, model_vocab_size)
