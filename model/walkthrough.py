"""One forward pass, step by step, with a trained model's real numbers:

    python -m model.walkthrough --out_dir=out/sort --start=CBABBC

It follows the Transformer explainers: token and position embeddings, their sum, then per block
LayerNorm, Q, K and V of each head, Q K^T, the scaling, the causal mask, the softmax, the
weighted values, the heads joined and projected, the residual adds, the feed-forward layer, and
at the end the logits and the next token's probabilities at a few temperatures.

Every matrix is computed by the NumPy reference (model/reference.py) and checked against the
torch model's own value for the same input, both in float64; a difference above TOLERANCE stops
the walk with an error. The torch values come from forward hooks on the model's modules; the
attention internals (Q K^T, mask, softmax, weighted values) are not module outputs, so they are
recomputed in torch from the model's own Q, K, V, and their joined result is checked against
what the model itself fed its output projection.
"""

import html
import json
import math
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import reference as ref
from model.checkpoint import open_model
from model.config import WalkthroughConfig, load_config, run_command
from model.errors import UserError
from model.gpt import causal_mask, rotate
from model.tasks import ChatTask
from model.tokenizer import UnknownCharacters, visible

TOLERANCE = 1e-9  # |reference - torch| <= TOLERANCE * (1 + |torch|), both float64
TEMPERATURES = (0.5, 1.0, 2.0)


class WalkthroughMismatch(RuntimeError):
    """The NumPy reference and the torch model disagree: the walk would not show the model's numbers."""


@dataclass
class Step:
    """One matrix of the walk: values (rows x cols) with labels, the formula that made it, and
    `key`, the name of the torch value it is checked against."""
    title: str
    formula: str
    shape: str  # in symbols, e.g. 'T x C'
    values: np.ndarray
    rows: list
    cols: list
    key: str
    source_cols: list = None  # the checked value's columns in the order shown (None: as they are)


# ---- the walk, computed by the NumPy reference --------------------------------------------

def token_labels(tokens):
    """Row labels: each token with its position, so repeated letters stay apart ('C0', 'B1', ...)."""
    return [f"{visible(t)}{i}" for i, t in enumerate(tokens)]


def temperatures(temperature):
    """The temperatures the last step shows: 0.5, 1, 2 and the one asked for."""
    return sorted(set(TEMPERATURES) | {temperature})


ACTIVATION_STEPS = {  # config name -> (the step's name, its formula)
    "gelu": ("GELU", "GELU(h) = h * Phi(h)  (Phi: the normal distribution's CDF)"),
    "gelu_tanh": ("GELU", "GELU(h) = 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))"),
    "relu": ("ReLU", "ReLU(h) = max(0, h)"),
    "silu": ("SiLU", "SiLU(h) = h * sigmoid(h)"),
}


def walk(params, config, ids, tokens, vocab, layers, heads, temperature):
    """The list of Steps for the input ids (T,) with their text tokens, in the explainers' order
    for the model's architecture. `vocab` labels the logit columns; `layers` and `heads` pick
    what to show (everything is computed)."""
    _, _, acts = ref.forward(params, config, np.array([ids]))
    rows, chan = token_labels(tokens), [f"c{j}" for j in range(config.n_embd)]
    steps = embedding_steps(acts, config, rows, chan)
    for i in layers:
        steps += block_steps(acts[f"layer{i}"], i, config, heads, rows, chan)
    return steps + output_steps(acts, config, [visible(t) for t in vocab], rows, chan, temperature)


