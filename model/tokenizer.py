"""Tokenizers: text <-> token ids, one interface for three kinds, each kept in the checkpoint as
plain data (so torch.load(weights_only=True) reads it and sample.py needs no other file):

- char: one id per character (the default; Chinese and small texts);
- bpe: byte-level BPE trained on the training text with Hugging Face `tokenizers`;
- file: a tokenizer loaded from files (tokenizer.json, GPT-2's vocab.json + merges.txt, or a
  BERT vocab.txt), through `tokenizers` too.

Every kind has: vocab_size, encode(text, drop_unknown), decode(ids), unknown(text),
start_ids(), label(id), token_bytes(id), model_vocab_size(), never_sampled(), digest(), to_dict(), and special
tokens: with_specials(names), special_id(name) and special_tokens(). A special token (a chat template's role marker,
an end-of-turn token) has an id of its own that no text ever encodes to: a text that spells
"<|user|>" stays those characters. `tokenizers` is an optional extra (pip install -e ".[bpe]"):
the char kind never needs it.
"""

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import UserError

SPECIALS = ["<|endoftext|>"]  # the BPE kind's one special token, as GPT-2's
BYTE_SYMBOLS = 256
CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# WordPiece decoding puts a space between all tokens, and BERT splits every Chinese character
# off anyway: a space between two Chinese characters, or between one and punctuation, carries
# nothing and is dropped (天 行 健 , -> 天行健,); a space beside a Latin word stays.
CJK_SPACE = re.compile(f"(?<=[{CJK}]) (?=[{CJK}]|[^\\w\\s])|(?<=[^\\w\\s]) (?=[{CJK}])")


def visible(ch):
    """A character as it can be shown in a table or on a plot axis: newline, space and tab made visible."""
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch)


class UnknownCharacters(UserError):
    """A text has characters the vocabulary cannot spell (`missing`, in order of first appearance).
    The one check every prompt goes through; the server words it for an API client."""

    def __init__(self, missing):
        self.missing = list(missing)
        shown = ", ".join(repr(ch) for ch in self.missing[:20])
        super().__init__(f"{len(self.missing)} character(s) not in the vocabulary: {shown}; change the text, or pass "
                         f"--drop_unknown=True to leave them out")


def spelled(tokenizer, text, drop_unknown=False):
    """The text as the vocabulary can spell it: UnknownCharacters naming what it lacks, or with
    drop_unknown the text without those characters."""
    missing = tokenizer.unknown(text)
    if missing and not drop_unknown:
        raise UnknownCharacters(missing)
    return "".join(c for c in text if c not in set(missing)) if missing else text


def encode_as_transformers(tokenizer, text):
    """The ids transformers gives a text (lm-eval's and vLLM's tokenizers): the special tokens'
    spellings read as those tokens (split out first), the rest through the vocabulary, characters
    it lacks left out. Our own commands never do this: "<|user|>" in a user's text stays text."""
    specials = sorted(tokenizer.special_tokens(), key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    ids = []
    for i, piece in enumerate(pieces):
        if i % 2:  # re.split puts what its group matched at the odd places
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids += tokenizer.encode(spelled(tokenizer, piece, drop_unknown=True))
    return ids


# ---- characters ---------------------------------------------------------------------------

def characters(chunks):
    """The sorted set of characters of some text given in chunks, without holding it whole."""
    seen = np.zeros(0x110000, dtype=bool)
    for chunk in chunks:
        seen[np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)] = True
    return [chr(c) for c in np.flatnonzero(seen)]


@dataclass
class CharTokenizer:
    itos: list  # id -> character; an entry longer than one character is a special token
    stoi: dict = field(init=False, repr=False)  # character -> id
    kind = "char"

    def __post_init__(self):
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self._table = None

    @classmethod
    def from_text(cls, text):
        """The vocabulary is the sorted set of the text's characters (newline included)."""
        return cls(characters([text]))

    @property
    def vocab_size(self):
        return len(self.itos)

    def model_vocab_size(self):
        return self.vocab_size

    def extend(self, chars):
        """A tokenizer that keeps every id of this one and appends the new characters of `chars`
        (a text or a list of characters), sorted: for fine-tuning on text with unseen characters."""
        new = sorted(set(chars) - set(self.itos))
        return CharTokenizer(self.itos + new)

    def with_specials(self, names):
        """This tokenizer with the special tokens `names` it lacks appended (every id kept)."""
        return CharTokenizer(self.itos + [n for n in names if n not in self.stoi])

    def special_id(self, name):
        return self.stoi[name] if len(name) > 1 and name in self.stoi else None

    def special_tokens(self):
        return [t for t in self.itos if len(t) > 1]

    def start_ids(self):
        """Where a sample starts when no prompt is given: a newline (a fresh line) if the
        vocabulary has one, else its first character."""
        return [self.stoi.get("\n", 0)]

    def never_sampled(self):
        return []

    def unknown(self, text):
        """The characters of `text` that have no id, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text, drop_unknown=False):
        return [self.stoi[ch] for ch in spelled(self, text, drop_unknown)]

    def encode_array(self, text):
        """encode() for large texts, in NumPy: -> int64 array. Unknown characters raise UserError."""
        if self._table is None:  # code point -> id, -1 where there is none
            self._table = np.full(0x110000, -1, dtype=np.int64)
            chars = [(i, ch) for i, ch in enumerate(self.itos) if len(ch) == 1]  # never a special token
            self._table[[ord(ch) for _, ch in chars]] = [i for i, _ in chars]
        ids = self._table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        if ids.size and ids.min() < 0:
            self.encode(text[int(np.argmin(ids))])  # raises with the character named
        return ids

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def label(self, i):
        return visible(self.itos[i])

    def token_bytes(self, i):
        return self.itos[i].encode("utf-8")

    def digest(self):
        return hashlib.sha256(json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8")).hexdigest()

    def to_dict(self):
        return {"type": "char", "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("itos"), list):
            raise UserError(f"not a character tokenizer: {str(d)[:80]}")
        return cls(list(d["itos"]))


# ---- Hugging Face tokenizers: trained BPE, or loaded from files ---------------------------

def hf():
    """The `tokenizers` library, or a UserError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError('subword tokenizers need the tokenizers library: pip install -e ".[bpe]"') from None
    return tokenizers


