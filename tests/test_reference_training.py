"""The NumPy reference trains: its gradients, clipping and AdamW step agree with PyTorch."""

import copy

import numpy as np
import pytest
import torch

from conftest import EXPLAINER_ARCH, LLAMA_ARCH, MINGPT_ARCH, QWEN2_ARCH, QWEN3_ARCH, SORT_MODEL, random_model
from model import reference as ref
from model.config import TrainConfig
from model.schedule import get_lr
from model.tasks import SortTask
from model.trainer import train_step

GRAD_CONFIGS = [
    dict(SORT_MODEL, activation="gelu"),
    dict(SORT_MODEL, activation="gelu_tanh", bias=False),
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=17, block_size=16, bias=True, activation="gelu_tanh"),
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=17, block_size=16, bias=False, activation="gelu"),
    dict(n_layer=2, n_head=2, n_embd=16, vocab_size=9, block_size=12, **EXPLAINER_ARCH),
    dict(n_layer=2, n_head=2, n_embd=16, vocab_size=9, block_size=12, bias=False, **EXPLAINER_ARCH, head="untied"),
    dict(SORT_MODEL, **MINGPT_ARCH),
    dict(SORT_MODEL, positions="rope", rope_theta=300.0),
    dict(SORT_MODEL, normalization="rmsnorm"),
    dict(SORT_MODEL, mlp="gated", activation="silu", intermediate_size=40),
    dict(n_layer=2, n_head=4, n_embd=16, vocab_size=9, block_size=12, n_kv_head=2),
    dict(n_layer=2, n_head=2, n_embd=16, vocab_size=9, block_size=12, head_dim=6, qk_norm=True),
    dict(SORT_MODEL, bias=False, qkv_bias=True),
    dict(n_layer=2, n_head=4, n_embd=16, vocab_size=9, block_size=12, **LLAMA_ARCH, n_kv_head=2),
    dict(n_layer=2, n_head=4, n_embd=16, vocab_size=9, block_size=12, **QWEN2_ARCH, n_kv_head=1),
    dict(n_layer=2, n_head=4, n_embd=16, vocab_size=9, block_size=12, **QWEN3_ARCH, n_kv_head=2, head_dim=6),
]


def torch_grads(model, idx, targets):
    model.zero_grad()
    _, loss = model(idx, targets)
    loss.backward()
    return {n: p.grad.detach().numpy() for n, p in model.named_parameters()}


def sample_batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = cfg["block_size"]
    idx = torch.randint(cfg["vocab_size"], (B, T), generator=g)
    targets = torch.randint(cfg["vocab_size"], (B, T), generator=g)
    targets[:, :T // 3] = -1
    return idx, targets


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("cfg", GRAD_CONFIGS, ids=lambda c: "-".join(f"{v}" for k, v in c.items() if k in (
    "n_embd", "activation", "bias", "positions", "norm", "head", "normalization", "mlp", "n_kv_head", "head_dim",
    "qk_norm", "qkv_bias")))
def test_reference_gradients_match_autograd(cfg, attention):
    model = random_model(seed=7, **cfg, attention=attention)
    idx, targets = sample_batch(cfg)
    expected = torch_grads(model, idx, targets)
    params = ref.params_from_state_dict(model.state_dict())
    _, _, acts = ref.forward(params, model.config, idx.numpy(), targets.numpy())
    got = ref.backward(params, model.config, acts, targets.numpy())
    assert set(got) == set(expected), f"gradient names differ: {set(got) ^ set(expected)}"
    for name, g in expected.items():
        rel = np.abs(got[name] - g).max() / max(np.abs(g).max(), 1e-30)
        assert rel < 1e-9, f"{name}: reference gradient off by {rel:.2e} relative"


def test_reference_gradients_match_finite_differences():
    cfg = dict(n_layer=1, n_head=2, n_embd=4, vocab_size=5, block_size=4, bias=True, activation="gelu")
    model = random_model(seed=2, **cfg)
    idx, targets = (t.numpy() for t in sample_batch(cfg, B=2))
    params = ref.params_from_state_dict(model.state_dict())
    _, _, acts = ref.forward(params, model.config, idx, targets)
    grads = ref.backward(params, model.config, acts, targets)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, p in params.items():
        for flat in rng.choice(p.size, size=min(4, p.size), replace=False):
            i = np.unravel_index(flat, p.shape)
            old = p[i]
            p[i] = old + eps
            up = ref.forward(params, model.config, idx, targets)[1]
            p[i] = old - eps
            down = ref.forward(params, model.config, idx, targets)[1]
            p[i] = old
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - grads[name][i]) < 1e-7 + 1e-5 * abs(numeric), (
                f"{name}{i}: analytic {grads[name][i]:.8g} vs finite difference {numeric:.8g}")


