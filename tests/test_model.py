"""The GPT module: size, layout, maths against the NumPy reference, and its input checks."""

import copy

import numpy as np
import pytest
import torch

from conftest import EXPLAINER_ARCH, LLAMA_ARCH, MINGPT_ARCH, QWEN2_ARCH, QWEN3_ARCH, SORT_MODEL, random_model
from model import GPT, GPTConfig
from model import reference as ref
from model.checkpoint import Checkpoint, model_from_checkpoint

CONFIGS = [  # (config, T): bias on/off, 1 to 4 heads, both GELU forms, T shorter than block_size
    (dict(n_layer=2, n_head=1, n_embd=8, vocab_size=7, block_size=9, bias=True, activation="gelu"), 9),
    (dict(n_layer=1, n_head=2, n_embd=12, vocab_size=5, block_size=10, bias=False, activation="gelu_tanh"), 6),
    (dict(n_layer=3, n_head=3, n_embd=18, vocab_size=11, block_size=8, bias=True, activation="gelu_tanh"), 5),
    (dict(n_layer=2, n_head=4, n_embd=16, vocab_size=6, block_size=12, bias=False, activation="gelu"), 12),
    (SORT_MODEL, 11),
    (dict(n_layer=2, n_head=2, n_embd=12, vocab_size=7, block_size=9, **EXPLAINER_ARCH), 9),
    (dict(n_layer=2, n_head=3, n_embd=18, vocab_size=5, block_size=8, bias=False, **EXPLAINER_ARCH, head="untied"), 6),
    (dict(SORT_MODEL, **MINGPT_ARCH), 11),
    (dict(n_layer=1, n_head=2, n_embd=10, vocab_size=6, block_size=7, positions="sinusoidal", norm="pre"), 7),
] + [(dict(n_layer=2, n_head=4, n_embd=16, vocab_size=7, block_size=9, **arch), 9) for arch in (
    # each of Llama's and Qwen's choices alone, then together
    dict(positions="rope", rope_theta=500.0), dict(normalization="rmsnorm"), dict(normalization="rmsnorm", norm="post"),
    dict(mlp="gated", activation="silu", intermediate_size=20), dict(mlp="gated", activation="gelu"),
    dict(n_kv_head=2), dict(n_kv_head=1, positions="rope"), dict(head_dim=6), dict(qk_norm=True),
    dict(bias=False, qkv_bias=True), dict(LLAMA_ARCH, n_kv_head=2), dict(QWEN2_ARCH, n_kv_head=2, intermediate_size=24),
    dict(QWEN3_ARCH, n_kv_head=2, head_dim=6))]


def batch(cfg, T, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(cfg["vocab_size"], (B, T), generator=g)
    targets = torch.randint(cfg["vocab_size"], (B, T), generator=g)
    targets[:, : T // 2] = -1  # ignored, as the sort task's input positions are
    return idx, targets


def test_sort_model_has_85584_parameters():
    assert GPT(GPTConfig(**SORT_MODEL)).num_params() == 85_584, "the visualisation's nano-gpt size"
    assert GPT(GPTConfig(**SORT_MODEL, head="untied")).num_params() == 85_728, "minGPT's gpt-nano: its own LM head"


def test_architecture_options_change_the_state_dict_as_documented():
    base = GPT(GPTConfig(**SORT_MODEL)).state_dict()
    explainer = GPT(GPTConfig(**SORT_MODEL, **EXPLAINER_ARCH)).state_dict()
    assert set(base) - set(explainer) == {"transformer.wpe.weight", "transformer.ln_f.weight",
                                          "transformer.ln_f.bias"}, "sinusoidal: no parameters; post-LN: no LN_f"
    assert set(explainer) <= set(base)
    untied = GPT(GPTConfig(**SORT_MODEL, head="untied"))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_sinusoidal_positions_are_the_papers_formula():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=16, positions="sinusoidal")).double()
    pe = model.transformer.wpe(torch.arange(16))
    pos, i = 5, 1  # PE(5, 2) = sin(5 / 10000^(2/8)), PE(5, 3) = cos(5 / 10000^(2/8))
    assert abs(pe[pos, 2 * i].item() - np.sin(pos / 10000 ** (2 * i / 8))) < 1e-15
    assert abs(pe[pos, 2 * i + 1].item() - np.cos(pos / 10000 ** (2 * i / 8))) < 1e-15
    np.testing.assert_allclose(pe.numpy(), ref.sinusoidal_positions(16, 8), rtol=0, atol=1e-15)
    assert GPT(GPTConfig(**{**SORT_MODEL, "bias": False})).num_params() == 83_952


