"""Text data: reading UTF-8 files and preparing their token ids once, as memory-mapped
prepared/{train,val}.bin files under the run's out_dir."""

import hashlib
import json
from pathlib import Path

import numpy as np

from model.errors import UserError


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
