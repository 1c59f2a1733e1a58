"""Preference tuning (DPO) and RL from rewards (GRPO): the losses against the NumPy reference, the
reference model, the data formats, and the runs (resume, rewards that misbehave)."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, random_model, run_training
from model import reference
from model.align import DPO, GRPO, Reference, adapters_off, dpo_loss, group_advantages, grpo_loss, token_logps
from model.checkpoint import load_checkpoint
from model.errors import UserError
from model.lora import LoRAConfig, add_adapters
from model.rewards import Rewards

TINY = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=12)


def logits_and_targets(seed, rows=6, T=7, V=11):
    """Random float64 logits (rows, T, V) and targets with -1 on a prompt of each row's own length."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(V, (rows, T), generator=g)
    for b in range(rows):
        y[b, :1 + b % 3] = -1  # the prompt
        y[b, T - b % 2:] = -1  # padding
    return logits, y


# ---- DPO ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_the_dpo_loss_and_its_gradient_are_the_numpy_references(loss_type, smoothing):
    """Bug: h's sign or the reference's side swapped, label smoothing on the wrong term, IPO on sums
    instead of per-token means, a log-probability taken at a padded or prompt place."""
    logits, y = logits_and_targets(0)
    ref_logits, _ = logits_and_targets(1)
    logits.requires_grad_(True)
    dpo = DPO(reference=None, beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    logps = dpo.sequence_logps(token_logps(logits, y), y)
    ref = dpo.sequence_logps(token_logps(ref_logits, y), y)
    loss, _ = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], 0.3, loss_type, smoothing)
    loss.backward()

    L, Y, R = logits.detach().numpy(), y.numpy(), ref_logits.numpy()
    count = (Y != -1).sum(-1) if loss_type == "ipo" else 1
    seq, ref_seq = reference.token_logps(L, Y).sum(-1) / count, reference.token_logps(R, Y).sum(-1) / count
    args = (seq[:3], seq[3:], ref_seq[:3], ref_seq[3:], 0.3, loss_type, smoothing)
    assert abs(loss.item() - reference.dpo_loss(*args)) < 1e-10
    dchosen, drejected = reference.dpo_loss_backward(*args)
    dlogp = (np.concatenate([dchosen, drejected]) / count)[:, None] * np.ones(Y.shape)  # each token of an answer
    assert np.abs(logits.grad.numpy() - reference.token_logps_backward(dlogp, L, Y)).max() < 1e-9


def test_dpo_at_the_start_is_log_2_with_every_reward_0_and_prompt_tokens_never_count():
    """Bug: the reference is not the start (a loss other than log 2 at step 0), or a prompt's or the
    padding's logits reach the answer's log-probability."""
    model = random_model(**TINY).train()
    x = torch.randint(11, (6, 7), generator=torch.Generator().manual_seed(0))
    _, y = logits_and_targets(2)
    dpo = DPO(Reference.copy_of(model), beta=0.1)
    loss, metrics = dpo(model, x, y)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert all(metrics[k].item() == 0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    logits = torch.randn(6, 7, 11, dtype=torch.float64)
    moved = logits.clone()
    moved[y == -1] += torch.randn_like(moved[y == -1]) * 5  # every place outside the answers
    assert torch.equal(token_logps(logits, y).sum(-1), token_logps(moved, y).sum(-1))


def test_the_lora_off_reference_is_the_frozen_base_and_the_adapters_come_back():
    """Bug: the adapters stay on in the reference (its log-probabilities the policy's), or stay off after it."""
    base = random_model(**TINY)
    frozen = Reference(None, random_model(**TINY))  # the same seed: the same weights
    add_adapters(base, LoRAConfig(rank=4, targets="all"))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))  # adapters that change the output (B starts at 0)
    x = torch.randint(11, (6, 7), generator=torch.Generator().manual_seed(0))
    _, y = logits_and_targets(3)
    policy = token_logps(base(x)[0], y)
    assert torch.equal(Reference(base).token_logps(x, y), frozen.token_logps(x, y))
    assert not torch.allclose(policy, frozen.token_logps(x, y))
    assert torch.equal(token_logps(base(x)[0], y), policy)
    with adapters_off(base):
        assert torch.equal(token_logps(base(x)[0], y), frozen.token_logps(x, y))


