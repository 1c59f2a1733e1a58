"""The CUDA paths: CPU and CUDA give the same numbers, flash attention, bf16 and fp16 mixed
precision, fused AdamW, torch.compile and the KV cache on the GPU. Skipped without a GPU."""

from contextlib import contextmanager

import pytest
import torch

from conftest import ROOT, random_model, run_training, train_args, working_dir
from model.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model.engine import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50, block_size=32, bias=True)


@contextmanager
def full_float32():
    """TF32 off, so CUDA's float32 matmuls are comparable with the CPU's."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def batch(B=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(MODEL["vocab_size"], (B, T), generator=g),
            torch.randint(MODEL["vocab_size"], (B, T), generator=g))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_cpu_and_cuda_agree_on_logits_loss_and_gradients(attention):
    x, y = batch()
    results = []
    with full_float32():
        for device in ("cpu", "cuda"):
            model = random_model(dtype=torch.float32, attention=attention, **MODEL).to(device)
            logits, loss = model(x.to(device), y.to(device))
            loss.backward()
            results.append((logits.cpu(), loss.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (cpu_logits, cpu_loss, cpu_grads), (gpu_logits, gpu_loss, gpu_grads) = results
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-5, msg=lambda m: f"logits: {m}")
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"loss: {m}")
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")


def test_flash_attention_under_bf16_matches_the_explicit_maths():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x, _ = batch()
    x = x.cuda()
    flash = random_model(dtype=torch.float32, attention="sdpa", **MODEL).cuda()
    explicit = random_model(dtype=torch.float32, attention="explicit", **MODEL).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run
            a, _ = flash(x)
        b, _ = explicit(x)
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05, msg=lambda m: f"flash vs explicit: {m}")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bf16")
    with working_dir(base):
        summary = run_training("chinese.py", base / "run", "--device=cuda", "--dtype=bfloat16")
    return base / "run", summary


def test_bf16_autocast_run_learns_the_corpus(bf16_run):
    out, summary = bf16_run
    assert summary["train_loss"] < 0.1, f"bf16 run ended at train loss {summary['train_loss']:.4f}"
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt.config["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in ckpt.model.values()), "weights stay float32 under autocast"
    assert "fused" in ckpt.optimizer["param_groups"][0] and ckpt.optimizer["param_groups"][0]["fused"]
    model, tok = model_from_checkpoint(ckpt, "cuda"), tokenizer_from_checkpoint(ckpt)
    corpus = (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8")
    for line in corpus.splitlines():
        ids = generate(model, torch.tensor([tok.encode(line[:3])], device="cuda"), len(line) - 3, temperature=0.0)
        assert tok.decode(ids[0].tolist()) == line, f"greedy continuation of {line[:3]} on CUDA"


def test_fp16_run_uses_the_grad_scaler(tmp_path):
    with working_dir(tmp_path):
        summary = run_training("chinese.py", tmp_path / "run", "--device=cuda", "--dtype=float16",
                               "--max_iters=100", "--eval_interval=100")
    assert summary["train_loss"] < 2.0, f"fp16 run ended at train loss {summary['train_loss']:.4f}"


def test_compile_on_cuda_gives_the_eager_losses(tmp_path):
    losses = []
    for compile_ in (False, True):
        with working_dir(tmp_path):
            summary = run_training("chinese.py", tmp_path / f"run{compile_}", "--device=cuda", "--dtype=float32",
                                   "--max_iters=20", "--eval_interval=20", f"--compile={compile_}")
        losses.append(summary["train_loss"])
    assert abs(losses[0] - losses[1]) < 1e-3 * abs(losses[0]), f"eager {losses[0]}, compiled {losses[1]}"


def test_kv_cache_on_cuda_gives_the_cpu_tokens():
    model = random_model(dtype=torch.float64, **MODEL)
    idx = torch.tensor([[1, 2, 3]])
    cpu = generate(model, idx, 60, temperature=0.0)  # past block_size: the window slides
    model.cuda()
    for use_cache in (True, False):
        gpu = generate(model, idx.cuda(), 60, temperature=0.0, use_cache=use_cache)
        assert torch.equal(gpu.cpu(), cpu), f"CUDA tokens (use_cache={use_cache}) differ from the CPU's"


def test_compiled_decoding_as_a_cuda_graph_gives_the_eager_tokens():
    """The static-cache step compiled in 'reduce-overhead' mode (CUDA graphs): the cache updated in
    place must stay the graph's memory, step after step and after the window starts again."""
    model = random_model(dtype=torch.float32, **MODEL).cuda()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    torch._dynamo.reset()
    with full_float32(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, idx, 60, temperature=0.0, compiled=True)
    with full_float32():
        assert torch.equal(compiled, generate(model, idx, 60, temperature=0.0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl_match_one(tmp_path):
    from test_distributed import TINY, losses, torchrun
    args = [a for a in TINY if not a.startswith(("--device", "--dtype"))] + ["--device=cuda", "--dtype=float32"]
    with working_dir(tmp_path):
        run_training("chinese.py", tmp_path / "one", *args, "--max_iters=4")
    proc = torchrun(2, train_args("chinese.py", tmp_path / "two", *args, "--max_iters=4"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for it in one:
        assert abs(one[it] - two[it]) < 1e-4, f"iteration {it}: 2 GPUs {two[it]}, 1 GPU {one[it]}"