def embedding_steps(acts, config, rows, chan):
    tok = Step("token embedding", "X_tok[t] = W_te[id_t]  (row id_t of the V x C embedding matrix)",
               "T x C", acts["tok_emb"][0], rows, chan, "tok_emb")
    if config.positions == "rope":  # nothing is added: each attention layer turns Q and K by position
        return [Step("token embedding: the input to block 0", tok.formula + "; no position is added (RoPE turns Q "
                     "and K in each attention layer)", "T x C", acts["x0"][0], rows, chan, "x0")]
    if config.positions == "sinusoidal":
        pos = Step("positional encoding", "PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / "
                   "10000^(2i/C))  (fixed, nothing learned)", "T x C", acts["pos_emb"], rows, chan, "pos_emb")
    else:
        pos = Step("position embedding", "X_pos[t] = W_pe[t]  (row t of the block_size x C matrix)",
                   "T x C", acts["pos_emb"], rows, chan, "pos_emb")
    return [tok, pos, Step("embeddings summed: the input to block 0", "x = X_tok + X_pos", "T x C", acts["x0"][0], rows,
                           chan, "x0")]


def head_steps(a, i, h, config, rows, source):
    """Q, K, V of one head (its shared key/value head under grouped-query attention), their norms
    and turns where the model has them, then the scores, scaling, mask, softmax and weighted values."""
    hs, groups = config.head_dim, config.n_head // config.n_kv_head
    kv = h // groups
    p, key, hd = f"block {i}, head {h}", f"layer{i}.head{h}", [f"c{j}" for j in range(hs)]
    shared = f" (key/value head {kv}, shared by query heads {kv * groups}..{kv * groups + groups - 1})" if groups > 1 else ""
    qspan, kspan = f"channels {h * hs}..{h * hs + hs - 1} of", f"channels {kv * hs}..{kv * hs + hs - 1} of"
    steps = [Step(f"{p}: queries", f"Q = {qspan} {source} W_q^T + b_q", "T x hs", a["q_lin"][0, h], rows, hd, f"{key}.q_lin"),
             Step(f"{p}: keys{shared}", f"K = {kspan} {source} W_k^T + b_k", "T x hs", a["k_lin"][0, kv], rows, hd,
                  f"{key}.k_lin"),
             Step(f"{p}: values{shared}", f"V = {kspan} {source} W_v^T + b_v", "T x hs", a["v"][0, kv], rows, hd,
                  f"{key}.v")]
    if config.qk_norm:
        steps += [Step(f"{p}: queries normed", "RMSNorm(Q) = Q / sqrt(mean(Q^2) + eps) * g_q, each row", "T x hs",
                       a["q_normed"][0, h], rows, hd, f"{key}.q_normed"),
                  Step(f"{p}: keys normed", "RMSNorm(K) = K / sqrt(mean(K^2) + eps) * g_k, each row", "T x hs",
                       a["k_normed"][0, kv], rows, hd, f"{key}.k_normed")]
    if config.positions == "rope":
        turn = (f"channels j and j + {hs // 2} of row t turned by the angle t * {config.rope_theta:g}^(-2j/{hs}): "
                f"x cos + rotate_half(x) sin")
        steps += [Step(f"{p}: queries turned by position (RoPE)", turn, "T x hs", a["q"][0, h], rows, hd, f"{key}.q"),
                  Step(f"{p}: keys turned by position (RoPE)", turn, "T x hs", a["k"][0, kv], rows, hd, f"{key}.k")]
    q, k = a["q"][0, h], a["k"][0, kv]
    return steps + [
        Step(f"{p}: scores", "Q K^T  (row: the query's token, column: the key's)", "T x T", q @ k.T, rows, rows,
             f"{key}.qk"),
        Step(f"{p}: scaled scores", f"Q K^T / sqrt(hs) = Q K^T / {math.sqrt(hs):.4g}", "T x T", a["scores"][0, h],
             rows, rows, f"{key}.scores"),
        Step(f"{p}: causal mask", "-inf where the key comes after the query: no looking ahead", "T x T",
             a["masked"][0, h], rows, rows, f"{key}.masked"),
        Step(f"{p}: attention weights", "softmax of each row (each row sums to 1)", "T x T", a["att"][0, h], rows,
             rows, f"{key}.att"),
        Step(f"{p}: weighted values", "attention weights x V", "T x hs", a["y_heads"][0, h], rows, hd, f"{key}.y"),
    ]


