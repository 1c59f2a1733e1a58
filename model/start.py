"""Starting a training run: from scratch, resuming out_dir's checkpoint, or fine-tuning another
model. prepare_run() builds the Run that the loop (model/trainer.py) works with."""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.checkpoint import config_of, find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model.config import MODEL_FIELDS, format_config
from model.errors import UserError
from model.gpt import GPT, RUN_FIELDS, GPTConfig
from model.lora import LoRAConfig, adapter_size, add_adapters, merge_adapters, store_frozen_in
from model.memory import check_fits
from model.runtime import Runtime, setup_runtime
from model.tasks import task_for_training


@dataclass
class Start:
    """Where the weights come from: 'scratch', 'resume' (out_dir's checkpoint) or 'finetune'
    (another model's checkpoint), with that checkpoint, its tokenizer and its GPTConfig fields."""
    mode: str
    ckpt: Optional[dict] = None
    tokenizer: object = None
    model_args: Optional[dict] = None


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
    lora_base: Optional[str] = None  # LoRA: the base model the adapters are saved apart from


def lora_base(cfg, start):
    """Where a LoRA run's base lives (its checkpoint names it), or None without LoRA."""
    if not cfg.lora_rank:
        return None
    if start.mode == "resume":
        return start.ckpt["base"]
    return str(Path(find_checkpoint(out_dir=cfg.init_from)).resolve())


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
    if "tokenizer" not in ckpt or "task" not in ckpt:
        verb = "resume" if mode == "resume" else "fine-tune from"
        raise UserError(f"{path} has no vocabulary or task (it was written by nanoGPT?), so train.py cannot "
                        f"{verb} it; sample it with: python sample.py --ckpt={path} --meta=path/to/meta.pkl")
    if mode == "resume" and "optimizer" not in ckpt:
        raise UserError(f"{path} has no optimizer state (a converted or downloaded model), so it cannot be "
                        f"resumed; fine-tune from it with --init_from={path}")
    return Start(mode, ckpt, tokenizer_from_checkpoint(ckpt), asdict(config_of(ckpt)))


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
    """The GPT for the task: new (seeded), the checkpoint's (resume: adapters and all), or another
    model's weights (fine-tune: the position embeddings cropped to the task's block size, the
    vocabulary grown; with --lora_rank, the base frozen and adapters added)."""
    run_fields = {k: getattr(cfg, k) for k in RUN_FIELDS}
    torch.manual_seed(cfg.seed)
    if start.mode == "resume":
        return model_from_checkpoint(start.ckpt, **run_fields)
    args = {k: getattr(cfg, k) for k in MODEL_FIELDS} if start.mode == "scratch" else dict(start.model_args)
    model = GPT(GPTConfig(**{**args, **run_fields, "block_size": task.block_size, "vocab_size": task.model_vocab_size}))
    if start.mode == "finetune":
        state = merge_adapters(model_from_checkpoint(start.ckpt)).state_dict()
        if "transformer.wpe.weight" in state:  # learned positions; sinusoidal ones have no weights
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:task.block_size]
        grow_vocabulary(state, task.model_vocab_size, torch.Generator().manual_seed(cfg.seed))
        model.load_state_dict(state)
        if cfg.lora_rank:
            add_lora(model, cfg, grown=task.model_vocab_size > start.model_args["vocab_size"])
    return model


def add_lora(model, cfg, grown):
    """Freeze the model and add adapters; embeddings grown for new tokens train too (new rows need
    learning), and the adapter checkpoint keeps them."""
    add_adapters(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
    if grown:
        model.transformer.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)


def prepare_run(cfg):
    """Check the config, set up devices, data, model and optimizer; print what was chosen."""
    cfg.validate()
    rt = setup_runtime(cfg.device, cfg.dtype)
    cfg = replace(cfg, gradient_accumulation_steps=micro_steps(cfg, rt))
    if rt.master:
        check_writable(cfg.out_dir)
    start = read_start(cfg)
    if start.mode == "resume":
        lora = start.ckpt.get("lora") or {"rank": 0}
        cfg = replace(cfg, task=start.ckpt["task"]["type"], **{f"lora_{k}": v for k, v in lora.items()})
    with rank0_first(rt):
        task = task_for_training(cfg, start)
    model = build_model(cfg, start, task)
    model.to(rt.device, dtype=torch.float64 if rt.dtype == torch.float64 else torch.float32)
    if cfg.lora_rank and rt.dtype in (torch.bfloat16, torch.float16):
        store_frozen_in(model, rt.dtype)  # the base never changes: no float32 copy of it
    cfg = replace(cfg, block_size=task.block_size, **{k: getattr(model.config, k) for k in MODEL_FIELDS})
    memory = check_fits(model.config, model.num_params(), sum(p.numel() for p in model.parameters() if p.requires_grad),
                        cfg.batch_size, rt.device, 8 if rt.dtype == torch.float64 else 4,
                        rt.dtype in (torch.bfloat16, torch.float16),
                        adapter_size(model, LoRAConfig(8, targets="all")), start.mode == "finetune")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    run = Run(cfg, rt, model, optimizer, task, lora_base=lora_base(cfg, start))
    if start.mode == "resume":
        optimizer.load_state_dict(start.ckpt["optimizer"])
        run.iter_num, run.best_val_loss = start.ckpt["iter_num"], start.ckpt["best_val_loss"]
        run.saved_iter = run.iter_num
    if rt.master:
        how = {"scratch": "from scratch", "resume": f"resuming at iteration {run.iter_num}"}.get(
            start.mode, f"fine-tuning {cfg.init_from}")
        print(f"config:\n{format_config(cfg)}")
        print(f"device: {rt.device}{' (auto)' if cfg.device == 'auto' else ''}, dtype: "
              f"{str(rt.dtype).replace('torch.', '')}, processes: {rt.world_size}")
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f" (LoRA: {trained:,} of them train)" if cfg.lora_rank else ""
        print(f"model: {model.num_params():,} parameters{lora}, {how}")
        print(memory)
    return run
