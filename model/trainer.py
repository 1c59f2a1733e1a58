"""The training loop: one process on CPU, CUDA or MPS, or many under torchrun (DDP).

Randomness is derived, not carried: the batch of micro-step m at iteration i comes from a
generator seeded with (seed, i, m), and dropout from (seed, i, rank). So a run resumed at
iteration i continues exactly as if it had never stopped, with any number of processes.
"""

import json
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model.checkpoint import (find_checkpoint, load_checkpoint, model_from_checkpoint, record_latest,
                              save_checkpoint, tokenizer_from_checkpoint)
from model.config import UserError, format_config
from model.report import write_report, write_run_summary
from model.gpt import GPT, GPTConfig
from model.schedule import get_lr
from model.tasks import SortTask, TextTask, read_text
from model.tokenizer import CharTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---- devices and precision ----------------------------------------------------------------

def available_devices():
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not here raises UserError
    listing the ones that are."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    found = available_devices()
    kind, _, index = name.partition(":")
    ok = (kind == "cpu" and not index) or (kind == "mps" and not index and "mps" in found) or (
        kind == "cuda" and (f"cuda:{index or 0}" in found))
    if not ok:
        raise UserError(f"device {name!r} is not available on this machine; available: {', '.join(found)}")
    return name


def resolve_dtype(name, device_type):
    """'auto': bfloat16 on CUDA where supported, else float16 there; float32 elsewhere."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[name]


def autocast_context(device_type, dtype):
    """Mixed precision: weights stay float32 (float64 for the parity tests), matmuls run in
    bfloat16/float16 under autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device_type, dtype=dtype)
    return nullcontext()


@dataclass
class Runtime:
    device: str
    device_type: str
    dtype: torch.dtype
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0


