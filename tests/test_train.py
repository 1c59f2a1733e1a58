"""Training runs end to end: the built-in configs learn, checkpoints hold what they promise,
and a resumed run continues exactly."""

import json

import torch

import train as train_cli
from conftest import ROOT, assert_writes_each_line, run_training, train_args, working_dir
from model.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint

CORPUS = (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8")


def test_corpus_is_the_three_lines_verbatim():
    assert CORPUS == "白日依山尽,黄河入海流。\n马无夜草不肥,人无横财不富。\n天行健,君子以自强不息,地势坤,君子以厚德载物。\n"


def test_sort_config_reaches_full_heldout_accuracy(trained_sort):
    base, summary = trained_sort
    assert summary["heldout_acc"] == 1.0, f"held-out exact match {summary['heldout_acc']:.1%}"
    assert summary["stopped"] == "heldout_acc 100%" and summary["iter_num"] < 2000
    ckpt = load_checkpoint(base / "out" / "sort" / "ckpt.pt")
    assert model_from_checkpoint(ckpt).num_params() == 85_584


def test_chinese_config_learns_the_corpus(trained_chinese):
    base, _ = trained_chinese
    tok = tokenizer_from_checkpoint(load_checkpoint(base / "out" / "chinese" / "ckpt.pt"))
    assert tok.itos == sorted(set(CORPUS)), "vocabulary: the sorted set of the corpus's characters"
    assert_writes_each_line(base / "out" / "chinese")


def test_checkpoint_contents(trained_sort):
    base, _ = trained_sort
    path = base / "out" / "sort" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)  # no pickled code needed to read it
    assert {"model", "model_args", "optimizer", "iter_num", "best_val_loss", "config", "tokenizer", "task"} <= set(ckpt)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_args"]["n_embd"] == 48 and ckpt["model_args"]["block_size"] == 11
    assert ckpt["tokenizer"] == {"type": "char", "itos": ["A", "B", "C"]}
    assert ckpt["task"]["type"] == "sort" and len(ckpt["task"]["heldout"]) == 146
    assert ckpt["config"]["out_dir"].endswith("sort") and ckpt["config"]["block_size"] == 11
    assert (base / "out" / "latest.txt").read_text().strip() == str(path.resolve())
    rows = [json.loads(line) for line in (base / "out" / "sort" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("heldout_acc" in r for r in rows)
    assert not list(path.parent.glob("*.tmp")), "no temporary file left behind"


def per_step_losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps: bit-identical losses and parameters
    (dropout on, so the random state has to come back too)."""
    small = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--dropout=0.1",
             "--log_interval=1", "--eval_interval=3", "--eval_iters=2", "--batch_size=4",
             "--gradient_accumulation_steps=2", "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=2"]
    with working_dir(tmp_path):
        run_training("chinese.py", tmp_path / "straight", *small)
        run_training("chinese.py", tmp_path / "halves", *small, "--max_iters=3")
        run_training("chinese.py", tmp_path / "halves", *small, "--init_from=resume")
    straight = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    halves = load_checkpoint(tmp_path / "halves" / "ckpt.pt")
    assert halves.iter_num == straight.iter_num == 6
    assert per_step_losses(tmp_path / "straight") == per_step_losses(tmp_path / "halves")
    for k, v in straight.model.items():
        assert torch.equal(v, halves.model[k]), f"{k} differs after resume"


def test_train_cli_reports_user_errors(capsys, in_tmp):
    assert train_cli.main(["configs/nope.py"]) == 2
    assert "error: config file configs/nope.py not found" in capsys.readouterr().err
    assert train_cli.main([str(ROOT / "configs" / "sort.py"), "--n_embd=50"]) == 2
    assert "n_embd=50 is not divisible by n_head=3" in capsys.readouterr().err


def test_resume_without_checkpoint_says_so(capsys, in_tmp):
    assert train_cli.main([str(ROOT / "configs" / "sort.py"), "--out_dir=empty", "--init_from=resume"]) == 2
    assert "checkpoint empty/ckpt.pt not found" in capsys.readouterr().err


def test_micro_batches_of_a_step_differ_and_are_those_their_seeds_give(tmp_path):
    """Bug: the micro-step index dropped from the batch seed, so every micro-batch of an iteration is
    the same batch (gradient accumulation then averages one batch with itself)."""
    from model.config import TrainConfig, load_config
    from model.start import prepare_run
    from model.trainer import derived_seed, micro_batches
    cfg = load_config(TrainConfig, train_args("chinese.py", tmp_path / "run", "--n_layer=1", "--n_embd=16",
                                              "--n_head=2", "--block_size=8", "--gradient_accumulation_steps=3"))
    with working_dir(tmp_path):
        run = prepare_run(cfg)
    batches = micro_batches(run, 7)
    assert len(batches) == 3
    for m, (x, y) in enumerate(batches):
        ex, ey = run.task.get_batch("train", cfg.batch_size, torch.Generator().manual_seed(derived_seed(cfg.seed, 7, m)))
        assert torch.equal(x, ex) and torch.equal(y, ey), f"micro-batch {m} is not the one seeded (seed, 7, {m})"
    assert not torch.equal(batches[0][0], batches[1][0]) and not torch.equal(batches[1][0], batches[2][0])
    assert not torch.equal(micro_batches(run, 8)[0][0], batches[0][0]), "each iteration draws new batches"


def test_the_loop_reads_the_loss_only_to_log_evaluate_or_stop(tmp_path, monkeypatch):
    """Bug: loss.item() on every iteration (a host-device sync per step on a GPU, which nanoGPT
    avoids): the loss is read at iteration 1, every log_interval, and at evaluations."""
    import model.trainer as trainer
    read_at = []
    real = trainer.reduce_across_ranks

    def recording(rt, loss, stop):
        read_at.append(len(steps))
        return real(rt, loss, stop)

    steps = []
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    monkeypatch.setattr(trainer, "reduce_across_ranks", recording)
    with working_dir(tmp_path):
        run_training("chinese.py", tmp_path / "run", "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=8",
                     "--eval_iters=1", "--max_iters=12", "--log_interval=5", "--eval_interval=6")
    assert read_at == [1, 5, 6, 10, 12]


def test_the_report_is_written_from_the_run_in_memory(tmp_path, monkeypatch):
    """Bug: the report reloads the checkpoint from disk through the generic opener (GPT-2 folder
    detection, tokenizer files) though the model, tokenizer and task are in memory."""
    import model.checkpoint as checkpoint

    def no_reading(*a, **kw):
        raise AssertionError("a checkpoint was read back from disk")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_reading)
    monkeypatch.setattr(checkpoint, "open_model", no_reading)
    with working_dir(tmp_path):
        summary = run_training("chinese.py", tmp_path / "run", "--n_layer=1", "--n_embd=16", "--n_head=2",
                               "--block_size=8", "--eval_iters=1", "--max_iters=2", "--eval_interval=2")
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert summary["report"].endswith("report.md") and "## Samples (the model at iteration 2)" in report
