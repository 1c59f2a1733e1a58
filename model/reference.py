"""The GPT in plain NumPy (float64): forward, backward and one AdamW step.

One small function per step of the Transformer explainers, each forward with its backward
right below it. Everything here is what `model/gpt.py` computes; the tests hold the two
together number by number. No torch is imported here.

Shapes: B = batch, T = sequence length, C = n_embd, nh = n_head, nkv = n_kv_head, hs = head_dim,
I = intermediate_size, V = vocab_size.
Parameters are the model's state_dict as NumPy arrays (nanoGPT names; a Linear weight is
(out, in), so a linear layer is x @ W.T + b).
"""

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


# ---- embeddings ---------------------------------------------------------------------------

def embed_tokens(idx, wte):
    """Token embedding lookup: row idx[b, t] of wte (V, C). (B, T) -> (B, T, C)."""
    return wte[idx]


def embed_tokens_backward(dx, idx, vocab_size):
    """d wte: each token's row collects the gradients of every place it appears. -> (V, C)."""
    dwte = np.zeros((vocab_size, dx.shape[-1]))
    np.add.at(dwte, idx, dx)
    return dwte


def embed_positions(T, wpe):
    """Position embedding: rows 0 .. T-1 of wpe (block_size, C). -> (T, C), added to every sequence."""
    return wpe[:T]


def embed_positions_backward(dx, block_size):
    """d wpe: position t collects the gradients of position t over the batch. -> (block_size, C)."""
    dwpe = np.zeros((block_size, dx.shape[-1]))
    dwpe[:dx.shape[1]] = dx.sum(axis=0)
    return dwpe


def sinusoidal_positions(T, C):
    """The original Transformer's fixed positional encoding, no parameters. (T, C):
    PE[pos, 2i] = sin(pos / 10000^(2i/C)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/C))."""
    angle = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, C, 2) / C)  # (T, C / 2)
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(T, -1)[:, :C]


# ---- layer norm ---------------------------------------------------------------------------

def layer_norm(x, w, b, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (C). (..., C) -> (..., C)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w
    return y + b if b is not None else y


def layer_norm_backward(dy, x, w, eps=1e-5):
    """With xhat = (x - mean) / s, s = sqrt(var + eps), and g = dy * w:
    dx = (g - mean(g) - xhat * mean(g * xhat)) / s;  dw = sum(dy * xhat);  db = sum(dy)."""
    mean = x.mean(axis=-1, keepdims=True)
    s = np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mean) / s
    g = dy * w
    dx = (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)) / s
    axes = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def rms_norm(x, w, b=None, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis: LayerNorm without the mean and the bias
    (Llama, Qwen). (..., C) -> (..., C)."""
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * w


def rms_norm_backward(dy, x, w, eps=1e-6):
    """With r = sqrt(mean(x^2) + eps), xhat = x / r and g = dy * w:
    dx = (g - xhat * mean(g * xhat)) / r;  dw = sum(dy * xhat);  no bias."""
    r = np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat, g = x / r, dy * w
    dx = (g - xhat * (g * xhat).mean(axis=-1, keepdims=True)) / r
    return dx, (dy * xhat).sum(axis=tuple(range(dy.ndim - 1))), None


NORMS = {"layernorm": (layer_norm, layer_norm_backward), "rmsnorm": (rms_norm, rms_norm_backward)}


# ---- linear layers ------------------------------------------------------------------------

def linear(x, W, b):
    """y = x W^T + b. x: (..., in), W: (out, in) -> (..., out)."""
    y = x @ W.T
    return y + b if b is not None else y


def linear_backward(dy, x, W):
    """dx = dy W;  dW = dy^T x (summed over every row);  db = sum(dy)."""
    dx = dy @ W
    dW = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx, dW, dy.reshape(-1, dy.shape[-1]).sum(axis=0)


# ---- attention ----------------------------------------------------------------------------

def split_qkv(qkv, q_size):
    """The c_attn output (B, T, q_size + 2 kv_size) holds Q, K and V side by side -> Q (B, T, nh hs),
    K and V (B, T, nkv hs) each (as wide as Q unless attention is grouped)."""
    kv = (qkv.shape[-1] - q_size) // 2
    return np.split(qkv, [q_size, q_size + kv], axis=-1)


def split_heads(x, n_head):
    """(B, T, h hs) -> (B, h, T, hs): each head works on its own hs channels."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def rope_tables(T, hs, theta):
    """RoPE's (cos, sin), each (T, hs): pair (i, i + hs/2) of a head turns by pos * theta^(-2i/hs)."""
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, hs, 2) / hs)  # (T, hs / 2)
    angle = np.concatenate([angle, angle], axis=-1)
    return np.cos(angle), np.sin(angle)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the halves of the last axis: each pair turned by 90 degrees."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope(x, cos, sin):
    """Rotary position embedding of queries or keys x (B, h, T, hs): x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


def rope_backward(dy, cos, sin):
    """The turn backwards: dx = dy cos + rotate_half^T(dy sin), rotate_half^T([g1, g2]) = [g2, -g1]."""
    g1, g2 = np.split(dy * sin, 2, axis=-1)
    return dy * cos + np.concatenate([g2, -g1], axis=-1)


def repeat_kv(x, groups):
    """Grouped-query attention: (B, nkv, T, hs) -> (B, nkv * groups, T, hs), each key/value head
    repeated for the `groups` query heads that share it."""
    return np.repeat(x, groups, axis=1)


def repeat_kv_backward(dx, groups):
    """A shared head collects the gradients of every query head that read it."""
    B, nh, T, hs = dx.shape
    return dx.reshape(B, nh // groups, groups, T, hs).sum(axis=2)


def merge_heads(x):
    """(B, nh, T, hs) -> (B, T, C): the heads' outputs side by side again."""
    B, nh, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def attention_scores(q, k):
    """scores = Q K^T / sqrt(hs): how well each query matches each key. -> (B, nh, T, T)."""
    return q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])


