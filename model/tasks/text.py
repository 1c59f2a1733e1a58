"""Plain text: predict each next token of a UTF-8 text, prepared once into token ids
(model/data.py) and read back memory-mapped; and the tokenizer a text task trains with."""

import sys
from pathlib import Path

import numpy as np
import torch

from model.data import TextSource, open_splits, prepare, reuse, safe_pieces
from model.errors import UserError
from model.sampling import generate
from model.tokenizer import CharTokenizer, StreamDecoder, characters, load_tokenizer_files, tokenizer_from_dict, train_bpe

SEPARATOR = "-" * 40  # between samples

class TextTask:
    """Language modelling on a text: predict each next token. For training, the text's token
    ids are prepared once (model/data.py) and read back memory-mapped; for inference the task
    needs only the tokenizer (None for a nanoGPT checkpoint: ids in, ids out)."""

    def __init__(self, tokenizer, block_size, data=None, model_vocab_size=None):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.data = data  # {"train": ids, "val": ids}, training only
        self.model_vocab_size = model_vocab_size or (tokenizer.model_vocab_size() if tokenizer else None)

    @classmethod
    def for_training(cls, cfg, start):
        """The text of cfg.data, prepared in bounded memory (model/data.py), with the tokenizer the
        start calls for: new (char, BPE trained on the text, or loaded from files), the
        checkpoint's (resume), or the base model's with the text's new characters (fine-tune)."""
        source = TextSource.at(cfg.data)
        if source.size == 0:
            raise UserError("the text is empty: give a file with at least a few hundred characters")
        settings = prepare_settings(cfg, start)
        prepared = Path(cfg.out_dir) / "prepared"
        found = reuse(source, prepared, settings)
        if found is not None:
            tokenizer, data = tokenizer_from_dict(found["tokenizer"]), open_splits(prepared, found["dtype"])
        else:
            tokenizer = text_tokenizer(cfg, start, source.chunks)
            data = prepare(source, tokenizer, prepared, cfg.val_fraction, settings)
        block_size, vocab = text_model_shape(cfg, start, tokenizer)
        return cls(tokenizer, block_size, checked_splits(data, block_size, cfg.val_fraction), vocab)

    def get_batch(self, split, batch_size, generator):
        data = self.data[split]
        T = self.block_size
        starts = torch.randint(len(data) - T, (batch_size,), generator=generator).numpy()
        rows = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def evaluate(self, model, device):
        return {}

    def solved(self, evaluation):
        return None

    def state(self):
        return {"type": "text"}

    # ---- what the commands show ----

    def describe(self, config):
        tok = self.tokenizer
        size = f"{tok.vocab_size} characters" if tok.kind == "char" else f"{tok.vocab_size}-token {tok.kind} tokenizer"
        return f"text from {config.get('data')} ({size})"

    def report_rows(self, run):
        return []

    def demo(self, model, device, count=3, new_tokens=100):
        """A few samples at temperature 0.8 from a fresh line (seeded: the same every time)."""
        tok = self.tokenizer
        ids = torch.tensor([tok.start_ids()] * count, device=device)
        out = generate(model, ids, new_tokens, temperature=0.8, generator=torch.Generator(device).manual_seed(1337),
                       vocab_limit=tok.vocab_size, banned=tok.never_sampled())
        return f"\n{SEPARATOR}\n".join(tok.decode(row.tolist()) for row in out)

    def encode_prompt(self, text):
        unknown = self.tokenizer.unknown(text)
        if unknown:
            raise UserError(f"the prompt has characters the model does not know: {''.join(unknown)!r}")
        return self.tokenizer.encode(text)

    def attention_prompt(self, model, start):
        """The prompt's last block_size tokens, or the model's own greedy line from a fresh line."""
        tok = self.tokenizer
        if start:
            ids = self.encode_prompt(start)[-self.block_size:]
        else:
            first = torch.tensor([tok.start_ids()])
            ids = generate(model, first, min(24, self.block_size) - 1, temperature=0.0,
                           vocab_limit=tok.vocab_size)[0].tolist()
        return [tok.label(i) for i in ids], ids

    def sample(self, cfg, prompt, model, device):
        """sample.py: num_samples continuations of the prompt, generated as one batch. The first
        streams as it comes; the others print when they are done."""
        tok = self.tokenizer
        if tok is None:
            ids, decode = prompt_ids(prompt, model.config.vocab_size), lambda row: " ".join(str(i) for i in row)
            stream = lambda t: print(f" {t[0].item()}", end="", flush=True)  # noqa: E731
            finish = str
        else:
            ids = tok.encode(prompt, drop_unknown=cfg.drop_unknown) if prompt else tok.start_ids()
            if not ids:
                raise UserError("the prompt is empty once unknown characters are dropped; give --start with known "
                                "characters")
            decode, first = tok.decode, StreamDecoder(tok, ids)
            stream = lambda t: print(first.add(t[0].item()), end="", flush=True)  # noqa: E731
            finish = first.flush
        if len(ids) > self.block_size:
            print(f"notice: the prompt has {len(ids)} tokens; the model reads its last {self.block_size} "
                  f"(block_size)", file=sys.stderr)
        print(decode(ids), end="", flush=True)
        out = generate(model, torch.tensor([ids] * cfg.num_samples, device=device), cfg.max_new_tokens,
                       cfg.temperature, cfg.top_k, cfg.top_p, torch.Generator(device).manual_seed(cfg.seed),
                       cfg.kv_cache, on_token=stream, vocab_limit=tok.vocab_size if tok else None,
                       banned=tok.never_sampled() if tok else None)
        print(finish(), end="")
        for row in out[1:]:
            print(f"\n{SEPARATOR}\n{decode(row.tolist())}", end="")
        print()


