"""Convert a model between formats:

    python -m model.convert SOURCE DEST [--to=ours|hf] [--meta=path/to/meta.pkl]

SOURCE: a checkpoint or out_dir of ours, a Hugging Face GPT-2 folder, or a nanoGPT ckpt.pt (its
vocabulary from the meta.pkl beside it, or --meta). --to=ours (the default) writes DEST/ckpt.pt
with the tokenizer inside and a note of where it came from; --to=hf writes DEST as a GPT-2 folder
(model.safetensors, config.json, tokenizer.json) that transformers' GPT2LMHeadModel and
AutoTokenizer load. Nothing in DEST is overwritten.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import (find_checkpoint, load_checkpoint, model_args_of, model_from_checkpoint,
                              save_checkpoint, tokenizer_from_checkpoint)
from model.config import load_config, run_command
from model.errors import UserError
from model.hf import write_folder

USAGE = "usage: python -m model.convert SOURCE DEST [--to=ours|hf] [--meta=path/to/meta.pkl]"


@dataclass
class ConvertConfig:
    to: str = "ours"  # 'ours' (DEST/ckpt.pt) or 'hf' (a GPT-2 folder)
    meta: str = ""  # nanoGPT checkpoints: a meta.pkl with the character vocabulary

    def validate(self):
        if self.to not in ("ours", "hf"):
            raise UserError(f"--to must be ours or hf, got {self.to!r}")


def source_tokenizer(path, ckpt, meta):
    """The checkpoint's vocabulary, or a nanoGPT checkpoint's meta.pkl (--meta, or beside it)."""
    beside = Path(path).parent / "meta.pkl" if Path(path).is_file() else None
    if "tokenizer" not in ckpt and not meta and beside is not None and beside.is_file():
        meta = str(beside)
    tokenizer = tokenizer_from_checkpoint(ckpt, meta)
    if tokenizer is None:
        raise UserError(f"{path} has no vocabulary (a nanoGPT checkpoint?) and no meta.pkl beside it; "
                        f"give one with --meta=path/to/meta.pkl")
    return tokenizer


def to_ours(path, ckpt, model, tokenizer, dest):
    out = Path(dest) / "ckpt.pt"
    if out.exists():
        raise UserError(f"{out} exists; choose another DEST (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    args, extra = model_args_of(model.config)
    save_checkpoint({"model": model.state_dict(), "model_args": args, "model_extra": extra,
                     "iter_num": ckpt.get("iter_num", 0), "best_val_loss": float(ckpt.get("best_val_loss", float("inf"))),
                     "config": {"converted_from": str(Path(path).resolve())}, "tokenizer": tokenizer.to_dict(),
                     "task": ckpt.get("task") or {"type": "text"}}, out)
    return out


def convert(source, dest, cfg):
    """SOURCE -> DEST as cfg.to says; returns what was written."""
    path = find_checkpoint(ckpt=source)
    ckpt = load_checkpoint(path)
    tokenizer = source_tokenizer(path, ckpt, cfg.meta)
    model = model_from_checkpoint(ckpt)
    if cfg.to == "ours":
        return to_ours(path, ckpt, model, tokenizer, dest)
    if (ckpt.get("task") or {}).get("type", "text") != "text":
        raise UserError(f"{path} is a {ckpt['task']['type']} model; a GPT-2 folder holds text models only")
    if any((Path(dest) / n).exists() for n in ("model.safetensors", "config.json", "tokenizer.json")):
        raise UserError(f"{dest} already holds a model; choose another DEST (nothing is overwritten)")
    return write_folder(model, tokenizer, dest)


def convert_command(argv):
    if len(argv) < 2 or argv[0].startswith("--") or argv[1].startswith("--"):
        raise UserError(USAGE)
    cfg = load_config(ConvertConfig, argv[2:])
    print(convert(argv[0], argv[1], cfg))
    return 0


def main(argv):
    return run_command(convert_command, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