def attention_scores_backward(dscores, q, k):
    """dQ = dscores K / sqrt(hs);  dK = dscores^T Q / sqrt(hs)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return dscores @ k * scale, dscores.swapaxes(-1, -2) @ q * scale


def causal_mask(scores):
    """Set scores[t, s] = -inf for s > t: a position never looks at the positions after it."""
    T = scores.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    return np.where(future, -np.inf, scores)


def softmax(x):
    """exp(x - max) / sum(exp(x - max)) over the last axis (subtracting the max keeps exp finite)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dp, p):
    """dx = p * (dp - sum(dp * p)) over the last axis; masked entries have p = 0 and get 0."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def attend(att, v):
    """Weighted sum of the values: y = att V. (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)."""
    return att @ v


def attend_backward(dy, att, v):
    """datt = dy V^T;  dV = att^T dy."""
    return dy @ v.swapaxes(-1, -2), att.swapaxes(-1, -2) @ dy


# ---- feed-forward -------------------------------------------------------------------------

def gelu(x, form="exact"):
    """exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2));
    tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's approximation."""
    if form == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_backward(dy, x, form="exact"):
    """exact: d/dx x Phi(x) = Phi(x) + x phi(x);
    tanh: 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    if form == "tanh":
        u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
        th = np.tanh(u)
        du = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x ** 2)
        return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * du)
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x ** 2) / math.sqrt(2.0 * math.pi)
    return dy * (cdf + x * pdf)


def relu(x):
    """The original Transformer's feed-forward activation: max(0, x)."""
    return np.maximum(x, 0.0)


def relu_backward(dy, x):
    """d/dx max(0, x) = 1 where x > 0, else 0."""
    return dy * (x > 0)


def silu(x):
    """SiLU (swish), Llama's and Qwen's activation: x sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def silu_backward(dy, x):
    """d/dx x s(x) = s(x) (1 + x (1 - s(x))), s the sigmoid."""
    s = 1.0 / (1.0 + np.exp(-x))
    return dy * s * (1.0 + x * (1.0 - s))


ACTIVATIONS = {  # config name -> (forward, backward)
    "gelu": (gelu, gelu_backward),
    "gelu_tanh": (lambda x: gelu(x, "tanh"), lambda dy, x: gelu_backward(dy, x, "tanh")),
    "relu": (relu, relu_backward),
    "silu": (silu, silu_backward),
}


def activation(x, name):
    """The feed-forward activation by its config name: 'gelu', 'gelu_tanh', 'relu' or 'silu'."""
    return ACTIVATIONS[name][0](x)


def activation_backward(dy, x, name):
    return ACTIVATIONS[name][1](dy, x)


# ---- loss ---------------------------------------------------------------------------------

def cross_entropy(logits, targets):
    """Mean of -log softmax(logits)[target] over the positions whose target is not -1."""
    keep = targets != -1
    z = logits[keep]
    logp = z - z.max(axis=-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(z)), targets[keep]].mean()


def cross_entropy_backward(logits, targets):
    """dlogits = (softmax(logits) - onehot(target)) / N at the N kept positions, 0 at ignored ones."""
    keep = targets != -1
    dlogits = softmax(logits)
    dlogits[keep, targets[keep]] -= 1.0
    dlogits[~keep] = 0.0
    return dlogits / keep.sum()


# ---- preference tuning (DPO) and RL from rewards (GRPO) -----------------------------------

def token_logps(logits, targets):
    """log softmax(logits)[target] at each place (B, T) whose target is not -1, 0 elsewhere."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(targets != -1, picked, 0.0)