# ---- GRPO ---------------------------------------------------------------------------------

def test_advantages_are_per_group_and_a_group_of_equal_rewards_gives_0():
    """Bug: normalised over the whole batch, a biased std, or NaN for a group whose samples all scored alike."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    assert np.abs(adv.numpy() - reference.group_advantages(rewards.numpy(), 4)).max() < 1e-12
    assert torch.equal(adv[4:8], torch.zeros(4, dtype=torch.float64))
    assert abs(adv[:4].sum()) < 1e-12 and abs(adv[8:].sum()) < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_grpo_loss_and_its_gradient_are_the_numpy_references(beta):
    """Bug: the clipped term's gradient let through, clip applied to the advantage, the KL estimator's
    sign, the mean over sequences instead of over all completion tokens."""
    g = torch.Generator().manual_seed(0)
    logps = (torch.rand(5, 6, generator=g, dtype=torch.float64) * -3).requires_grad_(True)
    old = logps.detach() + torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = logps.detach() + torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 6, generator=g) > 0.3
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, 0.2, beta)
    loss.backward()
    args = (logps.detach().numpy(), old.numpy(), ref.numpy(), adv.numpy(), mask.numpy(), 0.2, beta)
    assert abs(loss.item() - reference.grpo_loss(*args)) < 1e-10
    assert np.abs(logps.grad.numpy() - reference.grpo_loss_backward(*args)).max() < 1e-9
    assert 0 < metrics["clip_ratio"].item() < 1


def test_the_first_step_on_a_batch_has_ratio_1_and_no_kl():
    """Bug: the sampling policy's log-probabilities taken from another model (a ratio other than 1 on
    the first step), or a KL that is not 0 while the policy is the reference."""
    model = random_model(**TINY).train()
    x = torch.randint(11, (6, 7), generator=torch.Generator().manual_seed(0))
    _, y = logits_and_targets(4)
    from model.align import Rollouts
    rollouts = Rollouts(x, y, torch.linspace(-1, 1, 6, dtype=torch.float64), None,
                        Reference.copy_of(model).token_logps(x, y), {})
    grpo = GRPO(rewards=None, reference=None, beta=0.04, epsilon=0.2)
    loss, metrics = grpo.loss_fn(rollouts)(model, x, y)
    assert metrics["kl"].item() == 0 and metrics["clip_ratio"].item() == 0
    # ratio 1, KL 0: the loss is minus the advantage-weighted token mean
    assert loss.item() == pytest.approx(-(torch.linspace(-1, 1, 6)[:, None] * (y != -1)).sum().item() / (y != -1).sum().item())


# ---- rewards ------------------------------------------------------------------------------

def test_rewards_that_misbehave_stop_with_one_line_naming_them(tmp_path):
    """Bug: a reward's exception or wrong-length answer ends in a traceback, or is silently cut to fit."""
    (tmp_path / "r.py").write_text("def boom(prompts, completions, **kw):\n    return 1 / 0\n"
                                   "def short(prompts, completions, **kw):\n    return [1.0]\n"
                                   "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(prompts)\n")
    rows = [{"prompt": "BA", "ids": [1, 0]}, {"prompt": "AB", "ids": [0, 1]}]
    for fn, message in (("boom", r"reward .*r.py:boom raised ZeroDivisionError: division by zero \(at .*r.py, line 2\)"),
                        ("short", "returned 1 values for 2 completions"), ("nan", "returned nan for completion 0")):
        with pytest.raises(UserError, match=message):
            Rewards.parse(f"{tmp_path / 'r.py'}:{fn}")(rows, ["AB", "AB"])
    for spec, message in (("nope", "give one of exact_match, sort"), (f"{tmp_path}/none.py:f", "there is no file"),
                          (f"{tmp_path / 'r.py'}:missing", "has no function missing")):
        with pytest.raises(UserError, match=message):
            Rewards.parse(spec)
    with pytest.raises(UserError, match="2 numbers for 1 rewards"):
        Rewards.parse("sort", "1,2")
    assert Rewards.parse("sort,exact_match", "1,0.5")(
        [{"prompt": "BA", "ids": [], "answer": "AB"}] * 2, ["AB", "BA"]) == [1.5, 0.0]


