"""LoRA adapters and gradient checkpointing: the model starts equal to its base, only the adapters
learn, adapter checkpoints resume exactly and open anywhere, and peft reads what we write."""

import contextlib
import json

import pytest
import torch

import sample as sample_cli
from conftest import LLAMA_ARCH, ROOT, random_model, run_training, working_dir
from model.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from model.convert import main as convert_main
from model.gpt import GPT, GPTConfig
from model.lora import LoRAConfig, add_adapters, merge_adapters

LORA = ["--lora_rank=4", "--lora_alpha=8", "--lora_targets=all", "--eval_iters=2", "--log_interval=1",
        "--batch_size=8", "--warmup_iters=2"]


def lora_run(base, out, *extra):
    """A LoRA fine-tune of the Chinese model on its own text (no new characters)."""
    with working_dir(out.parent):
        return run_training("finetune.py", out, f"--init_from={base / 'out' / 'chinese'}",
                            f"--data={ROOT / 'data' / 'chinese'}", "--val_fraction=0", *LORA, *extra)


@pytest.mark.parametrize("arch", [{}, dict(LLAMA_ARCH, n_kv_head=1)], ids=["gpt2", "llama"])
def test_adapters_start_at_zero_and_merge_into_the_same_model(arch):
    """Bug: B not zero at the start (the fine-tune would not start from its base), or a merge that
    is not W + (alpha / r) B A."""
    model = random_model(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=8, dtype=torch.float32, **arch)
    x = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(0))
    base, _ = model(x)
    add_adapters(model, LoRAConfig(rank=3, alpha=6.0, targets="all"))
    assert torch.equal(model(x)[0], base), "zero-initialised adapters leave the logits unchanged"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted, _ = model(x)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merge_adapters(model)(x)[0], adapted, rtol=1e-6, atol=1e-6)


def test_only_the_adapters_learn_and_the_checkpoint_holds_only_them(trained_chinese, tmp_path):
    base, _ = trained_chinese
    summary = lora_run(base, tmp_path / "lora", "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2")
    ckpt = load_checkpoint(tmp_path / "lora" / "ckpt.pt")
    base_ckpt = load_checkpoint(base / "out" / "chinese" / "ckpt.pt")
    assert ckpt.lora.base == str((base / "out" / "chinese" / "ckpt.pt").resolve())
    assert ckpt.model and all(".lora_A." in k or ".lora_B." in k for k in ckpt.model)
    assert len(ckpt.optimizer["state"]) == len(ckpt.model), "AdamW state for the adapters only"
    size, base_size = (tmp_path / "lora" / "ckpt.pt").stat().st_size, (base / "out" / "chinese" / "ckpt.pt").stat().st_size
    assert size < base_size / 2, f"adapter checkpoint {size} bytes, base {base_size}"
    model = model_from_checkpoint(ckpt)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, base_ckpt.model[name]), f"{name}: a base weight changed"
    assert summary["loss"] < 1.0


def test_an_adapter_checkpoint_resumes_exactly(trained_chinese, tmp_path):
    base, _ = trained_chinese
    lora_run(base, tmp_path / "straight", "--max_iters=6", "--eval_interval=3", "--lora_dropout=0.1")
    lora_run(base, tmp_path / "halves", "--max_iters=3", "--eval_interval=3", "--lora_dropout=0.1")
    with working_dir(tmp_path):
        run_training("finetune.py", tmp_path / "halves", "--init_from=resume", f"--data={ROOT / 'data' / 'chinese'}",
                     "--val_fraction=0", "--max_iters=6", "--eval_interval=3", *LORA[3:])
    a, b = (load_checkpoint(tmp_path / n / "ckpt.pt") for n in ("straight", "halves"))
    assert b.iter_num == 6 and b.lora == a.lora
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), f"{k} differs after resume"


