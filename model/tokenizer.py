"""Character-level tokenizer: one id per character, kept as plain data in checkpoints."""

from dataclasses import dataclass, field

import numpy as np

from model.errors import UserError


def visible(ch):
    """A character as it can be shown in a table or on a plot axis: newline, space and tab made visible."""
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch)


@dataclass
class CharTokenizer:
    itos: list  # id -> character
    stoi: dict = field(init=False, repr=False)  # character -> id

    def __post_init__(self):
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text):
        """The vocabulary is the sorted set of the text's characters (newline included)."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.itos)

    def extend(self, text):
        """A tokenizer that keeps every id of this one and appends the text's new characters
        (sorted), for fine-tuning on text with characters the model has not seen."""
        new = sorted(set(text) - set(self.itos))
        return CharTokenizer(self.itos + new)

    def start_text(self):
        """Where a sample starts when no prompt is given: a newline (a fresh line) if the
        vocabulary has one, else its first character."""
        return "\n" if "\n" in self.stoi else self.itos[0]

    def unknown(self, text):
        """The characters of `text` that have no id, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text, drop_unknown=False):
        missing = self.unknown(text)
        if missing and not drop_unknown:
            shown = ", ".join(repr(ch) for ch in missing[:20])
            raise UserError(f"{len(missing)} character(s) not in the vocabulary: {shown}; "
                            f"change the text, or pass --drop_unknown=True to leave them out")
        return [self.stoi[ch] for ch in text if ch in self.stoi]

    def encode_array(self, text):
        """encode() for large texts, in NumPy: -> int64 array. Unknown characters raise UserError."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        vocab_codes = np.array([ord(ch) for ch in self.itos], dtype=np.uint32)
        order = np.argsort(vocab_codes)
        pos = np.searchsorted(vocab_codes[order], codes).clip(0, len(order) - 1)
        found = vocab_codes[order][pos] == codes
        if not found.all():
            self.encode(text[int(np.argmin(found))])  # raises with the character named
        return order[pos]

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def to_dict(self):
        return {"type": "char", "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("itos"), list):
            raise UserError(f"not a character tokenizer: {str(d)[:80]}")
        return cls(list(d["itos"]))