NORM_FORMULAS = {"layernorm": "LN(x) = (x - mean(x)) / sqrt(var(x) + {eps}) * gamma + beta, each row",
                 "rmsnorm": "RMSNorm(x) = x / sqrt(mean(x^2) + {eps}) * gamma, each row"}


def block_steps(a, i, config, heads, rows, chan):
    """One block's steps. Pre-norm: norm, attention, add, norm, feed-forward, add. Post-norm (the
    explainers' order): attention, add & norm, feed-forward, add & norm."""
    post, b, key = config.norm == "post", f"block {i}", f"layer{i}"
    n = "RMSNorm" if config.normalization == "rmsnorm" else "LayerNorm"
    titles = ([f"{b}: add & norm: {n} 1", f"{b}: add & norm: {n} 2: the block's output", f"{b}: add (residual)"] if post
              else [f"{b}: {n} 1", f"{b}: {n} 2", f"{b}: add (residual): the block's output"])
    norm_1 = Step(titles[0], NORM_FORMULAS[config.normalization].format(eps=f"{config.layer_norm_eps:g}"), "T x C",
                  a["ln_1"][0], rows, chan, f"{key}.ln_1")
    norm_2 = Step(titles[1], f"{n}(x), as {n} 1 with its own gamma", "T x C", a["ln_2"][0], rows, chan, f"{key}.ln_2")
    add_1 = Step(f"{b}: add (residual)", "x + attention output", "T x C", a["sum_1"][0], rows, chan, f"{key}.sum_1")
    add_2 = Step(titles[2], "x + feed-forward output", "T x C", a["sum_2"][0], rows, chan, f"{key}.sum_2")
    source = "x" if post else f"{n}(x)".replace("LayerNorm", "LN")
    steps = [] if post else [norm_1]
    for h in heads:
        steps += head_steps(a, i, h, config, rows, source)
    joined = [f"c{j}" for j in range(config.n_head * config.head_dim)]
    wide_heads = "T x C" if len(joined) == config.n_embd else "T x nh hs"
    steps += [Step(f"{b}: heads joined", f"[head 0 | ... | head {config.n_head - 1}], side by side", wide_heads,
                   a["y"][0], rows, joined, f"{key}.y"),
              Step(f"{b}: attention output", "joined heads W_o^T + b_o  (c_proj)", "T x C", a["attn_out"][0], rows,
                   chan, f"{key}.attn_out")]
    steps += [add_1, norm_1] if post else [add_1, norm_2]
    steps += mlp_steps(a, b, key, config, rows, chan, source)
    return steps + ([add_2, norm_2] if post else [add_2])


def mlp_steps(a, b, key, config, rows, chan, source):
    """The feed-forward layer: act(x W_1) W_2, or gated (SwiGLU): (act(x W_gate) * x W_up) W_down."""
    act, act_formula = ACTIVATION_STEPS[config.activation]
    inner = "4C" if config.intermediate_size == 4 * config.n_embd else "I"
    wide, width = [f"c{j}" for j in range(config.intermediate_size)], f"T x {inner}"
    if config.mlp == "gated":
        return [Step(f"{b}: feed-forward, gate", f"g = {source} W_gate^T  (C -> I)", width, a["gate"][0], rows, wide,
                     f"{key}.gate"),
                Step(f"{b}: {act} of the gate", act_formula.replace("h", "g"), width, a["act"][0], rows, wide,
                     f"{key}.act"),
                Step(f"{b}: feed-forward, up", f"u = {source} W_up^T  (C -> I)", width, a["fc"][0], rows, wide,
                     f"{key}.fc"),
                Step(f"{b}: gated", f"{act}(g) * u, channel by channel", width, a["hidden"][0], rows, wide,
                     f"{key}.hidden"),
                Step(f"{b}: feed-forward, down", "gated W_down^T  (I -> C)", "T x C", a["mlp_out"][0], rows, chan,
                     f"{key}.mlp_out")]
    return [Step(f"{b}: feed-forward, first layer", f"h = {source} W_1^T + b_1  (C -> {inner})", width, a["fc"][0],
                 rows, wide, f"{key}.fc"),
            Step(f"{b}: {act}", act_formula, width, a["act"][0], rows, wide, f"{key}.act"),
            Step(f"{b}: feed-forward, second layer", f"{act}(h) W_2^T + b_2  ({inner} -> C)", "T x C",
                 a["mlp_out"][0], rows, chan, f"{key}.mlp_out")]