# peft itself still calls a transformers API that transformers 5 deprecates; our code does not
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_an_adapter_checkpoint_samples_and_exports_merged_and_as_peft(trained_chinese, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, _ = trained_chinese
    lora_run(base, tmp_path / "lora", "--max_iters=20", "--eval_interval=20", "--learning_rate=1e-2")
    capsys.readouterr()
    assert sample_cli.main([f"--out_dir={tmp_path / 'lora'}", "--start=天行健", "--max_new_tokens=5",
                            "--num_samples=1"]) == 0
    assert capsys.readouterr().out.startswith("天行健")
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "lora" / "ckpt.pt")).eval()
    x = torch.randint(39, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, _ = ours(x)
    assert convert_main([str(tmp_path / "lora"), str(tmp_path / "merged"), "--to=hf"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert convert_main([str(base / "out" / "chinese"), str(tmp_path / "base-hf"), "--to=hf"]) == 0
    assert convert_main([str(tmp_path / "lora"), str(tmp_path / "adapters"), "--to=peft"]) == 0
    with_peft = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf"), tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(with_peft(x).logits, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


@pytest.mark.parametrize("arch", [{}, dict(LLAMA_ARCH, n_kv_head=1)], ids=["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    """Bug: a recomputed block that draws other dropout masks, or skips the cache of RoPE tables."""
    grads = []
    for checkpointing in (False, True):
        model = random_model(n_layer=3, n_head=2, n_embd=16, vocab_size=11, block_size=8, dtype=torch.float32,
                             dropout=0.1, gradient_checkpointing=checkpointing, **arch).train()
        x = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        model(x, x)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-6, msg=name)


def test_adapters_whose_base_changed_are_refused_in_one_line_naming_it(trained_chinese, tmp_path, capsys):
    """Bug: the base trained further in place (or replaced by another model) after the adapters were
    trained on it, and the adapters opened or resumed on it silently; or a base of another shape
    blamed on the adapter checkpoint's own model_args."""
    import shutil

    import train as train_cli
    base, _ = trained_chinese
    shutil.copytree(base / "out" / "chinese", tmp_path / "base")
    with working_dir(tmp_path):
        run_training("finetune.py", tmp_path / "lora", f"--init_from={tmp_path / 'base'}", "--val_fraction=0",
                     *LORA, "--max_iters=4", "--eval_interval=4")
    assert load_checkpoint(tmp_path / "lora" / "ckpt.pt").lora.base_digest, "the checkpoint says what its base was"
    sample = [f"--out_dir={tmp_path / 'lora'}", "--start=天", "--max_new_tokens=3"]
    assert sample_cli.main(sample) == 0
    capsys.readouterr()
    on_disk = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    on_disk["model"]["transformer.h.0.mlp.c_fc.weight"] += 0.01  # trained a little further, in place
    torch.save(on_disk, tmp_path / "base" / "ckpt.pt")
    refused = f"the adapters' base model {(tmp_path / 'base' / 'ckpt.pt').resolve()} is not the one they were trained on"
    assert sample_cli.main(sample) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert refused in err[-1] and "--allow_changed_base=True" in err[-1] and len(err) == 2, err  # checkpoint:, error:
    resume = [str(ROOT / "configs" / "finetune.py"), f"--out_dir={tmp_path / 'lora'}", "--init_from=resume",
              f"--data={ROOT / 'data' / 'chinese'}", "--val_fraction=0", "--max_iters=6", "--eval_interval=6"]
    with working_dir(tmp_path):
        assert train_cli.main(resume) == 2 and refused in capsys.readouterr().err
        assert train_cli.main(resume + ["--allow_changed_base=True"]) == 0
    assert sample_cli.main(sample + ["--allow_changed_base=True"]) == 0
    other = random_model(n_layer=1, n_head=2, n_embd=16, vocab_size=len(on_disk["tokenizer"]["itos"]), block_size=8,
                         dtype=torch.float32)
    save_checkpoint(Checkpoint(other.state_dict(), other.config, on_disk["tokenizer"], on_disk["task"]),
                    tmp_path / "base" / "ckpt.pt")  # another model in its place
    capsys.readouterr()
    assert sample_cli.main(sample) == 2 and refused in capsys.readouterr().err


def test_the_chunked_loss_is_the_loss_and_gives_its_gradients():
    """Bug: chunks averaged instead of summed and divided by the counted targets once (chunks of other
    sizes or with -1 targets weigh wrong), or a chunk dropped at the end."""
    model = random_model(n_layer=1, n_head=2, n_embd=16, vocab_size=11, block_size=8, dtype=torch.float64).train()
    x = torch.randint(11, (3, 8), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, :5] = -1  # not in the loss, as a prompt's targets
    hidden = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)
    whole = torch.nn.functional.cross_entropy(model.lm_head(hidden).view(-1, 11), y.view(-1), ignore_index=-1)
    chunked = model.chunked_loss(hidden, y, chunk=5)  # 24 tokens: chunks of 5, 5, 5, 5, 4
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert torch.allclose(*(torch.autograd.grad(loss, hidden)[0] for loss in (chunked, whole)), rtol=0, atol=1e-12)
    model.config.gradient_checkpointing = True
    logits, loss = model(x, y)
    assert logits is None, "training with checkpointing never makes the whole (B, T, V) logits"
    model.config.gradient_checkpointing = False
    torch.testing.assert_close(loss, model(x, y)[1], rtol=0, atol=1e-12)


def test_lora_from_scratch_and_bad_targets_are_one_line(in_tmp, trained_chinese, capsys):
    import train as train_cli
    assert train_cli.main([str(ROOT / "configs" / "chinese.py"), "--lora_rank=4"]) == 2
    assert "LoRA adapts a trained model: give the base with --init_from" in capsys.readouterr().err
    base, _ = trained_chinese
    assert train_cli.main([str(ROOT / "configs" / "finetune.py"), f"--init_from={base / 'out' / 'chinese'}",
                           f"--data={ROOT / 'data' / 'chinese'}", "--lora_rank=4", "--lora_targets=wq"]) == 2
    assert "--lora_targets='wq' names no layer of this model" in capsys.readouterr().err


MEASURE = """
import json, sys, torch
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
from model.lora import LoRAConfig, add_adapters
from model.memory import estimate
from model.runtime import peak_memory_mb
from model.trainer import train_step
config = GPTConfig(**json.loads(sys.argv[1]))
model = GPT(config).train()
if sys.argv[2] == "lora":
    add_adapters(model, LoRAConfig(rank=8, targets="all"))
trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
batch = int(sys.argv[3])
x = torch.randint(config.vocab_size, (batch, config.block_size + 1))
train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], 1e-4, 1.0)
print(json.dumps({{"estimate": estimate(config, model.num_params(), trained, batch).total, "peak": peak_memory_mb("cpu")}}))
"""


PEAKS = {  # case -> (shape, mode, batch)
    "full": (dict(n_layer=4, n_head=12, n_embd=768, vocab_size=16384, block_size=256), "full", 2),
    "lora": (dict(n_layer=6, n_head=8, n_kv_head=2, n_embd=512, intermediate_size=1408, vocab_size=32768,
                  block_size=256, positions="rope", normalization="rmsnorm", mlp="gated", activation="silu", bias=False),
             "lora", 2),
    # GPT-2's vocabulary with checkpointing: the (B, T, V) logits would be 1.2 GB of the peak were the loss not
    # computed 256 tokens at a time (the estimate, which counts one chunk, was then half the peak)
    "checkpointing": (dict(n_layer=4, n_head=4, n_embd=256, vocab_size=50304, block_size=256, gradient_checkpointing=True),
                      "full", 8)}


@pytest.fixture(scope="module")
def peaks():
    """The three measurements, started at once: each in a process of its own, whose peak is its own alone."""
    import subprocess
    import sys
    return {case: subprocess.Popen([sys.executable, "-c", MEASURE.format(root=str(ROOT)), json.dumps(shape), mode,
                                    str(batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for case, (shape, mode, batch) in PEAKS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", PEAKS)
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peak(peaks, case):
    out, err = peaks[case].communicate(timeout=300)
    assert peaks[case].returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.75 < result["estimate"] / result["peak"] < 1.25, result


def saved_floats(model, x, y=None, inside=None):
    """Floats autograd keeps for backward (parameters left out) in one forward pass; with `inside`, only
    while inside those modules."""
    saved, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    handles = [h for m in inside or () for h in (m.register_forward_pre_hook(lambda *a: hooks.__enter__()),
                                                 m.register_forward_hook(lambda *a: hooks.__exit__(None, None, None)))]
    with hooks if inside is None else contextlib.nullcontext():
        _, loss = model(x, y)
    for h in handles:
        h.remove()
    return sum(saved.values()), loss


@pytest.mark.parametrize("arch", [{}, dict(LLAMA_ARCH, n_kv_head=2)], ids=["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_part_of_the_memory_estimate_is_the_real_tensors(arch, lora):
    """Bug: a part counted wrong that the total's 25% hides: gradients or AdamW's moments for every
    parameter under LoRA, one moment instead of two, the feed-forward's hidden or the logits' copies
    left out of the activations."""
    from model.memory import estimate
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=64, **arch)
    model = GPT(config).train()
    if lora:
        add_adapters(model, LoRAConfig(rank=8, targets="all"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(config.vocab_size, (2, config.block_size + 1))
    e = estimate(config, model.num_params(), sum(p.numel() for p in trained), 2)
    blocks, _ = saved_floats(model, x[:, :-1], inside=model.transformer.h)
    without_loss, _ = saved_floats(model, x[:, :-1])
    with_loss, loss = saved_floats(model, x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    mb = lambda n: n * 4 / 2 ** 20  # noqa: E731  float32
    assert e.weights == mb(sum(p.numel() for p in model.parameters())), "every weight, frozen or not"
    assert e.gradients == mb(sum(p.grad.numel() for p in trained)), "a gradient for what trains, only"
    assert e.optimizer == mb(sum(v.numel() for st in optimizer.state.values() for k, v in st.items()
                                 if k in ("exp_avg", "exp_avg_sq"))), "AdamW's two moments of what trains"
    assert 1.0 <= e.kept / mb(blocks) <= 1.5, (e.kept, mb(blocks))
    log_softmax = 2 * config.block_size * config.vocab_size  # what the loss keeps, (B T, V), and one scalar
    assert with_loss - without_loss == log_softmax + 1
    assert e.logits == mb(3 * log_softmax), "the log-softmax kept, the logits and their gradient beside it in backward"


def test_a_run_that_would_not_fit_names_the_options_that_would(trained_chinese, tmp_path, monkeypatch, capsys):
    """Bug: a run that cannot fit starts anyway and dies of memory an hour later."""
    import model.memory as memory
    import train as train_cli
    base, _ = trained_chinese
    monkeypatch.setattr(memory, "available_mb", lambda device: 315.0)  # the process alone is counted as 300
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={base / 'out' / 'chinese'}",
            f"--data={ROOT / 'data' / 'chinese'}", f"--out_dir={tmp_path / 'ft'}", "--batch_size=64"]
    with working_dir(tmp_path):
        assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: this run needs about") and "and 315 MB are available; options that fit:" in err
    assert "--lora_rank=8 --lora_targets=all --gradient_checkpointing=True" in err and "--batch_size=" in err
    assert not (tmp_path / "ft" / "ckpt.pt").exists()


def test_lora_under_bfloat16_keeps_the_frozen_base_in_bfloat16(trained_chinese, tmp_path):
    """--dtype=bfloat16: the base never changes, so it is kept in bfloat16 (half the memory); the
    adapters and their AdamW state stay float32; training still learns and saves float32 adapters."""
    from model.config import TrainConfig, load_config
    from model.start import prepare_run
    base, _ = trained_chinese
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={base / 'out' / 'chinese'}",
            f"--data={ROOT / 'data' / 'chinese'}", f"--out_dir={tmp_path / 'bf16'}", "--val_fraction=0", "--device=cpu",
            "--dtype=bfloat16", *LORA]
    with working_dir(tmp_path):
        run = prepare_run(load_config(TrainConfig, args))
    dtypes = {(p.requires_grad, p.dtype) for p in run.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    summary = lora_run(base, tmp_path / "bf16", "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2",
                       "--device=cpu", "--dtype=bfloat16")
    assert summary["loss"] < 1.0
    ckpt = load_checkpoint(tmp_path / "bf16" / "ckpt.pt")
    assert {v.dtype for v in ckpt.model.values()} == {torch.float32}