@pytest.mark.parametrize("arch", [{}, EXPLAINER_ARCH, MINGPT_ARCH, dict(LLAMA_ARCH, n_kv_head=1),
                                  dict(QWEN2_ARCH, n_kv_head=1), dict(QWEN3_ARCH, n_kv_head=1, head_dim=8)],
                         ids=["gpt2", "explainer", "mingpt", "llama", "qwen2", "qwen3"])
def test_ten_training_steps_match_the_reference(arch):
    """The project's own train_step (what train.py runs) against the reference's backward,
    clipping and AdamW, with gradient accumulation and the project's LR schedule."""
    cfg = TrainConfig(learning_rate=3e-3, min_lr=3e-4, warmup_iters=3, lr_decay_iters=10, max_iters=10,
                      weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=0.5, batch_size=8,
                      gradient_accumulation_steps=2)
    task = SortTask(seed=0)
    model = random_model(seed=11, **{**SORT_MODEL, **arch})
    model.train()
    params = ref.params_from_state_dict(model.state_dict())
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    state = {}
    clipped = 0
    for it in range(10):
        g = torch.Generator().manual_seed(it)
        batches = [task.get_batch("train", cfg.batch_size, g) for _ in range(cfg.gradient_accumulation_steps)]
        lr = get_lr(it, cfg)
        loss = train_step(model, optimizer, batches, lr, cfg.grad_clip).item()
        grads, ref_loss = {}, 0.0
        for x, y in batches:
            _, l, acts = ref.forward(params, model.config, x.numpy(), y.numpy())
            for k, v in ref.backward(params, model.config, acts, y.numpy()).items():
                grads[k] = grads.get(k, 0.0) + v / len(batches)
            ref_loss += l / len(batches)
        clipped += ref.clip_grad_norm(grads, cfg.grad_clip) > cfg.grad_clip
        ref.adamw_step(params, grads, state, lr, cfg.weight_decay, cfg.beta1, cfg.beta2)
        assert abs(loss - ref_loss) < 1e-8, f"step {it}: loss {loss} vs reference {ref_loss}"
    assert clipped > 0, "the test should exercise gradient clipping"
    for name, p in model.named_parameters():
        diff = np.abs(p.detach().numpy() - params[name]).max()
        assert diff < 1e-8, f"{name} after 10 steps differs from the reference by {diff:.2e}"


def test_float32_model_against_float64_reference():
    """As llm.c's test does for its C code: float32 within stated tolerances of exact maths.
    Logits and loss 1e-5 relative; gradients 1e-3 relative to each tensor's largest entry."""
    model64 = random_model(seed=4, **SORT_MODEL)
    model32 = copy.deepcopy(model64).float()
    idx, targets = sample_batch(SORT_MODEL, B=16)
    params = ref.params_from_state_dict(model64.state_dict())
    logits, loss, acts = ref.forward(params, model64.config, idx.numpy(), targets.numpy())
    grads = ref.backward(params, model64.config, acts, targets.numpy())
    got32 = torch_grads(model32, idx, targets)
    l32, loss32 = model32(idx, targets)
    assert np.abs(l32.detach().double().numpy() - logits).max() / np.abs(logits).max() < 1e-5
    assert abs(loss32.item() - loss) / loss < 1e-5
    for name, g in grads.items():
        rel = np.abs(got32[name] - g).max() / np.abs(g).max()
        assert rel < 1e-3, f"float32 gradient of {name} off by {rel:.2e} relative"
