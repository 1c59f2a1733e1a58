"""Checkpoints: one schema (Checkpoint) that every writer and reader goes through, written
atomically and read without running pickled code, and open_model(), the one way every command
opens a model to use it.

On disk a checkpoint is nanoGPT's dict (model, model_args, optimizer, iter_num, best_val_loss,
config), so nanoGPT's sample.py loads ours: model_args holds exactly the fields nanoGPT's
GPTConfig takes, and our other architecture choices go in model_extra, which nanoGPT ignores.
Beside them: tokenizer, task, lora (an adapter checkpoint's settings and base), chat (a
Hugging Face folder's chat template) and reference (the frozen start of preference tuning or RL).
"""

import hashlib
import os
import pickle
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch

from model.errors import UserError
from model.gpt import GPT, NANOGPT_FIELDS, RUN_FIELDS, GPTConfig
from model.hf import is_hf_folder, read_folder
from model.lora import LoRAConfig, add_adapters, merge_adapters
from model.quantize import for_decoding
from model.runtime import resolve_device
from model.tasks import task_from_checkpoint
from model.tokenizer import CharTokenizer, tokenizer_from_dict

# what a checkpoint keeps of a GPTConfig: nanoGPT's fields (model_args) and what the weights are (model_extra)
STORED_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name in NANOGPT_FIELDS or f.name not in RUN_FIELDS)
LATEST = Path("out") / "latest.txt"  # records the checkpoint train.py wrote last
TRAIN_HINT = "train one first, e.g. python train.py configs/sort.py"


# ---- the schema ---------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A model and what it needs to be used, trained on or resumed."""
    model: dict  # the state_dict in our layout (an adapter checkpoint: only what trained)
    model_config: GPTConfig  # on disk: model_args (nanoGPT's fields) and model_extra (ours)
    tokenizer: Optional[dict] = None  # its plain data (tokenizer_from_dict); None: a nanoGPT checkpoint
    task: Optional[dict] = None  # the task's state (None: a nanoGPT checkpoint, which has none)
    iter_num: int = 0
    best_val_loss: float = float("inf")
    optimizer: Optional[dict] = None  # AdamW's state (None: converted or downloaded, not resumable)
    config: dict = field(default_factory=dict)  # the run's settings, or where the model came from
    lora: Optional[LoRAConfig] = None  # an adapter checkpoint's LoRA settings and base
    chat: Optional[dict] = None  # a Hugging Face folder's chat template (ChatTemplate's plain data)
    reference: Optional[dict] = None  # DPO/GRPO of a whole model: the frozen start's {"path", "digest"}

    def to_dict(self):
        values = asdict(self.model_config)
        out = {"model": self.model, "model_args": {k: values[k] for k in NANOGPT_FIELDS},
               "model_extra": {k: values[k] for k in STORED_FIELDS if k not in NANOGPT_FIELDS},
               "iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "config": self.config}
        optional = {"optimizer": self.optimizer, "tokenizer": self.tokenizer, "task": self.task,
                    "lora": self.lora.to_dict() if self.lora else None, "chat": self.chat,
                    "reference": self.reference}
        return {**out, **{k: v for k, v in optional.items() if v is not None}}

    @classmethod
    def from_dict(cls, d):
        """The dict torch.load gives (ours, nanoGPT's, or an older version of ours). Invalid model_args
        raise UserError."""
        args = {**d["model_args"], **d.get("model_extra", {})}
        if "gelu" in args:  # checkpoints before the activation option named the GELU form
            args.setdefault("activation", {"exact": "gelu", "tanh": "gelu_tanh"}.get(args.pop("gelu"), "?"))
        try:
            config = GPTConfig(**{k: v for k, v in args.items() if k in STORED_FIELDS})
        except (TypeError, UserError) as e:
            raise UserError(f"the checkpoint's model_args are invalid: {e}") from None
        lora = d.get("lora")
        if lora is not None and "base" not in lora:  # adapter checkpoints before the base moved inside "lora"
            lora = {**lora, "base": d.get("base", "")}
        return cls(clean_state_dict(d["model"]), config, d.get("tokenizer"), d.get("task"), d.get("iter_num", 0),
                   float(d.get("best_val_loss", float("inf"))), d.get("optimizer"), d.get("config") or {},
                   LoRAConfig(**lora) if lora is not None else None, d.get("chat"), d.get("reference"))


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


def weights_digest(state):
    """What identifies a model's weights, cheaply: SHA-256 over each tensor's name, shape and an even
    sample of up to 4,096 of its values (a model trained further changes nearly every value)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        flat = state[name].detach().reshape(-1)
        digest.update(f"{name}{tuple(state[name].shape)}".encode())
        digest.update(flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


# ---- writing and reading ------------------------------------------------------------------

def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`: a run killed or a
    disk filling up while writing leaves the previous file whole, and no partial file behind to
    fill the disk further. A write the system refuses (no space left, no permission, a folder
    that is a file) raises UserError naming the path; Ctrl-C and real bugs pass through as they are."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # it was never made (the folder is a file, or not writable): nothing to clean
            pass
        cause = os_error(e)
        if cause is None:
            raise
        raise UserError(f"cannot write {path}: {cause.strerror or cause}") from None


def check_writable(folder, name, fix):
    """Fail now, not after an hour's work, if files cannot be written into `folder` (made if missing):
    UserError '{name} {folder} is not writable (why); {fix}'."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{name} {folder} is not writable ({e.strerror or e}); {fix}") from None