def token_logps_backward(dlogp, logits, targets):
    """dlogits = dlogp * (onehot(target) - softmax(logits)) at the kept places, 0 at the others."""
    dlogits = -softmax(logits) * dlogp[..., None]
    B, T = np.nonzero(targets != -1)
    dlogits[B, T, targets[B, T]] += dlogp[B, T]
    dlogits[targets == -1] = 0.0
    return dlogits


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """The answers' log-probabilities (B,) under the policy and the reference -> the mean loss over
    the pairs. h = (chosen - ref_chosen) - (rejected - ref_rejected); sigmoid (DPO):
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); ipo: (h - 1 / (2 beta))^2."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    e = label_smoothing
    return (-(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)).mean()


def dpo_loss_backward(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """(dloss/dchosen, dloss/drejected), each (B,): through h, which rises with chosen and falls with rejected."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        dh = 2 * (h - 1 / (2 * beta)) / len(h)
    else:
        sig = 1 / (1 + np.exp(-beta * h))
        dh = (-(1 - label_smoothing) * beta * (1 - sig) + label_smoothing * beta * sig) / len(h)
    return dh, -dh


def group_advantages(rewards, group_size, eps=1e-4):
    """(r - its group's mean) / (its group's standard deviation, n - 1 in the denominator, + eps)."""
    r = rewards.reshape(-1, group_size)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.0):
    """The clipped surrogate: per token -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A) with
    ratio = exp(logps - old_logps), plus beta times the k3 KL estimate exp(ref - logps) - (ref - logps) - 1,
    averaged over the completion tokens (mask) of the batch."""
    ratio, A = np.exp(logps - old_logps), advantages[:, None]
    per_token = -np.minimum(ratio * A, np.clip(ratio, 1 - epsilon, 1 + epsilon) * A)
    if beta:
        d = ref_logps - logps
        per_token = per_token + beta * (np.exp(d) - d - 1)
    return (per_token * mask).sum() / mask.sum()


def grpo_loss_backward(logps, old_logps, ref_logps, advantages, mask, epsilon=0.2, beta=0.0):
    """dloss/dlogps (B, T): -A ratio where the unclipped term is the smaller (the clipped one is
    constant in logps), plus beta (1 - exp(ref - logps)), over the number of completion tokens."""
    ratio, A = np.exp(logps - old_logps), advantages[:, None]
    unclipped = ratio * A <= np.clip(ratio, 1 - epsilon, 1 + epsilon) * A
    inside = (ratio >= 1 - epsilon) & (ratio <= 1 + epsilon)
    dlogps = np.where(unclipped | inside, -A * ratio, 0.0)
    if beta:
        dlogps = dlogps + beta * (1 - np.exp(ref_logps - logps))
    return dlogps * mask / mask.sum()


# ---- the whole model ----------------------------------------------------------------------

