"""The GPT: a decoder-only Transformer in nanoGPT's layout.

Read top to bottom: config, positions, norms, attention, MLP, block, then the GPT that stacks them.
Shapes: B = batch, T = sequence length, C = n_embd, nh = n_head, nkv = n_kv_head, hs = head_dim
(C // nh unless set), I = intermediate_size (4C unless set).

The defaults are GPT-2's choices. Four options give the original Transformer's instead, one at
a time, as the step-by-step explainers draw it: sinusoidal positions, post-LN ("Add & Norm"),
a ReLU feed-forward; and minGPT's untied LM head. Six more give what Llama and Qwen changed:
rotary positions (RoPE), RMSNorm, the gated SiLU feed-forward (SwiGLU), grouped-query attention,
an explicit head size, RMSNorm on each head's queries and keys (Qwen3) and biases on Q/K/V only
(Qwen2). Each is one small module picked when the model is built; the forward pass tests none
of them. The KV caches a generation feeds it live with the decoding engine (model/engine.py).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from model.errors import UserError

CHOICES = {
    # GELU x Phi(x) with erf; GPT-2's tanh form of it; max(0, x); SiLU x sigmoid(x) (Llama, Qwen)
    "activation": ("gelu", "gelu_tanh", "relu", "silu"),
    # an embedding learned per position (GPT-2); the fixed sin/cos code; Q and K rotated by position (RoPE)
    "positions": ("learned", "sinusoidal", "rope"),
    "norm": ("pre", "post"),  # x + f(N(x)) (GPT-2); N(x + f(x)), the original "Add & Norm"
    "normalization": ("layernorm", "rmsnorm"),  # N: (x - mean) / std * g + b (GPT-2); x / rms(x) * g (Llama)
    "mlp": ("standard", "gated"),  # act(x W1) W2 (GPT-2); (act(x W_gate) * x W_up) W_down (SwiGLU with silu)
    "head": ("tied", "untied"),  # the LM head reads with the token embedding matrix (GPT-2), or its own (minGPT)
    "attention": ("sdpa", "explicit"),  # the fused kernel, or the maths written out (how, not what)
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (number of position embeddings)
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    activation: str = "gelu"
    positions: str = "learned"
    norm: str = "pre"
    head: str = "tied"
    layer_norm_eps: float = 1e-5  # the norm's eps, sqrt(var + eps) or sqrt(mean(x^2) + eps): folders say theirs
    attention: str = "sdpa"
    normalization: str = "layernorm"
    mlp: str = "standard"
    rope_theta: float = 10000.0  # RoPE: pair i of a head turns by position * rope_theta^(-2i / hs)
    n_kv_head: int = 0  # key/value heads, each shared by n_head // n_kv_head query heads (0: n_head, no sharing)
    head_dim: int = 0  # hs, channels per head (0: n_embd // n_head; Qwen3 sets its own)
    intermediate_size: int = 0  # the feed-forward's width I (0: 4 * n_embd)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the Q, K, V projections even when bias=False (Qwen2)
    gradient_checkpointing: bool = False  # training: keep only each block's input, recompute the rest backwards

    def __post_init__(self):
        """The one place model fields are checked: a value no model can have is a UserError."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        self.check_heads()
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.positions == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE turns pairs of channels: head_dim must be even, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise UserError(f"rope_theta must be greater than 0, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.layer_norm_eps < 1:
            raise UserError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def check_heads(self):
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a positive integer (or 0 for its default), got {value!r}")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise UserError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}: each key/value head "
                            f"serves the same number of query heads")
        if self.head_dim:
            return
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head gets "
                f"n_embd // n_head channels; pick n_embd a multiple of n_head "
                f"(e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}), or set head_dim")


NANOGPT_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # nanoGPT's GPTConfig
RUN_FIELDS = ("dropout", "attention", "gradient_checkpointing")  # how a run computes, not what the weights are


