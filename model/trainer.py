"""The training loop: one process on CPU, CUDA or MPS, or many under torchrun (DDP).

Randomness is derived, not carried: the batch of micro-step m at iteration i comes from a
generator seeded with (seed, i, m), and dropout from (seed, i, rank). So a run resumed at
iteration i continues exactly as if it had never stopped, with any number of processes.
"""

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model.align import DPO, GRPO
from model.checkpoint import Checkpoint, save_run
from model.errors import UserError
from model.eval import answer_scores
from model.lora import adapter_state
from model.report import write_report, write_run_summary
from model.runtime import autocast_context, derived_seed, end_processes, peak_memory_mb, reduce_across_ranks
from model.schedule import get_lr
from model.start import prepare_run


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---- one optimizer step -------------------------------------------------------------------

def lm_loss(model, x, y):
    """The model's own loss, the mean cross-entropy over the targets (no metrics beside it)."""
    return model(x, y)[1], {}


def train_step(model, optimizer, batches, lr, grad_clip, autocast=None, scaler=None, loss_fn=lm_loss, stats=None):
    """One optimizer step over the micro-batches [(x, y), ...] (gradient accumulation).
    Under DDP the gradients are averaged across processes once, on the last micro-batch.
    loss_fn(model, x, y) -> (loss, metrics): the cross-entropy, or DPO's or GRPO's (model/align.py),
    whose metrics (detached tensors), averaged over the micro-batches, go into `stats`.
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
                loss, metrics = loss_fn(model, x, y)
            loss = loss / len(batches)
            scaler.scale(loss).backward()
        total = total + loss.detach()
        if stats is not None:
            for k, v in metrics.items():
                stats[k] = (stats[k] if i else 0.0) + v.detach() / len(batches)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def rl_step(run, model, it, lr, autocast, scaler, stats):
    """GRPO's iteration: sample a group for each of batch_size training prompts (drawn, like every
    sample, from the seed and the iteration: a resumed run samples what it would have), score them,
    then num_iterations optimizer steps on them."""
    cfg, grpo = run.cfg, run.objective
    rows = run.task.draw_prompts("train", cfg.batch_size, torch.Generator().manual_seed(derived_seed(cfg.seed, it)))
    with autocast:
        rollouts = grpo.rollouts(run.model, run.task, rows, derived_seed(cfg.seed, it, -2))
    for _ in range(grpo.num_iterations):
        loss = train_step(model, run.optimizer, [(rollouts.x, rollouts.y)], lr, cfg.grad_clip, autocast, scaler,
                          grpo.loss_fn(rollouts), stats)
    return loss


def iteration(run, model, it, lr, autocast, scaler, stats):
    """One iteration's optimizer step(s): GRPO's, or one step on the task's batches under the run's loss."""
    if isinstance(run.objective, GRPO):
        return rl_step(run, model, it, lr, autocast, scaler, stats)
    return train_step(model, run.optimizer, micro_batches(run, it), lr, run.cfg.grad_clip, autocast, scaler,
                      run.objective or lm_loss, stats)


def micro_batches(run, it):
    """This process's share of iteration it's micro-batches, on its device."""
    cfg, rt = run.cfg, run.rt
    per_rank = cfg.gradient_accumulation_steps // rt.world_size
    out = []
    for m in range(rt.rank * per_rank, (rt.rank + 1) * per_rank):
        x, y = run.task.get_batch("train", cfg.batch_size, torch.Generator().manual_seed(derived_seed(cfg.seed, it, m)))
        out.append((to_device(x, rt), to_device(y, rt)))
    return out


def to_device(t, rt):
    """A batch tensor onto the run's device. On CUDA from pinned memory, without waiting for the
    copy: the host goes on to queue the step while the batch travels."""
    if rt.device_type == "cuda":
        return t.pin_memory().to(rt.device, non_blocking=True)
    return t.to(rt.device)


# ---- evaluation, logging, checkpoints -----------------------------------------------------

@torch.no_grad()
def estimate_losses(run, autocast):
    """Mean loss over eval_iters fixed batches of each split (the same batches every time)."""
    model, cfg = run.model, run.cfg
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = 0.0
        for k in range(cfg.eval_iters):
            g = torch.Generator().manual_seed(derived_seed(cfg.seed, -1, k))
            x, y = run.task.get_batch(split, cfg.batch_size, g)
            with autocast:
                loss, _ = (run.objective or lm_loss)(model, to_device(x, run.rt), to_device(y, run.rt))
            total = total + loss.float()
        out[f"{split}_loss"] = total.item() / cfg.eval_iters  # one read of the device per split
    model.train()
    return out


def evaluate(run, autocast):
    """The losses (GRPO has none to estimate: its samples are its data), the exact match of greedy
    replies where the task knows the right ones, and DPO's preference accuracy on the held-out pairs."""
    ev = {} if isinstance(run.objective, GRPO) else estimate_losses(run, autocast)
    with autocast:  # in the run's precision, as training (a LoRA run's frozen base may be bfloat16)
        ev.update(answer_scores(run.model, run.task))
        if isinstance(run.objective, DPO):
            ev.update(preference_scores(run))
    return ev


