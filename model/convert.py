"""Convert a model between formats:

    python -m model.convert SOURCE DEST [--to=ours|hf|llmviz|peft|gguf] [--outtype=f32|f16|bf16|q8_0] [--meta=meta.pkl]
        [--n_head=N] [--start=CBABBC,...]

SOURCE: a checkpoint or out_dir of ours, a Hugging Face GPT-2 folder, a nanoGPT ckpt.pt (its
vocabulary from the meta.pkl beside it, or --meta), the 3D visualisation's model JSON, or a
minGPT state_dict saved with torch.save (--n_head needed: a state_dict does not record it).
--to=ours (the default) writes DEST/ckpt.pt with the tokenizer inside and a note of where it came
from; --to=hf writes DEST as a Hugging Face folder (GPT-2, Llama, Qwen2 or Qwen3: model.safetensors,
config.json, tokenizer.json, tokenizer_config.json, and a chat model's template files) that
transformers' AutoModelForCausalLM and AutoTokenizer load; --to=peft a LoRA checkpoint's adapters
as peft's folder; --to=llmviz writes a sorter as the visualisation's two files (the model, and the
activations of the --start inputs); --to=gguf writes DEST (a .gguf file) for llama.cpp and ollama,
with an ollama Modelfile beside it (DEST with .Modelfile for .gguf). Nothing in DEST is overwritten: every file a format writes is
checked, and DEST made writable, before any is written.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import (Checkpoint, check_writable, find_checkpoint, load_checkpoint, model_from_checkpoint,
                              save_checkpoint, tokenizer_from_checkpoint)
from model.config import load_config, run_command
from model.errors import UserError
from model.gguf import check_gguf, modelfile_path, write_gguf
from model.hf import CHAT_FILES, FOLDER_FILES, PEFT_FILES, check_peft, folder_format, write_folder, write_peft
from model.llmviz import MODEL_FILE, PARTIALS_FILE, read_model_json, read_state_dict, write_llmviz
from model.lora import merge_adapters
from model.tasks import SortTask, chat_task, task_from_checkpoint

USAGE = ("usage: python -m model.convert SOURCE DEST [--to=ours|hf|llmviz|peft|gguf] [--outtype=f32|f16|bf16|q8_0] "
         "[--meta=path/to/meta.pkl] [--n_head=N] [--start=CBABBC,...]")
FORMATS = ("ours", "hf", "llmviz", "peft", "gguf")


@dataclass
class ConvertConfig:
    to: str = "ours"  # 'ours' (DEST/ckpt.pt), 'hf' (a Hugging Face folder), 'llmviz' (the visualisation's files)
    # or 'peft' (a LoRA checkpoint's adapters as peft's folder)
    meta: str = ""  # nanoGPT checkpoints: a meta.pkl with the character vocabulary
    n_head: int = 0  # minGPT state_dicts: the number of heads (a state_dict does not record it)
    start: str = ""  # --to=llmviz: the sort inputs whose activations are written, e.g. CBABBC,ABCABC
    allow_changed_base: bool = False  # LoRA adapters: convert them even if their base's weights changed
    outtype: str = "f32"  # --to=gguf: the matrices' type, 'f32', 'f16', 'bf16' or 'q8_0' (8-bit, llama.cpp's)

    def validate(self):
        if self.to not in FORMATS:
            raise UserError(f"--to must be one of {', '.join(FORMATS)}; got {self.to!r}")


def source_tokenizer(path, ckpt, meta):
    """The checkpoint's vocabulary, or a nanoGPT checkpoint's meta.pkl (--meta, or beside it)."""
    beside = Path(path).parent / "meta.pkl" if Path(path).is_file() else None
    if ckpt.tokenizer is None and not meta and beside is not None and beside.is_file():
        meta = str(beside)
    tokenizer = tokenizer_from_checkpoint(ckpt, meta, path)
    if tokenizer is None:
        raise UserError(f"{path} has no vocabulary (a nanoGPT checkpoint?) and no meta.pkl beside it; "
                        f"give one with --meta=path/to/meta.pkl")
    return tokenizer


def bare_state_dict(path):
    """Whether a file that is no checkpoint is a state_dict of GPT tensors (as minGPT saves one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: load_checkpoint's own message says so
        return False
    return isinstance(state, dict) and any(str(k).endswith("wte.weight") for k in state)


def read_source(source, cfg):
    """(path, Checkpoint) for any SOURCE convert reads."""
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


def files_to_write(to, path, ckpt, task, chat, dest, cfg, tokenizer):
    """The files --to writes into DEST (--to=gguf: beside DEST, in its folder); a model that format
    cannot hold is refused here, before anything is written."""
    if to == "gguf":
        if Path(dest).suffix != ".gguf":
            raise UserError(f"--to=gguf writes one file: give DEST as a path ending in .gguf, got {dest}")
        if isinstance(task, SortTask):
            raise UserError(f"{path} is a sort model; llama.cpp runs text and chat models")
        check_gguf(ckpt.model_config, tokenizer, cfg.outtype)
        return Path(dest).name, modelfile_path(dest).name
    if to == "peft":
        if not ckpt.lora:
            raise UserError(f"{path} has no LoRA adapters (train with --lora_rank to make some); --to=hf writes a "
                            f"whole model")
        check_peft(ckpt.model, ckpt.model_config)
        return PEFT_FILES
    if to == "llmviz":
        if not isinstance(task, SortTask):
            raise UserError("the visualisation shows a letter sorter: convert a sort model (train configs/sort.py)")
        return MODEL_FILE, PARTIALS_FILE
    if to == "hf":
        if isinstance(task, SortTask):
            raise UserError(f"{path} is a sort model; a Hugging Face folder holds text and chat models only")
        folder_format(ckpt.model_config)
        return FOLDER_FILES + (CHAT_FILES if chat else ())
    return ("ckpt.pt",)


def check_dest(dest, names):
    """DEST may take these files: none of them there already, and a folder that can be written into."""
    there = [n for n in names if (Path(dest) / n).exists()]
    if there:
        raise UserError(f"{dest} already holds {', '.join(there)}; choose another DEST (nothing is overwritten)")
    check_writable(dest, "DEST", "choose another DEST")


def convert(source, dest, cfg):
    """SOURCE -> DEST as cfg.to says; returns what was written. Every refusal comes before any file is written."""
    path, ckpt = read_source(source, cfg)
    tokenizer = source_tokenizer(path, ckpt, cfg.meta)
    task = task_from_checkpoint(ckpt, tokenizer)
    chat = chat_task(ckpt, task)
    names = files_to_write(cfg.to, path, ckpt, task, chat, dest, cfg, tokenizer)
    check_dest(Path(dest).parent if cfg.to == "gguf" else dest, names)
    adapted = model_from_checkpoint(ckpt, allow_changed_base=cfg.allow_changed_base).eval()
    if cfg.to == "peft":
        return write_peft(adapted, ckpt.model, ckpt.lora, dest)
    model = merge_adapters(adapted)  # LoRA adapters folded into the weights: a whole model
    if cfg.to == "ours":
        out = Path(dest) / "ckpt.pt"
        save_checkpoint(Checkpoint(model.state_dict(), model.config, tokenizer.to_dict(), ckpt.task or {"type": "text"},
                                   ckpt.iter_num, ckpt.best_val_loss, config={"converted_from": str(path.resolve())},
                                   chat=ckpt.chat), out)
        return out
    if cfg.to == "llmviz":
        return write_llmviz(model, task, dest, cfg.start)
    if cfg.to == "gguf":
        return write_gguf(model, tokenizer, dest, cfg.outtype, chat, Path(path).parent.name if path.is_file() else path.name)
    return write_folder(model, tokenizer, dest, chat.template if chat else None)


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