def causal_mask(T, S, device=None):
    """(T, S) bool, True where a query may look: the T queries are the last T of the S positions,
    so query t (at position S - T + t) sees keys 0 .. S - T + t and never one after it."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class SinusoidalPositions(nn.Module):
    """The original Transformer's positional encoding: fixed, no parameters (nothing in the
    state_dict). PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / 10000^(2i/C))."""

    def __init__(self, n_embd):
        super().__init__()
        self.n_embd = n_embd
        # empty and not saved: it follows the model's dtype and device, so the code is computed in them
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def forward(self, pos):
        """pos: (T,) or (B, T) positions -> (T, C) or (B, T, C)."""
        i2 = torch.arange(0, self.n_embd, 2, dtype=self.anchor.dtype, device=pos.device)  # 2i
        angle = pos.to(self.anchor.dtype)[..., None] / 10000 ** (i2 / self.n_embd)  # (..., T, C / 2)
        return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)[..., :self.n_embd]


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE, as Llama and Qwen, in Hugging Face's half-split layout):
    no parameters. Channel i < hs/2 of a head pairs with channel i + hs/2, and the pair turns by
    the angle position * theta^(-2i / hs); Q K^T then depends on how far apart two tokens are."""

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the model's dtype and device

    def forward(self, pos):
        """pos (T,) -> (cos, sin), each (T, hs), for rotate(); pos (B, T) (rows at their own
        positions) -> each (B, 1, T, hs), the same for every head."""
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=pos.device)
                                        / self.head_dim)
        angle = pos.double()[..., None] * inv_freq  # (..., T, hs / 2), in float64 so float32 models match HF's tables
        angle = torch.cat([angle, angle], dim=-1)
        if pos.dim() == 2:
            angle = angle.unsqueeze(1)
        return angle.cos().to(self.anchor.dtype), angle.sin().to(self.anchor.dtype)


def rotate(x, rope):
    """x (B, h, T, hs) turned by the angles of rope = (cos, sin): x cos + rotate_half(x) sin, where
    rotate_half(x) = [-x2, x1] for the halves x1, x2 of each head."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def norm_layer(config, dim=None):
    """The model's normalisation over `dim` channels (default C): LayerNorm or RMSNorm."""
    dim = dim or config.n_embd
    if config.normalization == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.attend = self.explicit_attention if config.attention == "explicit" else self.sdpa_attention  # how, not what
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, q + 2 * kv, bias=config.bias or config.qkv_bias)  # Q, K, V at once
        self.c_proj = nn.Linear(q, config.n_embd, bias=config.bias)  # heads joined -> C
        qk_norm = lambda: nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps) if config.qk_norm else nn.Identity()  # noqa: E731
        self.q_norm, self.k_norm = qk_norm(), qk_norm()  # Qwen3: each head's queries and keys RMS-normed
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, layer=0, rope=None, mask=None):
        """x: (B, T, C) -> (B, T, C). With a kv_cache, x holds only the new tokens; rope: their
        (cos, sin) when positions are rotary; mask (B, 1, T, S): which keys each query sees, when
        rows are at different positions (None: the usual causal mask)."""
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        # split the channels into heads: (B, T, h * hs) -> (B, h, T, hs)
        q = self.q_norm(q.view(B, T, nh, hs).transpose(1, 2))
        k = self.k_norm(k.view(B, T, nkv, hs).transpose(1, 2))
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, nkv, past + T, hs)
        y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # join the heads again
        return self.resid_dropout(self.c_proj(y))

    def explicit_attention(self, q, k, v, mask=None):
        """softmax(Q K^T / sqrt(hs) + causal mask) V, written out. q: (B, nh, T, hs), k, v: (B, nkv, past + T, hs)."""
        nh, nkv = q.size(1), k.size(1)
        if nkv < nh:  # grouped-query attention: each key/value head serves nh // nkv query heads
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        T, S = q.size(2), k.size(2)
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
        mask = causal_mask(T, S, q.device) if mask is None else mask
        scores = scores.masked_fill(~mask, float("-inf"))
        att = F.softmax(scores, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs)

    def sdpa_attention(self, q, k, v, mask=None):
        """The same maths through PyTorch's fused kernel (flash attention where available), the shared
        key/value heads read in place (enable_gqa) rather than repeated."""
        dropout = self.dropout if self.training else 0.0
        T, S = q.size(2), k.size(2)
        sdpa = partial(F.scaled_dot_product_attention, dropout_p=dropout, enable_gqa=k.size(1) < q.size(1))
        if mask is not None:
            return sdpa(q, k, v, attn_mask=mask)
        if T == S:  # no cache: the kernel's own causal mask
            return sdpa(q, k, v, is_causal=True)
        if T == 1:  # one new token sees every cached key: no mask needed
            return sdpa(q, k, v)
        return sdpa(q, k, v, attn_mask=causal_mask(T, S, q.device))


ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
               "silu": nn.SiLU}


