"""Plain text: predict each next token of a UTF-8 text, prepared once into token ids
(model/data.py) and read back memory-mapped; and the tokenizer a text task trains with."""

import sys
from pathlib import Path

import numpy as np
import torch

from model.data import TextSource, open_splits, prepare, reuse, safe_pieces
from model.engine import Rules
from model.errors import UserError
from model.tokenizer import CharTokenizer, characters, load_tokenizer_files, tokenizer_from_dict, train_bpe


class TextTask:
    """Language modelling on a text: predict each next token. For training, the text's token
    ids are prepared once (model/data.py) and read back memory-mapped; for inference the task
    needs only the tokenizer (None for a nanoGPT checkpoint: ids in, ids out)."""

    exact_match = False  # a continuation has no one right answer

    def __init__(self, tokenizer, block_size, data=None, model_vocab_size=None):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.data = data  # {"train": ids, "val": ids}, training only
        self.model_vocab_size = model_vocab_size or (tokenizer.model_vocab_size() if tokenizer else None)
        self.rules = Rules() if tokenizer is None else Rules(banned=tuple(tokenizer.never_sampled()),
                                                             vocab_limit=tokenizer.vocab_size)

    @classmethod
    def for_training(cls, settings, start):
        """The text of settings.data, prepared in bounded memory (model/data.py), with the tokenizer
        the start calls for: new (char, BPE trained on the text, or loaded from files), the
        checkpoint's (resume), or the base model's with the text's new characters (fine-tune)."""
        source = TextSource.at(settings.data)
        if source.size == 0:
            raise UserError("the text is empty: give a file with at least a few hundred characters")
        prepared = Path(settings.out_dir) / "prepared"
        found = reuse(source, prepared, prepare_settings(settings, start))
        if found is not None:
            tokenizer, data = tokenizer_from_dict(found["tokenizer"]), open_splits(prepared, found["dtype"])
        else:
            tokenizer = text_tokenizer(settings, start, source.chunks)
            data = prepare(source, tokenizer, prepared, settings.val_fraction, prepare_settings(settings, start))
        block_size, vocab = text_model_shape(settings, start, tokenizer)
        return cls(tokenizer, block_size, checked_splits(data, block_size, settings.val_fraction), vocab)

    def get_batch(self, split, batch_size, generator):
        data = self.data[split]
        T = self.block_size
        starts = torch.randint(len(data) - T, (batch_size,), generator=generator).numpy()
        rows = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def answers(self, split):
        return []

    def encode_prompt(self, text, drop_unknown=False):
        """The text's ids (UnknownCharacters for characters the vocabulary lacks, unless dropped);
        an empty text, or one that is nothing once they are dropped, starts a fresh line."""
        return (self.tokenizer.encode(text, drop_unknown=drop_unknown) if text else []) or self.tokenizer.start_ids()

    def describe(self, config):
        tok = self.tokenizer
        size = f"{tok.vocab_size} characters" if tok.kind == "char" else f"{tok.vocab_size}-token {tok.kind} tokenizer"
        return f"text from {config.get('data')} ({size})"

    def state(self):
        return {"type": "text"}

    @classmethod
    def from_state(cls, state, tokenizer, block_size, model_vocab_size):
        return cls(tokenizer, block_size, model_vocab_size=model_vocab_size)


def prepare_settings(settings, start):
    """What prepared files depend on besides the text: reused only when these are unchanged."""
    return {"tokenizer": settings.tokenizer if start.mode == "scratch" else start.mode, "vocab_size": settings.vocab_size,
            "base": start.tokenizer.digest() if start.tokenizer else None, "val_fraction": settings.val_fraction,
            "drop_unknown": settings.drop_unknown}


