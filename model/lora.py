"""LoRA: fine-tune a big model by training small low-rank adapters beside its frozen weights.

A chosen linear layer y = x W^T + b becomes y = x W^T + b + (alpha / r) B A x: A (r x in) starts
random, B (out x r) starts at zero, so the model starts exactly equal to its base, and only A and
B learn (with AdamW state for them alone). Merged, W + (alpha / r) B A is an ordinary weight again.
The adapters' names are peft's: <layer>.lora_A.weight and <layer>.lora_B.weight.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.errors import UserError

TARGETS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_gate", "mlp.c_fc", "mlp.c_proj")}
TARGETS["all"] = TARGETS["attention"] + TARGETS["mlp"]


@dataclass
class LoRAConfig:
    """How adapters are made, and (in an adapter checkpoint) the base they were trained on."""
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"  # 'attention', 'mlp', 'all', or layer names like 'c_attn,c_fc'
    base: str = ""  # the base model's checkpoint or folder (an absolute path): the frozen weights
    base_digest: str = ""  # what identifies those weights (checkpoint.weights_digest), checked when opened

    @property
    def scale(self):
        return self.alpha / self.rank

    def layer_suffixes(self):
        return TARGETS.get(self.targets) or tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def to_dict(self):
        return asdict(self)


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank adapter: its weight and bias keep their names (and stay frozen),
    lora_A and lora_B learn."""

    def __init__(self, base, lora):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight only to throw it away
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base's own tensors, not copies
        self.lora_A = nn.Linear(base.in_features, lora.rank, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(lora.rank, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft (and nn.Linear) start A
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted layer starts equal to its base
        self.lora_dropout = nn.Dropout(lora.dropout)
        self.scale = lora.scale

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    def merged(self):
        """An ordinary nn.Linear whose weight is W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * self.lora_B.weight @ self.lora_A.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def add_adapters(model, lora):
    """Freeze every weight of `model` and give the target layers adapters, in place. Returns the
    names of the adapted layers; a target that names no layer is a UserError."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [name for name, _ in target_layers(model, lora)]
    if not chosen:
        raise UserError(f"--lora_targets={lora.targets!r} names no layer of this model; use attention, mlp, all, or "
                        f"names like c_attn,c_proj,c_fc")
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), lora))
    return chosen


def target_layers(model, lora):
    """(name, layer) of every linear layer `lora.targets` names (never the LM head)."""
    suffixes = lora.layer_suffixes()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"
            and any(name == s or name.endswith("." + s) for s in suffixes)]


def adapter_size(model, lora):
    """How many parameters `lora`'s adapters would add to `model` (without adding them)."""
    return sum(lora.rank * (m.in_features + m.out_features) for _, m in target_layers(model, lora))


def merge_adapters(model):
    """Fold every adapter into its layer's weight, in place: the plain model the adapters made."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    return model


def store_frozen_in(model, dtype):
    """Keep the frozen weights in `dtype` (bfloat16, float16): they never change, so they need no
    float32 master copy; what trains stays float32. Half the weights' memory under autocast."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def adapter_state(model):
    """What an adapter checkpoint keeps: every parameter that trains (the adapters, and embeddings
    grown for new tokens), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
