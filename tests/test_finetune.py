"""Fine-tuning a trained model on a new text with new characters."""

import json

import pytest
import torch

import sample as sample_cli
from conftest import ROOT, working_dir
from model.checkpoint import load_checkpoint, tokenizer_from_checkpoint
from model.config import TrainConfig, load_config
from model.errors import UserError
from model.start import prepare_run
from model.trainer import train

POEMS = ROOT / "data" / "poems"


def finetune_args(base, out_dir, *extra):
    return [str(ROOT / "configs" / "finetune.py"), f"--init_from={base / 'out' / 'chinese'}",
            f"--data={POEMS}", f"--out_dir={out_dir}", *extra]


@pytest.fixture(scope="module")
def finetuned(trained_chinese, tmp_path_factory):
    base, _ = trained_chinese
    out = tmp_path_factory.mktemp("ft") / "finetune"
    with working_dir(base):
        summary = train(load_config(TrainConfig, finetune_args(base, out, "--max_iters=150", "--lr_decay_iters=150",
                                                               "--eval_interval=50", "--log_interval=1")))
    return base, out, summary


def test_vocabulary_grows_and_old_embeddings_are_kept_at_iteration_0(trained_chinese, tmp_path):
    base, _ = trained_chinese
    old = load_checkpoint(base / "out" / "chinese" / "ckpt.pt")
    old_tok = tokenizer_from_checkpoint(old)
    run = prepare_run(load_config(TrainConfig, finetune_args(base, tmp_path / "ft")))
    tok = run.task.tokenizer
    new_chars = set(POEMS.joinpath("input.txt").read_text(encoding="utf-8")) - set(old_tok.itos)
    assert tok.itos[:old_tok.vocab_size] == old_tok.itos, "known characters keep their ids"
    assert set(tok.itos[old_tok.vocab_size:]) == new_chars and new_chars
    wte = run.model.transformer.wte.weight.detach().cpu()
    assert torch.equal(wte[:old_tok.vocab_size], old.model["transformer.wte.weight"]), "learned rows unchanged"
    fresh = wte[old_tok.vocab_size:]
    assert abs(fresh.std().item() - 0.02) < 0.003, "new rows start like fresh embeddings, N(0, 0.02)"
    assert run.model.config.block_size == 24, "block_size=0 keeps the base model's"
    assert run.model.lm_head.weight is run.model.transformer.wte.weight


def test_block_size_can_shrink_not_grow(trained_chinese, tmp_path):
    base, _ = trained_chinese
    run = prepare_run(load_config(TrainConfig, finetune_args(base, tmp_path / "a", "--block_size=16")))
    old = load_checkpoint(base / "out" / "chinese" / "ckpt.pt").model["transformer.wpe.weight"]
    assert torch.equal(run.model.transformer.wpe.weight.detach().cpu(), old[:16]), "position embeddings cropped"
    with pytest.raises(UserError, match="block_size=32 is larger than the base model's 24"):
        prepare_run(load_config(TrainConfig, finetune_args(base, tmp_path / "b", "--block_size=32")))


def test_finetuned_loss_falls_and_samples_mix_both_texts(finetuned, capsys):
    base, out, summary = finetuned
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], f"loss on the new text did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert sample_cli.main([f"--out_dir={out}", "--start=天行健", "--max_new_tokens=100", "--num_samples=1"]) == 0
    text = capsys.readouterr().out
    old_only = set((ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8")) - set(
        (POEMS / "input.txt").read_text(encoding="utf-8"))
    new_only = set((POEMS / "input.txt").read_text(encoding="utf-8")) - set(
        (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8"))
    assert set(text) & old_only, "the prompt's characters come from the base text"
    assert set(text[3:]) & new_only, "the continuation uses characters only the new text has"


def test_a_finetune_can_be_resumed(finetuned):
    base, out, _ = finetuned
    with working_dir(base):
        summary = train(load_config(TrainConfig, finetune_args(base, out, "--init_from=resume", "--max_iters=160",
                                                               "--lr_decay_iters=150")))
    assert summary["iter_num"] == 160
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt.config["init_from"] == "resume" and ckpt.model_config.vocab_size == len(ckpt.tokenizer["itos"])


@pytest.mark.parametrize("arch", [["--positions=sinusoidal", "--norm=post", "--activation=relu"], ["--head=untied"]],
                         ids=["explainer", "untied"])
def test_models_of_every_architecture_can_be_fine_tuned(arch, tmp_path):
    """No position embeddings to crop (sinusoidal), and an untied head that grows rows of its own."""
    small = ["--n_layer=1", "--n_head=2", "--n_embd=8", "--max_iters=2", "--eval_interval=2", "--eval_iters=1"]
    with working_dir(tmp_path):
        train(load_config(TrainConfig, [str(ROOT / "configs" / "chinese.py"), f"--data={ROOT / 'data' / 'chinese'}",
                                        f"--out_dir={tmp_path / 'base'}", *small, *arch]))
        run = prepare_run(load_config(TrainConfig, [str(ROOT / "configs" / "finetune.py"), f"--data={POEMS}",
                                                    f"--init_from={tmp_path / 'base'}", f"--out_dir={tmp_path / 'ft'}"]))
    base = load_checkpoint(tmp_path / "base" / "ckpt.pt").model
    known = base["transformer.wte.weight"].size(0)
    model = run.model.cpu()
    assert model.config.vocab_size > known, "the poems' new characters joined the vocabulary"
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[name][:known], base[name]), f"{name}: known rows kept"
    untied = model.config.head == "untied"
    assert (model.lm_head.weight is not model.transformer.wte.weight) == untied, "the head stays as it was"
    if untied:
        assert not torch.equal(model.lm_head.weight[known:], model.transformer.wte.weight[known:]), "rows of its own"