def checked_splits(data, block_size, val_fraction):
    """The prepared splits, if the training part holds a block; a validation part too short
    for one falls back, with a warning and a fix, to the training text."""
    n_train, n_val = len(data["train"]), len(data["val"])
    if n_train < block_size + 1:
        need = int((block_size + 1) / (1 - val_fraction)) + 1
        raise UserError(f"the text is too short: its training part has {n_train} tokens and "
                        f"block_size={block_size} needs at least {block_size + 1} (a text of about "
                        f"{need} tokens with val_fraction={val_fraction}); use more text or a "
                        f"smaller --block_size")
    if n_val < block_size + 1:
        if val_fraction > 0:
            enough = np.ceil(100 * (block_size + 2) / (n_train + n_val)) / 100
            print(f"warning: the validation split has {n_val} tokens, fewer than block_size + 1 = "
                  f"{block_size + 1}; the val loss is measured on the training text instead. To fix "
                  f"it, raise --val_fraction (to {enough:.2f} or more) or lower --block_size "
                  f"(to {max(1, n_val - 1)} or less)", file=sys.stderr)
        data["val"] = data["train"]
    return data


def text_tokenizer(settings, start, chunks):
    """The tokenizer a task trains with; building one may read the text, `chunks()` (streamed)."""
    if start.mode == "resume":
        return start.tokenizer
    if start.mode == "scratch" and settings.tokenizer == "char":
        return CharTokenizer(characters(chunks()))
    if start.mode == "scratch" and settings.tokenizer == "bpe":
        if not settings.vocab_size:
            raise UserError("--tokenizer=bpe needs --vocab_size: how many tokens to learn (e.g. 4096)")
        # pieces of a few KB: the trainer's memory follows the size of the strings it is given
        return train_bpe((piece for pieces in safe_pieces(chunks()) for piece in pieces), settings.vocab_size)
    tokenizer = load_tokenizer_files(settings.tokenizer) if start.mode == "scratch" else start.tokenizer
    if tokenizer.kind == "char":
        return tokenizer.extend(characters(chunks()))  # new characters, new ids
    if tokenizer.unk_id is None:
        return tokenizer  # byte-level: spells any text as it is
    return spell_the_text(tokenizer, characters(chunks()), settings.drop_unknown)


def spell_the_text(tokenizer, chars, drop_unknown):
    """A vocabulary that can spell every character of the text: the characters it lacks join it
    as new ids (the known ones keep theirs), or with --drop_unknown they are left out, with a
    notice; never silently the unknown token. A byte-level vocabulary spells anything already."""
    missing = tokenizer.unknown("".join(chars))
    if not missing:
        return tokenizer
    shown = "".join(missing[:30]) + ("..." if len(missing) > 30 else "")
    if drop_unknown:
        print(f"notice: {len(missing)} characters of the text are not in the vocabulary and are left out "
              f"(--drop_unknown): {shown}", file=sys.stderr)
        return tokenizer
    print(f"notice: {len(missing)} characters of the text join the vocabulary as new tokens: {shown}", file=sys.stderr)
    return tokenizer.extend(missing)


def text_model_shape(settings, start, tokenizer):
    """(block_size, the model's vocabulary size) for a text task. From scratch: block_size and
    the tokenizer's size (subword vocabularies padded to a multiple of 64), or --vocab_size when
    a char or loaded tokenizer is given one; otherwise the checkpoint's, grown if the tokenizer grew."""
    if start.mode == "scratch":
        vocab = tokenizer.model_vocab_size()
        if settings.vocab_size and settings.tokenizer != "bpe":
            if settings.vocab_size < tokenizer.vocab_size:
                raise UserError(f"--vocab_size={settings.vocab_size} is smaller than the tokenizer's "
                                f"{tokenizer.vocab_size} tokens; leave it 0 or give {tokenizer.vocab_size} or more")
            vocab = settings.vocab_size
        return settings.block_size, vocab
    base = start.ckpt.model_config.block_size
    block_size = base if start.mode == "resume" else settings.block_size or base
    if block_size > base:
        raise UserError(f"block_size={block_size} is larger than the base model's {base}; a fine-tune can keep it "
                        f"or reduce it (--block_size={base} or less)")
    return block_size, max(start.ckpt.model_config.vocab_size, tokenizer.vocab_size)
