"""Answers: teach a model to answer from prompt/completion pairs or conversations, the two
formats of TRL and transformers, one JSON object a line in .jsonl files:

    {"prompt": "305", "completion": "三百零五"}
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]}

The chat template (template.py) turns messages into tokens. The loss is on what the assistant
writes, its content and its end-of-turn token (so the model learns to stop); the targets of the
markers, the system and user turns are -1, as on the sorter's input.
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data import TextSource, reuse, token_dtype, write_meta
from model.engine import Rules
from model.errors import UserError
from model.tasks.records import contents, held_out, read_records
from model.tasks.template import ChatTemplate
from model.tasks.text import prepare_settings, text_model_shape, text_tokenizer
from model.tokenizer import tokenizer_from_dict

SPLIT_FILES = ("ids.bin", "loss.bin", "offsets.npy")  # per split: token ids, 1 where in the loss, example starts


def start_template(start, tokenizer):
    """(template, tokenizer) for training: a resumed run's; a base model's own (trained on .jsonl, or a
    folder's chat template, which fine-tuning then teaches); else ours, its special tokens added."""
    state = start.ckpt.task if start.ckpt else {}
    if "template" in state:
        return ChatTemplate.from_dict(state["template"]), tokenizer
    if start.ckpt and start.ckpt.chat:
        return ChatTemplate.from_dict(start.ckpt.chat), tokenizer
    return ChatTemplate.for_tokenizer(tokenizer)


# ---- preparing examples ------------------------------------------------------------------

def prepare_examples(source, tokenizer, template, prepared, is_val, settings, hasher):
    """Each record's ids and loss mask into prepared/{train,val}.{ids,loss}.bin, with the examples'
    start offsets; meta.json last (a stopped run leaves nothing to reuse), with `hasher`'s digest of
    the files, whether every record is a prompt/completion pair and the most exchanges (user turns) one has."""
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "meta.json").unlink(missing_ok=True)
    dtype, pairs, turns = token_dtype(tokenizer.model_vocab_size()), True, 0
    files = {s: (open(prepared / f"{s}.ids.bin", "wb"), open(prepared / f"{s}.loss.bin", "wb")) for s in ("train", "val")}
    offsets = {"train": [0], "val": [0]}
    bar = tqdm(total=len(is_val), unit="ex", desc="preparing examples", dynamic_ncols=True, disable=len(is_val) < 50_000)
    try:
        for i, (messages, is_pair) in enumerate(read_records(source)):
            bar.update(1)
            ids, in_loss = template.encode(tokenizer, messages, drop_unknown=True)  # the vocabulary spells the text
            split = "val" if is_val[i] else "train"
            files[split][0].write(np.array(ids, dtype=dtype).tobytes())
            files[split][1].write(np.array(in_loss, dtype=np.uint8).tobytes())
            offsets[split].append(offsets[split][-1] + len(ids))
            pairs &= is_pair
            turns = max(turns, exchanges(messages))
    finally:
        bar.close()
        for f in (f for pair in files.values() for f in pair):
            f.close()
    for split, starts in offsets.items():
        np.save(prepared / f"{split}.offsets.npy", np.array(starts, dtype=np.int64))
    write_meta(prepared, source, hasher, settings, tokenizer, dtype, pairs=pairs, turns=turns,
               template=template.to_dict())


def exchanges(messages):
    """How many exchanges a conversation has: its user turns."""
    return sum(m["role"] == "user" for m in messages)


