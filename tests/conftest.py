import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the tests build every model and tokenizer they use; transformers must never look online for one
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from model.gpt import GPT, GPTConfig  # noqa: E402

SORT_MODEL = dict(n_layer=3, n_head=3, n_embd=48, vocab_size=3, block_size=11, bias=True)
# the original Transformer's choices as the explainers draw them, and minGPT's
EXPLAINER_ARCH = dict(positions="sinusoidal", norm="post", activation="relu")
MINGPT_ARCH = dict(head="untied", activation="gelu_tanh")
# what Llama and Qwen changed (n_kv_head and head_dim are set per model: they depend on n_head and n_embd)
LLAMA_ARCH = dict(positions="rope", normalization="rmsnorm", mlp="gated", activation="silu", bias=False, head="untied")
QWEN2_ARCH = dict(LLAMA_ARCH, qkv_bias=True, head="tied", rope_theta=1e6)
QWEN3_ARCH = dict(LLAMA_ARCH, qk_norm=True, rope_theta=1e6)


# A command as its user runs it from a terminal, Ctrl-C included. A test runner started in the background
# (a shell's `pytest &`) ignores SIGINT, and a process that starts with SIGINT ignored never gets Python's
# Ctrl-C handler: the command restores it first, so its Ctrl-C tests do not depend on how pytest was started.
WITH_CTRL_C = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
target = sys.argv.pop(1)
if target.startswith("-m "):
    runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
else:
    sys.argv[0] = target
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
"""


def command(target, *args):
    """argv for `python TARGET ARGS` (TARGET a script's path, or '-m module'), Ctrl-C handled as in a terminal."""
    return [sys.executable, "-c", WITH_CTRL_C, str(target), *map(str, args)]


def random_model(seed=0, dtype=torch.float64, **kw):
    """A GPT with every parameter random, LayerNorm gains and biases too (the default 1s and
    0s would hide mistakes in how they are applied)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kw)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name or "_norm." in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def nanogpt_checkpoint(path):
    """A checkpoint as nanoGPT's train.py writes it (compiled model, no tokenizer, its config)."""
    torch.manual_seed(0)
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=5, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "model_args": model_args, "optimizer": {}, "iter_num": 5000,
                "best_val_loss": torch.tensor(1.47), "config": {"dataset": "shakespeare_char"}}, path)
    return path


def trained_run(config, base):
    """Train a built-in config as shipped in base/run; returns that folder."""
    with working_dir(base):
        run_training(config, base / "run")
    return base / "run"


def assert_writes_each_line(out_dir):
    """The model in out_dir continues each line of data/chinese from its first three characters
    (greedy), as the corpus configs promise. Returns the model for further checks."""
    from model.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
    from model.engine import generate
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    model, tok = model_from_checkpoint(ckpt), tokenizer_from_checkpoint(ckpt)
    for line in (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8").splitlines():
        out = generate(model, torch.tensor([tok.encode(line[:3])]), len(line) - 3, temperature=0.0)
        assert tok.decode(out[0].tolist()) == line, f"{out_dir}: greedy continuation of {line[:3]} is wrong"
    return model


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (train.py writes out/latest.txt relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def train_args(config, out_dir, *overrides):
    """Arguments for a built-in config, writing to out_dir and reading the shipped data."""
    return [str(ROOT / "configs" / config), f"--out_dir={out_dir}", f"--data={ROOT / 'data' / 'chinese'}",
            *overrides]


def run_training(config, out_dir, *overrides):
    from model.config import TrainConfig, load_config
    from model.trainer import train
    return train(load_config(TrainConfig, train_args(config, out_dir, *overrides)))


@pytest.fixture(scope="session")
def trained_sort(tmp_path_factory):
    """configs/sort.py trained as shipped (it stops at 100% held-out): (folder, summary)."""
    base = tmp_path_factory.mktemp("sort")
    with working_dir(base):
        summary = run_training("sort.py", base / "out" / "sort")
    return base, summary


@pytest.fixture(scope="session")
def trained_chinese(tmp_path_factory):
    base = tmp_path_factory.mktemp("chinese")
    with working_dir(base):
        summary = run_training("chinese.py", base / "out" / "chinese")
    return base, summary


CHAT_DATA = ROOT / "data" / "chat" / "conversations.jsonl"


@pytest.fixture(scope="session")
def trained_numerals(tmp_path_factory):
    """configs/numerals.py as shipped: (folder, summary)."""
    base = tmp_path_factory.mktemp("numerals")
    with working_dir(base):
        summary = run_training("numerals.py", base / "numerals", f"--data={ROOT / 'data/numerals/numerals.jsonl'}")
    return base / "numerals", summary


@pytest.fixture(scope="session")
def trained_chat(tmp_path_factory):
    """configs/chat.py as shipped: its out_dir."""
    base = tmp_path_factory.mktemp("chat")
    with working_dir(base):
        run_training("chat.py", base / "chat", f"--data={CHAT_DATA}")
    return base / "chat"
