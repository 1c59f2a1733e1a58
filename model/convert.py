"""Convert a model between formats:

    python -m model.convert SOURCE DEST [--to=ours|hf|llmviz|peft] [--meta=meta.pkl] [--n_head=N] [--start=CBABBC,...]

SOURCE: a checkpoint or out_dir of ours, a Hugging Face GPT-2 folder, a nanoGPT ckpt.pt (its
vocabulary from the meta.pkl beside it, or --meta), the 3D visualisation's model JSON, or a
minGPT state_dict saved with torch.save (--n_head needed: a state_dict does not record it).
--to=ours (the default) writes DEST/ckpt.pt with the tokenizer inside and a note of where it came
from; --to=hf writes DEST as a GPT-2 folder (model.safetensors, config.json, tokenizer.json) that
transformers' GPT2LMHeadModel and AutoTokenizer load; --to=llmviz writes a sorter as the
visualisation's two files (the model, and the activations of the --start inputs). Nothing in
DEST is overwritten.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import (clean_state_dict, find_checkpoint, load_checkpoint, model_args_of, model_from_checkpoint,
                              save_checkpoint, tokenizer_from_checkpoint)
from model.config import load_config, run_command
from model.errors import UserError
from model.hf import write_folder, write_peft
from model.lora import merge_adapters
from model.llmviz import MODEL_FILE, PARTIALS_FILE, read_model_json, read_state_dict, write_llmviz
from model.tasks import SortTask, task_from_checkpoint

USAGE = ("usage: python -m model.convert SOURCE DEST [--to=ours|hf|llmviz|peft] [--meta=path/to/meta.pkl] [--n_head=N] "
         "[--start=CBABBC,...]")
FORMATS = ("ours", "hf", "llmviz", "peft")


@dataclass
class ConvertConfig:
    to: str = "ours"  # 'ours' (DEST/ckpt.pt), 'hf' (a Hugging Face folder), 'llmviz' (the visualisation's files)
    # or 'peft' (a LoRA checkpoint's adapters as peft's folder)
    meta: str = ""  # nanoGPT checkpoints: a meta.pkl with the character vocabulary
    n_head: int = 0  # minGPT state_dicts: the number of heads (a state_dict does not record it)
    start: str = ""  # --to=llmviz: the sort inputs whose activations are written, e.g. CBABBC,ABCABC

    def validate(self):
        if self.to not in FORMATS:
            raise UserError(f"--to must be one of {', '.join(FORMATS)}; got {self.to!r}")


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


def bare_state_dict(path):
    """Whether a file that is no checkpoint is a state_dict of GPT tensors (as minGPT saves one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: load_checkpoint's own message says so
        return False
    return isinstance(state, dict) and any(str(k).endswith("wte.weight") for k in state)


def read_source(source, cfg):
    """(path, checkpoint) for any SOURCE convert reads."""
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        return path, read_model_json(path)
    path = find_checkpoint(ckpt=source)
    try:
        return path, load_checkpoint(path)
    except UserError:
        if path.is_file() and bare_state_dict(path):
            return path, read_state_dict(path, cfg.n_head)
        raise


def convert(source, dest, cfg):
    """SOURCE -> DEST as cfg.to says; returns what was written."""
    path, ckpt = read_source(source, cfg)
    tokenizer = source_tokenizer(path, ckpt, cfg.meta)
    adapted = model_from_checkpoint(ckpt).eval()
    if cfg.to == "peft":
        if "lora" not in ckpt:
            raise UserError(f"{path} has no LoRA adapters (train with --lora_rank to make some); --to=hf writes a whole model")
        if (Path(dest) / "adapter_model.safetensors").exists():
            raise UserError(f"{dest} already holds adapters; choose another DEST (nothing is overwritten)")
        return write_peft(adapted, clean_state_dict(ckpt["model"]), ckpt["lora"], ckpt["base"], dest)
    model = merge_adapters(adapted)  # LoRA adapters folded into the weights: a whole model
    if cfg.to == "ours":
        return to_ours(path, ckpt, model, tokenizer, dest)
    if cfg.to == "llmviz":
        if any((Path(dest) / n).exists() for n in (MODEL_FILE, PARTIALS_FILE)):
            raise UserError(f"{dest} already holds the visualisation's files; choose another DEST (nothing is overwritten)")
        return write_llmviz(model, task_from_checkpoint(ckpt, tokenizer, model.config.block_size), dest, cfg.start)
    task = task_from_checkpoint(ckpt, tokenizer, model.config.block_size)
    if isinstance(task, SortTask):
        raise UserError(f"{path} is a sort model; a GPT-2 folder holds text and chat models only")
    if any((Path(dest) / n).exists() for n in ("model.safetensors", "config.json", "tokenizer.json")):
        raise UserError(f"{dest} already holds a model; choose another DEST (nothing is overwritten)")
    return write_folder(model, tokenizer, dest, getattr(task, "template", None))


def convert_command(argv):
    if len(argv) < 2 or argv[0].startswith("--") or argv[1].startswith("--"):
        raise UserError(USAGE)
    cfg = load_config(ConvertConfig, argv[2:])
    written = convert(argv[0], argv[1], cfg)
    for path in written if isinstance(written, list) else [written]:
        print(path)
    return 0


def main(argv):
    return run_command(convert_command, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
