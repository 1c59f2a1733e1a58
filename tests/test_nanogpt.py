"""nanoGPT both ways: our checkpoints load in nanoGPT's own sample.py and give our logits, and a
checkpoint nanoGPT wrote either works here or stops with one clear line.

nanoGPT is not vendored: the model below is written from nanoGPT's model.py as published
(GPTConfig's seven fields, LayerNorm with optional bias and eps 1e-5, exact GELU, tied head,
logits of the last position only at inference), and load_like_nanogpt follows its sample.py.
"""

import os
import pickle
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

import train as train_cli
from conftest import nanogpt_checkpoint, train_args


@dataclass
class NanoGPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=LayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x)[:, [-1], :])  # inference: the last position only


def load_like_nanogpt(ckpt_path):
    """nanoGPT's sample.py with init_from='resume': GPTConfig(**model_args), strip '_orig_mod.',
    strict load_state_dict, and the vocabulary from data/<config['dataset']>/meta.pkl."""
    checkpoint = torch.load(ckpt_path, map_location="cpu")
    model = NanoGPT(NanoGPTConfig(**checkpoint["model_args"]))
    state_dict = checkpoint["model"]
    for k in list(state_dict):
        if k.startswith("_orig_mod."):
            state_dict[k[len("_orig_mod."):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    meta_path = os.path.join("data", checkpoint["config"]["dataset"], "meta.pkl")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    return model.eval(), meta


def test_model_args_are_exactly_nanogpts_fields(trained_chinese):
    base, _ = trained_chinese
    ckpt = torch.load(base / "out" / "chinese" / "ckpt.pt", weights_only=True)
    assert set(ckpt["model_args"]) == {f.name for f in fields(NanoGPTConfig)}, "nanoGPT calls GPTConfig(**model_args)"
    assert ckpt["model_extra"] == {"activation": "gelu", "positions": "learned", "norm": "pre", "head": "tied",
                                   "layer_norm_eps": 1e-5, "normalization": "layernorm", "mlp": "standard",
                                   "rope_theta": 10000.0, "n_kv_head": 4, "head_dim": 16, "intermediate_size": 256,
                                   "qk_norm": False, "qkv_bias": False}, \
        "our other architecture fields go where nanoGPT does not look"


def test_our_checkpoint_runs_in_nanogpts_sample_py(trained_chinese):
    from model.checkpoint import open_model
    base, _ = trained_chinese
    path = base / "out" / "chinese" / "ckpt.pt"
    nano, meta = load_like_nanogpt(path)
    ours = open_model(path, quiet=True)
    text = "天行健,君子以"
    ids = [meta["stoi"][c] for c in text]
    assert ids == ours.tokenizer.encode(text), "meta.pkl holds our vocabulary, id for id"
    with torch.no_grad():
        theirs = nano(torch.tensor([ids]))[0, -1]
        mine = ours.model(torch.tensor([ids]))[0][0, -1]
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5, msg=lambda m: f"nanoGPT's logits differ: {m}")
    assert meta["itos"][int(theirs.argmax())] == "自", "nanoGPT's greedy next character continues the line"


def test_resume_or_finetune_from_a_nanogpt_checkpoint_says_what_works(in_tmp, capsys):
    (in_tmp / "nano").mkdir()
    path = nanogpt_checkpoint(in_tmp / "nano" / "ckpt.pt")
    for how in ("--init_from=resume", f"--init_from={path}"):
        code = train_cli.main(train_args("chinese.py", in_tmp / "nano", how, "--max_iters=1"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, f"{how}: exit code {code}"
        assert len(err) == 1 and "has no vocabulary or task (it was written by nanoGPT?)" in err[0], err
        assert f"python sample.py --ckpt={path} --meta=path/to/meta.pkl" in err[0]