def os_error(e):
    """The OSError behind an exception, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError ("No space left on device")."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def save_checkpoint(ckpt, path):
    write_atomically(path, lambda f: torch.save(ckpt.to_dict(), f))


def save_run(ckpt, path):
    """A training run's checkpoint: `path` (ckpt.pt), nanoGPT's meta.pkl beside it (character
    vocabularies), and out/latest.txt naming it, each written atomically."""
    save_checkpoint(ckpt, path)
    write_meta(ckpt.tokenizer, Path(path).parent / "meta.pkl")
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(LATEST, lambda f: f.write((str(Path(path).resolve()) + "\n").encode("utf-8")))


def find_checkpoint(out_dir="", ckpt=""):
    """The checkpoint named by `ckpt` or `out_dir`: a file, a folder's ckpt.pt, or a Hugging Face
    folder; neither given, the one train.py wrote last. A missing one raises UserError saying
    how to make one."""
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


def load_checkpoint(path, mmap=False):
    """The Checkpoint in a file of ours (or nanoGPT's) or a Hugging Face folder. Files are read with
    torch.load(weights_only=True): no pickled code runs, and a file that is truncated, corrupted or
    not a checkpoint at all is one clear UserError. Everything is loaded onto the CPU:
    model_from_checkpoint moves the weights where they run, and the rest (optimizer state, the
    sort split) stays off the GPU. mmap: the tensors are the file's pages, mapped, not read into
    memory of their own (open_model; a run that trains on the file reads it whole)."""
    path = Path(path)
    if is_hf_folder(path):
        folder = read_folder(path)
        try:
            config = GPTConfig(**folder.config)
        except UserError as e:
            raise UserError(f"{path / 'config.json'}: {e}") from None
        return Checkpoint(folder.weights, config, folder.tokenizer.to_dict(), {"type": "text"},
                          config={"source": str(path.resolve())}, chat=folder.chat)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many kinds for a bad file; all mean the same to a user
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupted, or another kind "
                        f"of file): {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint: it lacks the 'model' and 'model_args' entries "
                        f"that train.py (and nanoGPT) write")
    try:
        return Checkpoint.from_dict(ckpt)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# ---- the model a checkpoint holds ---------------------------------------------------------

@contextmanager
def without_initial_values():
    """Modules built in this block get torch.empty's memory, not drawn values (torch.nn.init's functions do
    nothing here, as transformers' no_init_weights): a checkpoint's tensors replace every parameter at once,
    so drawing would cost time and touch memory no one reads."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def model_from_checkpoint(ckpt, device="cpu", allow_changed_base=False, **overrides):
    """The GPT a checkpoint describes, with its weights; an adapter checkpoint's (LoRA) with its
    base's weights and its adapters, the adapters (and what else it trained) left trainable.
    model_args that do not fit the weights raise UserError naming the mismatch. `overrides` are
    GPTConfig fields that do not change the weights (dropout, attention). The model is built without
    drawing initial values and takes the checkpoint's tensors as they are: no random weights made only
    to be overwritten, and float32 weights are not copied (a file opened with mmap stays one copy)."""
    with without_initial_values():
        model = GPT(replace(ckpt.model_config, **overrides))
        if ckpt.lora:
            add_adapters(model, ckpt.lora)
    state = dict(ckpt.model)
    if ckpt.lora:
        state = {**base_weights(ckpt.lora, model, allow_changed_base), **state}
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied; some tools save it once
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:4] if ln.strip()]
        source = ckpt.config.get("source")  # a Hugging Face folder's
        what = f"{source}: its config.json does" if source else f"the checkpoint's model_args {ckpt.to_dict()['model_args']} do"
        raise UserError(f"{what} not match its weights: {' '.join(lines)[:400]}") from None
    if model.config.head == "tied":  # assigned one by one, the two names became two tensors: one again
        model.transformer.wte.weight = model.lm_head.weight
    if ckpt.lora:
        for name, p in model.named_parameters():
            p.requires_grad_(name in ckpt.model)
    return model.to(device, torch.float32)


