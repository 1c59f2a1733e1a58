"""The weights a model reads when it decodes on the CPU: float32, bfloat16 or int8.

Writing one token reads every weight matrix once and does one multiply-add with each weight, so
on a CPU decoding runs as fast as memory can be read: half the bytes (bfloat16) or a quarter
(int8) make it nearly that much faster. for_decoding(model, dtype) replaces each nn.Linear by a
DecodeLinear holding its matrix W (out, in) in that type, and the token embedding by a
DecodeEmbedding that reads its rows from the same store (a tied LM head's matrix is one store).
int8 keeps round(W / s) with one scale per output row, s = max |W_row| / 127 (weight-only, as
llama.cpp's q8_0, whose blocks are 32 weights instead of a row). Activations, norms, biases and
the KV cache stay float32.

A few rows (decoding up to 8 sequences) go through a kernel torch.compile's Inductor writes for
each matrix's shape from matvec() below: y = (x * W).sum(-1) * s, the matrix read in its own type
over every core. Compiled for fixed shapes it read GPT-2's matrices 2-4x faster than torch's
matrix-vector product on this project's machine (float32, one row: 0.85 against 3.2 ms through
18 matrices of a 6 x 384 model). More rows (a prompt) take torch's matrix products: float32 ones for
float32 weights, else bfloat16 ones (twice as fast for a prompt where the CPU has bfloat16
instructions; int8 weights up to 16 rows through torch's int8 kernel).
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
FEW_ROWS = 8  # up to this many rows (sequences decoded together) go through the kernels, padded to 1, 2, 4 or 8
kernels = {}  # (M, N, K, weight dtype, scaled) -> the kernel Inductor wrote for those shapes
use_compiled = [True]  # False once compiling failed here (no C++ compiler): torch's own ops instead


def kernel(args):
    """The kernel Inductor writes for matvec(*args) at these shapes and types (compiled once each)."""
    x, w, *scale = args
    key = (x.size(0), *w.shape, w.dtype, bool(scale))
    if key not in kernels:
        from torch.fx.experimental.proxy_tensor import make_fx
        # traced on fake tensors: real ones would make the (M, N, K) product whole, a copy of W in float32
        graph = make_fx(lambda *a: (matvec(a[0], a[1], a[2] if len(a) > 2 else None),), tracing_mode="fake")(*args)
        kernels[key] = torch._inductor.compile(graph, list(args))
    return kernels[key]


def few_rows(x, w, scale):
    """matvec for a few rows x (M, K), M <= FEW_ROWS: through a compiled kernel where the matrix is worth
    one (the rows padded with zeros to a power of two, so a server's batches need four kernels a shape)."""
    M = x.size(0)
    if use_compiled[0] and w.numel() >= COMPILED_FROM:
        padded = torch.cat([x, x.new_zeros((1 << (M - 1).bit_length()) - M, x.size(1))]) if M & (M - 1) else x
        args = (padded.contiguous(), w) if scale is None else (padded.contiguous(), w, scale)
        try:
            return kernel(args)(*args)[0][:M]
        except Exception as e:  # torch.compile needs a C++ compiler on the CPU; everything else still works
            use_compiled[0] = False
            print(f"notice: torch.compile cannot build the decoding kernel here ({type(e).__name__}: {e}); decoding "
                  f"with torch's own matrix products, more slowly", file=sys.stderr)
    y = F.linear(x, w.float())
    return y if scale is None else y * scale


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
        if flat.size(0) <= FEW_ROWS:  # decoding a few sequences
            y = few_rows(flat, self.weight, self.scale)
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