class MLP(nn.Module):
    """The feed-forward layer: C -> I (4C unless set), the activation, I -> C."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GatedMLP(nn.Module):
    """The gated feed-forward of Llama and Qwen (SwiGLU with silu): act(x W_gate) * (x W_up), then
    I -> C. The gate decides, channel by channel, how much of the up-projection passes."""

    def __init__(self, config):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)  # the up-projection
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_gate(x)) * self.c_fc(x)))


class Block(nn.Module):
    """A Transformer block. Pre-norm (GPT-2, Llama): x + attn(N(x)), then x + mlp(N(x)). Post-norm
    (the original Transformer's "Add & Norm"): N(x + attn(x)), then N(x + mlp(x))."""

    def __init__(self, config):
        super().__init__()
        self.post = config.norm == "post"
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = GatedMLP(config) if config.mlp == "gated" else MLP(config)

    def forward(self, x, kv_cache=None, layer=0, rope=None, mask=None):
        if self.post:
            x = self.ln_1(x + self.attn(x, kv_cache, layer, rope, mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))  # token embedding
        if config.positions == "learned":  # added to the token embeddings; RoPE turns Q and K instead
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.positions == "sinusoidal":
            self.transformer.wpe = SinusoidalPositions(config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.rotary = Rotary(config.head_dim, config.rope_theta) if config.positions == "rope" else None
        # post-norm blocks end normalised already: no final norm
        self.transformer.ln_f = norm_layer(config) if config.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.head == "tied":  # the LM head reads the vocabulary with the token embedding matrix
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down so the residual stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters counted once (a tied LM head is the token embedding). With
        non_embedding=True the learned position embedding is left out, as nanoGPT reports."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n

    def forward(self, idx, targets=None, kv_cache=None, last=None):
        """idx: (B, T) token ids -> logits (B, T, vocab_size) and the mean cross-entropy over
        targets (B, T) that are not -1 (None without targets). last (B,): each row's last position;
        only its logits are computed, (B, 1, vocab_size) (reading a prompt needs no others). With a
        kv_cache (model/engine.py), idx holds only the tokens after the cached ones and they take the
        positions after them (a ragged cache: each row's own, so pos is (B, T) and each row's position
        embedding its own (B, T, C)). Training with gradient checkpointing, the logits are None: the
        loss is computed 256 tokens at a time, so the (B, T, vocab_size) logits never exist whole."""
        self._check_input(idx, kv_cache)
        B, T = idx.size()
        if kv_cache is None:
            pos, mask = torch.arange(T, dtype=torch.long, device=idx.device), None
        else:
            pos, mask = kv_cache.start(T, idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.rotary is None:  # positions are added to the token embeddings
            x, rope = x + self.transformer.wpe(pos), None  # (T, C), broadcast over the batch
        else:  # RoPE: Q and K are turned by position in every layer instead; the angles computed once
            rope = self.rotary(pos)
        x = self.transformer.drop(x)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # the same gradients for less memory: this block's activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, kv_cache, layer, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer, rope, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if recompute and targets is not None:
            return None, self.chunked_loss(x, targets)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def chunked_loss(self, x, targets, chunk=256):
        """The same mean cross-entropy, `chunk` tokens at a time, each chunk's logits recomputed in
        backward: with a large vocabulary (Qwen's 151,936) the logits are the biggest activation."""
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        total = sum(torch.utils.checkpoint.checkpoint(self.loss_sum, x[i:i + chunk], targets[i:i + chunk],
                                                      use_reentrant=False) for i in range(0, len(x), chunk))
        return total / (targets != -1).sum()

    def loss_sum(self, x, targets):
        return F.cross_entropy(self.lm_head(x), targets, ignore_index=-1, reduction="sum")

    def _check_input(self, idx, kv_cache):
        if torch.compiler.is_compiling():
            return
        past = kv_cache.length if kv_cache is not None else 0
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        T = idx.size(1)
        if past + T > self.config.block_size:
            raise ValueError(
                f"input of length {past + T} is longer than block_size={self.config.block_size}; "
                f"crop it to its last {self.config.block_size} tokens")
        # the range check reads the ids on the host: free on the CPU, a sync per step on a GPU, where
        # ids are checked where they enter instead (tokenizers, prepared data, prompts)
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            bad = sorted({int(i) for i in idx.flatten().tolist() if not 0 <= i < self.config.vocab_size})
            raise ValueError(
                f"token ids {bad[:10]} are outside the vocabulary [0, {self.config.vocab_size})")

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices and embeddings (2+ dims) only, never on biases
        or LayerNorm gains. The fused kernel (one pass over all parameters) on CUDA and CPU."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