def output_steps(acts, config, vocab_labels, rows, chan, temperature):
    """The final LayerNorm (pre-LN models), the logits, and the next token's probabilities."""
    logits, steps = acts["logits"][0], []
    x = "x"
    if config.norm == "pre":
        name, x = ("RMSNorm", "RMSNorm_f(x)") if config.normalization == "rmsnorm" else ("LayerNorm", "LN_f(x)")
        steps.append(Step(f"final {name}", x, "T x C", acts["ln_f"][0], rows, chan, "ln_f"))
    head = ("W_te^T  (the LM head is the token embedding matrix, shared)" if config.head == "tied" else
            "W_head^T  (the LM head: its own V x C matrix)")
    steps.append(Step("logits", f"{x} {head}", "T x V", logits, rows, vocab_labels, "logits"))
    temps = temperatures(temperature)
    probs = np.stack([ref.softmax(logits[-1] / t) for t in temps])
    order = np.argsort(-probs[temps.index(temperature)], kind="stable")  # most likely first at `temperature`
    steps.append(Step(f"next token after {rows[-1]!s}: probabilities",
                      f"softmax(logits of the last row / temperature), most likely first at temperature "
                      f"{temperature:g}", "temperatures x V", probs[:, order], [f"temperature {t:g}" for t in temps],
                      [vocab_labels[j] for j in order], "next_probs", source_cols=list(order)))
    return steps


# ---- the torch model's own values ---------------------------------------------------------

@torch.no_grad()
def torch_values(model, ids, temps):
    """The torch model's intermediates for ids (T,), by the Step keys, as float64 NumPy arrays."""
    found, handles = {}, []
    out = lambda key: lambda mod, inp, o: found.__setitem__(key, o[0])  # noqa: E731
    into = lambda key: lambda mod, inp: found.__setitem__(key, inp[0][0])  # noqa: E731
    tr = model.transformer
    named = [("tok_emb", tr.wte), ("x0", tr.drop), ("logits", model.lm_head)] + (
        [("ln_f", tr.ln_f)] if "ln_f" in tr else [])
    for name, mod in named:
        handles.append(mod.register_forward_hook(out(name)))
    if "wpe" in tr:
        handles.append(tr.wpe.register_forward_hook(lambda mod, inp, o: found.__setitem__("pos_emb", o)))
    for i, block in enumerate(tr.h):
        for key, mod in (("ln_1", block.ln_1), ("qkv", block.attn.c_attn), ("attn_out", block.attn.c_proj),
                         ("ln_2", block.ln_2), ("fc", block.mlp.c_fc), ("act", block.mlp.act),
                         ("mlp_out", block.mlp.c_proj), ("x_out", block)) + (
                            (("gate", block.mlp.c_gate),) if "c_gate" in block.mlp._modules else ()):
            handles.append(mod.register_forward_hook(out(f"layer{i}.{key}")))
        for key, mod in (("y", block.attn.c_proj), ("hidden", block.mlp.c_proj), ("ln_1_in", block.ln_1),
                         ("ln_2_in", block.ln_2)):
            handles.append(mod.register_forward_pre_hook(into(f"layer{i}.{key}")))
    try:
        model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    rope = model.rotary(torch.arange(len(ids))) if model.rotary is not None else None
    for i in range(model.config.n_layer):
        residual_sums(found, i, model.config.norm == "post")
        head_values(found, i, model.transformer.h[i].attn, model.config, rope)
    found["next_probs"] = torch.stack([torch.softmax(found["logits"][-1] / t, dim=-1) for t in temps])
    return {k: v.numpy() for k, v in found.items()}