@torch.no_grad()
def preference_scores(run):
    """TRL's eval_rewards/accuracies and eval_rewards/margins over the held-out pairs (up to EVAL_LIMIT)."""
    pairs, size = run.task.pairs["val"][:run.task.EVAL_LIMIT], run.cfg.batch_size
    if not pairs:
        return {}
    run.model.eval()
    sums = {"rewards/accuracies": 0.0, "rewards/margins": 0.0}
    for i in range(0, len(pairs), size):
        x, y = run.task.batch_of(pairs[i:i + size])
        _, metrics = run.objective(run.model, to_device(x, run.rt), to_device(y, run.rt))
        for k in sums:
            sums[k] += metrics[k].item() * len(pairs[i:i + size])
    run.model.train()
    return {f"eval_{k}": v / len(pairs) for k, v in sums.items()}


def run_config(run):
    """The run's config as the checkpoint and the report keep it. nanoGPT's sample.py reads
    data/<config['dataset']>/meta.pkl; an absolute path there names out_dir."""
    return {**asdict(run.cfg), "dataset": str(Path(run.cfg.out_dir).resolve())}


def checkpoint_of(run):
    """The run as a Checkpoint; an adapter checkpoint holds only what trained (its base is named in lora)."""
    return Checkpoint(adapter_state(run.model) if run.lora else run.model.state_dict(), run.model.config,
                      run.task.tokenizer.to_dict(), run.task.state(), run.iter_num, run.best_val_loss,
                      run.optimizer.state_dict(), run_config(run), run.lora, reference=run.reference)


def save(run):
    """Write out_dir/ckpt.pt (rank 0 only) and remember which iteration is on disk. A write that
    fails (a full disk) says which checkpoint is still intact."""
    path = Path(run.cfg.out_dir) / "ckpt.pt"
    try:
        save_run(checkpoint_of(run), path)
    except UserError as e:
        kept = (f"{path} still holds iteration {run.saved_iter}, intact" if run.saved_iter is not None else
                "no checkpoint of this run was saved before")
        raise UserError(f"{e} (saving iteration {run.iter_num}); {kept}. Free some space or choose another "
                        f"--out_dir, then continue with --init_from=resume") from None
    run.saved_iter = run.iter_num
    return path


class MetricsLog:
    """One JSON object a line in out_dir/metrics.jsonl, for plots and reports."""

    def __init__(self, out_dir, append):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, **row):
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self):
        try:
            self.file.close()
        except OSError:  # a failed write was reported already; its lost line cannot be written now
            pass


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

BAR = {"rewards/accuracies": "pref_acc", "rewards/margins": "margin", "reward": "reward", "kl": "kl"}  # shown as


class Progress:
    """What the loop shows and keeps while it runs: the bar, the metrics log (rank 0), the
    summary it returns, and the clock for tokens/s (which counts training steps only)."""

    def __init__(self, run):
        cfg, master = run.cfg, run.rt.master
        self.log = MetricsLog(cfg.out_dir, append=cfg.init_from == "resume") if master else None
        self.bar = tqdm(total=cfg.max_iters, initial=run.iter_num, disable=not master, unit="it", dynamic_ncols=True)
        self.summary = {"stopped": "max_iters", "checkpoint": None, "loss": None}
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * run.task.block_size
        self.start = self.last = time.time()
        self.last_iter = run.iter_num  # the clock's iteration at self.last
        self.shown = {}  # the latest accuracies, for the bar

    def logs(self, run):
        """Whether this iteration's loss is logged: every log_interval, and the first."""
        return run.iter_num % run.cfg.log_interval == 0 or run.iter_num == 1

    def step(self, run, loss, lr, stats):
        """The loss (and DPO's or GRPO's metrics, `stats`) read at this iteration: the bar, the log
        (on log iterations), tokens/s since the last read."""
        now, it = time.time(), run.iter_num
        tok_s = self.tokens_per_iter * (it - self.last_iter) / max(now - self.last, 1e-9)
        self.last, self.last_iter = now, it
        self.summary["loss"] = loss
        stats = {k: float(v) for k, v in stats.items()}
        if self.log and self.logs(run):
            self.log.write(iter=it, loss=loss, lr=lr, tokens_per_s=tok_s, time_s=now - self.start, **stats)
        shown = {BAR[k]: f"{v:.3g}" for k, v in stats.items() if k in BAR}
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", **shown, **self.shown,
                             refresh=False)

    def evaluation(self, run, ev):
        self.summary.update(ev)
        self.shown = {k.replace("_acc", "").replace("eval_rewards/accuracies", "heldout_pref"): f"{v:.1%}"
                      for k, v in ev.items() if k.endswith(("_acc", "accuracies"))}
        if self.log:
            self.log.write(iter=run.iter_num, time_s=time.time() - self.start, **ev)
            self.bar.write(f"iter {run.iter_num}: " + ", ".join(
                f"{k} {v:.1%}" if k.endswith(("_acc", "accuracies")) else f"{k} {v:.4f}" for k, v in ev.items()))

    def close(self):
        self.bar.close()
        if self.log:
            self.log.close()