def attention_forward(x, P, h, config, rope_cs, a):
    """Causal self-attention of one block on x (B, T, C), its intermediates stored in `a`:
    Q, K, V projected and split into heads, normed per head (qk_norm), turned by position (RoPE),
    K and V shared across query heads (grouped-query attention), then softmax(Q K^T / sqrt(hs)) V."""
    nh, nkv, eps = config.n_head, config.n_kv_head, config.layer_norm_eps
    a["qkv"] = linear(x, P(h + "attn.c_attn.weight"), P(h + "attn.c_attn.bias"))
    q, k, v = split_qkv(a["qkv"], nh * config.head_dim)
    a["q_lin"], a["k_lin"], a["v"] = split_heads(q, nh), split_heads(k, nkv), split_heads(v, nkv)
    norm = NORMS["rmsnorm"][0]
    a["q_normed"] = norm(a["q_lin"], P(h + "attn.q_norm.weight"), eps=eps) if config.qk_norm else a["q_lin"]
    a["k_normed"] = norm(a["k_lin"], P(h + "attn.k_norm.weight"), eps=eps) if config.qk_norm else a["k_lin"]
    a["q"], a["k"] = ((rope(a["q_normed"], *rope_cs), rope(a["k_normed"], *rope_cs)) if rope_cs else
                      (a["q_normed"], a["k_normed"]))
    groups = nh // nkv
    a["scores"] = attention_scores(a["q"], repeat_kv(a["k"], groups))
    a["masked"] = causal_mask(a["scores"])
    a["att"] = softmax(a["masked"])
    a["y_heads"] = attend(a["att"], repeat_kv(a["v"], groups))
    a["y"] = merge_heads(a["y_heads"])
    return linear(a["y"], P(h + "attn.c_proj.weight"), P(h + "attn.c_proj.bias"))


def mlp_forward(x, P, h, config, a):
    """The feed-forward layer: act(x W1) W2, or gated (SwiGLU): (act(x W_gate) * x W_up) W_down."""
    a["fc"] = linear(x, P(h + "mlp.c_fc.weight"), P(h + "mlp.c_fc.bias"))
    if config.mlp == "gated":
        a["gate"] = linear(x, P(h + "mlp.c_gate.weight"), P(h + "mlp.c_gate.bias"))
        a["act"] = activation(a["gate"], config.activation)
        a["hidden"] = a["act"] * a["fc"]
    else:
        a["act"] = a["hidden"] = activation(a["fc"], config.activation)
    return linear(a["hidden"], P(h + "mlp.c_proj.weight"), P(h + "mlp.c_proj.bias"))


def block_forward(x, P, h, config, rope_cs=None):
    """One block. Pre-norm: x + attn(N1(x)), then + mlp(N2(.)). Post-norm ("Add & Norm"):
    N1(x + attn(x)), then N2(. + mlp(.)). N is LayerNorm or RMSNorm. Returns the output and the
    intermediates."""
    eps, post, norm_fn = config.layer_norm_eps, config.norm == "post", NORMS[config.normalization][0]
    a = {"x_in": x}
    norm = lambda name, t: norm_fn(t, P(h + name + ".weight"), P(h + name + ".bias"), eps)  # noqa: E731
    a["attn_in"] = x if post else norm("ln_1", x)
    a["attn_out"] = attention_forward(a["attn_in"], P, h, config, rope_cs, a)
    a["sum_1"] = x + a["attn_out"]  # residual add
    a["x_mid"] = norm("ln_1", a["sum_1"]) if post else a["sum_1"]
    a["mlp_in"] = a["x_mid"] if post else norm("ln_2", a["x_mid"])
    a["ln_1"], a["ln_2"] = (a["x_mid"], None) if post else (a["attn_in"], a["mlp_in"])
    a["mlp_out"] = mlp_forward(a["mlp_in"], P, h, config, a)
    a["sum_2"] = a["x_mid"] + a["mlp_out"]  # residual add
    a["x_out"] = norm("ln_2", a["sum_2"]) if post else a["sum_2"]
    if post:
        a["ln_2"] = a["x_out"]
    return a["x_out"], a