@dataclass
class Examples:
    """One split's examples: example i is ids[offsets[i]:offsets[i + 1]] (memory-mapped), with its
    loss mask; `keep` lists the examples that fit the model (block_size + 1 tokens at most)."""
    ids: np.ndarray
    loss: np.ndarray
    offsets: np.ndarray
    keep: np.ndarray

    @classmethod
    def open(cls, prepared, split, dtype, block_size):
        offsets = np.load(prepared / f"{split}.offsets.npy")
        ids, loss = (np.memmap(prepared / f"{split}.{kind}.bin", dtype=t, mode="r") if offsets[-1] else np.zeros(0, t)
                     for kind, t in (("ids", dtype), ("loss", np.uint8)))
        return cls(ids, loss, offsets, np.flatnonzero(np.diff(offsets) <= block_size + 1))

    def example(self, i):
        """(ids, in_loss) of example i as int64 and bool arrays."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b].astype(np.int64), self.loss[a:b].astype(bool)


def open_examples(prepared, dtype, block_size):
    """The prepared splits; examples longer than block_size + 1 tokens are left out, said once."""
    data = {s: Examples.open(prepared, s, dtype, block_size) for s in ("train", "val")}
    dropped = sum(len(d.offsets) - 1 - len(d.keep) for d in data.values())
    if dropped:
        print(f"notice: {dropped} examples are longer than block_size + 1 = {block_size + 1} tokens and are left out "
              f"(a cut answer would teach the model not to finish); raise --block_size to keep them", file=sys.stderr)
    if not len(data["train"].keep):
        raise UserError(f"no training example fits block_size={block_size}; raise --block_size")
    return data


def padded_batch(rows, pad_id):
    """Examples [(ids, in_loss), ...] -> x, y (B, T), T the longest example's length - 1: x = ids[:-1],
    y = ids[1:] where ids[t + 1] is in the loss, else -1; rows padded with pad_id in x and -1 in y."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, in_loss) in enumerate(rows):
        x[b, :len(ids) - 1] = torch.from_numpy(ids[:-1])
        y[b, :len(ids) - 1] = torch.from_numpy(np.where(in_loss[1:], ids[1:], -1))
    return x, y


def first_answer(ids, in_loss):
    """(the ids before the first answer, the answer: the tokens from there while the loss counts)."""
    first = int(np.argmax(in_loss))
    end = first + (int(np.argmin(in_loss[first:])) if not in_loss[first:].all() else len(ids) - first)
    return ids[:first].tolist(), ids[first:end].tolist()


def answering_task(start, what):
    """The ChatTask of a model that answers already (a chat checkpoint's, a folder's chat template),
    for tuning it further on preferences or rewards; UserError for one that does not."""
    state = start.ckpt.task if start.ckpt else None
    template = (state or {}).get("template") or (start.ckpt.chat if start.ckpt else None)
    if template is None:
        raise UserError(f"{what} starts from a model that answers (trained on pairs or conversations, or a folder "
                        f"with a chat template): fine-tune one on prompt/completion pairs first, then give it "
                        f"with --init_from")
    config = start.ckpt.model_config
    return ChatTask(start.tokenizer, ChatTemplate.from_dict(template), config.block_size, model_vocab_size=config.vocab_size)


# ---- the task ----------------------------------------------------------------------------