def byte_symbols():
    """GPT-2's map from the 256 bytes to the printable characters byte-level tokens are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind our interface. kind: 'bpe' (trained here) or 'file'."""

    def __init__(self, tok, kind):
        self.tok, self.kind = tok, kind
        tok.encode_special_tokens = True  # text never encodes to a special token (not saved: set on every load)
        spec = json.loads(tok.to_str())
        self.byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        self.wordpiece = (spec.get("model") or {}).get("type") == "WordPiece"
        unk = (spec.get("model") or {}).get("unk_token")
        self.unk_id = tok.token_to_id(unk) if unk else None
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # a vocab.txt may skip ids
        self._bytes = {c: b for b, c in byte_symbols().items()} if self.byte_level else None

    def model_vocab_size(self):
        """The model's vocabulary: the tokenizer's, padded to a multiple of 64 (faster matmuls)."""
        return -(-self.vocab_size // 64) * 64

    def encode(self, text, drop_unknown=False):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.unk_id is not None and self.unk_id in ids:
            if not drop_unknown:
                raise UnknownCharacters(self.unknown(text))
            ids = [i for i in ids if i != self.unk_id]
        return ids

    def encode_batch(self, texts):
        """Many texts at once (in parallel, in Rust, without offsets) -> one flat int64 array of their
        ids, for preparing training data: the unknown token is left out (the vocabulary grows to
        spell the text first, unless --drop_unknown, which says what it drops)."""
        out = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        ids = np.concatenate([np.array(e.ids, dtype=np.int64) for e in out] or [np.zeros(0, np.int64)])
        return ids if self.unk_id is None else ids[ids != self.unk_id]

    def extend(self, chars):
        """A WordPiece vocabulary that keeps every id and appends the characters of `chars` it
        cannot spell (in their normalised form, e.g. lower case), for fine-tuning on new text."""
        missing = self.unknown("".join(chars))
        if not missing:
            return self
        spec = json.loads(self.tok.to_str())
        vocab = spec["model"]["vocab"]
        normal = self.tok.normalizer.normalize_str if self.tok.normalizer else str
        next_id = self.vocab_size
        for c in dict.fromkeys(normal(c).strip() for c in missing):  # BERT pads Chinese characters with spaces
            if c and c not in vocab:
                vocab[c], next_id = next_id, next_id + 1
        return HFTokenizer(hf().Tokenizer.from_str(json.dumps(spec)), self.kind)

    def encode_template(self, text):
        """A chat template's rendered text -> ids, its special tokens' spellings read as those tokens
        (as transformers' apply_chat_template reads them; user text goes through encode())."""
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True

    def with_specials(self, names):
        """This tokenizer with the special tokens `names` it lacks added after its ids."""
        missing = [n for n in names if self.special_id(n) is None]
        if not missing:
            return self
        tok = hf().Tokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens([hf().AddedToken(n, special=True, normalized=False) for n in missing])
        return HFTokenizer(tok, self.kind)

    def special_id(self, name):
        """The id of the special (added) token `name`, or None."""
        return next((i for i, t in self.tok.get_added_tokens_decoder().items() if t.content == name and t.special), None)

    def special_tokens(self):
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]

    def never_sampled(self):
        """BERT's special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) mark structure, not text."""
        if not self.wordpiece:
            return []
        found = (self.tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
        return [i for i in found if i is not None]

    def unknown(self, text):
        """Characters the vocabulary cannot spell (they would become the unknown token); none
        for a byte-level tokenizer, which spells any text with its 256 byte symbols."""
        if self.unk_id is None:
            return []
        return [c for c in dict.fromkeys(text) if not c.isspace()
                and self.unk_id in self.tok.encode(c, add_special_tokens=False).ids]

    def decode(self, ids):
        text = self.tok.decode([int(i) for i in ids], skip_special_tokens=False)
        return CJK_SPACE.sub("", text) if self.wordpiece else text

    def start_ids(self):
        """A fresh line, or (a vocabulary with no newline, like BERT's) its [CLS] token or id 0."""
        newline = self.tok.encode("\n", add_special_tokens=False).ids
        cls = self.tok.token_to_id("[CLS]")
        return newline if newline and newline != [self.unk_id] else [cls if cls is not None else 0]

    def label(self, i):
        """The token as text; a byte-level token that is not whole UTF-8 shows its bytes, e.g. <e5 a4>."""
        token = self.tok.id_to_token(i)
        if not self.is_bytes(token):
            return "".join(visible(c) for c in (token or f"<{i}>"))
        raw = self.token_bytes(i)
        try:
            return "".join(visible(c) for c in raw.decode("utf-8"))
        except UnicodeDecodeError:
            return f"<{raw.hex(' ')}>"

    def is_bytes(self, token):
        """Whether a token's text is byte symbols (a byte-level BPE's merges; not its added tokens)."""
        return self.byte_level and token is not None and all(c in self._bytes for c in token)

    def token_bytes(self, i):
        """The bytes token i adds to a text (a byte-level token's may end inside a character)."""
        token = self.tok.id_to_token(i)
        return bytes(self._bytes[c] for c in token) if self.is_bytes(token) else self.decode([i]).encode("utf-8")

    def digest(self):
        return hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()

    def to_dict(self):
        return {"type": self.kind, "json": self.tok.to_str()}

    @classmethod
    def from_dict(cls, d):
        return cls(hf().Tokenizer.from_str(d["json"]), d["type"])


def train_bpe(chunks, vocab_size, count=None):
    """A byte-level BPE tokenizer trained on text given in chunks (streamed, never whole), with
    `vocab_size` ids: 256 byte symbols, <|endoftext|>, and the merges the text supports."""
    lib = hf()
    least = BYTE_SYMBOLS + len(SPECIALS)
    if vocab_size < least:
        raise UserError(f"--vocab_size={vocab_size} is too small for a byte-level BPE: it needs the "
                        f"{BYTE_SYMBOLS} byte symbols and {len(SPECIALS)} special token, so {least} or more "
                        f"(try 4096)")
    tok = lib.Tokenizer(lib.models.BPE())
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = lib.decoders.ByteLevel()
    trainer = lib.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=True,
                                      initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    tok.train_from_iterator(chunks, trainer, length=count)
    print(f"trained a {tok.get_vocab_size()}-token byte-level BPE in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if tok.get_vocab_size() < vocab_size:
        raise UserError(f"--vocab_size={vocab_size} is too large for this text: it supports only "
                        f"{tok.get_vocab_size()} tokens; use --vocab_size={tok.get_vocab_size()} or less")
    return HFTokenizer(tok, "bpe")


def wordpiece_from_vocab(path):
    """A BERT-style WordPiece tokenizer (lower-casing, Chinese characters split one by one) from a
    vocab.txt, as BertTokenizer reads it: the Chinese GPT-2 models on the hub ship one."""
    lib = hf()
    vocab = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\r"), i)
    if "[UNK]" not in vocab:
        raise UserError(f"{path} has no [UNK] token: a BERT vocab.txt needs one (one token a line)")
    tok = lib.Tokenizer(lib.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = lib.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = lib.pre_tokenizers.BertPreTokenizer()
    tok.decoder = lib.decoders.WordPiece()
    return tok


def load_tokenizer_files(path):
    """--tokenizer=PATH: a tokenizer.json, a folder holding one, GPT-2's vocab.json + merges.txt, or
    a BERT vocab.txt (file or folder). A file that does not parse is a UserError."""
    lib, p = hf(), Path(path)
    if p.is_dir():
        found = [p / n for n in ("tokenizer.json", "vocab.json", "vocab.txt") if (p / n).is_file()]
        if not found:
            raise UserError(f"{path} holds no tokenizer.json, vocab.json + merges.txt or vocab.txt")
        p = found[0]
    elif not p.is_file():
        raise UserError(f"--tokenizer={path}: no such file or folder; use char, bpe, or a tokenizer's path")
    try:
        if p.suffix == ".txt":  # one token a line: a BERT vocab.txt
            return HFTokenizer(wordpiece_from_vocab(p), "file")
        if p.name == "vocab.json":
            if not (p.parent / "merges.txt").is_file():
                raise UserError(f"{p} needs merges.txt beside it (GPT-2's two files)")
            tok = lib.Tokenizer(lib.models.BPE.from_file(str(p), str(p.parent / "merges.txt")))
            tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = lib.decoders.ByteLevel()
            return HFTokenizer(tok, "file")
        return HFTokenizer(lib.Tokenizer.from_file(str(p)), "file")
    except UserError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for files it cannot read
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{p} is not a tokenizer file that can be read: {reason}") from None


def tokenizer_from_dict(d):
    """A tokenizer from the plain data a checkpoint keeps."""
    if isinstance(d, dict) and d.get("type") in ("bpe", "file") and isinstance(d.get("json"), str):
        return HFTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)