def setup_runtime(cfg):
    """One process, or one of many started by torchrun (RANK/WORLD_SIZE in the environment):
    NCCL on CUDA, Gloo on CPU."""
    if "RANK" not in os.environ:
        device = resolve_device(cfg.device)
        rt = Runtime(device, device.split(":")[0], None)
    else:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            resolve_device("cuda")  # a clear error when there is none
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        elif cfg.device not in ("auto", "cpu"):
            raise UserError(f"torchrun supports CUDA (NCCL) and CPU (Gloo); got --device={cfg.device}")
        else:
            device = "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rt = Runtime(device, device.split(":")[0], None, True, rank, local_rank, int(os.environ["WORLD_SIZE"]))
    rt.dtype = resolve_dtype(cfg.dtype, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where float32 remains
    return rt


# ---- one optimizer step -------------------------------------------------------------------

def train_step(model, optimizer, batches, lr, grad_clip, autocast=None, scaler=None):
    """One optimizer step over the micro-batches [(x, y), ...] (gradient accumulation).
    Under DDP the gradients are averaged across processes once, on the last micro-batch.
    Returns the mean loss over the micro-batches (a detached tensor)."""
    autocast = autocast or nullcontext()
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast:
                _, loss = model(x, y)
            loss = loss / len(batches)
            scaler.scale(loss).backward()
        total = total + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def derived_seed(*parts):
    """A seed made from integers: the same parts give the same seed in every process and run."""
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF  # hash of a tuple of ints is not randomised


# ---- setting up a run ---------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run works with, built by prepare_run()."""
    cfg: object
    rt: Runtime
    model: GPT
    optimizer: torch.optim.Optimizer
    task: object
    iter_num: int = 0
    best_val_loss: float = float("inf")


def check_writable(out_dir):
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another with --out_dir") from None


@contextmanager
def rank0_first(rt):
    """Rank 0 does the block first (e.g. writes prepared data), then the others (which reuse it)."""
    if rt.ddp and not rt.master:
        dist.barrier()
    yield
    if rt.ddp and rt.master:
        dist.barrier()


def make_task(cfg, ckpt, finetune, block_size):
    """The sort task or a text task. Resuming takes the tokenizer and split from the checkpoint;
    fine-tuning extends the base model's vocabulary with the new text's characters."""
    if cfg.task == "sort":
        if ckpt is not None and not finetune:
            return SortTask.from_state(ckpt["task"])
        return SortTask(cfg.sort_length, cfg.sort_alphabet, cfg.sort_holdout, cfg.seed)
    text = read_text(cfg.data)
    if ckpt is None:
        tokenizer = CharTokenizer.from_text(text)
    else:
        tokenizer = tokenizer_from_checkpoint(ckpt)
        if tokenizer is None:
            raise UserError("the checkpoint has no tokenizer (a nanoGPT checkpoint?); it cannot be trained on text here")
        if finetune:
            tokenizer = tokenizer.extend(text)
    return TextTask(text, tokenizer, Path(cfg.out_dir) / "prepared", block_size, cfg.val_fraction)


def grow_vocabulary(state, vocab_size, generator):
    """Fine-tuning: new characters get new rows in the (tied) token embedding, initialised like
    fresh embeddings, N(0, 0.02); the rows of known characters are kept as they are."""
    wte = state["transformer.wte.weight"]
    extra = torch.randn(vocab_size - wte.size(0), wte.size(1), generator=generator, dtype=wte.dtype) * 0.02
    state["transformer.wte.weight"] = state["lm_head.weight"] = torch.cat([wte, extra.to(wte.device)])


def prepare_run(cfg):
    """Resolve the config, set up devices, data, model and optimizer; print what was chosen."""
    cfg.validate()
    rt = setup_runtime(cfg)
    if cfg.gradient_accumulation_steps % rt.world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
                        f"the number of processes ({rt.world_size})")
    if rt.master:
        check_writable(cfg.out_dir)
    ckpt, finetune = None, False
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
        cfg = replace(cfg, task=ckpt["task"]["type"])
    elif cfg.init_from != "scratch":
        ckpt, finetune = load_checkpoint(find_checkpoint(out_dir=cfg.init_from)), True

    if ckpt is not None:
        model_args = {k: v for k, v in ckpt["model_args"].items() if k in GPTConfig.__dataclass_fields__}
    else:
        model_args = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "bias", "gelu")}
    model_args.update(dropout=cfg.dropout, attention=cfg.attention)
    if cfg.task == "sort":
        block_size = 2 * (ckpt["task"]["length"] if ckpt and not finetune else cfg.sort_length) - 1
    elif finetune:
        base = model_args["block_size"]
        block_size = cfg.block_size or base
        if block_size > base:
            raise UserError(f"block_size={block_size} is larger than the base model's {base}; "
                            f"a fine-tune can keep it or reduce it (--block_size={base} or less)")
    else:
        block_size = model_args.get("block_size", cfg.block_size)
    with rank0_first(rt):
        task = make_task(cfg, ckpt, finetune, block_size)
    model_args.update(block_size=block_size, vocab_size=task.tokenizer.vocab_size)
    cfg = replace(cfg, block_size=block_size, **{k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "bias", "gelu")})

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        state = model_from_checkpoint(ckpt).state_dict()
        if finetune:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
            grow_vocabulary(state, task.tokenizer.vocab_size, torch.Generator().manual_seed(cfg.seed))
        model.load_state_dict(state)
    model.to(rt.device, dtype=torch.float64 if rt.dtype == torch.float64 else torch.float32)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    run = Run(cfg, rt, model, optimizer, task)
    if cfg.init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    if rt.master:
        how = {"scratch": "from scratch", "resume": f"resuming at iteration {run.iter_num}"}.get(
            cfg.init_from, f"fine-tuning {cfg.init_from}")
        print(f"config:\n{format_config(cfg)}")
        print(f"device: {rt.device}{' (auto)' if cfg.device == 'auto' else ''}, dtype: "
              f"{str(rt.dtype).replace('torch.', '')}, processes: {rt.world_size}")
        print(f"model: {model.num_params():,} parameters, {how}")
    return run


# ---- evaluation, logging, checkpoints -----------------------------------------------------

@torch.no_grad()
def estimate_losses(run, autocast):
    """Mean loss over eval_iters fixed batches of each split (the same batches every time)."""
    model, cfg = run.model, run.cfg
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = []
        for k in range(cfg.eval_iters):
            g = torch.Generator().manual_seed(derived_seed(cfg.seed, -1, k))
            x, y = run.task.get_batch(split, cfg.batch_size, g)
            with autocast:
                _, loss = model(x.to(run.rt.device), y.to(run.rt.device))
            losses.append(loss.item())
        out[f"{split}_loss"] = sum(losses) / len(losses)
    model.train()
    return out


def checkpoint_dict(run):
    return {
        "model": run.model.state_dict(),
        "model_args": asdict(run.model.config),
        "optimizer": run.optimizer.state_dict(),
        "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss,
        "config": asdict(run.cfg),
        "tokenizer": run.task.tokenizer.to_dict(),
        "task": run.task.state(),
    }


def save(run):
    path = Path(run.cfg.out_dir) / "ckpt.pt"
    save_checkpoint(checkpoint_dict(run), path)
    record_latest(path)
    return path


class MetricsLog:
    """One JSON object a line in out_dir/metrics.jsonl, for plots and reports."""

    def __init__(self, out_dir, append):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, **row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step and save; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ---- the loop -----------------------------------------------------------------------------

def train(cfg):
    """Train as the config says. Returns a summary dict (iterations, losses, metrics, why it
    stopped, checkpoint path). Raises TrainingDiverged on a NaN/inf loss, UserError on bad input."""
    try:
        return train_loop(prepare_run(cfg))
    finally:
        if dist.is_initialized():  # also when setting up failed, so torchrun ends cleanly
            dist.destroy_process_group()


