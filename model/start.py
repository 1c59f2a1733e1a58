"""Starting a training run: from scratch, resuming out_dir's checkpoint, or fine-tuning another
model. prepare_run() builds the Run that the loop (model/trainer.py) works with."""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.align import DPO, GRPO, Reference
from model.checkpoint import (Checkpoint, check_writable, find_checkpoint, load_checkpoint, model_from_checkpoint,
                              recorded_state, tokenizer_from_checkpoint, weights_digest)
from model.config import MODEL_FIELDS, format_config
from model.errors import UserError
from model.gpt import GPT, RUN_FIELDS, GPTConfig
from model.lora import LoRAConfig, adapter_size, add_adapters, merge_adapters, store_frozen_in
from model.memory import check_fits
from model.rewards import Rewards
from model.runtime import Runtime, setup_runtime
from model.tasks import task_for_training
from model.tasks.preference import PreferenceTask


@dataclass
class Start:
    """Where the weights come from: 'scratch', 'resume' (out_dir's checkpoint) or 'finetune'
    (another model's checkpoint, at `path`), with that checkpoint and its tokenizer."""
    mode: str
    ckpt: Optional[Checkpoint] = None
    tokenizer: object = None
    path: Optional[Path] = None


@dataclass
class Run:
    """Everything a training run works with."""
    cfg: object
    rt: Runtime
    model: GPT
    optimizer: torch.optim.Optimizer
    task: object
    iter_num: int = 0
    best_val_loss: float = float("inf")
    saved_iter: Optional[int] = None  # the iteration of the state on disk (None: nothing saved yet)
    lora: Optional[LoRAConfig] = None  # LoRA: how the adapters were made and the base they are saved apart from
    objective: object = None  # None: the model's cross-entropy; DPO or GRPO (model/align.py)
    reference: Optional[dict] = None  # DPO/GRPO of a whole model: its frozen start, as the checkpoint records it


def read_start(cfg):
    """The Start that cfg.init_from names. A checkpoint without our vocabulary and task (one
    nanoGPT wrote) cannot be trained on here: UserError saying what does work."""
    if cfg.init_from == "scratch":
        return Start("scratch")
    if cfg.init_from == "resume":
        mode, path = "resume", Path(cfg.out_dir) / "ckpt.pt"
    else:
        mode, path = "finetune", find_checkpoint(out_dir=cfg.init_from)
    ckpt = load_checkpoint(path)
    if ckpt.tokenizer is None or ckpt.task is None:
        verb = "resume" if mode == "resume" else "fine-tune from"
        raise UserError(f"{path} has no vocabulary or task (it was written by nanoGPT?), so train.py cannot "
                        f"{verb} it; sample it with: python sample.py --ckpt={path} --meta=path/to/meta.pkl")
    if mode == "resume" and ckpt.optimizer is None:
        raise UserError(f"{path} has no optimizer state (a converted or downloaded model), so it cannot be "
                        f"resumed; fine-tune from it with --init_from={path}")
    return Start(mode, ckpt, tokenizer_from_checkpoint(ckpt), Path(path).resolve())


def micro_steps(cfg, rt):
    """Micro-batches per iteration for the whole job: gradient_accumulation_steps, split across the
    processes. Fewer than the processes: each process takes one, and rank 0 says so."""
    steps = cfg.gradient_accumulation_steps
    if steps < rt.world_size:
        if rt.master:
            print(f"notice: gradient_accumulation_steps={steps} is less than the {rt.world_size} processes; each "
                  f"process takes one micro-batch, so a step sees batch_size x {rt.world_size} = "
                  f"{cfg.batch_size * rt.world_size} sequences")
        return rt.world_size
    if steps % rt.world_size:
        raise UserError(f"gradient_accumulation_steps={steps} must be a multiple of the number of processes "
                        f"({rt.world_size}) or less than it")
    return steps


@contextmanager
def rank0_first(rt):
    """Rank 0 does the block first (e.g. writes prepared data), then the others (which reuse it)."""
    if rt.ddp and not rt.master:
        dist.barrier()
    yield
    if rt.ddp and rt.master:
        dist.barrier()