def prepare_settings(cfg, start):
    """What prepared files depend on besides the text: reused only when these are unchanged."""
    return {"tokenizer": cfg.tokenizer if start.mode == "scratch" else start.mode, "vocab_size": cfg.vocab_size,
            "base": start.tokenizer.digest() if start.tokenizer else None, "val_fraction": cfg.val_fraction,
            "drop_unknown": cfg.drop_unknown}


def prompt_ids(prompt, vocab_size):
    """Without a vocabulary the prompt is token ids ('1 5 2'), each below vocab_size; none given: token 0."""
    try:
        ids = [int(t) for t in prompt.split()] or [0]
    except ValueError:
        raise UserError(f"without a vocabulary --start must be token ids like '1 5 2', got {prompt!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"--start has token ids {bad[:10]} outside the model's vocabulary [0, {vocab_size})")
    return ids


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


def text_tokenizer(cfg, start, chunks):
    """The tokenizer a task trains with; building one may read the text, `chunks()` (streamed)."""
    if start.mode == "resume":
        return start.tokenizer
    if start.mode == "scratch" and cfg.tokenizer == "char":
        return CharTokenizer(characters(chunks()))
    if start.mode == "scratch" and cfg.tokenizer == "bpe":
        if not cfg.vocab_size:
            raise UserError("--tokenizer=bpe needs --vocab_size: how many tokens to learn (e.g. 4096)")
        # pieces of a few KB: the trainer's memory follows the size of the strings it is given
        return train_bpe((piece for pieces in safe_pieces(chunks()) for piece in pieces), cfg.vocab_size)
    tokenizer = load_tokenizer_files(cfg.tokenizer) if start.mode == "scratch" else start.tokenizer
    if tokenizer.kind == "char":
        return tokenizer.extend(characters(chunks()))  # new characters, new ids
    if tokenizer.unk_id is None:
        return tokenizer  # byte-level: spells any text as it is
    return spell_the_text(tokenizer, characters(chunks()), cfg.drop_unknown)


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


def text_model_shape(cfg, start, tokenizer):
    """(block_size, the model's vocabulary size) for a text task. From scratch: block_size and
    the tokenizer's size (subword vocabularies padded to a multiple of 64), or --vocab_size when
    a char or loaded tokenizer is given one; otherwise the checkpoint's, grown if the tokenizer grew."""
    if start.mode == "scratch":
        vocab = tokenizer.model_vocab_size()
        if cfg.vocab_size and cfg.tokenizer != "bpe":
            if cfg.vocab_size < tokenizer.vocab_size:
                raise UserError(f"--vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                                f"{tokenizer.vocab_size} tokens; leave it 0 or give {tokenizer.vocab_size} or more")
            vocab = cfg.vocab_size
        return cfg.block_size, vocab
    base = start.model_args["block_size"]
    block_size = base if start.mode == "resume" else cfg.block_size or base
    if block_size > base:
        raise UserError(f"block_size={block_size} is larger than the base model's {base}; a fine-tune can keep it "
                        f"or reduce it (--block_size={base} or less)")
    return block_size, max(start.model_args["vocab_size"], tokenizer.vocab_size)
