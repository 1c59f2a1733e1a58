"""The sort task's data format and split, text preparation, and the character tokenizer."""

import time

import numpy as np
import pytest
import torch

from model.data import TextSource
from model.errors import UserError
from model.config import TrainConfig
from model.start import Start
from model.tasks import SortTask, TextTask
from model.tokenizer import CharTokenizer


def test_sort_example_format():
    task = SortTask()
    assert task.tokenizer.itos == ["A", "B", "C"] and task.block_size == 11
    letters = torch.tensor([task.tokenizer.encode("CBABBC")])
    x, y = task.examples(task.numbers(letters))
    assert task.tokenizer.decode(x[0].tolist()) == "CBABBCABBBC", "x is the input then the answer minus its last letter"
    assert y[0, :5].tolist() == [-1] * 5, "the 5 targets on input positions are ignored"
    assert task.tokenizer.decode(y[0, 5:].tolist()) == "ABBBCC", "the other 6 targets are the sorted letters"


def test_sort_split_is_fixed_disjoint_and_20_percent():
    a, b = SortTask(seed=1337), SortTask(seed=1337)
    held, train = set(a.splits["val"].tolist()), set(a.splits["train"].tolist())
    assert len(held) == 146 and len(train) == 583 and not held & train and len(held | train) == 729
    assert torch.equal(a.splits["val"], b.splits["val"]), "same seed, same split"
    assert held != set(SortTask(seed=1).splits["val"].tolist())
    g = torch.Generator().manual_seed(0)
    x, _ = a.get_batch("train", 512, g)
    assert not set(a.numbers(x[:, :6]).tolist()) & held, "a training batch holds a held-out input"
    rebuilt = SortTask.from_state(a.state())
    assert torch.equal(rebuilt.splits["train"], a.splits["train"])


def test_sort_length_and_alphabet_are_configurable():
    task = SortTask(length=10, alphabet="ABCDE")
    assert task.block_size == 19 and task.tokenizer.vocab_size == 5
    x, y = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 19) and (y[:, :9] == -1).all()
    assert torch.equal(y[:, 9:], x[:, :10].sort(dim=1).values)


def test_tokenizer_vocabulary_and_extension():
    text = "白日依山尽,\n白日"
    tok = CharTokenizer.from_text(text)
    assert tok.itos == sorted(set(text)) and "\n" in tok.itos
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)
    bigger = tok.extend("山高月小")
    assert bigger.itos[:tok.vocab_size] == tok.itos, "existing characters keep their ids"
    assert bigger.itos[tok.vocab_size:] == ["小", "月", "高"]
    assert CharTokenizer.from_dict(bigger.to_dict()) == bigger
    with pytest.raises(UserError, match=r"2 character\(s\) not in the vocabulary: 'x', 'y'"):
        tok.encode("白xy")
    assert tok.encode("白xy", drop_unknown=True) == tok.encode("白")
    with pytest.raises(UserError, match="'z'"):
        tok.encode_array("白z")


def text_task(folder, text, block_size, val_fraction, name="t.txt"):
    """A text task trained from scratch on `text`, as train.py builds it."""
    (folder / name).write_text(text, encoding="utf-8")
    cfg = TrainConfig(data=str(folder / name), out_dir=str(folder / f"out-{name}"), block_size=block_size,
                      val_fraction=val_fraction)
    return TextTask.for_training(cfg, Start("scratch"))


def test_text_batches_are_shifted_by_one(tmp_path):
    text = "abcdefghij" * 5
    task = text_task(tmp_path, text, block_size=8, val_fraction=0.2)
    x, y = task.get_batch("train", 6, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(task.data["val"]) == 10 and len(task.data["train"]) == 40


def test_text_errors(tmp_path):
    with pytest.raises(UserError, match="the text is empty"):
        text_task(tmp_path, "", 8, 0.1)
    with pytest.raises(UserError, match=r"too short: its training part has 5 tokens and block_size=8 needs at least 9"):
        text_task(tmp_path, "ababa", 8, 0.0)
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("你好".encode("utf-8") + "世界".encode("gbk"))
    with pytest.raises(UserError, match=r"gbk.txt is not UTF-8 text: byte 6 \(0xca\)"):
        "".join(TextSource.at(bad).chunks())
    with pytest.raises(UserError, match="not found"):
        TextSource.at(tmp_path / "missing.txt")


def test_small_validation_split_warns_with_a_fix(tmp_path, capsys):
    text = "abcdefghij" * 5
    task = text_task(tmp_path, text, block_size=8, val_fraction=0.1)
    err = capsys.readouterr().err
    assert "warning: the validation split has 5 tokens, fewer than block_size + 1 = 9" in err
    assert "--val_fraction (to 0.20 or more) or lower --block_size (to 4 or less)" in err
    assert task.data["val"] is task.data["train"], "the val loss falls back to the training text"
    text_task(tmp_path, text, block_size=8, val_fraction=0.2, name="b.txt")
    assert "warning" not in capsys.readouterr().err


def test_prepared_tokens_are_reused_until_the_text_changes(tmp_path):
    text = "白日依山尽,黄河入海流。" * 4
    first = text_task(tmp_path, text, 4, 0.25)
    train_bin = tmp_path / "out-t.txt" / "prepared" / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    time.sleep(0.01)
    again = text_task(tmp_path, text, 4, 0.25)
    assert train_bin.stat().st_mtime_ns == stamp, "same text: the prepared files are reused"
    assert np.array_equal(first.data["train"], again.data["train"]) and first.data["train"].dtype == np.uint16
    assert again.tokenizer == first.tokenizer, "the tokenizer comes back with the reused files"
    changed = text_task(tmp_path, text.replace("黄河", "长江"), 4, 0.25)
    assert train_bin.stat().st_mtime_ns != stamp, "a changed text is prepared again"
    assert "长" in changed.tokenizer.itos
    assert isinstance(again.data["train"], np.memmap), "read back memory-mapped, not held in memory"


def test_vocabularies_past_65535_use_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000)) * 2
    task = text_task(tmp_path, text, 8, 0.0)
    assert task.data["train"].dtype == np.uint32 and task.tokenizer.vocab_size == 70_000
    assert task.tokenizer.decode(task.data["train"][69_990:70_010]) == text[69_990:70_010]
