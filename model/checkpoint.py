"""Checkpoints: nanoGPT's format (model, model_args, optimizer, iter_num, best_val_loss, config)
plus our tokenizer and task data, written atomically and read without running pickled code,
and open_model(), the one way every command opens a model to use it.

model_args holds exactly the fields nanoGPT's GPTConfig takes, so nanoGPT's sample.py loads our
checkpoints; the architecture choices nanoGPT lacks go in model_extra, which nanoGPT ignores.
"""

import os
import pickle
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from model.errors import UserError
from model.gpt import GPT, NANOGPT_FIELDS, RUN_FIELDS, GPTConfig
from model.hf import is_hf_folder, read_folder
from model.lora import LoRAConfig, add_adapters, merge_adapters
from model.runtime import decode_layout, resolve_device
from model.tasks import task_from_checkpoint
from model.tokenizer import CharTokenizer, tokenizer_from_dict

# what a checkpoint keeps of a GPTConfig: nanoGPT's fields (model_args) and what the weights are (model_extra)
STORED_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name in NANOGPT_FIELDS or f.name not in RUN_FIELDS)
LATEST = Path("out") / "latest.txt"  # records the checkpoint train.py wrote last
TRAIN_HINT = "train one first, e.g. python train.py configs/sort.py"


def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`: a run killed or a
    disk filling up while writing leaves the previous file whole, and no partial file behind to
    fill the disk further. A write the system refuses (no space left, no permission) raises
    UserError naming the path; Ctrl-C and real bugs pass through as they are."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error(e)
        if cause is None:
            raise
        raise UserError(f"cannot write {path}: {cause.strerror or cause}") from None


def os_error(e):
    """The OSError behind an exception, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError ("No space left on device")."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def save_checkpoint(ckpt, path):
    write_atomically(path, lambda f: torch.save(ckpt, f))


def record_latest(path):
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(LATEST, lambda f: f.write((str(Path(path).resolve()) + "\n").encode("utf-8")))


def find_checkpoint(out_dir="", ckpt=""):
    """The checkpoint named by `ckpt` or `out_dir`: a file, a folder's ckpt.pt, or a Hugging Face
    GPT-2 folder; neither given, the one train.py wrote last. A missing one raises UserError
    saying how to make one."""
    if ckpt or out_dir:
        path = Path(ckpt or out_dir)
        if path.is_dir() and not (path / "ckpt.pt").is_file() and is_hf_folder(path):
            return path
        path = path / "ckpt.pt" if path.is_dir() or (not ckpt and not path.suffix) else path
    elif LATEST.is_file():
        path = Path(LATEST.read_text(encoding="utf-8").strip())
    else:
        raise UserError(f"no checkpoint found (no --out_dir or --ckpt given, and no {LATEST}); {TRAIN_HINT}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; {TRAIN_HINT}, or name another with --out_dir")
    return path


def load_checkpoint(path):
    """torch.load with weights_only=True (no pickled code runs), and a clear error for a file
    that is truncated, corrupted or not a checkpoint at all. Everything is loaded onto the CPU:
    model_from_checkpoint moves the weights where they run, and the rest (optimizer state,
    the sort split) stays off the GPU."""
    path = Path(path)
    if is_hf_folder(path):
        return read_folder(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file; all mean the same to a user
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupted, or another kind "
                        f"of file): {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint: it lacks the 'model' and 'model_args' entries "
                        f"that train.py (and nanoGPT) write")
    return ckpt


def clean_state_dict(state_dict):
    """Our layout from what other tools save: no torch.compile '_orig_mod.' or DDP 'module.'
    prefixes, and no causal-mask buffers (older nanoGPT and Hugging Face keep them)."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[k] = v
    return out


def model_args_of(config):
    """GPTConfig -> (model_args, model_extra): nanoGPT's fields, and our other architecture fields."""
    values = asdict(config)
    args = {k: values[k] for k in NANOGPT_FIELDS}
    extra = {k: values[k] for k in STORED_FIELDS if k not in NANOGPT_FIELDS}
    return args, extra


def config_of(ckpt, **overrides):
    """The GPTConfig a checkpoint describes (model_args, then model_extra; older checkpoints kept
    the extra fields in model_args). Invalid values raise UserError."""
    args = {**ckpt["model_args"], **ckpt.get("model_extra", {})}
    if "gelu" in args:  # checkpoints before the activation option named the GELU form
        args.setdefault("activation", {"exact": "gelu", "tanh": "gelu_tanh"}.get(args.pop("gelu"), "?"))
    try:
        return GPTConfig(**{**{k: v for k, v in args.items() if k in STORED_FIELDS}, **overrides})
    except (TypeError, UserError) as e:
        raise UserError(f"the checkpoint's model_args are invalid: {e}") from None


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """The GPT a checkpoint describes, with its weights; an adapter checkpoint's (LoRA) with its
    base's weights and its adapters, the adapters (and what else it trained) left trainable.
    model_args that do not fit the weights raise UserError naming the mismatch. `overrides` are
    GPTConfig fields that do not change the weights (dropout, attention)."""
    model = GPT(config_of(ckpt, **overrides))
    state = clean_state_dict(ckpt["model"])
    if "lora" in ckpt:
        add_adapters(model, LoRAConfig(**ckpt["lora"]))
        state = {**base_weights(ckpt["base"], model), **state}
        for name, p in model.named_parameters():
            p.requires_grad_(name in ckpt["model"])
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied; some tools save it once
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:4] if ln.strip()]
        raise UserError(f"the checkpoint's model_args {dict(ckpt['model_args'])} do not match its "
                        f"weights: {' '.join(lines)[:400]}") from None
    return model.to(device)


def base_weights(path, model):
    """An adapter checkpoint's base weights, fitted to the fine-tuned model: learned positions cropped
    to its block_size; tensors of another shape (embeddings grown for new tokens) are the adapter
    checkpoint's own and left out here."""
    if not Path(path).exists():
        raise UserError(f"the adapters' base model {path} is not there; put it back, or train the adapters again "
                        f"from a base with --init_from")
    state = clean_state_dict(load_checkpoint(path)["model"])
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:model.config.block_size]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if shapes.get(k) == v.shape}


def tokenizer_from_checkpoint(ckpt, meta=""):
    """The checkpoint's character vocabulary, or (for a nanoGPT checkpoint, which has none) the
    one in a nanoGPT meta.pkl. None when there is neither."""
    if meta:
        return tokenizer_from_meta(meta)
    if "tokenizer" in ckpt:
        return tokenizer_from_dict(ckpt["tokenizer"])
    return None


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only plain data (dicts, lists, strings, numbers): a meta.pkl cannot run code."""

    def find_class(self, module, name):
        raise UserError(f"meta file refers to {module}.{name}; only plain data (a dict with 'itos') is read")


def tokenizer_from_meta(path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"meta file {path} not found")
    try:
        with open(p, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
        itos = meta["itos"]
        return CharTokenizer([itos[i] for i in range(len(itos))])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a nanoGPT meta.pkl with an 'itos' vocabulary: {e}") from None


def write_meta(tokenizer, path):
    """A character vocabulary as nanoGPT's meta.pkl (vocab_size, itos, stoi), so nanoGPT's
    sample.py decodes our checkpoints' text. Plain data only; written like checkpoints, atomically.
    (Subword tokenizers have no meta.pkl form: nanoGPT reads those with tiktoken's GPT-2 BPE.)"""
    if tokenizer.kind != "char":
        return
    meta = {"vocab_size": tokenizer.vocab_size, "itos": dict(enumerate(tokenizer.itos)), "stoi": dict(tokenizer.stoi)}
    write_atomically(path, lambda f: pickle.dump(meta, f))


@dataclass
class OpenedModel:
    """A checkpoint opened for use: the model in eval mode on `device`, its tokenizer (None for
    a nanoGPT checkpoint without --meta) and its task."""
    path: Path
    ckpt: dict
    model: GPT
    tokenizer: object
    task: object
    device: str


def open_model(out_dir="", ckpt="", device="cpu", meta="", quiet=False):
    """The one way to open a model: a checkpoint file, an out_dir, or (neither) the one train.py
    wrote last -> OpenedModel, laid out for fast decoding on the CPU (runtime.decode_layout).
    Says on stderr which checkpoint it opened unless quiet."""
    device = resolve_device(device)
    path = find_checkpoint(out_dir, ckpt)
    if not quiet:
        print(f"checkpoint: {path}", file=sys.stderr)
    checkpoint = load_checkpoint(path)
    model = merge_adapters(model_from_checkpoint(checkpoint, device)).eval()  # adapters folded in: as fast as any
    if device == "cpu":
        decode_layout(model)
    tokenizer = tokenizer_from_checkpoint(checkpoint, meta)
    task = task_from_checkpoint(checkpoint, tokenizer, model.config.block_size)
    return OpenedModel(path, checkpoint, model, tokenizer, task, device)
