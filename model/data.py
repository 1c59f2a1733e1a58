"""Text data in bounded memory: a text (a UTF-8 file or a folder of .txt files) is read in
chunks, never whole, and its token ids are written once to prepared/{train,val}.bin under the
run's out_dir, then read back memory-mapped. val is the end of the text (val_fraction of its
tokens). A later run on the same text with the same tokenizer settings reuses the files without
reading the text: it compares the files' sizes and modification times, and only when those
changed, their SHA-256 (hashed while preparing).
"""

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.errors import UserError

CHUNK_BYTES = 8 << 20  # text read and encoded this many bytes at a time
# Where text may be cut without changing its tokens: a single space or newline between two
# non-space characters. Byte-level BPE (GPT-2's rule) and BERT's WordPiece both split there.
SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


@dataclass
class DataSettings:
    """What a training task is made from: train.py's data flags (TrainConfig takes these fields)."""
    task: str = "text"  # 'text' (a UTF-8 file or a folder of .txt files), 'sort', or 'chat' (a .jsonl file picks it)
    data: str = "data/chinese"  # text: .txt; chat: .jsonl of {"prompt", "completion"} or {"messages": [...]}
    out_dir: str = "out"  # prepared files go to out_dir/prepared
    val_fraction: float = 0.1  # held out: the end of a text, a seeded share of chat examples (0: none)
    sort_length: int = 6  # sort: letters per input
    sort_alphabet: str = "ABC"
    sort_holdout: float = 0.2  # sort: fraction of all inputs never trained on
    block_size: int = 64  # sort: follows from sort_length; fine-tune: 0 keeps the base model's
    tokenizer: str = "char"  # text: 'char', 'bpe' (byte-level BPE trained on the text), or a tokenizer's path
    vocab_size: int = 0  # bpe: how many tokens to learn; char or a path: 0 is the tokenizer's size
    drop_unknown: bool = False  # a vocabulary from files: leave out characters it lacks instead of adding them
    seed: int = 1337  # the held-out share of chat examples and the sort split are drawn from it


@dataclass
class TextSource:
    """The files of a text, read in order, joined by newlines."""
    files: list

    @classmethod
    def at(cls, path, suffix=".txt"):
        """The file at `path`, or the `suffix` files in the folder at `path` (and below it), in order."""
        p = Path(path)
        if p.is_dir():
            files = sorted(p.rglob(f"*{suffix}"))
            if not files:
                raise UserError(f"folder {path} holds no {suffix} files")
        elif p.is_file():
            files = [p]
        else:
            kind = "text" if suffix == ".txt" else suffix
            raise UserError(f"data {path} not found: give a UTF-8 {kind} file or a folder of {suffix} files")
        return cls(files)

    def stamp(self):
        """What identifies the text without reading it: each file's path, size and mtime."""
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]

    @property
    def size(self):
        return sum(f.stat().st_size for f in self.files)

    def chunks(self, hasher=None, bar=None):
        """The text as str chunks of about CHUNK_BYTES (never cut inside a character). Bytes that
        are not UTF-8 raise UserError naming the file and the offset."""
        before = 0  # bytes of the whole text before this file
        for n, path in enumerate(self.files):
            if n:
                yield "\n"
            with open(path, "rb") as f:
                carry, offset = b"", 0  # offset: where `carry` starts in the file
                while True:
                    raw = f.read(CHUNK_BYTES)
                    if hasher is not None:
                        hasher.update(raw)
                    if bar is not None:
                        bar.update(len(raw))
                    data = carry + raw
                    cut = len(data) if not raw else complete_utf8(data)
                    yield decode_utf8(data[:cut], path, offset, before, len(self.files) > 1)
                    carry, offset = data[cut:], offset + cut
                    if not raw:
                        break
            before += path.stat().st_size + 1  # and the newline that joins it to the next


