"""Decoding weights (model/quantize.py): float32, bfloat16 and int8 matrices for the CPU, the kernels
compiled for one row, and opening a checkpoint without copying its weights."""

import sys

import pytest
import torch

import sample as sample_cli
from conftest import LLAMA_ARCH, random_model
from model.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, open_model, save_checkpoint
from model.config import ServeConfig, load_config
from model.engine import Rules, complete, generate, new_cache
from model.errors import UserError
from model.quantize import DecodeEmbedding, DecodeLinear, for_decoding, stored
from model.tokenizer import CharTokenizer

quantize = sys.modules["model.quantize"]
TOLERANCE = {"bfloat16": 2e-2, "int8": 4e-2}  # of the logits' largest size; measured below 1e-2 here


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Every matrix through its compiled one-row kernel, however small (the tests' models are tiny)."""
    monkeypatch.setattr(quantize, "COMPILED_FROM", 0)


def saved(tmp_path, **arch):
    model = random_model(dtype=torch.float32, n_layer=2, n_head=4, n_embd=64, vocab_size=70, block_size=32, **arch)
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(70)])
    save_checkpoint(Checkpoint(model.state_dict(), model.config, tok.to_dict(), {"type": "text"}), tmp_path / "ckpt.pt")
    return model, tmp_path / "ckpt.pt"


def test_int8_rows_are_rounded_with_one_scale_each():
    """Bug: one scale per column instead of per row, a chunk boundary skipped or written twice."""
    w = torch.randn(10, 7)
    w[3] *= 100  # a row of large weights must not coarsen the others
    q, scale = stored(w, "int8", chunk=3)
    assert q.dtype == torch.int8 and scale.shape == (10,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    assert (q.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-6).all(), "rounded to the nearest step"
    assert q.abs().amax(dim=1).eq(127).all(), "each row's largest weight is +-127"
    assert torch.equal(q, stored(w, "int8", chunk=100)[0]), "chunks change nothing"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 12, 40])
