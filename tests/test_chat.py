"""Teaching a model to answer: .jsonl pairs and conversations, the loss on answers only, the end of
turn, sampling and --chat, and the template as transformers reads it."""

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample as sample_cli
import train as train_cli
from conftest import CHAT_DATA, ROOT, command, run_training, working_dir
from model.checkpoint import load_checkpoint, open_model
from model.engine import complete
from model.tasks.template import ChatTemplate
from model.terminal import fit
from model.tokenizer import CharTokenizer, tokenizer_from_dict

SMALL = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=48", "--batch_size=4", "--eval_iters=1"]


def conversations():
    return [json.loads(line)["messages"] for line in CHAT_DATA.read_text(encoding="utf-8").splitlines()]


# ---- the template and the loss -----------------------------------------------------------

def test_the_loss_is_the_mean_over_the_answer_tokens_by_hand(tmp_path):
    """Bug: the loss taken on the template's markers, the user's turn, or without the end of
    turn (the model would never learn to stop)."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "ab", "completion": "bba"}\n' * 4, encoding="utf-8")
    from model.config import TrainConfig
    from model.start import Start
    from model.tasks import task_for_training
    task = task_for_training(TrainConfig(data=str(tmp_path / "d.jsonl"), out_dir=str(tmp_path / "o"),
                                         val_fraction=0.0, block_size=16), Start("scratch"))
    tok = task.tokenizer
    U, A, E = (tok.special_id(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    a, b = tok.stoi["a"], tok.stoi["b"]
    assert task.data["train"].example(0)[0].tolist() == [U, a, b, E, A, b, b, a, E]
    x, y = task.get_batch("train", 1, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    from model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=task.model_vocab_size))
    logits, loss = model(x, y)
    logp = F.log_softmax(logits[0].double(), dim=-1)
    ids = [U, a, b, E, A, b, b, a, E]
    answer = [(t, ids[t + 1]) for t in range(4, 8)]  # after <|assistant|>: b, b, a and the end of turn
    by_hand = -sum(logp[t, target] for t, target in answer) / len(answer)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_a_batch_of_examples_of_different_lengths_pads_outside_the_loss(tmp_path):
    """Bug: padding taken as targets (the end-of-turn id it is written with, after the answer), an
    answer's last target (its end of turn) cut, or a prompt token in the loss, once the examples of a
    batch differ in length (every other batch test uses examples of one length)."""
    from model.config import TrainConfig
    from model.start import Start
    from model.tasks import task_for_training
    answers = {"a" * n: "b" * (7 - n) + "a" * n for n in range(1, 7)}  # prompts of 1-6 letters, answers of 7
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                              for p, c in answers.items()), encoding="utf-8")
    task = task_for_training(TrainConfig(data=str(tmp_path / "d.jsonl"), out_dir=str(tmp_path / "o"), val_fraction=0.0,
                                         block_size=32), Start("scratch"))
    tok, end = task.tokenizer, task.end
    x, y = task.get_batch("train", 24, torch.Generator().manual_seed(0))
    assert len({(row != end).sum().item() for row in x}) > 1, "the batch mixes lengths"
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        prompt = tok.decode(row_x[1:row_x.index(end)])  # <|user|> PROMPT <|end|> <|assistant|> ANSWER <|end|>
        ids = task.template.encode(tok, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answers[prompt]}])[0]
        n = len(ids) - 1
        assert row_x == ids[:-1] + [end] * (len(row_x) - n), "the example, then padding"
        answer_from = ids.index(tok.special_id("<|assistant|>"))
        assert row_y == [-1] * answer_from + ids[answer_from + 1:] + [-1] * (len(row_y) - n), \
            "targets: the answer and its end of turn only; -1 on the prompt and on the padding"


def test_the_held_out_examples_are_a_fixed_share_never_trained_on(tmp_path):
    """Bug: held-out examples drawn into training batches, a share other than val_fraction, or a split
    that moves with anything but the seed (so a resumed or repeated run would train on its test)."""
    from model.config import TrainConfig
    from model.start import Start
    from model.tasks import task_for_training
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": str(i), "completion": str(i)[::-1] + "x"}) + "\n"
                                              for i in range(100, 150)), encoding="utf-8")

    def split(seed, out):
        task = task_for_training(TrainConfig(data=str(tmp_path / "d.jsonl"), out_dir=str(tmp_path / out), seed=seed,
                                             val_fraction=0.2, block_size=16), Start("scratch"))
        prompts = {s: {task.tokenizer.decode(p[1:-2]) for p, _ in task.answers(s)} for s in ("train", "val")}
        return task, prompts

    task, first = split(1337, "a")
    assert len(first["val"]) == 10 and len(first["train"]) == 40 and not first["val"] & first["train"]
    assert first["val"] | first["train"] == {str(i) for i in range(100, 150)}
    x, _ = task.get_batch("train", 512, torch.Generator().manual_seed(0))
    drawn = {task.tokenizer.decode(row[1:4]) for row in x.tolist()}  # <|user|> and the prompt's three digits
    assert drawn <= first["train"] and len(drawn) == 40, "training batches draw every training example, none held out"
    assert split(1337, "b")[1] == first, "the same seed, the same split (another out_dir)"
    assert split(7, "c")[1]["val"] != first["val"], "another seed, another split"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_text_that_spells_a_marker_stays_plain_text(kind):
    """Bug: a user's text containing '<|end|>' or '<|endoftext|>' becomes the special token and
    ends the turn (or the whole conversation) early."""
    text = "say <|user|> and <|end|> and <|endoftext|> 天行健"
    if kind == "char":
        base = CharTokenizer.from_text(text)
    else:
        pytest.importorskip("tokenizers")
        from model.tokenizer import train_bpe
        base = train_bpe(iter([text * 20]), 270)
    template, tok = ChatTemplate.for_tokenizer(base)
    specials = {tok.special_id(t) for t in template.special_tokens()}
    assert None not in specials and len(specials) == 4
    ids = tok.encode(text)
    assert not specials & set(ids) and tok.decode(ids) == text
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(text) == ids and {again.special_id(t) for t in template.special_tokens()} == specials


def test_template_round_trips_as_plain_data():
    template, tok = ChatTemplate.for_tokenizer(CharTokenizer.from_text("天行健 hello, be brief"))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "天行健"}]
    again = ChatTemplate.from_dict(json.loads(json.dumps(template.to_dict())))
    assert again == template and again.encode(tok, messages) == template.encode(tok, messages)
    ids, in_loss = template.encode(tok, messages, generation_prompt=False)
    assert tok.decode(ids) == "<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>天行健<|end|>"
    assert [tok.decode([i]) for i, keep in zip(ids, in_loss) if keep] == ["天", "行", "健", "<|end|>"]


# ---- bad data ------------------------------------------------------------------------------

@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "completion": "b"', "line 2: not JSON"),
    ('{"question": "a", "answer": "b"}', "line 2: each line needs 'prompt' and 'completion', or 'messages'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 must be {\"role\": one of system, user"),
    ('{"prompt": "a", "completion": ""}', "line 2: the completion is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the conversation has no assistant message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', "line 2: message 1 is a system message; only the first"),
    ('{"prompt": 3, "completion": "b"}', "line 2: 'prompt' and 'completion' must be strings"),
])
def test_a_bad_line_names_its_file_and_line_and_leaves_nothing_to_reuse(line, message, in_tmp, capsys):
    data = in_tmp / "d.jsonl"
    data.write_text('{"prompt": "ab", "completion": "ba"}\n' + line + "\n", encoding="utf-8")
    assert train_cli.main([f"--data={data}", "--out_dir=run", *SMALL, "--max_iters=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {data}, ") and message in err[-1], err[-1]
    assert not (in_tmp / "run" / "prepared" / "meta.json").exists(), "nothing half-prepared to reuse"


def test_examples_too_long_are_left_out_with_one_notice(in_tmp, capsys):
    data = in_tmp / "d.jsonl"
    data.write_text('{"prompt": "ab", "completion": "ba"}\n' * 3 + '{"prompt": "ab", "completion": "' + "b" * 60
                    + '"}\n', encoding="utf-8")
    assert train_cli.main([f"--data={data}", "--out_dir=run", *SMALL, "--max_iters=2", "--val_fraction=0"]) == 0
    err = capsys.readouterr().err
    assert err.count("notice: 1 examples are longer than block_size + 1 = 49 tokens and are left out") == 1, err


# ---- the shipped examples ------------------------------------------------------------------

def test_numerals_reach_full_heldout_exact_match(trained_numerals):
    out, summary = trained_numerals
    assert summary["heldout_acc"] >= 0.99, f"held-out exact match {summary['heldout_acc']:.1%}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout_acc" in r for r in rows)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| held-out exact match | " in report and "of 1000 completions |" in report
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["task"]["type"] == "chat" and ckpt["task"]["pairs"] is True


def test_a_reply_stops_at_the_end_of_turn(trained_numerals, capsys):
    """Bug: generation runs on to max_new_tokens past the end of turn, or prints the template."""
    out, _ = trained_numerals
    assert sample_cli.main([f"--out_dir={out}", "--start=1010", "--temperature=0", "--num_samples=1"]) == 0
    assert capsys.readouterr().out == "一千零一十\n"
    opened = open_model(out, quiet=True)
    task = opened.task
    ids, room, _ = fit(task, [{"role": "user", "content": "305"}], 50)
    row = complete(opened.model, [ids], replace(task.rules, max_tokens=room, temperature=0))[0]
    assert row == opened.tokenizer.encode("三百零五") + [task.end], "stops right after the end of turn"


def test_the_chat_model_answers_its_conversations(trained_chat, capsys):
    for messages in conversations():
        if len(messages) == 2:
            question, answer = messages[0]["content"], messages[1]["content"]
            assert sample_cli.main([f"--out_dir={trained_chat}", f"--start={question}", "--temperature=0",
                                    "--num_samples=1"]) == 0
            assert capsys.readouterr().out == answer + "\n", question


def test_chat_from_a_pipe_keeps_the_history(trained_chat, monkeypatch, capsys):
    """Bug: each turn answered without the turns before it, or the template's tokens printed."""
    import model.terminal as terminal
    prompts, real = [], terminal.fit
    monkeypatch.setattr(terminal, "fit", lambda task, messages, n: prompts.append(list(messages)) or real(task, messages, n))
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n天行健的下一句是什么?\n谢谢\n"))
    assert sample_cli.main([f"--out_dir={trained_chat}", "--chat", "--temperature=0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["你好!我是一个很小的GPT,有什么可以帮你?", "君子以自强不息。", "不客气!"]
    assert [m["content"] for m in prompts[2]] == ["你好", "你好!我是一个很小的GPT,有什么可以帮你?", "天行健的下一句是什么?",
                                                  "君子以自强不息。", "谢谢"], "the third turn sees the first two"


def test_a_conversation_longer_than_the_training_ones_is_said_once(trained_chat, trained_numerals, monkeypatch, capsys):
    """Bug: a model trained on conversations of at most three exchanges is given a longer history without
    a word (its replies degrade); or the notice repeats every turn."""
    assert torch.load(trained_chat / "ckpt.pt", weights_only=True)["task"]["turns"] == 3
    assert torch.load(trained_numerals[0] / "ckpt.pt", weights_only=True)["task"]["turns"] == 1
    five = "你好\n天行健的下一句是什么?\n谢谢\n你好\n谢谢\n"  # the training conversation, then two exchanges more
    monkeypatch.setattr(sys, "stdin", io.StringIO(five + "/reset\n" + five))
    assert sample_cli.main([f"--out_dir={trained_chat}", "--chat", "--temperature=0", "--max_new_tokens=8"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 10 and "dropped" not in err, "every message answered, the whole history kept"
    notice = "notice: this conversation is longer than any the model was trained on (3 exchange(s) at most)"
    assert err.count(notice) == 2 and "/reset starts a new one" in err, "once a conversation, from the fourth exchange"


def test_chat_commands_and_end_of_input_in_a_real_process(trained_chat):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={trained_chat}", "--chat",
                           "--temperature=0", "--system=Answer in Chinese."], input="Hello\n/reset\nHello\n/quit\n谢谢\n",
                          capture_output=True, text=True, timeout=120, cwd=trained_chat)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == ["你好!", "你好!"], "the system message kept after /reset; /quit ends"
    assert "(new conversation)" in proc.stderr


def test_bytes_that_are_not_utf8_are_one_line_and_the_chat_goes_on(trained_chat):
    """Bug: undecodable input on --chat is a traceback where stdin decodes strictly (en_US.UTF-8, or
    PYTHONIOENCODING=utf-8:strict, as here; C.UTF-8 is lenient), instead of one line and the next message answered."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={trained_chat}", "--chat",
                           "--temperature=0"], input=b"\xff\xfe hello\nHello\n", capture_output=True, env=env,
                          timeout=120, cwd=trained_chat)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert proc.stdout.decode().splitlines() == ["Hello! I am a very small GPT. How can I help?"]
    assert err.count("error: ") == 1, err


def test_ctrl_c_ends_a_chat_cleanly(trained_chat):
    """Bug: Ctrl-C while the chat waits for a message ends in a KeyboardInterrupt traceback."""
    proc = subprocess.Popen(command(ROOT / "sample.py", f"--out_dir={trained_chat}", "--chat", "--temperature=0"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=trained_chat)
    proc.stdin.write("Hello\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "Hello! I am a very small GPT. How can I help?\n"  # now waiting for the next line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_a_reply_never_holds_the_templates_markers(trained_numerals, tmp_path, capsys):
    """Bug: a chat model draws <|user|> or <|assistant|> mid-reply (only the end of turn may end one). This
    model wants nothing else: its final norm's gain is 0, so the norm's output is its bias b, and its own
    head puts the two markers first after anything. Through the engine, sample.py and the server."""
    ckpt = torch.load(trained_numerals[0] / "ckpt.pt", weights_only=True)
    opened = open_model(trained_numerals[0], quiet=True)
    tok, task = opened.tokenizer, opened.task
    markers = [tok.special_id("<|user|>"), tok.special_id("<|assistant|>")]
    state = ckpt["model"]
    bias = torch.randn_like(state["transformer.ln_f.bias"], generator=torch.Generator().manual_seed(0))
    head = torch.zeros_like(state["lm_head.weight"])
    head[markers[0]], head[markers[1]] = 10 * bias, 9 * bias
    state.update({"transformer.ln_f.weight": torch.zeros_like(bias), "transformer.ln_f.bias": bias, "lm_head.weight": head})
    ckpt["model_extra"]["head"] = "untied"
    (tmp_path / "m").mkdir()
    torch.save(ckpt, tmp_path / "m" / "ckpt.pt")
    model = open_model(tmp_path / "m", quiet=True).model
    ids = task.encode_messages([{"role": "user", "content": "305"}])
    assert model(torch.tensor([ids]))[0][0, -1].topk(2).indices.tolist() == markers, "the model wants the markers"
    every = {tok.special_id(m) for m in ("<|system|>", "<|user|>", "<|assistant|>")}
    assert set(task.rules.banned) == every, "the markers, and only they, are never drawn (not the end of turn)"
    for temperature in (0, 1.5):
        reply = complete(model, [ids], replace(task.rules, max_tokens=8, temperature=temperature, seed=0))[0]
        assert len(reply) == 8 and not set(reply) & set(markers), reply
    assert sample_cli.main([f"--out_dir={tmp_path / 'm'}", "--start=305", "--temperature=0", "--max_new_tokens=8",
                            "--num_samples=1"]) == 0
    assert "<|" not in capsys.readouterr().out
    from test_serve import serving
    with serving(tmp_path / "m") as running:
        answer = running.client().chat.completions.create(model=running.name, max_tokens=8, temperature=0,
                                                          messages=[{"role": "user", "content": "305"}])
    assert "<|" not in answer.choices[0].message.content and answer.choices[0].finish_reason == "length"


def test_chat_on_a_text_model_is_one_clear_line(trained_chinese, capsys):
    base, _ = trained_chinese
    assert sample_cli.main([f"--out_dir={base / 'out' / 'chinese'}", "--chat"]) == 2
    assert "was not trained to answer (it is a text model) and has no chat template" in capsys.readouterr().err


def test_finetune_a_text_model_on_pairs(trained_chinese, tmp_path):
    """configs/finetune.py with a .jsonl: the base's vocabulary grows by the template's tokens and
    the new characters, its old ids kept, and the loss falls."""
    base, _ = trained_chinese
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in [
        ("天行健", "君子以自强不息"), ("地势坤", "君子以厚德载物"), ("白日依山尽", "黄河入海流")] * 4), encoding="utf-8")
    with working_dir(tmp_path):
        summary = run_training("finetune.py", tmp_path / "ft", f"--init_from={base / 'out' / 'chinese'}",
                               f"--data={data}", "--max_iters=60", "--eval_interval=60", "--log_interval=1",
                               "--val_fraction=0")
    old = load_checkpoint(base / "out" / "chinese" / "ckpt.pt").tokenizer["itos"]
    new = load_checkpoint(tmp_path / "ft" / "ckpt.pt").tokenizer["itos"]
    assert new[:len(old)] == old and new[len(old):] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]) and summary["train_acc"] is not None
    evaluations = [r for r in rows if "val_loss" in r]
    assert all("heldout_acc" not in r for r in evaluations), "nothing is held out (val_fraction=0): no held-out score"


# ---- out to transformers ------------------------------------------------------------------

def test_transformers_reads_the_template_and_stops_where_we_do(trained_chat, tmp_path):
    """apply_chat_template(messages, add_generation_prompt=True) gives exactly our prompt ids, and
    transformers' greedy generate writes our reply and stops at our end of turn."""
    transformers = pytest.importorskip("transformers")
    from model.convert import main as convert_main
    assert convert_main([str(trained_chat), str(tmp_path / "hf"), "--to=hf"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    opened = open_model(trained_chat, quiet=True)
    task = opened.task
    for messages in conversations()[::5]:
        prompt = messages[:-1]
        ours, _ = task.template.encode(opened.tokenizer, prompt, generation_prompt=True)
        theirs = hf_tok.apply_chat_template(prompt, add_generation_prompt=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert list(theirs) == ours, prompt
        whole, _ = task.template.encode(opened.tokenizer, messages)
        assert hf_tok.apply_chat_template(messages, tokenize=False) == opened.tokenizer.decode(whole)
        room = task.block_size - len(ours)
        reply = complete(opened.model, [ours], replace(task.rules, max_tokens=room, temperature=0))[0]
        out = hf_model.generate(torch.tensor([ours]), max_new_tokens=room, do_sample=False)[0, len(ours):].tolist()
        assert out == reply[:reply.index(task.end) + 1], "transformers stops at the end of turn, as we do"


def test_the_walkthrough_names_the_special_tokens_and_what_the_loss_counts(trained_numerals, capsys):
    """For learners: a templated input shows its markers, and the loss's tokens are the answer's."""
    from model.walkthrough import main as walk_main
    out, _ = trained_numerals
    assert walk_main([f"--out_dir={out}", "--start=305", "--reply=三百零五", "--layers=0", "--heads=0"]) == 0
    text = capsys.readouterr().out
    assert "input: '305' -> tokens <|user|>0 31 02 53 <|end|>4 <|assistant|>5 三6 百7 零8 五9 <|end|>10" in text
    assert "<|user|> begins each user turn; <|assistant|> begins each assistant turn; <|end|> ends a turn" in text
    assert "in the loss (training): the predictions of 三6 百7 零8 五9 <|end|>10, the answer and its end of turn" in text
    assert walk_main([f"--out_dir={out}", "--start=305", "--format=json"]) == 0
    walk = json.loads(capsys.readouterr().out)
    assert walk["tokens"][-1] == "<|assistant|>" and "give the answer with --reply" in walk["template"][1]


def test_prepared_examples_are_reused_until_the_data_changes(tmp_path, monkeypatch):
    """Bug: the digest written while preparing differs from the one reuse computes, so a touched but
    unchanged file is prepared again (or a changed one is not)."""
    import model.tasks.chat as chat
    from model.config import TrainConfig
    from model.start import Start
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab", "completion": "ba"}\n' * 4, encoding="utf-8")
    prepared = []
    real = chat.prepare_examples
    monkeypatch.setattr(chat, "prepare_examples", lambda *a: prepared.append(1) or real(*a))
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "o"), val_fraction=0.0, block_size=16)
    same, changed = '{"prompt": "ab", "completion": "ba"}\n' * 4, '{"prompt": "ab", "completion": "ab"}\n' * 4
    for text in (same, same, changed):  # each write a new mtime: the second is hashed, found unchanged
        data.write_text(text, encoding="utf-8")
        chat.ChatTask.for_training(cfg, Start("scratch"))
    assert prepared == [1, 1], "prepared once for the bytes, once for the changed text"