def residual_sums(found, i, post):
    """The residual sums are the inputs of the norms (post-norm), or of norm 2 and the block's output (pre-norm)."""
    found[f"layer{i}.sum_1"] = found.pop(f"layer{i}.ln_1_in") if post else found.pop(f"layer{i}.ln_2_in")
    found[f"layer{i}.sum_2"] = found.pop(f"layer{i}.ln_2_in") if post else found[f"layer{i}.x_out"]
    found.pop(f"layer{i}.ln_1_in", None)


def head_values(found, i, attn, config, rope):
    """Each head's Q, K, V, their norms and turns, and the attention internals, recomputed in torch
    from the model's own Q, K, V projection output (the modules' own norms and rotation applied)."""
    nh, nkv, hs = config.n_head, config.n_kv_head, config.head_dim
    q, k, v = found.pop(f"layer{i}.qkv").split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q_lin, k_lin, v = (t.view(-1, n, hs).transpose(0, 1) for t, n in ((q, nh), (k, nkv), (v, nkv)))  # (h, T, hs)
    q_normed, k_normed = attn.q_norm(q_lin), attn.k_norm(k_lin)
    q_rot, k_rot = (rotate(q_normed, rope), rotate(k_normed, rope)) if rope is not None else (q_normed, k_normed)
    allowed = causal_mask(q.size(0), q.size(0))
    for h in range(nh):
        kv = h // (nh // nkv)
        qk = q_rot[h] @ k_rot[kv].T
        masked = (qk / math.sqrt(hs)).masked_fill(~allowed, float("-inf"))
        att = torch.softmax(masked, dim=-1)
        key = f"layer{i}.head{h}"
        found.update({f"{key}.q_lin": q_lin[h], f"{key}.k_lin": k_lin[kv], f"{key}.v": v[kv],
                      f"{key}.q_normed": q_normed[h], f"{key}.k_normed": k_normed[kv], f"{key}.q": q_rot[h],
                      f"{key}.k": k_rot[kv], f"{key}.qk": qk, f"{key}.scores": qk / math.sqrt(hs),
                      f"{key}.masked": masked, f"{key}.att": att, f"{key}.y": att @ v[kv]})


def check(steps, values):
    """Raise WalkthroughMismatch unless every step's matrix equals the torch model's within TOLERANCE."""
    for step in steps:
        expected = values[step.key]
        if step.source_cols is not None:
            expected = expected[:, step.source_cols]
        if expected.shape != step.values.shape:
            problem = f"have shapes {step.values.shape} and {expected.shape}"
        elif not np.allclose(step.values, expected, rtol=TOLERANCE, atol=TOLERANCE):  # -inf == -inf
            with np.errstate(invalid="ignore"):  # -inf - -inf (both masked) is nan: not a difference
                problem = f"differ by up to {np.nanmax(np.abs(step.values - expected)):.3g} (allowed {TOLERANCE:g})"
        else:
            continue
        raise WalkthroughMismatch(f"'{step.title}' ({step.key}): the NumPy reference and the torch model "
                                  f"{problem}; the walk stops here")


# ---- output -------------------------------------------------------------------------------