def forward(params, config, idx, targets=None):
    """The GPT forward pass. idx, targets: (B, T) int arrays. Returns logits (B, T, V), the loss
    (None without targets) and `acts`, every intermediate by name, for backward() and for
    anyone who wants to look inside. `config` is a GPTConfig; bias-free parameters are simply
    absent from `params`, and so is a tied LM head (it is transformer.wte.weight)."""
    B, T = idx.shape
    P = lambda name: params.get(name)  # noqa: E731  (a missing bias is None)
    acts = {"idx": idx}
    acts["tok_emb"] = embed_tokens(idx, P("transformer.wte.weight"))
    if config.positions == "sinusoidal":
        acts["pos_emb"] = sinusoidal_positions(T, config.n_embd)
    elif config.positions == "learned":
        acts["pos_emb"] = embed_positions(T, P("transformer.wpe.weight"))
    else:  # RoPE: nothing added here; each attention layer turns its queries and keys
        acts["pos_emb"], acts["rope"] = np.zeros((T, config.n_embd)), rope_tables(T, config.head_dim, config.rope_theta)
    acts["x0"] = x = acts["tok_emb"] + acts["pos_emb"]
    for i in range(config.n_layer):
        x, acts[f"layer{i}"] = block_forward(x, P, f"transformer.h.{i}.", config, acts.get("rope"))
    if config.norm == "pre":
        norm = NORMS[config.normalization][0]
        x = acts["ln_f"] = norm(x, P("transformer.ln_f.weight"), P("transformer.ln_f.bias"), config.layer_norm_eps)
    acts["final"] = x
    acts["logits"] = logits = x @ head_weight(params).T  # the LM head
    loss = cross_entropy(logits, targets) if targets is not None else None
    return logits, loss, acts


def head_weight(params):
    """The LM head: its own matrix when untied, else the token embedding's."""
    return params.get("lm_head.weight", params["transformer.wte.weight"])


def attention_backward(dout, a, P, h, config, rope_cs, put):
    """Gradients through one block's attention (attention_forward's steps in reverse); returns
    d(attention input)."""
    nh, nkv, eps = config.n_head, config.n_kv_head, config.layer_norm_eps
    groups = nh // nkv
    dy, dW, db = linear_backward(dout, a["y"], P(h + "attn.c_proj.weight"))
    put(h + "attn.c_proj.weight", dW)
    put(h + "attn.c_proj.bias", db)
    datt, dv = attend_backward(split_heads(dy, nh), a["att"], repeat_kv(a["v"], groups))
    dscores = softmax_backward(datt, a["att"])  # the mask's -inf entries pass no gradient
    dq, dk = attention_scores_backward(dscores, a["q"], repeat_kv(a["k"], groups))
    dk, dv = repeat_kv_backward(dk, groups), repeat_kv_backward(dv, groups)
    if rope_cs:
        dq, dk = rope_backward(dq, *rope_cs), rope_backward(dk, *rope_cs)
    if config.qk_norm:
        dq, dwq, _ = rms_norm_backward(dq, a["q_lin"], P(h + "attn.q_norm.weight"), eps)
        dk, dwk, _ = rms_norm_backward(dk, a["k_lin"], P(h + "attn.k_norm.weight"), eps)
        put(h + "attn.q_norm.weight", dwq)
        put(h + "attn.k_norm.weight", dwk)
    dqkv = np.concatenate([merge_heads(t) for t in (dq, dk, dv)], axis=-1)
    dx, dW, db = linear_backward(dqkv, a["attn_in"], P(h + "attn.c_attn.weight"))
    put(h + "attn.c_attn.weight", dW)
    put(h + "attn.c_attn.bias", db)
    return dx


def mlp_backward(dout, a, P, h, config, put):
    """Gradients through the feed-forward layer; returns d(its input)."""
    dhidden, dW, db = linear_backward(dout, a["hidden"], P(h + "mlp.c_proj.weight"))
    put(h + "mlp.c_proj.weight", dW)
    put(h + "mlp.c_proj.bias", db)
    dx = 0.0
    if config.mlp == "gated":
        dgate = activation_backward(dhidden * a["fc"], a["gate"], config.activation)
        dx, dW, db = linear_backward(dgate, a["mlp_in"], P(h + "mlp.c_gate.weight"))
        put(h + "mlp.c_gate.weight", dW)
        put(h + "mlp.c_gate.bias", db)
        dfc = dhidden * a["act"]
    else:
        dfc = activation_backward(dhidden, a["fc"], config.activation)
    dmlp_in, dW, db = linear_backward(dfc, a["mlp_in"], P(h + "mlp.c_fc.weight"))
    put(h + "mlp.c_fc.weight", dW)
    put(h + "mlp.c_fc.bias", db)
    return dx + dmlp_in


