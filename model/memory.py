"""Memory you can predict: what a training run will hold, before it starts.

weights (every parameter), gradients and AdamW's two moments (the parameters that train: all of
them, or the LoRA adapters), activations kept for the backward pass (per block, or with gradient
checkpointing only each block's input and one block recomputed), the logits and their gradient,
and what the process itself takes. Counted in float32 (float64 runs: twice), in MB.
"""

import os
from dataclasses import dataclass, replace

import torch

from model.errors import UserError

PROCESS_MB = 300  # Python, torch and the data, before any model: measured on Linux, CPU


@dataclass
class MemoryEstimate:
    """Each part in MB. Activations are what the blocks keep for backward (`kept`) and the logits'
    (`logits`: the logits, their log-softmax and its gradient, alive together in backward)."""
    weights: float
    gradients: float
    optimizer: float
    kept: float
    logits: float
    process: float = PROCESS_MB

    @property
    def activations(self):
        return self.kept + self.logits

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations + self.process

    def parts(self):
        return (f"weights {self.weights:,.0f} + gradients {self.gradients:,.0f} + AdamW state {self.optimizer:,.0f} "
                f"+ activations {self.activations:,.0f} + process {self.process:,.0f}")

    def line(self):
        return f"memory estimate: {self.total:,.0f} MB = {self.parts()}"


def block_floats(config, tokens):
    """Floats one block keeps for backward over `tokens` tokens: the norms' inputs and outputs, Q, K
    and V (K and V repeated for the heads that share them, as the explicit attention keeps them; the
    fused kernel reads them in place, so there it is an upper bound), the attention output, and the
    feed-forward's hidden layers (three for a plain one, five for a gated one)."""
    C, q = config.n_embd, config.n_head * config.head_dim
    attention = 4 * C + 3 * q + 2 * config.n_kv_head * config.head_dim + 2 * q
    hidden = (5 if config.mlp == "gated" else 3) * config.intermediate_size
    return tokens * (attention + hidden)


def estimate(config, parameters, trained, batch_size, bytes_per_float=4, half=False):
    """The memory of a training step of batch_size sequences of config.block_size tokens, for a model
    of `parameters` of which `trained` learn. `half`: under bfloat16/float16 autocast, where
    activations take 2 bytes and a LoRA run keeps its frozen base in 2 bytes too. -> MemoryEstimate."""
    mb, act_mb = bytes_per_float / 2 ** 20, (2 if half else bytes_per_float) / 2 ** 20
    frozen_mb = act_mb if trained < parameters else mb
    tokens = batch_size * config.block_size
    kept = (config.n_layer * tokens * config.n_embd + block_floats(config, tokens) if config.gradient_checkpointing
            else config.n_layer * block_floats(config, tokens))
    # the logits, their log-softmax and their gradient; with checkpointing, one chunk of them at a time (GPT.chunked_loss)
    logits = 3 * (min(tokens, 256) if config.gradient_checkpointing else tokens) * config.vocab_size
    return MemoryEstimate(trained * mb + (parameters - trained) * frozen_mb, trained * mb, 2 * trained * mb,
                          kept * act_mb, logits * act_mb)


def available_mb(device):
    """Memory this run may still take: free GPU memory, or the system's available memory (Linux,
    macOS); None where it cannot be told."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2 ** 20
    try:  # Linux: free memory plus what the page cache would give back
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config, parameters, trained, batch_size, device, bytes_per_float, half, lora_parameters, finetune):
    """The estimate's line, or UserError when it exceeds the memory available, naming the options
    that would fit: gradient checkpointing, LoRA (fine-tunes), a smaller batch."""
    need = estimate(config, parameters, trained, batch_size, bytes_per_float, half)
    have = available_mb(device)
    if have is None or need.total <= have:
        return need.line()
    options = []
    with_ckpt = replace(config, gradient_checkpointing=True)
    if not config.gradient_checkpointing:
        options.append(("--gradient_checkpointing=True", estimate(with_ckpt, parameters, trained, batch_size,
                                                                  bytes_per_float, half)))
    if finetune and trained > lora_parameters:
        options.append(("--lora_rank=8 --lora_targets=all --gradient_checkpointing=True",
                        estimate(with_ckpt, parameters, lora_parameters, batch_size, bytes_per_float, half)))
    for smaller in (batch_size // 2, batch_size // 4, 1):
        if 0 < smaller < batch_size:
            options.append((f"--batch_size={smaller} (with more --gradient_accumulation_steps)",
                            estimate(config, parameters, trained, smaller, bytes_per_float, half)))
    fits = [f"{flags} ({e.total:,.0f} MB)" for flags, e in options if e.total <= have]
    raise UserError(f"this run needs about {need.total:,.0f} MB ({need.parts()}) and {have:,.0f} MB are "
                    f"available; " + (f"options that fit: {'; '.join(fits)}" if fits else
                                      "nothing here fits: use a smaller model or a machine with more memory"))