def train(cfg):
    """Train as the config says. Returns a summary dict (iterations, losses, metrics, why it
    stopped, checkpoint path). Raises TrainingDiverged on a NaN/inf loss, UserError on bad input."""
    try:
        return train_loop(prepare_run(cfg))
    finally:
        end_processes()


def train_loop(run):
    cfg, rt = run.cfg, run.rt
    model = torch.compile(run.model) if cfg.compile else run.model
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    autocast = autocast_context(rt.device_type, rt.dtype)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    progress = Progress(run)
    try:
        if run.objective is not None and run.iter_num == 0:  # where tuning starts from, for comparison (TRL's eval_on_start)
            progress.evaluation(run, evaluate(run, autocast))
            progress.last = time.time()  # tokens/s counts training steps, not evaluation
        with StopRequest() as stop:
            while run.iter_num < cfg.max_iters:
                it = run.iter_num
                torch.manual_seed(derived_seed(cfg.seed, it, rt.rank))  # dropout
                lr = get_lr(it, cfg)
                stats = {}
                loss = iteration(run, model, it, lr, autocast, scaler, stats)
                run.iter_num += 1
                progress.bar.update(1)
                at_eval = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters
                # the loss is read from the device (a sync on a GPU) only to log, evaluate or stop, as nanoGPT
                # does; all processes read at the same iterations, so a Ctrl-C waits for the next of them
                if at_eval or progress.logs(run) or (stop.requested and not rt.ddp):
                    loss, stop_now = reduce_across_ranks(rt, loss.item(), stop.requested)
                    check_finite(loss, it, cfg)
                    progress.step(run, loss, lr, stats)
                    if stop_now:
                        progress.summary["stopped"] = "interrupted"
                        break
                if at_eval and evaluate_and_save(run, progress, autocast):
                    break
            save_final(run, progress.summary)
    finally:
        progress.close()
    return finish(run, progress)


def check_finite(loss, it, cfg):
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the loss became {loss} at iteration {it}; training stopped. The last good checkpoint (if any) "
            f"is kept in {cfg.out_dir}. Try a lower --learning_rate (now {cfg.learning_rate}) or --grad_clip=1.0")


def evaluate_and_save(run, progress, autocast):
    """Evaluate, log, and save when the val loss improved (or always_save_checkpoint). True when
    the task is solved and the config says to stop then."""
    ev = evaluate(run, autocast)
    progress.evaluation(run, ev)
    improved = ev.get("val_loss", -math.inf) < run.best_val_loss  # GRPO estimates no loss: each evaluation counts
    run.best_val_loss = min(run.best_val_loss, ev.get("val_loss", math.inf))
    if run.rt.master and (improved or run.cfg.always_save_checkpoint):
        progress.summary["checkpoint"] = str(save(run))
    progress.last, progress.last_iter = time.time(), run.iter_num  # tokens/s counts training steps, not evaluation
    scored = "heldout_acc" if "heldout_acc" in ev else "train_acc"  # nothing held out: the training answers
    if run.cfg.stop_at_full_accuracy and ev.get(scored) == 1.0:
        progress.summary["stopped"] = f"{scored} 100%"
        return True
    return False


def save_final(run, summary):
    """Save the state in memory when the one on disk is older and the run calls for it: after
    Ctrl-C, with always_save_checkpoint, or when nothing was saved yet. Never the same state twice."""
    if not run.rt.master or run.saved_iter == run.iter_num:
        return
    if run.cfg.always_save_checkpoint or summary["stopped"] == "interrupted" or run.saved_iter is None:
        summary["checkpoint"] = str(save(run))


def finish(run, progress):
    summary, rt = progress.summary, run.rt
    summary.update(iter_num=run.iter_num, wall_s=time.time() - progress.start)
    if summary["checkpoint"] is None and run.saved_iter is not None:
        summary["checkpoint"] = str(Path(run.cfg.out_dir) / "ckpt.pt")
    if rt.master:
        write_run_summary(run.cfg.out_dir, {**summary, "device": rt.device, "processes": rt.world_size,
                                            "dtype": str(rt.dtype).replace("torch.", ""),
                                            "loop_started_at": progress.start,
                                            "peak_memory_mb": peak_memory_mb(rt.device_type)})
        with autocast_context(rt.device_type, rt.dtype):
            summary["report"] = str(write_report(run.cfg.out_dir, run.model, run.task, run_config(run), run.iter_num))
        print(f"stopped after {run.iter_num} iterations ({summary['stopped']}) in {summary['wall_s']:.1f}s; "
              f"checkpoint: {summary['checkpoint']}; report: {summary['report']}")
    return summary