def width(text):
    """Terminal columns: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text, n):
    return " " * (n - width(text)) + text


def number(x, decimals):
    return "-inf" if x == -np.inf else f"{x:.{decimals}f}"


def shown_columns(n, max_cols):
    """Indices of the columns to show, with None where '...' stands."""
    if n <= max_cols:
        return list(range(n))
    return list(range(max_cols - 1)) + [None, n - 1]


def table(step, decimals, max_cols):
    """Header and rows of cells for a step, wide matrices cut to max_cols columns."""
    cols = shown_columns(len(step.cols), max_cols)
    header = [""] + ["..." if j is None else step.cols[j] for j in cols]
    body = [[step.rows[r]] + ["..." if j is None else number(step.values[r, j], decimals) for j in cols]
            for r in range(len(step.rows))]
    return header, body


def dimensions(step):
    return f"{step.shape} = {step.values.shape[0]} x {step.values.shape[1]}"


def as_text(steps, intro, decimals, max_cols):
    lines = intro + [""]
    for n, step in enumerate(steps, 1):
        header, body = table(step, decimals, max_cols)
        widths = [max(width(row[c]) for row in [header] + body) for c in range(len(header))]
        lines += [f"[{n}] {step.title}   ({dimensions(step)})", f"    {step.formula}"]
        for row in [header] + body:
            label = row[0] + " " * (widths[0] - width(row[0]))  # row labels flush left, numbers right
            lines.append("    " + "  ".join([label] + [pad(cell, w) for cell, w in zip(row[1:], widths[1:])]))
        lines.append("")
    return "\n".join(lines)


def as_markdown(steps, intro, decimals, max_cols):
    lines = [f"{line}  " for line in intro] + [""]
    for n, step in enumerate(steps, 1):
        header, body = table(step, decimals, max_cols)
        lines += [f"### {n}. {step.title}", "", f"`{step.formula}`, {dimensions(step)}", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)


def as_json(steps, info, decimals, indent=1):
    """Every number (no columns cut), rounded to `decimals`; null stands for -inf (masked)."""
    def rounded(m):
        return [[None if x == -np.inf else round(float(x), decimals) for x in row] for row in m]
    return json.dumps({**info, "steps": [
        {"title": s.title, "key": s.key, "formula": s.formula, "shape": s.shape, "size": list(s.values.shape),
         "rows": s.rows, "cols": s.cols, "values": rounded(s.values)} for s in steps]}, ensure_ascii=False,
        indent=indent)


def as_html(steps, info, decimals):
    """One self-contained page (model/walkthrough_page.html with the JSON format's data inside):
    inline CSS and plain JavaScript, no network request; heatmaps drawn on canvases."""
    page = Path(__file__).with_name("walkthrough_page.html").read_text(encoding="utf-8")
    data = as_json(steps, info, decimals, indent=None).replace("</", "<\\/")  # cannot end the <script> early
    return page.replace("__TITLE__", html.escape(info["input"])).replace("__DATA__", data)


# ---- the command line ---------------------------------------------------------------------

def pick(spec, count, what):
    """'all' or '0,2' -> [0, 2], each checked against the model's count."""
    if spec == "all":
        return list(range(count))
    try:
        chosen = [int(p) for p in spec.split(",")]
    except ValueError:
        raise UserError(f"--{what} must be 'all' or numbers like 0,1; got {spec!r}") from None
    bad = [c for c in chosen if not 0 <= c < count]
    if bad:
        raise UserError(f"--{what}={spec}: the model has {count} {what} (0..{count - 1}); {bad[0]} is not one")
    return chosen


def run(cfg):
    """The walkthrough as text, Markdown or JSON for the config's checkpoint and input; for
    --format=html, the path of the page it wrote."""
    path, steps, info = compute(cfg)
    if cfg.format == "json":
        return as_json(steps, info, cfg.decimals)
    if cfg.format == "html":
        output = Path(cfg.output) if cfg.output else (path if path.is_dir() else path.parent) / "walkthrough.html"
        output.write_text(as_html(steps, info, cfg.decimals), encoding="utf-8")
        return str(output)
    c = info["model"]
    shared = f" sharing n_kv_head={c['n_kv_head']} key/value heads" if c["n_kv_head"] < c["n_head"] else ""
    intro = [f"checkpoint: {path}",
             f"input: {cfg.start!r} -> tokens {' '.join(token_labels(info['tokens']))} -> ids {info['ids']}",
             f"model: n_layer={c['n_layer']}, n_head={c['n_head']}{shared}, n_embd={c['n_embd']} (C), head size "
             f"hs={c['head_dim']}, vocab V={c['vocab_size']}, T={len(info['ids'])} tokens",
             f"checked: {info['checked']}", *info.get("template", [])]
    render = as_markdown if cfg.format == "md" else as_text
    return render(steps, intro, cfg.decimals, cfg.max_cols)


def compute(cfg):
    """(checkpoint path, steps, info) for the config's checkpoint and input, every step checked."""
    opened = open_model(cfg, quiet=True)
    path, model, tokenizer = opened.path, opened.model.double(), opened.tokenizer
    if tokenizer is None:
        raise UserError("this checkpoint has no vocabulary (a nanoGPT checkpoint?); pass --meta=path/to/meta.pkl")
    if not cfg.start:
        example = tokenizer.decode(range(min(3, tokenizer.vocab_size))) if tokenizer.kind == "char" else "Hello"
        raise UserError(f"give the input to walk through with --start, e.g. --start={example!r}")
    try:
        ids, answer = input_ids(cfg, opened)
    except UnknownCharacters as e:
        raise UserError(f"--start has characters the model does not know: {''.join(e.missing)!r}; "
                        f"its vocabulary has {tokenizer.vocab_size} tokens") from None
    if len(ids) > model.config.block_size:
        raise UserError(f"--start has {len(ids)} tokens; this model reads at most block_size="
                        f"{model.config.block_size}")
    layers = pick(cfg.layers, model.config.n_layer, "layers")
    heads = pick(cfg.heads, model.config.n_head, "heads")
    params = ref.params_from_state_dict(model.state_dict())
    tokens = [tokenizer.label(i) for i in ids]
    vocab = [tokenizer.label(i) if i < tokenizer.vocab_size else f"<pad {i}>" for i in range(model.config.vocab_size)]
    steps = walk(params, model.config, ids, tokens, vocab, layers, heads, cfg.temperature)
    check(steps, torch_values(model, ids, temperatures(cfg.temperature)))
    c = model.config
    info = {"checkpoint": str(path), "input": cfg.start, "tokens": tokens, "ids": ids,
            "model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "head_dim": c.head_dim,
                      "n_embd": c.n_embd, "vocab_size": c.vocab_size, "block_size": c.block_size},
            "checked": f"every matrix equals the torch model's (float64) within {TOLERANCE:g}"}
    if answer is not None:
        info["template"] = template_notes(opened.task.template, tokens, answer)
    return path, steps, info