def complete_utf8(data):
    """The length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def decode_utf8(data, path, offset, before, several):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        where = f" (byte {before + at} of the whole text)" if several else ""
        raise UserError(f"{path} is not UTF-8 text: byte {at} (0x{data[e.start]:02x}) cannot be decoded{where}; "
                        f"convert it, e.g. iconv -f GBK -t UTF-8 {path.name} > fixed.txt") from None


def safe_pieces(chunks, target=1 << 14):
    """Re-cut text chunks into pieces of about `target` characters at SAFE_CUT places, so that
    encoding the pieces one by one gives the ids of the whole text."""
    rest = ""
    for chunk in chunks:
        text = rest + chunk
        pieces, start = [], 0
        for m in SAFE_CUT.finditer(text, pos=target):
            if m.start() - start >= target:
                pieces.append(text[start:m.start()])
                start = m.start()
        rest = text[start:]
        if pieces:
            yield pieces
    if rest:
        yield [rest]


def encode_chunks(tokenizer, chunks):
    """Token ids (int64 arrays) of a text given in chunks, chunk by chunk."""
    if tokenizer.kind == "char":
        for chunk in chunks:
            yield tokenizer.encode_array(chunk)
    else:
        for pieces in safe_pieces(chunks):
            for i in range(0, len(pieces), 64):  # about 1 MB at a time, encoded in parallel
                yield tokenizer.encode_batch(pieces[i:i + 64])


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def prepare(source, tokenizer, prepared_dir, val_fraction, settings):
    """Encode the text into prepared_dir/{train,val}.bin and write meta.json last (a run stopped
    half way leaves no meta.json, so the next run prepares again). Returns the memory-mapped splits."""
    prepared_dir.mkdir(parents=True, exist_ok=True)
    meta_path = prepared_dir / "meta.json"
    meta_path.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.model_vocab_size())
    hasher, tmp, start = hashlib.sha256(), prepared_dir / "all.bin.tmp", time.perf_counter()
    with open(tmp, "wb") as f, tqdm(total=source.size, unit="B", unit_scale=True, desc="preparing text",
                                     dynamic_ncols=True, disable=source.size < CHUNK_BYTES) as bar:
        for ids in encode_chunks(tokenizer, source.chunks(hasher, bar)):
            f.write(ids.astype(dtype).tobytes())
    n = tmp.stat().st_size // np.dtype(dtype).itemsize
    n_val = int(n * val_fraction)
    with open(prepared_dir / "val.bin", "wb") as f:
        if n_val:
            np.memmap(tmp, dtype=dtype, mode="r")[n - n_val:].tofile(f)
    os.truncate(tmp, (n - n_val) * np.dtype(dtype).itemsize)
    os.replace(tmp, prepared_dir / "train.bin")
    write_meta(prepared_dir, source, hasher, settings, tokenizer, dtype)
    seconds = time.perf_counter() - start
    print(f"prepared {source.size / 1e6:.1f} MB of text into {n:,} tokens in {seconds:.1f}s "
          f"({source.size / 1e6 / max(seconds, 1e-9):.1f} MB/s): {prepared_dir}", file=sys.stderr)
    return open_splits(prepared_dir, dtype)


def write_meta(prepared_dir, source, hasher, settings, tokenizer, dtype, **extra):
    """meta.json, written last: what was prepared, from which files, with which settings and tokenizer."""
    meta = {"settings": settings, "stamp": source.stamp(), "sha256": hasher.hexdigest(), "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer.to_dict(), **extra}
    (prepared_dir / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))


def reuse(source, prepared_dir, settings, files=("train.bin", "val.bin")):
    """meta.json of an earlier preparation of the same text with the same settings (its `files`
    all there), or None. The text is read (to hash it) only when its sizes or mtimes changed."""
    meta_path = prepared_dir / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("settings") != settings or not all((prepared_dir / name).is_file() for name in files):
        return None
    if meta["stamp"] != source.stamp():
        hasher = hashlib.sha256()
        for _ in source.chunks(hasher):
            pass
        if hasher.hexdigest() != meta["sha256"]:
            return None
        meta["stamp"] = source.stamp()
        meta_path.write_text(json.dumps(meta, ensure_ascii=False))
    return meta


def open_splits(prepared_dir, dtype):
    return {s: np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype)
            for s, p in ((s, prepared_dir / f"{s}.bin") for s in ("train", "val"))}