def grow_vocabulary(state, vocab_size, generator):
    """Fine-tuning: new characters get new rows in the token embedding (and in an untied LM head,
    rows of its own), initialised like fresh weights, N(0, 0.02); known rows are kept as they are."""
    wte, head = state["transformer.wte.weight"], state["lm_head.weight"]
    tied = head.data_ptr() == wte.data_ptr()

    def grown(w):
        extra = torch.randn(vocab_size - w.size(0), w.size(1), generator=generator, dtype=w.dtype) * 0.02
        return torch.cat([w, extra.to(w.device)])

    state["transformer.wte.weight"] = grown(wte)
    state["lm_head.weight"] = state["transformer.wte.weight"] if tied else grown(head)


def build_model(cfg, start, task):
    """(the GPT for the task, its LoRA or None): new (seeded), the checkpoint's (resume: adapters
    and all), or another model's weights (fine-tune: the position embeddings cropped to the task's
    block size, the vocabulary grown; with --lora_rank, the base frozen and adapters added)."""
    run_fields = {k: getattr(cfg, k) for k in RUN_FIELDS}
    torch.manual_seed(cfg.seed)
    if start.mode == "resume":
        return model_from_checkpoint(start.ckpt, allow_changed_base=cfg.allow_changed_base, **run_fields), start.ckpt.lora
    args = {k: getattr(cfg, k) for k in MODEL_FIELDS} if start.mode == "scratch" else asdict(start.ckpt.model_config)
    model = GPT(GPTConfig(**{**args, **run_fields, "block_size": task.block_size, "vocab_size": task.model_vocab_size}))
    if start.mode == "scratch":
        return model, None
    state = merge_adapters(model_from_checkpoint(start.ckpt)).state_dict()
    lora = cfg.lora()
    if lora:  # the adapters are saved apart from this base: say which it is, and what its weights were
        lora = replace(lora, base=str(start.path), base_digest=weights_digest(state))
    if "transformer.wpe.weight" in state:  # learned positions; sinusoidal ones have no weights
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:task.block_size]
    grow_vocabulary(state, task.model_vocab_size, torch.Generator().manual_seed(cfg.seed))
    model.load_state_dict(state)
    if lora:
        add_lora(model, lora, grown=task.model_vocab_size > start.ckpt.model_config.vocab_size)
    return model, lora


def add_lora(model, lora, grown):
    """Freeze the model and add adapters; embeddings grown for new tokens train too (new rows need
    learning), and the adapter checkpoint keeps them."""
    add_adapters(model, lora)
    if grown:
        model.transformer.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)


def frozen_start(cfg, start, model, lora):
    """(Reference, the checkpoint's record of it) for DPO, or GRPO with a KL term. Under LoRA the
    policy with its adapters off; else a frozen copy of the start: made now, or (resuming) read
    again from where the record says, refused when its weights changed since."""
    if lora:
        return Reference(model), None
    if start.mode == "finetune":
        return Reference.copy_of(model), {"path": str(start.path), "digest": weights_digest(model.state_dict())}
    record = start.ckpt.reference
    if record is None:
        raise UserError(f"{start.path} records no starting model to compare with; start this run again from the "
                        f"model with --init_from")
    state = recorded_state(record["path"], record["digest"], cfg.allow_changed_base, "the reference model",
                           "this run started from", "start this run again")
    frozen = GPT(model.config)
    frozen.load_state_dict(state)
    return Reference(model, frozen.to(next(model.parameters()).device)), record


