"""The weights a model reads when it decodes on the CPU: float32, bfloat16 or int8.

Writing one token reads every weight matrix once and does one multiply-add with each weight, so
on a CPU decoding runs as fast as memory can be read: half the bytes (bfloat16) or a quarter
(int8) make it nearly that much faster. for_decoding(model, dtype) replaces each nn.Linear by a
DecodeLinear holding its matrix W (out, in) in that type, and the token embedding by a
DecodeEmbedding that reads its rows from the same store (a tied LM head's matrix is one store).
int8 keeps round(W / s) with one scale per output row, s = max |W_row| / 127 (weight-only, as
llama.cpp's q8_0, whose blocks are 32 weights instead of a row). Activations, norms, biases and
the KV cache stay float32.

One row (decoding one sequence) goes through a kernel torch.compile writes from matvec() below:
y = (x * W).sum(-1) * s, the matrix read once in its own type, over every core; torch's matrix-
vector product read float32 at about two thirds of that speed on this project's machine, and int8
at less than half. Several rows (a prompt, a batch of requests) take torch's matrix products:
float32 ones for float32 weights, else bfloat16 ones (twice as fast for a prompt where the CPU
has bfloat16 instructions; int8 weights a few rows at a time through torch's int8 kernel).
"""

import sys

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.errors import UserError

DECODE_DTYPES = ("float32", "bfloat16", "int8")


def matvec(x, w, scale):
    """x (M, K) float32, w (N, K) in its stored type, scale (N,) or None -> x W^T * scale (M, N) float32:
    each weight read once and multiplied in float32."""
    y = (x[:, None, :] * w.float()).sum(-1)
    return y if scale is None else y * scale


COMPILED_FROM = 2 ** 18  # weights in a matrix worth a kernel of its own (smaller ones: torch's product is as quick)
kernels = {}  # (N, K, weight dtype, scaled) -> the kernel Inductor wrote for that shape
use_compiled = [True]  # False once compiling failed here (no C++ compiler): torch's own ops instead


def kernel(args):
    """The kernel Inductor writes for matvec(*args) at these shapes and types (compiled once each)."""
    x, w, *scale = args
    key = (*w.shape, w.dtype, bool(scale))
    if key not in kernels:
        from torch.fx.experimental.proxy_tensor import make_fx
        # traced on fake tensors: real ones would make the (1, N, K) product whole, a copy of W in float32
        graph = make_fx(lambda *a: (matvec(a[0], a[1], a[2] if len(a) > 2 else None),), tracing_mode="fake")(*args)
        kernels[key] = torch._inductor.compile(graph, list(args))
    return kernels[key]


def one_row(x, w, scale):
    """matvec for one row x (1, K): through its compiled kernel where the matrix is worth one."""
    args = (x, w) if scale is None else (x, w, scale)
    if use_compiled[0] and w.numel() >= COMPILED_FROM:
        try:
            return kernel(args)(*args)[0]
        except Exception as e:  # torch.compile needs a C++ compiler on the CPU; everything else still works
            use_compiled[0] = False
            print(f"notice: torch.compile cannot build the decoding kernel here ({type(e).__name__}: {e}); decoding "
                  f"with torch's own matrix products, more slowly", file=sys.stderr)
    return F.linear(x, w.float()) * (1 if scale is None else scale)


def stored(weight, dtype, chunk=4096):
    """(W in dtype, its per-row scales or None) for a float matrix (N, K); int8 `chunk` rows at a time,
    so a large LM head needs no float32 temporaries of its size."""
    w = weight.detach()
    if dtype != "int8":
        return w.to(getattr(torch, dtype)).contiguous(), None
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.size(0))
    for i in range(0, w.size(0), chunk):
        part = w[i:i + chunk].float()
        scale[i:i + chunk] = part.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[i:i + chunk] = torch.round(part / scale[i:i + chunk, None])
    return q, scale


class DecodeLinear(nn.Module):
    """y = x W^T + b with W kept as for_decoding stored it (buffers: nothing here trains)."""

    def __init__(self, weight, scale, bias):
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in)
        self.register_buffer("scale", scale)  # (out,) for int8, else None
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x):
        """x (..., in) float32 -> (..., out) float32."""
        flat = x.reshape(-1, self.in_features)
        if flat.size(0) == 1:  # decoding one sequence
            y = one_row(flat.contiguous(), self.weight, self.scale)
        elif self.weight.dtype == torch.float32:
            y = F.linear(flat, self.weight)
        elif self.scale is not None and flat.size(0) <= 16:  # int8, a few rows: torch's int8 kernel reads W once
            y = torch.ops.aten._weight_int8pack_mm(flat.bfloat16(), self.weight, self.scale.bfloat16()).float()
        else:  # a prompt: bfloat16 products (int8's whole numbers are exact in it), as llama.cpp rounds activations
            y = F.linear(flat.bfloat16(), self.weight.bfloat16()).float()
            y = y if self.scale is None else y * self.scale
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class DecodeEmbedding(nn.Module):
    """The token embedding's rows, read from a DecodeLinear's store (the tied LM head's, or its own)."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # tied: the very module that is the LM head, so its store is kept once

    def forward(self, idx):
        """idx (B, T) -> (B, T, C) float32."""
        x = F.embedding(idx, self.table.weight).float()
        return x if self.table.scale is None else x * self.table.scale[idx, None]


def for_decoding(model, dtype, device="cpu"):
    """The model (in place) with its matrices stored in dtype for decoding: on the CPU each nn.Linear a
    DecodeLinear and the token embedding a DecodeEmbedding, the float32 weights let go one by one (no
    second copy of the model); on a GPU the whole model in that dtype (its tensor cores want it so).
    Not for training: on the CPU nothing is a parameter any more."""
    if dtype not in DECODE_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DECODE_DTYPES)}; got {dtype!r}")
    if not str(device).startswith("cpu"):
        if dtype == "int8":
            raise UserError("int8 weights are for decoding on the CPU; on a GPU use --dtype=bfloat16")
        return model.to(getattr(torch, dtype))
    tr = model.transformer
    with torch.no_grad():
        if tr.wte.weight is not model.lm_head.weight:  # untied: the embedding has a store of its own
            tr.wte = DecodeEmbedding(DecodeLinear(*stored(tr.wte.weight, dtype), None))
        for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            linear = getattr(owner, attr)
            setattr(owner, attr, DecodeLinear(*stored(linear.weight, dtype), linear.bias))
            del linear  # its float32 weight goes now, before the next layer's is converted
        if not isinstance(tr.wte, DecodeEmbedding):  # tied: the rows are the LM head's store
            tr.wte = DecodeEmbedding(model.lm_head)
    return model