def recorded_state(path, digest, allow_changed, what, used, redo):
    """The whole weights of the model at `path` that a run recorded (its adapters merged, if it is an
    adapter checkpoint itself), refused unless allow_changed when they changed since `digest` was
    taken. The messages name the model (`what`), what it was `used` for, and what to `redo`."""
    if not Path(path).exists():
        raise UserError(f"{what} {path} is not there; put it back, or {redo}")
    state = merge_adapters(model_from_checkpoint(load_checkpoint(path))).state_dict()
    if digest and weights_digest(state) != digest and not allow_changed:
        raise UserError(f"{what} {path} is not the one {used} (its weights changed since); {redo} on it, or pass "
                        f"--allow_changed_base=True to go on anyway")
    return state


def base_weights(lora, model, allow_changed_base=False):
    """An adapter checkpoint's base weights, fitted to the fine-tuned model: learned positions cropped
    to its block_size; tensors of another shape (embeddings grown for new tokens) are the adapter
    checkpoint's own and left out here. A base whose weights changed since the adapters were trained
    (retrained in place, replaced) is refused unless allow_changed_base."""
    state = recorded_state(lora.base, lora.base_digest, allow_changed_base, "the adapters' base model",
                           "they were trained on", "train the adapters again")
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:model.config.block_size]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if shapes.get(k) == v.shape}


# ---- vocabularies: ours, and nanoGPT's meta.pkl -------------------------------------------

def tokenizer_from_checkpoint(ckpt, meta="", path=None):
    """The checkpoint's vocabulary, or (for a nanoGPT checkpoint, which has none) the one in a
    nanoGPT meta.pkl; None when there is neither. With `path` (opening a model to use it), one with
    more tokens than the model has ids is a UserError: the two come from different models."""
    tokenizer = tokenizer_from_meta(meta) if meta else tokenizer_from_dict(ckpt.tokenizer) if ckpt.tokenizer else None
    ids = ckpt.model_config.vocab_size
    if path is not None and tokenizer is not None and tokenizer.vocab_size > ids:
        where = f"the vocabulary in {meta}" if meta else "its tokenizer"
        raise UserError(f"{path}: {where} has {tokenizer.vocab_size} tokens but the model only {ids} ids; the two come "
                        f"from different models")
    return tokenizer


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
    """A character vocabulary (its plain data) as nanoGPT's meta.pkl (vocab_size, itos, stoi), so
    nanoGPT's sample.py decodes our checkpoints' text. Plain data only; written atomically.
    (Subword tokenizers have no meta.pkl form: nanoGPT reads those with tiktoken's GPT-2 BPE.)"""
    if tokenizer["type"] != "char":
        return
    itos = tokenizer["itos"]
    meta = {"vocab_size": len(itos), "itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}
    write_atomically(path, lambda f: pickle.dump(meta, f))


# ---- opening a model to use it ------------------------------------------------------------

@dataclass
class ModelSource:
    """Which model a command opens (the flags of every command that uses a model)."""
    out_dir: str = ""  # a training run's out_dir; empty: the checkpoint train.py wrote last
    ckpt: str = ""  # a checkpoint file or a Hugging Face folder (instead of out_dir)
    meta: str = ""  # nanoGPT checkpoints: a meta.pkl with the character vocabulary
    allow_changed_base: bool = False  # LoRA adapters: use them even if their base's weights changed


@dataclass
class OpenedModel:
    """A checkpoint opened for use: the model in eval mode on `device`, its tokenizer (None for
    a nanoGPT checkpoint without --meta) and its task."""
    path: Path
    ckpt: Checkpoint
    model: GPT
    tokenizer: object
    task: object
    device: str


def open_model(source, device="cpu", quiet=False, dtype=None):
    """The one way to open a model: a ModelSource (a command's flags: its checkpoint file, out_dir,
    or neither, the one train.py wrote last) or a path -> OpenedModel. dtype: the weights' type for
    decoding, 'float32', 'bfloat16' or 'int8' (model/quantize.py); None (the views: every weight a
    float32 parameter, as trained). Says on stderr which checkpoint it opened unless quiet."""
    source = source if isinstance(source, ModelSource) else ModelSource(ckpt=str(source))
    device = resolve_device(device)
    path = find_checkpoint(source.out_dir, source.ckpt)
    if not quiet:
        print(f"checkpoint: {path}", file=sys.stderr)
    ckpt = load_checkpoint(path, mmap=dtype in (None, "float32"))  # mapped when its tensors are kept as they are:
    # converted, each float32 tensor is let go as soon as it is (a mapping would hold the file until the end)
    model = model_from_checkpoint(ckpt, device, source.allow_changed_base)
    model = merge_adapters(model).eval()  # adapters folded in: as fast as any
    tokenizer = tokenizer_from_checkpoint(ckpt, source.meta, path)
    ckpt = replace(ckpt, model={})  # the weights are the model's now: the float32 ones go when it lets them go
    if dtype is not None:
        for_decoding(model, dtype, device)
    return OpenedModel(path, ckpt, model, tokenizer, task_from_checkpoint(ckpt, tokenizer), device)