def test_state_dict_is_nanogpt_layout():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=5, block_size=4))
    expected = {"transformer.wte.weight": (5, 8), "transformer.wpe.weight": (4, 8),
                "transformer.ln_f.weight": (8,), "transformer.ln_f.bias": (8,), "lm_head.weight": (5, 8)}
    for i in range(2):
        h = f"transformer.h.{i}."
        expected.update({h + "ln_1.weight": (8,), h + "ln_1.bias": (8,),
                         h + "attn.c_attn.weight": (24, 8), h + "attn.c_attn.bias": (24,),
                         h + "attn.c_proj.weight": (8, 8), h + "attn.c_proj.bias": (8,),
                         h + "ln_2.weight": (8,), h + "ln_2.bias": (8,),
                         h + "mlp.c_fc.weight": (32, 8), h + "mlp.c_fc.bias": (32,),
                         h + "mlp.c_proj.weight": (8, 32), h + "mlp.c_proj.bias": (8,)})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected, f"state_dict differs from nanoGPT's: {set(got) ^ set(expected)}"
    assert model.lm_head.weight is model.transformer.wte.weight, "LM head must be tied to wte"


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=500, block_size=64))
    sd = model.state_dict()
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std().item() - 0.02) < 0.001
    assert abs(sd["transformer.wte.weight"].std().item() - 0.02) < 0.001
    resid = 0.02 / (2 * 4) ** 0.5
    assert abs(sd["transformer.h.1.attn.c_proj.weight"].std().item() - resid) < 0.0007, "c_proj std 0.02/sqrt(2 n_layer)"
    assert abs(sd["transformer.h.1.mlp.c_proj.weight"].std().item() - resid) < 0.0007
    assert all(v.abs().max() == 0 for k, v in sd.items() if k.endswith("c_attn.bias") or k.endswith("c_fc.bias"))


@pytest.mark.parametrize("cfg,T", CONFIGS)
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_float64_model_matches_numpy_reference(cfg, T, attention):
    model = random_model(seed=T, **cfg, attention=attention)
    idx, targets = batch(cfg, T)
    logits, loss = model(idx, targets)
    r_logits, r_loss, _ = ref.forward(ref.params_from_state_dict(model.state_dict()), model.config,
                                      idx.numpy(), targets.numpy())
    np.testing.assert_allclose(logits.detach().numpy(), r_logits, rtol=0, atol=1e-10,
                               err_msg=f"logits differ from the reference for {cfg}")
    assert abs(loss.item() - r_loss) < 1e-10, f"loss {loss.item()} != reference {r_loss}"


@pytest.mark.parametrize("cfg,T", CONFIGS[:3])
def test_float32_model_matches_reference_within_1e5_relative(cfg, T):
    model64 = random_model(seed=1, **cfg)
    model32 = copy.deepcopy(model64).float()
    idx, targets = batch(cfg, T)
    logits, loss = model32(idx, targets)
    r_logits, r_loss, _ = ref.forward(ref.params_from_state_dict(model64.state_dict()), model64.config,
                                      idx.numpy(), targets.numpy())
    rel = np.abs(logits.detach().double().numpy() - r_logits).max() / np.abs(r_logits).max()
    assert rel < 1e-5, f"float32 logits off by {rel:.2e} relative"
    assert abs(loss.item() - r_loss) / abs(r_loss) < 1e-5


def test_attention_paths_agree_and_are_causal():
    cfg = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=9, block_size=10)
    a = random_model(seed=3, **cfg, attention="sdpa")
    b = random_model(seed=3, **cfg, attention="explicit")
    idx, _ = batch(cfg, 10)
    la, _ = a(idx)
    lb, _ = b(idx)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-12, msg="sdpa and explicit attention differ")
    for t in range(10):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 9
        for model in (a, b):
            lc, _ = model(changed)
            assert torch.equal(lc[:, :t], model(idx)[0][:, :t]), f"position {t} leaked into earlier positions"
            assert not torch.equal(lc[:, t:], model(idx)[0][:, t:])


def test_targets_minus_one_are_ignored():
    cfg = dict(n_layer=1, n_head=1, n_embd=8, vocab_size=5, block_size=6)
    model = random_model(**cfg)
    idx, targets = batch(cfg, 6)
    _, loss = model(idx, targets)
    logp = torch.log_softmax(model(idx)[0], -1)
    keep = targets != -1
    manual = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert abs(loss.item() - manual.item()) < 1e-12


def test_nanogpt_state_dict_loads_with_same_logits():
    """A checkpoint as nanoGPT writes one (compiled: '_orig_mod.' prefixes; older versions: a
    causal-mask buffer named attn.bias), built here from nanoGPT's key list."""
    cfg = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=13, block_size=8, bias=True)
    source = random_model(seed=5, **cfg, dtype=torch.float32)
    keys = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(2):
        keys += [f"transformer.h.{i}.{k}" for k in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")]
    keys += ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    sd = source.state_dict()
    nano = {"_orig_mod." + k: sd[k].clone() for k in keys}
    for i in range(2):
        nano[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, bias=True, vocab_size=13, dropout=0.0)
    loaded = model_from_checkpoint(Checkpoint.from_dict({"model": nano, "model_args": model_args})).eval()
    idx, _ = batch(cfg, 8)
    torch.testing.assert_close(loaded(idx)[0], source(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_embd=10, n_head=3), "n_embd=10 is not divisible by n_head=3"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(block_size=-4), "block_size must be a positive integer, got -4"),
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
    (dict(activation="swish"), "activation must be one of gelu, gelu_tanh, relu, silu; got 'swish'"),
    (dict(positions="rotary"), "positions must be one of learned, sinusoidal"),
    (dict(norm="sandwich"), "norm must be one of pre, post"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**dict(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=4), **kwargs})
    assert message in str(e.value)


def test_input_errors_name_the_bad_value():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=4))
    with pytest.raises(ValueError, match=r"input of length 5 is longer than block_size=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids \[5, 9\] are outside the vocabulary \[0, 5\)"):
        model(torch.tensor([[0, 5, 9]]))
    with pytest.raises(ValueError, match=r"token ids \[-1\]"):
        model(torch.tensor([[-1, 2]]))


def test_optimizer_decays_only_matrices():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=4))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