def objective_for(cfg, start, task, model, lora, rewards, rt):
    """(what the run minimises, its reference's record): DPO for preferences, GRPO with rewards,
    else None (the model's own loss)."""
    preference, rewarded = isinstance(task, PreferenceTask), rewards is not None
    if not (preference or rewarded):
        if not hasattr(task, "get_batch"):
            raise UserError(f"{cfg.data} holds prompts alone: give --reward to learn from rewards (GRPO)")
        return None, None
    what = "DPO" if preference else "GRPO"
    if cfg.dropout:
        raise UserError(f"{what} trains without dropout (as TRL does: the policy and the reference must compute "
                        f"alike); leave --dropout=0")
    if rewarded and (rt.ddp or cfg.gradient_accumulation_steps > 1):
        raise UserError("GRPO runs in one process and one batch of samples a step: raise --batch_size instead of "
                        "--gradient_accumulation_steps or processes")
    if rewarded and not hasattr(task, "draw_prompts"):
        raise UserError("GRPO learns from prompts: a .jsonl of prompts (--data), or a sorter to start from")
    reference, record = frozen_start(cfg, start, model, lora) if preference or cfg.beta else (None, None)
    if preference:
        return DPO(reference, cfg.beta, cfg.loss_type, cfg.label_smoothing), record
    return GRPO(rewards, reference, cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.epsilon,
                cfg.beta, cfg.num_iterations), record


def rows_per_step(cfg, objective):
    """Sequences a micro-step's forward reads: DPO reads both answers of each pair, GRPO every sample."""
    return cfg.batch_size * {DPO: 2, GRPO: cfg.num_generations}.get(type(objective), 1)


def prepare_run(cfg):
    """Set up devices, data, model and optimizer for a config (load_config checked it); print what was chosen."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    cfg = replace(cfg, gradient_accumulation_steps=micro_steps(cfg, rt))
    if rt.master:
        check_writable(cfg.out_dir, "out_dir", "choose another with --out_dir")
    rewards = Rewards.parse(cfg.reward, cfg.reward_weights) if cfg.reward else None  # a bad file: said before any work
    start = read_start(cfg)
    if start.mode == "resume":  # the checkpoint decides the task and the adapters
        cfg = replace(cfg.with_lora(start.ckpt.lora), task=start.ckpt.task["type"])
    with rank0_first(rt):
        task = task_for_training(cfg.data_settings(), start, rewarded=rewards is not None)
    model, lora = build_model(cfg, start, task)
    model.to(rt.device, dtype=torch.float64 if rt.dtype == torch.float64 else torch.float32)
    if lora and rt.dtype in (torch.bfloat16, torch.float16):
        store_frozen_in(model, rt.dtype)  # the base never changes: no float32 copy of it
    objective, reference = objective_for(cfg, start, task, model, lora, rewards, rt)
    cfg = replace(cfg, block_size=task.block_size, **{k: getattr(model.config, k) for k in MODEL_FIELDS})
    frozen = getattr(getattr(objective, "reference", None), "copy", None)  # DPO's or GRPO's frozen start: weights too
    weights = model.num_params() + (frozen.num_params() if frozen is not None else 0)
    memory = check_fits(model.config, weights, sum(p.numel() for p in model.parameters() if p.requires_grad),
                        rows_per_step(cfg, objective), rt.device, 8 if rt.dtype == torch.float64 else 4,
                        rt.dtype in (torch.bfloat16, torch.float16),
                        adapter_size(model, LoRAConfig(8, targets="all")), start.mode == "finetune")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    run = Run(cfg, rt, model, optimizer, task, lora=lora, objective=objective, reference=reference)
    if start.mode == "resume":
        optimizer.load_state_dict(start.ckpt.optimizer)
        run.iter_num, run.best_val_loss = start.ckpt.iter_num, start.ckpt.best_val_loss
        run.saved_iter = run.iter_num
    if rt.master:
        how = {"scratch": "from scratch", "resume": f"resuming at iteration {run.iter_num}"}.get(
            start.mode, f"fine-tuning {cfg.init_from}")
        print(f"config:\n{format_config(cfg)}")
        print(f"device: {rt.device}{' (auto)' if cfg.device == 'auto' else ''}, dtype: "
              f"{str(rt.dtype).replace('torch.', '')}, processes: {rt.world_size}")
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters = f" (LoRA: {trained:,} of them train)" if lora else ""
        print(f"model: {model.num_params():,} parameters{adapters}, {how}")
        print(memory)
    return run