def test_every_path_of_a_decode_linear_gives_the_product_of_its_stored_weights(compiled_kernels, dtype, rows):
    """Bug: the bias left out, scales broadcast over the wrong side, the kernels reading W transposed
    or returning the rows padded to a power of two, int8's 9-16 rows or prompt path forgetting its scales."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = DecodeLinear(*stored(linear.weight, dtype), linear.bias)
    w = layer.weight.float() * (layer.scale[:, None] if layer.scale is not None else 1)
    x = torch.randn(rows, 96)
    exact = x @ w.t() + linear.bias
    got = layer(x.view(rows, 1, 96))
    assert got.shape == (rows, 1, 40) and got.dtype == torch.float32
    # up to 8 rows: float32 products of the stored weights; more: bfloat16 activations (as llama.cpp)
    tolerance = 1e-5 if rows <= quantize.FEW_ROWS or dtype == "float32" else 2e-2
    torch.testing.assert_close(got[:, 0], exact.detach(), atol=tolerance * exact.abs().max().item(), rtol=0)


@pytest.mark.parametrize("arch", [{}, LLAMA_ARCH], ids=["gpt2", "llama"])
def test_float32_decoding_weights_give_the_models_numbers(tmp_path, compiled_kernels, arch):
    """Bug: a tied head given its own copy, an untied embedding read from the head, positions or
    biases lost in the swap; the prompt's last logits taken from the wrong position."""
    model, path = saved(tmp_path, **arch, **({"n_kv_head": 2} if arch else {}))
    opened = open_model(path, quiet=True, dtype="float32").model
    assert isinstance(opened.lm_head, DecodeLinear) and isinstance(opened.transformer.wte, DecodeEmbedding)
    assert (opened.transformer.wte.table is opened.lm_head) == (model.config.head == "tied")
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(opened(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
    ours = complete(opened, [idx[0].tolist()], Rules(max_tokens=20, temperature=0.0))[0]
    assert ours == generate(model, idx, 20, temperature=0.0)[0, 8:].tolist(), "the same greedy tokens, step by step"


def test_bfloat16_and_int8_logits_stay_close_to_float32(tmp_path, compiled_kernels):
    """Bug: bfloat16 or int8 weights that change the model (a scale lost, rows mixed up) rather than round
    it, in the prompt's products or in the one-row kernels."""
    model, path = saved(tmp_path)
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        exact = model(idx)[0]
        for dtype, tolerance in TOLERANCE.items():
            opened = open_model(path, quiet=True, dtype=dtype).model
            cache = new_cache(opened, 1, 8)
            one_row = torch.cat([opened(idx[:, i:i + 1], kv_cache=cache)[0] for i in range(idx.size(1))], dim=1)
            for got in (opened(idx)[0], one_row):
                assert (got - exact).abs().max() < tolerance * exact.abs().max(), dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_trained_model_answers_the_same_in_bfloat16_and_int8(trained_chat, capsys, dtype):
    """Bug: the end of turn or the markers lost with the swapped head (the reply would not stop), or
    weights rounded so coarsely that a learned answer changes."""
    for question, answer in (("天行健的下一句是什么?", "君子以自强不息。"), ("你好", "你好!我是一个很小的GPT,有什么可以帮你?")):
        assert sample_cli.main([f"--out_dir={trained_chat}", f"--start={question}", "--temperature=0",
                                "--num_samples=1", f"--dtype={dtype}"]) == 0
        assert capsys.readouterr().out == answer + "\n", question


def test_the_server_decodes_in_the_dtype_it_is_given(trained_chat):
    """Bug: --dtype read by sample.py only."""
    from model.serve.server import make_app
    _, engine, _ = make_app(load_config(ServeConfig, [f"--out_dir={trained_chat}", "--device=cpu", "--dtype=int8"]),
                            quiet=True)
    assert engine.model.lm_head.weight.dtype == torch.int8
    assert engine.model.transformer.h[0].ln_1.weight.dtype == torch.float32, "norms stay float32"


def test_a_dtype_that_is_not_one_is_one_line(trained_chat, capsys):
    assert sample_cli.main([f"--out_dir={trained_chat}", "--dtype=int4"]) == 2
    assert capsys.readouterr().err.strip() == "error: dtype must be one of float32, bfloat16, int8; got 'int4'"
    with pytest.raises(UserError, match="int8 weights are for decoding on the CPU; on a GPU use --dtype=bfloat16"):
        for_decoding(random_model(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=4), "int8", "cuda")


def test_opening_takes_the_checkpoints_tensors_and_keeps_no_float32_copy(tmp_path):
    """Bug: the model built with random weights and the checkpoint copied in (two copies at open),
    a tied head untied by loading, float32 matrices kept beside the int8 ones."""
    model, path = saved(tmp_path)
    ckpt = load_checkpoint(path, mmap=True)
    built = model_from_checkpoint(ckpt)
    assert built.lm_head.weight.data_ptr() == ckpt.model["lm_head.weight"].data_ptr(), "the file's tensor itself"
    assert built.lm_head.weight is built.transformer.wte.weight, "tied: one parameter"
    opened = open_model(path, quiet=True, dtype="int8")
    assert opened.ckpt.model == {}, "the opened checkpoint lets its float32 weights go"
    matrices = [m.weight for m in opened.model.modules() if isinstance(m, DecodeLinear)]
    assert matrices and all(w.dtype == torch.int8 for w in matrices)
    assert not any(p.dim() == 2 for p in opened.model.parameters() if p is not opened.model.transformer.wpe.weight)


def test_a_checkpoint_replaced_while_it_is_open_leaves_the_open_model_alone(tmp_path):
    """Bug: mapped tensors that follow the file: train.py saving over ckpt.pt would change a served model."""
    model, path = saved(tmp_path)
    opened = open_model(path, quiet=True, dtype="float32").model
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = opened(idx)[0].clone()
        other = random_model(seed=1, dtype=torch.float32, **{k: getattr(model.config, k) for k in (
            "n_layer", "n_head", "n_embd", "vocab_size", "block_size")})
        save_checkpoint(Checkpoint(other.state_dict(), other.config, load_checkpoint(path).tokenizer, {"type": "text"}),
                        path)  # as train.py saves: a new file renamed over the old one
        torch.testing.assert_close(opened(idx)[0], before, rtol=0, atol=0)


def test_prefill_computes_only_each_rows_last_logits():
    """Bug: the last position taken from the first row for all rows, or the last of the padding."""
    model = random_model(n_layer=1, n_head=2, n_embd=16, vocab_size=11, block_size=8)
    idx = torch.randint(11, (3, 6), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([5, 2, 0])
    with torch.no_grad():
        full, part = model(idx)[0], model(idx, last=last)[0]
    assert part.shape == (3, 1, 11)
    torch.testing.assert_close(part[:, 0], full[torch.arange(3), last], rtol=0, atol=1e-12)


def test_without_a_compiler_decoding_goes_on_with_torchs_products(tmp_path, compiled_kernels, monkeypatch, capsys):
    """Bug: a machine that cannot compile (no C++ compiler) cannot decode at all."""
    model, path = saved(tmp_path)
    monkeypatch.setattr(quantize, "use_compiled", [True])
    monkeypatch.setattr(quantize, "kernel", lambda args: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    opened = open_model(path, quiet=True, dtype="bfloat16").model
    ids = complete(opened, [[1, 2, 3]], Rules(max_tokens=5, temperature=0.0))[0]
    assert len(ids) == 5 and quantize.use_compiled == [False]
    assert "torch.compile cannot build the decoding kernel here" in capsys.readouterr().err
