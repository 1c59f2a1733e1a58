"""Beyond one process: DDP on CPU (Gloo, two processes started by torchrun) against one
process with the same global batch, resuming with another process count, and torch.compile."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_training, train_args, working_dir
from model.checkpoint import load_checkpoint

# Two layers, dropout off (dropout masks differ per rank by design), four micro-steps an
# iteration: two per process under DDP, so the no_sync micro-step is exercised too.
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4", "--dropout=0",
        "--gradient_accumulation_steps=4", "--log_interval=1", "--eval_interval=4", "--eval_iters=2",
        "--device=cpu", "--dtype=float32"]


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def torchrun(nproc, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "tests" / "ddp_worker.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Eight iterations in one process: the run the distributed ones must reproduce."""
    base = tmp_path_factory.mktemp("one")
    with working_dir(base):
        run_training("chinese.py", base / "run", *TINY, "--max_iters=8")
    return base / "run"


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume_in_one(one_process, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, train_args("chinese.py", out, *TINY, "--max_iters=4"), tmp_path)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    assert "processes: 2" in proc.stdout
    assert proc.stdout.count("model: ") == 1, "only rank 0 prints"
    assert proc.stdout.count("iter 4: train_loss") == 1, "only rank 0 reports evaluations"
    assert proc.stderr.count("4/4 [") >= 1 and "it/s" in proc.stderr, "rank 0 shows the progress bar"

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between rank 0 and rank 1"

    expected, got = losses(one_process), losses(out)
    assert sorted(got) == [1, 2, 3, 4], f"rank 0 alone logs each iteration once, got iterations {sorted(got)}"
    for it in got:
        assert abs(got[it] - expected[it]) < 1e-6, f"iteration {it}: 2 processes {got[it]}, 1 process {expected[it]}"

    # The checkpoint of the two-process run goes on in one process, as if it had never stopped.
    with working_dir(tmp_path):
        run_training("chinese.py", out, *TINY, "--max_iters=8", "--init_from=resume")
    got = losses(out)
    for it in range(1, 9):
        assert abs(got[it] - expected[it]) < 1e-6, f"iteration {it} after resuming: {got[it]} vs {expected[it]}"
    final, straight = load_checkpoint(out / "ckpt.pt").model, load_checkpoint(one_process / "ckpt.pt").model
    for name in straight:
        torch.testing.assert_close(final[name], straight[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gradient_accumulation_must_split_across_processes():
    """The rule each torchrun process applies (the runs above show what its processes share)."""
    from model.config import TrainConfig
    from model.errors import UserError
    from model.runtime import Runtime
    from model.start import micro_steps
    two = Runtime("cpu", "cpu", torch.float32, ddp=True, world_size=2)
    with pytest.raises(UserError, match=r"gradient_accumulation_steps=3 must be a multiple of the number of "
                                        r"processes \(2\) or less than it"):
        micro_steps(TrainConfig(gradient_accumulation_steps=3), two)
    assert micro_steps(TrainConfig(gradient_accumulation_steps=4), two) == 4


@pytest.mark.slow
def test_default_accumulation_under_torchrun_takes_one_micro_batch_per_process(tmp_path):
    """`torchrun --nproc_per_node=2 train.py CONFIG` with gradient_accumulation_steps=1 trains: each
    process takes one micro-batch, so a step is the one-process step with two micro-batches."""
    args = [*TINY, "--max_iters=3", "--eval_interval=3"]
    proc = torchrun(2, train_args("chinese.py", tmp_path / "two", *args, "--gradient_accumulation_steps=1"), tmp_path)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("notice: gradient_accumulation_steps=1 is less than the 2 processes") == 1, proc.stdout
    assert "a step sees batch_size x 2 = 8 sequences" in proc.stdout
    with working_dir(tmp_path):
        run_training("chinese.py", tmp_path / "one", *args, "--gradient_accumulation_steps=2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for it in one:
        assert abs(one[it] - two[it]) < 1e-6, f"iteration {it}: 2 processes {two[it]}, 1 process {one[it]}"


@pytest.mark.slow
def test_compile_gives_the_eager_losses_on_cpu(one_process, tmp_path):
    with working_dir(tmp_path):
        run_training("chinese.py", tmp_path / "run", *TINY, "--max_iters=3", "--compile=True")
    expected, got = losses(one_process), losses(tmp_path / "run")
    for it in (1, 2, 3):
        assert abs(got[it] - expected[it]) < 1e-5, f"iteration {it}: compiled {got[it]}, eager {expected[it]}"
