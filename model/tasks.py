"""The two kinds of training data: the letter-sorting task and plain text.

Both give batches as (x, y) pairs of (B, T) int64 tensors, y being x shifted by one token,
with -1 where no loss is taken.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from model.config import UserError
from model.tokenizer import CharTokenizer


# ---- sorting letters ----------------------------------------------------------------------

class SortTask:
    """Inputs are `length` letters from `alphabet`; the answer is the same letters sorted.
    A sequence is the input followed by the answer, e.g. CBABBC ABBBCC; the model reads all
    but its last token and is scored only on the answer, so the targets on input positions
    are -1. Each input is numbered (its letters as base-k digits); a seeded, fixed fraction
    of the numbers is held out and never trained on."""

    EVAL_LIMIT = 10_000  # larger splits are scored on a fixed random subset of this size

    def __init__(self, length=6, alphabet="ABC", holdout=0.2, seed=1337, heldout=None):
        self.length = length
        self.alphabet = alphabet
        self.tokenizer = CharTokenizer(list(alphabet))  # ids follow the alphabet: A=0, B=1, C=2
        self.block_size = 2 * length - 1
        n = len(alphabet) ** length
        if n > 2 ** 40:
            raise UserError(f"{len(alphabet)}^{length} inputs are too many to number; use fewer letters")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if heldout is None:
            heldout = perm[:max(1, round(n * holdout))]
        is_heldout = torch.zeros(n, dtype=torch.bool)
        is_heldout[heldout] = True
        self.splits = {"val": heldout, "train": perm[~is_heldout[perm]]}

    def inputs(self, numbers):
        """Input numbers (N,) -> their letters as token ids (N, length)."""
        k = len(self.alphabet)
        powers = k ** torch.arange(self.length - 1, -1, -1)
        return (numbers[:, None] // powers) % k

    def numbers(self, letters):
        """The inverse of inputs(): letters (N, length) -> input numbers (N,)."""
        k = len(self.alphabet)
        return (letters * k ** torch.arange(self.length - 1, -1, -1)).sum(dim=1)

    def examples(self, numbers):
        """Input numbers (N,) -> x, y (N, 2 * length - 1): x = input + answer[:-1], y = the
        next token at each place, -1 on the first length - 1 places (still reading the input)."""
        letters = self.inputs(numbers)
        seq = torch.cat([letters, letters.sort(dim=1).values], dim=1)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :self.length - 1] = -1
        return x, y

    def get_batch(self, split, batch_size, generator):
        numbers = self.splits[split]
        pick = torch.randint(len(numbers), (batch_size,), generator=generator)
        return self.examples(numbers[pick])

    def answers(self, model, letters, device):
        """The model's greedy answers to inputs (N, length) -> (N, length), on the CPU."""
        from model.sampling import generate  # here, not at the top: sampling needs no tasks
        return generate(model, letters.to(device), self.length, temperature=0.0)[:, self.length:].cpu()

    def accuracy(self, model, split, device):
        """Greedy exact match: the share of the split's inputs whose whole answer is right."""
        letters = self.inputs(self.splits[split][:self.EVAL_LIMIT])
        right = (self.answers(model, letters, device) == letters.sort(dim=1).values).all(dim=1)
        return right.float().mean().item()

    def evaluate(self, model, device):
        return {"heldout_acc": self.accuracy(model, "val", device),
                "train_acc": self.accuracy(model, "train", device)}

    def state(self):
        """Plain data for the checkpoint: enough to rebuild the task and its exact split."""
        return {"type": "sort", "length": self.length, "alphabet": self.alphabet,
                "heldout": self.splits["val"].clone()}

    @classmethod
    def from_state(cls, state):
        return cls(state["length"], state["alphabet"], heldout=state["heldout"])


# ---- plain text ---------------------------------------------------------------------------

def read_text(path):
    """A UTF-8 text file, or every .txt file of a folder (sorted by name, joined by newlines)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise UserError(f"folder {path} holds no .txt files")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"data {path} not found: give a UTF-8 text file or a folder of .txt files")
    texts = []
    for f in files:
        raw = f.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text: byte {e.start} (0x{raw[e.start]:02x}) cannot be "
                            f"decoded; convert it, e.g. iconv -f GBK -t UTF-8 {f.name} > fixed.txt") from None
    return "\n".join(texts)


class TextTask:
    """Character-level language modelling on a text. The text is tokenised once into
    prepared/train.bin and prepared/val.bin (uint16, uint32 past 65,535 characters) under
    out_dir and read back memory-mapped; a run on the same text and vocabulary reuses them."""

    def __init__(self, text, tokenizer, prepared_dir, block_size, val_fraction):
        self.tokenizer = tokenizer
        self.block_size = block_size
        if not text:
            raise UserError("the text is empty: give a file with at least a few hundred characters")
        self.data = prepare_tokens(text, tokenizer, Path(prepared_dir), val_fraction)
        n_train, n_val = len(self.data["train"]), len(self.data["val"])
        if n_train < block_size + 1:
            need = int((block_size + 1) / (1 - val_fraction)) + 1
            raise UserError(f"the text is too short: its training part has {n_train} characters and "
                            f"block_size={block_size} needs at least {block_size + 1} (a text of about "
                            f"{need} characters with val_fraction={val_fraction}); use more text or a "
                            f"smaller --block_size")
        if n_val < block_size + 1:
            if val_fraction > 0:
                enough = math.ceil(100 * (block_size + 2) / (n_train + n_val)) / 100
                print(f"warning: the validation split has {n_val} characters, fewer than block_size + 1 = "
                      f"{block_size + 1}; the val loss is measured on the training text instead. To fix "
                      f"it, raise --val_fraction (to {enough:.2f} or more) or lower --block_size "
                      f"(to {max(1, n_val - 1)} or less)", file=sys.stderr)
            self.data["val"] = self.data["train"]

    def get_batch(self, split, batch_size, generator):
        data = self.data[split]
        T = self.block_size
        starts = torch.randint(len(data) - T, (batch_size,), generator=generator).tolist()
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in starts])
        return x, y

    def evaluate(self, model, device):
        return {}

    def state(self):
        return {"type": "text"}


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def prepare_tokens(text, tokenizer, prepared_dir, val_fraction):
    """Token ids of the text split into train and val, as memory-mapped arrays, prepared once:
    a meta.json records the text's hash and the vocabulary they were made with."""
    key = {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
           "itos_sha256": hashlib.sha256("".join(tokenizer.itos).encode("utf-8")).hexdigest(),
           "val_fraction": val_fraction,
           "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name}
    meta_path = prepared_dir / "meta.json"
    paths = {s: prepared_dir / f"{s}.bin" for s in ("train", "val")}
    if not (meta_path.is_file() and json.loads(meta_path.read_text()) == key and all(p.is_file() for p in paths.values())):
        ids = tokenizer.encode_array(text).astype(key["dtype"])
        n_val = int(len(ids) * val_fraction)
        prepared_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # a crash below leaves no meta, so no stale reuse
        ids[:len(ids) - n_val].tofile(paths["train"])
        ids[len(ids) - n_val:].tofile(paths["val"])
        meta_path.write_text(json.dumps(key))
    return {s: np.memmap(p, dtype=key["dtype"], mode="r") if p.stat().st_size else np.zeros(0, key["dtype"])
            for s, p in paths.items()}