class ChatTask:
    """Answering: batches of whole examples (padded, padding never in the loss), the loss on what
    the assistant writes, and prompts as the template writes them. A reply ends at the end of turn
    and never contains the template's other markers (rules)."""

    EVAL_LIMIT = 2000  # larger splits are scored on their first examples
    examples_name = "completions"

    def __init__(self, tokenizer, template, block_size, data=None, model_vocab_size=None, pairs=False, turns=0):
        self.tokenizer, self.template, self.block_size = tokenizer, template, block_size
        self.data, self.pairs = data, pairs
        self.turns = turns  # the most exchanges a training conversation had (0: not known, a folder's template)
        self.exact_match = pairs  # a pair's completion is its one right answer; a conversation's replies are examples
        self.model_vocab_size = model_vocab_size or tokenizer.model_vocab_size()
        self.end = tokenizer.special_id(template.end_of_turn)
        never = {i for i in tokenizer.never_sampled() if i != self.end} | set(template.marker_ids(tokenizer))
        self.rules = Rules(stop_ids=(self.end,), banned=tuple(sorted(never)), vocab_limit=tokenizer.vocab_size)

    @classmethod
    def for_training(cls, settings, start):
        """settings.data's records with the tokenizer the start calls for (as for text) plus the
        template's special tokens, prepared once into prepared/ and reused while nothing changed."""
        source = TextSource.at(settings.data, ".jsonl")
        prepared_as = {**prepare_settings(settings, start), "task": "chat", "seed": settings.seed}
        prepared = Path(settings.out_dir) / "prepared"
        meta = reuse(source, prepared, prepared_as, [f"{s}.{f}" for s in ("train", "val") for f in SPLIT_FILES])
        if meta is not None:
            tokenizer, template = tokenizer_from_dict(meta["tokenizer"]), ChatTemplate.from_dict(meta["template"])
        else:
            hasher = hashlib.sha256()  # hashed as the lines are checked: no pass over the files only to hash them
            n = sum(1 for _ in read_records(source, hasher))  # every line checked before anything is written
            if n == 0:
                raise UserError(f"{settings.data} holds no examples: one JSON object a line")
            base = text_tokenizer(settings, start, lambda: contents(source))
            template, tokenizer = start_template(start, base)
            prepare_examples(source, tokenizer, template, prepared, held_out(n, settings.val_fraction, settings.seed),
                             prepared_as, hasher)
            meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
        block_size, vocab = text_model_shape(settings, start, tokenizer)
        data = open_examples(prepared, meta["dtype"], block_size)
        if not len(data["val"].keep):
            data["val"] = data["train"]  # nothing held out (val_fraction=0): the val loss is the training examples'
        turns = meta.get("turns") or max(exchanges(m) for m, _ in read_records(source))  # older preparations lack it
        return cls(tokenizer, template, block_size, data, vocab, meta["pairs"], turns)

    def get_batch(self, split, batch_size, generator):
        """Random examples of the split, each x = ids[:-1], y = ids[1:] where ids[t + 1] is in the
        loss, else -1; rows padded to the longest (x with the end-of-turn id, y with -1)."""
        d = self.data[split]
        return padded_batch([d.example(i) for i in d.keep[torch.randint(len(d.keep), (batch_size,), generator=generator)
                                                           .numpy()]], self.end)

    def answers(self, split):
        """(prompt ids, answer ids) of the split's examples (up to EVAL_LIMIT): the conversation up to its
        first answer, and that answer with its end of turn. None held out: [] for "val"."""
        if self.data is None or (split == "val" and self.data["val"] is self.data["train"]):
            return []
        return [first_answer(*self.data[split].example(i)) for i in self.data[split].keep[:self.EVAL_LIMIT]]

    def encode_prompt(self, text, drop_unknown=False):
        """Plain text (no template) as ids, to be continued; UnknownCharacters for characters the model lacks."""
        return (self.tokenizer.encode(text, drop_unknown=drop_unknown) if text else []) or self.tokenizer.start_ids()

    def encode_messages(self, messages, drop_unknown=False):
        """A whole conversation as the ids its reply follows (ending with the assistant's marker);
        UnknownCharacters for characters the model lacks."""
        return self.template.encode(self.tokenizer, messages, generation_prompt=True, drop_unknown=drop_unknown)[0]

    def describe(self, config):
        kind = "prompt/completion pairs" if self.pairs else "conversations"
        return f"answers: {kind} from {config.get('data')} (end of turn {self.template.end_of_turn})"

    def state(self):
        return {"type": "chat", "template": self.template.to_dict(), "pairs": self.pairs, "turns": self.turns}

    @classmethod
    def from_state(cls, state, tokenizer, block_size, model_vocab_size):
        return cls(tokenizer, ChatTemplate.from_dict(state["template"]), block_size,
                   model_vocab_size=model_vocab_size, pairs=state.get("pairs", False), turns=state.get("turns", 0))