def train_loop(run):
    cfg, rt, task = run.cfg, run.rt, run.task
    model = torch.compile(run.model) if cfg.compile else run.model
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    local_steps = cfg.gradient_accumulation_steps // rt.world_size
    micro_ids = range(rt.rank * local_steps, (rt.rank + 1) * local_steps)
    autocast = autocast_context(rt.device_type, rt.dtype)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * task.block_size

    def batches(it):
        out = []
        for m in micro_ids:
            x, y = task.get_batch("train", cfg.batch_size, torch.Generator().manual_seed(derived_seed(cfg.seed, it, m)))
            out.append((x.to(rt.device), y.to(rt.device)))
        return out

    log = MetricsLog(cfg.out_dir, append=cfg.init_from == "resume") if rt.master else None
    bar = tqdm(total=cfg.max_iters, initial=run.iter_num, disable=not rt.master, unit="it", dynamic_ncols=True)
    summary = {"stopped": "max_iters", "checkpoint": None}
    start_time = last_time = time.time()
    last_eval, loss_val = {}, None
    try:
        with StopRequest() as stop:
            while run.iter_num < cfg.max_iters:
                it = run.iter_num
                torch.manual_seed(derived_seed(cfg.seed, it, rt.rank))  # dropout
                lr = get_lr(it, cfg)
                loss = train_step(model, run.optimizer, batches(it), lr, cfg.grad_clip, autocast, scaler)
                loss_val, stop_now = reduce_across_ranks(rt, loss.item(), stop.requested)
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(
                        f"the loss became {loss_val} at iteration {it}; training stopped. The last good "
                        f"checkpoint (if any) is kept in {cfg.out_dir}. Try a lower --learning_rate "
                        f"(now {cfg.learning_rate}) or --grad_clip=1.0")
                run.iter_num += 1
                now = time.time()
                tok_s = tokens_per_iter / max(now - last_time, 1e-9)
                last_time = now
                bar.update(1)
                if log and (run.iter_num % cfg.log_interval == 0 or run.iter_num == 1):
                    log.write(iter=run.iter_num, loss=loss_val, lr=lr, tokens_per_s=tok_s, time_s=now - start_time)
                if stop_now:
                    summary["stopped"] = "interrupted"
                    break
                if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters:
                    ev = evaluate(run, autocast)
                    summary.update(ev)
                    last_eval = {k.replace("_acc", ""): f"{v:.1%}" for k, v in ev.items() if k.endswith("_acc")}
                    improved = ev["val_loss"] < run.best_val_loss
                    run.best_val_loss = min(run.best_val_loss, ev["val_loss"])
                    if rt.master:
                        log.write(iter=run.iter_num, time_s=time.time() - start_time, **ev)
                        bar.write(f"iter {run.iter_num}: " + ", ".join(
                            f"{k} {v:.1%}" if k.endswith("_acc") else f"{k} {v:.4f}" for k, v in ev.items()))
                        if improved or cfg.always_save_checkpoint:
                            summary["checkpoint"] = str(save(run))
                    if cfg.task == "sort" and cfg.stop_at_full_accuracy and ev.get("heldout_acc") == 1.0:
                        summary["stopped"] = "heldout_acc 100%"
                        break
                    last_time = time.time()  # tokens/s counts training steps, not evaluation
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", **last_eval, refresh=False)
            unsaved = summary["checkpoint"] is None or run.iter_num % cfg.eval_interval
            if rt.master and unsaved and (cfg.always_save_checkpoint or summary["stopped"] == "interrupted"
                                          or summary["checkpoint"] is None):
                summary["checkpoint"] = str(save(run))  # the final state, also after Ctrl-C
    finally:
        bar.close()
        if log:
            log.close()
    summary.update(iter_num=run.iter_num, wall_s=time.time() - start_time, loss=loss_val)
    if rt.master:
        write_run_summary(cfg.out_dir, {**summary, "device": rt.device, "processes": rt.world_size,
                                        "dtype": str(rt.dtype).replace("torch.", "")})
        summary["report"] = str(write_report(cfg.out_dir))
        print(f"stopped after {run.iter_num} iterations ({summary['stopped']}) in {summary['wall_s']:.1f}s; "
              f"checkpoint: {summary['checkpoint']}; report: {summary['report']}")
    return summary


def evaluate(run, autocast):
    ev = estimate_losses(run, autocast)
    ev.update(run.task.evaluate(run.model, run.rt.device))
    return ev


def reduce_across_ranks(rt, loss, stop):
    """The mean loss over processes, and whether any process was asked to stop (so all stop
    at the same step)."""
    if not rt.ddp:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t[0].item() / rt.world_size, t[1].item() > 0