def input_ids(cfg, opened):
    """(ids, answer) of the walk's input. A model trained to answer reads --start as a user turn in its
    chat template, then --reply as its answer (or, without one, its answer's marker): `answer` says
    which tokens the model writes and the loss counts. Other models read --start as it is (answer None)."""
    if not isinstance(opened.task, ChatTask):
        return opened.tokenizer.encode(cfg.start), None
    messages = [{"role": "user", "content": cfg.start}] + ([{"role": "assistant", "content": cfg.reply}] if cfg.reply else [])
    return opened.task.template.encode(opened.tokenizer, messages, generation_prompt=not cfg.reply)


def template_notes(template, tokens, answer):
    """What a learner needs to read a templated input: the special tokens, and which tokens the loss counts."""
    rows = token_labels(tokens)
    roles = "; ".join(f"{marker} begins each {role} turn" for role, marker in template.markers.items())
    counted = [rows[t] for t, keep in enumerate(answer) if keep]
    return [f"template: {roles}; {template.end_of_turn} ends a turn. Special tokens: no text encodes to them",
            "in the loss (training): " + (f"the predictions of {' '.join(counted)}, the answer and its end of turn; "
                                          f"every other target is -1" if counted else
                                          "nothing here yet: give the answer with --reply to see which tokens count")]


def walkthrough_command(argv):
    print(run(load_config(WalkthroughConfig, argv)))
    return 0


def main(argv):
    return run_command(walkthrough_command, argv, failures=WalkthroughMismatch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