def block_backward(dx, a, P, h, config, rope_cs, put):
    """Gradients through one block (block_forward's steps in reverse); returns d(block input)."""
    eps, post, norm_bwd = config.layer_norm_eps, config.norm == "post", NORMS[config.normalization][1]

    def norm_backward(name, dy, x):
        d, dw, db = norm_bwd(dy, x, P(h + name + ".weight"), eps)
        put(h + name + ".weight", dw)
        put(h + name + ".bias", db)
        return d

    dsum2 = norm_backward("ln_2", dx, a["sum_2"]) if post else dx
    dmlp_in = mlp_backward(dsum2, a, P, h, config, put)
    dx_mid = dsum2 + (dmlp_in if post else norm_backward("ln_2", dmlp_in, a["x_mid"]))  # the residual passes dsum2
    dsum1 = norm_backward("ln_1", dx_mid, a["sum_1"]) if post else dx_mid
    dattn_in = attention_backward(dsum1, a, P, h, config, rope_cs, put)
    return dsum1 + (dattn_in if post else norm_backward("ln_1", dattn_in, a["x_in"]))


def backward(params, config, acts, targets):
    """Gradients of the mean cross-entropy with respect to every parameter, by name (a tied LM
    head's gradient is added into transformer.wte.weight, as autograd does)."""
    P = lambda name: params.get(name)  # noqa: E731
    grads = {}

    def put(name, g):
        if name in params and g is not None:
            grads[name] = grads.get(name, 0.0) + g

    dlogits = cross_entropy_backward(acts["logits"], targets)
    head = "lm_head.weight" if "lm_head.weight" in params else "transformer.wte.weight"
    W = head_weight(params)
    put(head, dlogits.reshape(-1, W.shape[0]).T @ acts["final"].reshape(-1, W.shape[1]))
    dx = dlogits @ W
    if config.norm == "pre":
        x_last = acts[f"layer{config.n_layer - 1}"]["x_out"] if config.n_layer else acts["x0"]
        dx, dw, db = NORMS[config.normalization][1](dx, x_last, P("transformer.ln_f.weight"), config.layer_norm_eps)
        put("transformer.ln_f.weight", dw)
        put("transformer.ln_f.bias", db)
    for i in reversed(range(config.n_layer)):
        dx = block_backward(dx, acts[f"layer{i}"], P, f"transformer.h.{i}.", config, acts.get("rope"), put)
    put("transformer.wte.weight", embed_tokens_backward(dx, acts["idx"], P("transformer.wte.weight").shape[0]))
    if "transformer.wpe.weight" in params:
        put("transformer.wpe.weight", embed_positions_backward(dx, P("transformer.wpe.weight").shape[0]))
    return grads


# ---- one optimizer step -------------------------------------------------------------------

def clip_grad_norm(grads, max_norm):
    """Scale every gradient by min(1, max_norm / (||g|| + 1e-6)), ||g|| over all of them at once.
    Returns the norm before clipping (as torch.nn.utils.clip_grad_norm_ does)."""
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    for name in grads:
        grads[name] = grads[name] * scale
    return total


def adamw_step(params, grads, state, lr, weight_decay, beta1, beta2, eps=1e-8):
    """One AdamW step, in place on `params`. Decay is decoupled (p -= lr * wd * p) and applies
    only to tensors with 2+ dims, as the project's optimizer groups them:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    `state` holds step count t and m, v per parameter; start it as {}."""
    t = state["step"] = state.get("step", 0) + 1
    for name, g in grads.items():
        p = params[name]
        m = state.setdefault("m", {}).setdefault(name, np.zeros_like(p))
        v = state.setdefault("v", {}).setdefault(name, np.zeros_like(p))
        if p.ndim >= 2:
            p *= 1.0 - lr * weight_decay
        m[:] = beta1 * m + (1.0 - beta1) * g
        v[:] = beta2 * v + (1.0 - beta2) * g * g
        m_hat = m / (1.0 - beta1 ** t)
        v_hat = v / (1.0 - beta2 ** t)
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)


def params_from_state_dict(state_dict):
    """The model's state_dict (torch tensors) as float64 NumPy arrays. A tied lm_head.weight (the
    same tensor as transformer.wte.weight) is left out: the reference reads the LM head from
    transformer.wte.weight then, so there is one copy to train."""
    wte = state_dict["transformer.wte.weight"]
    tied = "lm_head.weight" in state_dict and state_dict["lm_head.weight"].data_ptr() == wte.data_ptr()
    return {k: v.detach().cpu().double().numpy().copy() for k, v in state_dict.items()
            if not (tied and k == "lm_head.weight")}