# ---- preference data ----------------------------------------------------------------------

def test_the_three_preference_forms_are_the_same_pairs(trained_numerals, tmp_path):
    """Bug: the implicit form's shared start taken as part of the answers, or a string prompt encoded
    without the template; the batch's rejected rows not the same prompts as its chosen rows."""
    from model.data import DataSettings
    from model.start import read_start
    from model.tasks import task_for_training
    forms = [{"prompt": "12", "chosen": "十二", "rejected": "一二"},
             {"prompt": [{"role": "user", "content": "12"}], "chosen": [{"role": "assistant", "content": "十二"}],
              "rejected": [{"role": "assistant", "content": "一二"}]},
             {"chosen": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "十二"}],
              "rejected": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "一二"}]}]
    cfg_start = type("C", (), {"init_from": str(trained_numerals[0]), "out_dir": str(tmp_path)})
    pairs = []
    for i, form in enumerate(forms):
        path = tmp_path / f"{i}.jsonl"
        path.write_text(json.dumps(form, ensure_ascii=False) + "\n" + json.dumps(
            {"prompt": "305", "chosen": "三百零五", "rejected": "三百五"}, ensure_ascii=False) + "\n", encoding="utf-8")
        task = task_for_training(DataSettings(data=str(path), val_fraction=0.0, out_dir=str(tmp_path)), read_start(cfg_start))
        pairs.append([[a.tolist() for a in answer] for pair in task.pairs["train"] for answer in pair])
    assert pairs[0] == pairs[1] == pairs[2]
    x, y = task.batch_of(task.pairs["train"])
    tok = task.tokenizer
    assert [tok.decode(r[r != -1].tolist()) for r in y] == ["十二<|end|>", "三百零五<|end|>", "一二<|end|>", "三百五<|end|>"]
    assert torch.equal(x[0, :4], x[2, :4]) and torch.equal(x[1, :6], x[3, :6])  # the same prompts


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1", "chosen": "一"}', "line 2: each line needs 'chosen' and 'rejected'"),
    ('{"prompt": "1", "chosen": "一", "rejected": [{"role": "assistant", "content": "x"}]}', "line 2: 'chosen' and 'rejected' must both be strings"),
    ('{"chosen": [{"role": "user", "content": "1"}], "rejected": [{"role": "user", "content": "1"}]}',
     "the chosen answer must be an assistant message"),
])
def test_a_bad_preference_line_names_its_file_and_line(trained_numerals, in_tmp, line, message):
    data = in_tmp / "prefs.jsonl"
    data.write_text('{"prompt": "1", "chosen": "一", "rejected": "二"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        run_training("dpo.py", in_tmp / "out", f"--init_from={trained_numerals[0]}", f"--data={data}")


# ---- the runs -----------------------------------------------------------------------------

def prefs_file(path):
    from importlib import util
    spec = util.spec_from_file_location("make", ROOT / "data" / "numerals" / "make.py")
    make = util.module_from_spec(spec)
    spec.loader.exec_module(make)
    path.write_text("".join(json.dumps({"prompt": str(n), "chosen": make.chinese(n), "rejected": make.chinese(n + 1)},
                                       ensure_ascii=False) + "\n" for n in range(0, 400, 7)), encoding="utf-8")
    return path


def weights(out_dir):
    return load_checkpoint(out_dir / "ckpt.pt").model


DPO_RUN = ("--batch_size=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1",
           "--stop_at_full_accuracy=False")


def test_dpo_resumes_exactly_and_refuses_a_reference_that_changed(trained_numerals, in_tmp):
    """Bug: the reference on resume is the resumed policy (or nothing), the batches not derived from
    the iteration, the reference's record lost with the first save."""
    data = prefs_file(in_tmp / "prefs.jsonl")
    run = lambda out, *a: run_training("dpo.py", in_tmp / out, f"--init_from={trained_numerals[0]}", f"--data={data}",  # noqa: E731
                                       "--max_iters=4", "--lr_decay_iters=4", *DPO_RUN, *a)
    straight = run("straight")
    assert straight["iter_num"] == 4 and "eval_rewards/accuracies" in straight
    rows = [json.loads(line) for line in (in_tmp / "straight" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("iter") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
    run("halves", "--max_iters=2")
    run("halves", "--init_from=resume")
    for k, v in weights(in_tmp / "straight").items():
        assert torch.equal(v, weights(in_tmp / "halves")[k]), k
    ckpt = torch.load(trained_numerals[0] / "ckpt.pt", weights_only=False)
    key = "transformer.h.0.mlp.c_fc.weight"
    moved = in_tmp / "moved"
    moved.mkdir()
    torch.save(ckpt, moved / "ckpt.pt")
    run("on_moved", f"--init_from={moved}", "--max_iters=2")
    ckpt["model"][key] = ckpt["model"][key] * 0.5  # the start retrained in place
    torch.save(ckpt, moved / "ckpt.pt")
    with pytest.raises(UserError, match="is not the one this run started from"):
        run("on_moved", "--init_from=resume")


def p_first_c(out_dir):
    """The sorter's mean probability of answering with C first, over 64 of its inputs."""
    from model.checkpoint import open_model
    opened = open_model(out_dir / "ckpt.pt", quiet=True)
    model, task = opened.model, opened.task
    x = task.inputs(torch.arange(0, 729, 11)[:64])
    with torch.no_grad():
        return torch.softmax(model(x)[0][:, -1], dim=-1)[:, 2].mean().item()


def test_grpo_raises_what_its_reward_prefers_and_resumes_exactly(in_tmp):
    """Bug: the advantage's sign, rollouts not derived from the seed and step (a resumed run samples
    anew), samples scored against another prompt's rows."""
    run_training("sort.py", in_tmp / "start", "--max_iters=2")  # a sorter that has learned next to nothing
    (in_tmp / "reward.py").write_text("def c_first(prompts, completions, **kw):\n"
                                      "    return [float(c[0] == 'C') for c in completions]\n")
    run = lambda out, *a: run_training("grpo.py", in_tmp / out, f"--init_from={in_tmp / 'start'}",  # noqa: E731
                                       f"--reward={in_tmp / 'reward.py'}:c_first", "--batch_size=4",
                                       "--num_generations=4", "--eval_interval=100", "--log_interval=1",
                                       "--learning_rate=3e-3", "--warmup_iters=1", "--max_iters=12",
                                       "--lr_decay_iters=12", "--num_iterations=2", *a)
    run("straight")
    before, after = p_first_c(in_tmp / "start"), p_first_c(in_tmp / "straight")
    assert after > before + 0.15, (before, after)
    run("halves", "--max_iters=6")
    run("halves", "--init_from=resume")
    for k, v in weights(in_tmp / "straight").items():
        assert torch.equal(v, weights(in_tmp / "halves")[k]), k


def test_dpo_under_lora_and_grpo_on_a_file_of_prompts_run_from_a_chat_model(trained_numerals, in_tmp):
    """Bug: the LoRA run's reference not the base (no log 2 at the start), a prompts file's answer
    column not scored as heldout_acc, its rows not passed to the reward."""
    numerals = trained_numerals[0]
    run_training("dpo.py", in_tmp / "lora", f"--init_from={numerals}", f"--data={prefs_file(in_tmp / 'p.jsonl')}",
                 "--lora_rank=4", "--max_iters=2", *DPO_RUN)
    rows = [json.loads(line) for line in (in_tmp / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert load_checkpoint(in_tmp / "lora" / "ckpt.pt").lora is not None
    prompts = in_tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": str(n), "answer": str(n)}) + "\n" for n in range(40)))
    summary = run_training("grpo.py", in_tmp / "grpo", f"--init_from={numerals}", f"--data={prompts}",
                           "--reward=exact_match", "--batch_size=2", "--num_generations=2", "--max_iters=1",
                           "--val_fraction=0.25")
    assert summary["heldout_acc"] == 0.0  # it answers in numerals, never with the digits
    assert summary["train_acc"] == 0.0
    with pytest.raises(UserError, match="holds prompts alone: give --reward"):
        run_training("grpo.py", in_tmp / "grpo", "--init_from=resume", "--reward=", f"--data={prompts}")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations inside TRL's config
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_dpo_batch_is_trls_loss_on_our_hugging_face_export(trained_numerals, tmp_path, loss_type):
    """Bug: our answers' tokens or template differ from what TRL tokenizes (apply_chat_template of the
    prompt, then of prompt + answer), or our loss from TRL's DPOTrainer on the same pairs."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from model.convert import main as convert_main
    from model.data import DataSettings
    from model.start import read_start
    from model.tasks import task_for_training
    numerals = trained_numerals[0]
    assert convert_main([str(numerals), str(tmp_path / "hf"), "--to=hf"]) == 0
    records = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}
               for p, c, r in (("12", "十二", "一十二"), ("305", "三百零五", "三百五"), ("7", "七", "一"), ("1010", "一千零一十", "一千一十"))]
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():  # the policy a step away from the reference, so that the loss is not log 2 alone
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1)
    trainer = DPOTrainer(model=policy, ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.3,
                                        loss_type=loss_type, report_to=[], use_cpu=True, bf16=False, seed=0),
                         train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(tmp_path / "hf"))
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(policy, batch).item()

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = type("C", (), {"init_from": str(numerals), "out_dir": str(tmp_path)})
    task = task_for_training(DataSettings(data=str(path), val_fraction=0.0, out_dir=str(tmp_path)), read_start(cfg))
    from model.checkpoint import open_model
    policy.save_pretrained(tmp_path / "policy")  # the perturbed weights, opened as every command opens a folder
    trainer.processing_class.save_pretrained(tmp_path / "policy")
    ours, frozen = open_model(tmp_path / "policy", quiet=True).model, open_model(tmp_path / "hf", quiet=True).model
    x, y = task.batch_of(task.pairs["train"])
    loss, _ = DPO(Reference(ours, frozen), beta=0.3, loss_type=loss_type)(ours, x, y)
    assert abs(loss.item() - theirs) < 1e-5, (loss.item(), theirs)


def test_the_memory_estimate_counts_dpos_frozen_reference(trained_numerals, in_tmp, monkeypatch):
    """Bug: the frozen copy of the start (a second model's weights) left out of the estimate, or
    counted under LoRA, where the reference is the policy itself."""
    from model import start
    from model.config import TrainConfig, load_config
    from conftest import train_args
    data, counted = prefs_file(in_tmp / "prefs.jsonl"), []
    real = start.check_fits
    monkeypatch.setattr(start, "check_fits", lambda config, parameters, *a: counted.append(parameters) or
                        real(config, parameters, *a))
    runs = [start.prepare_run(load_config(TrainConfig, train_args("dpo.py", in_tmp / name, f"--init_from={trained_numerals[0]}",
                                                                  f"--data={data}", *extra)))
            for name, extra in (("whole", []), ("lora", ["--lora_rank=4"]))]
    assert counted == [2 * runs[0].model.num_params(), runs[1].model.num_params()]
