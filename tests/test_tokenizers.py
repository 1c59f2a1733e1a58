"""Tokenizers of every kind (char, trained byte-level BPE, loaded files), held to what the
`tokenizers` library itself gives, and text preparation in bounded memory."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import sample as sample_cli
import train as train_cli
from conftest import ROOT
from model import data as data_mod
from model.checkpoint import open_model
from model.config import TrainConfig
from model.engine import TextStream, complete
from model.errors import UserError
from model.start import Start
from model.tasks import TextTask
from model.tokenizer import CharTokenizer, load_tokenizer_files, tokenizer_from_dict, train_bpe

tokenizers = pytest.importorskip("tokenizers")  # the [bpe] extra; CI installs it, so nothing skips there

TEXTS = {
    "chinese": "白日依山尽,黄河入海流。\n天行健,君子以自强不息。",
    "english": "The quick brown fox jumps over the lazy dog.\nIt's 42 degrees!",
    "mixed": "GPT 模型 reads 天行健 and writes 君子以自强不息 in 2024.",
    "emoji": "I like 🙂 and 🚀🚀, 你呢 👩‍💻?",
}
CORPUS = "\n".join(list(TEXTS.values()) * 30)
CHINESE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "。", "2024", "gpt", "模", "型", "reads", "and",
                 "writes", "in", "."] + list(dict.fromkeys("白日依山尽黄河入海流天行健君子以自强不息"))


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter([CORPUS]), 400)


@pytest.fixture(scope="module")
def files(tmp_path_factory, bpe):
    """The trained BPE saved as tokenizer.json and as GPT-2's vocab.json + merges.txt, and a
    BERT vocab.txt of Chinese characters."""
    folder = tmp_path_factory.mktemp("tokenizers")
    (folder / "json").mkdir()
    bpe.tok.save(str(folder / "json" / "tokenizer.json"))
    (folder / "gpt2").mkdir()
    bpe.tok.model.save(str(folder / "gpt2"))
    (folder / "bert").mkdir()
    (folder / "bert" / "vocab.txt").write_text("\n".join(CHINESE_VOCAB) + "\n", encoding="utf-8")
    return folder


# ---- round trips and agreement with `tokenizers` ------------------------------------------

@pytest.mark.parametrize("name", TEXTS)
def test_byte_level_kinds_round_trip_any_text(name, bpe, files):
    text = TEXTS[name]
    for tok in (bpe, load_tokenizer_files(files / "json"), load_tokenizer_files(files / "gpt2")):
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{tok.kind} tokenizer does not round-trip the {name} text"
        assert tok.unknown(text) == [], "byte-level BPE spells any text"
    unseen = "Ωμέγα ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    assert bpe.decode(bpe.encode(unseen)) == unseen, "characters never seen in training fall back to bytes"


@pytest.mark.parametrize("name", TEXTS)
def test_char_kind_round_trips(name):
    tok = CharTokenizer.from_text(CORPUS)
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_wordpiece_round_trips_chinese_and_names_what_it_cannot_spell(files):
    tok = load_tokenizer_files(files / "bert" / "vocab.txt")
    text = "白日依山尽,黄河入海流。天行健 and writes 君子以自强不息 in 2024."
    assert tok.decode(tok.encode(text)) == text, "Chinese reads without spaces between the characters"
    assert tok.unknown("天行健!地势坤") == ["!", "地", "势", "坤"]
    with pytest.raises(UserError, match=r"4 character\(s\) not in the vocabulary: '!', '地', '势', '坤'"):
        tok.encode("天行健!地势坤")
    assert tok.encode("天行健!地势坤", drop_unknown=True) == tok.encode("天行健")


def test_ids_equal_what_tokenizers_itself_gives(files):
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    text = TEXTS["mixed"] + " " + TEXTS["emoji"] + "\n" + TEXTS["english"]
    ours = load_tokenizer_files(files / "json" / "tokenizer.json")
    assert ours.encode(text) == Tokenizer.from_file(str(files / "json" / "tokenizer.json")).encode(text).ids
    gpt2 = ByteLevelBPETokenizer(str(files / "gpt2" / "vocab.json"), str(files / "gpt2" / "merges.txt"))
    assert load_tokenizer_files(files / "gpt2").encode(text) == gpt2.encode(text).ids
    chinese = TEXTS["chinese"].replace("\n", "")
    bert = BertWordPieceTokenizer(str(files / "bert" / "vocab.txt"))
    assert load_tokenizer_files(files / "bert").encode(chinese) == bert.encode(chinese, add_special_tokens=False).ids


def test_trained_bpe_has_the_asked_size_and_keeps_as_plain_data(bpe):
    assert bpe.vocab_size == 400 and bpe.model_vocab_size() == 448, "the model's vocabulary is padded to 64"
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again.encode(CORPUS) == bpe.encode(CORPUS) and again.digest() == bpe.digest()


def test_stream_decoding_never_shows_a_replacement_character(bpe):
    text = TEXTS["chinese"] + TEXTS["emoji"]
    ids = bpe.encode(text)
    cut = [i for i in ids if "\ufffd" in bpe.decode([i])]
    assert cut, "the test needs tokens that end inside a character"
    stream = TextStream(bpe)
    pieces = [stream.add(i)[0] for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


class CountingDecoder:
    """A tokenizer whose decode() records how many ids it was given each time."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_stream_decoding_is_linear_and_equals_the_whole_decode(kind, bpe, files):
    """Bug: the streamer decodes the whole sample again for each new token (quadratic in its
    length), or its window cuts text the whole decode would join (WordPiece spaces, BERT's Chinese)."""
    text = {"char": CORPUS, "bpe": CORPUS, "wordpiece": "白日依山尽,黄河入海流。天行健 and writes 君子以自强不息 in 2024."}[kind]
    tok = {"char": CharTokenizer.from_text(CORPUS), "bpe": bpe,
           "wordpiece": load_tokenizer_files(files / "bert" / "vocab.txt")}[kind]
    ids = (tok.encode(text) * 40)[:3000]
    k = next(k for k in range(5, 20) if not tok.decode(ids[:k]).endswith("\ufffd"))  # a prompt of whole characters
    counting = CountingDecoder(tok)
    stream = TextStream(counting, context=ids[:k])
    streamed = "".join(stream.add(i)[0] for i in ids[k:]) + stream.finish()
    assert tok.decode(ids[:k]) + streamed == tok.decode(ids)
    assert max(counting.lengths) <= 8, "each step decodes a few recent ids, not the whole sample"


def test_token_labels_show_bytes_when_a_token_is_not_text(bpe):
    partial = [i for i in range(bpe.vocab_size) if "\ufffd" in bpe.decode([i])]
    assert partial, "a byte-level vocabulary has tokens that are parts of characters"
    for i in partial:
        assert re.fullmatch(r"<[0-9a-f]{2}( [0-9a-f]{2})*>", bpe.label(i)), f"token {i} is labelled {bpe.label(i)!r}"
    labels = "".join(bpe.label(i) for i in bpe.encode("a fox\n"))
    assert "\\n" in labels and "␣" in labels, "newlines and spaces made visible"


# ---- the command lines --------------------------------------------------------------------

def train_text(tmp_path, text_file, out, *extra):
    return train_cli.main([str(ROOT / "configs" / "chinese.py"), f"--data={text_file}", f"--out_dir={out}",
                           "--max_iters=30", "--eval_interval=30", "--eval_iters=2", "--block_size=16",
                           "--n_layer=1", "--n_embd=32", "--n_head=2", *extra])


@pytest.mark.parametrize("how", ["bpe", "json", "vocab_txt"])
def test_checkpoints_of_each_kind_load_weights_only_and_sample(how, in_tmp, files, capsys):
    text = in_tmp / "text.txt"
    text.write_text(CORPUS if how != "vocab_txt" else TEXTS["chinese"].replace("\n", "") * 40, encoding="utf-8")
    flags = {"bpe": ["--tokenizer=bpe", "--vocab_size=300"], "json": [f"--tokenizer={files / 'json'}"],
             "vocab_txt": [f"--tokenizer={files / 'bert' / 'vocab.txt'}"]}[how]
    assert train_text(in_tmp, text, in_tmp / "run", *flags) == 0
    ckpt = torch.load(in_tmp / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["type"] == ("bpe" if how == "bpe" else "file")
    assert ckpt["model_args"]["vocab_size"] % 64 == 0, "subword vocabularies are padded to a multiple of 64"
    capsys.readouterr()
    start = "天行健" if how == "vocab_txt" else "The quick"
    assert sample_cli.main([f"--out_dir={in_tmp / 'run'}", f"--start={start}", "--max_new_tokens=20",
                            "--num_samples=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(start) and out.count("-" * 40) == 1, out


def test_bpe_model_streams_whole_characters(in_tmp, capsys):
    """A byte-level model of Chinese poems whose tokens are often parts of characters: what
    sample.py streams is the whole text's decoding, character by character, never U+FFFD."""
    text = in_tmp / "poems.txt"
    text.write_text((ROOT / "data" / "poems" / "input.txt").read_text(encoding="utf-8") * 3, encoding="utf-8")
    assert train_text(in_tmp, text, in_tmp / "run", "--tokenizer=bpe", "--vocab_size=300", "--max_iters=300",
                      "--eval_interval=300", "--n_embd=64", "--learning_rate=3e-3") == 0
    opened = open_model(in_tmp / "run", quiet=True)
    tok = opened.tokenizer
    assert any("\ufffd" in tok.decode([i]) for i in range(tok.vocab_size)), "some tokens are parts of characters"
    capsys.readouterr()
    assert sample_cli.main([f"--out_dir={in_tmp / 'run'}", "--start=床前", "--max_new_tokens=40", "--temperature=0",
                            "--num_samples=1"]) == 0
    streamed = capsys.readouterr().out.rstrip("\n")
    prompt = tok.encode("床前")
    whole = tok.decode(prompt + complete(opened.model, [prompt], replace(opened.task.rules, max_tokens=40,
                                                                         temperature=0.0))[0])
    assert "\ufffd" not in whole, "the test needs a model that writes whole characters"
    assert "\ufffd" not in streamed and whole.startswith(streamed) and len(streamed) >= len(whole) - 1


# ---- preparation in bounded memory --------------------------------------------------------

def prepared_task(tmp_path, data, **cfg):
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), block_size=8, val_fraction=0.1, **cfg)
    return TextTask.for_training(cfg, Start("scratch"))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepared_files_equal_the_whole_text_encoded_at_once(kind, tmp_path, monkeypatch):
    """Chunks of 1000 bytes and BPE pieces of 200 characters: boundaries fall inside 3- and 4-byte
    characters and inside would-be merges, yet the ids are those of the whole text."""
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 1000)
    real = data_mod.safe_pieces
    monkeypatch.setattr(data_mod, "safe_pieces", lambda chunks: real(chunks, target=200))
    text = CORPUS * 2
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    flags = {"tokenizer": "bpe", "vocab_size": 350} if kind == "bpe" else {}
    task = prepared_task(tmp_path, tmp_path / "t.txt", **flags)
    whole = task.tokenizer.encode(text)
    n_val = int(len(whole) * 0.1)
    assert np.array_equal(task.data["train"], whole[:len(whole) - n_val]), f"{kind}: train.bin differs"
    assert np.array_equal(task.data["val"], whole[len(whole) - n_val:]), f"{kind}: val.bin is not the text's end"


def test_val_is_the_end_of_the_text_and_shares_nothing_with_train(tmp_path):
    """Bug: val cut from the text's start while train keeps the start too (val overlaps train). A
    text of distinct lines: no stretch of it repeats, so a split taken from the wrong place shows."""
    text = "".join(f"{i:04d} {'天地玄黄宇宙洪荒'[i % 8]}\n" for i in range(2000))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    task = prepared_task(tmp_path, tmp_path / "t.txt")
    whole = np.array(task.tokenizer.encode(text))
    n_val = int(len(whole) * 0.1)
    assert np.array_equal(task.data["val"], whole[-n_val:]), "val.bin is the text's last tenth"
    assert np.array_equal(task.data["train"], whole[:-n_val]), "train.bin is the rest, from the start"
    val_lines = set(task.tokenizer.decode(task.data["val"]).splitlines()[1:])  # whole lines only
    assert val_lines and not val_lines & set(task.tokenizer.decode(task.data["train"]).splitlines())


def test_a_new_tokenizer_or_vocab_size_prepares_the_text_again(tmp_path):
    """Bug: prepared ids reused after the tokenizer or vocab_size changed (the settings check
    skipped): training would read ids of another vocabulary, silently."""
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")
    for flags in ({}, {"tokenizer": "bpe", "vocab_size": 300}, {"tokenizer": "bpe", "vocab_size": 350}, {}):
        task = prepared_task(tmp_path, tmp_path / "t.txt", **flags)
        assert task.tokenizer.kind == flags.get("tokenizer", "char") and task.tokenizer.vocab_size == flags.get(
            "vocab_size", len(set(CORPUS))), f"{flags}: the prepared text's tokenizer is an earlier run's"
        ids = np.concatenate([task.data["train"], task.data["val"]])
        assert np.array_equal(ids, task.tokenizer.encode(CORPUS)), f"{flags}: ids of another vocabulary"


def test_reuse_reads_nothing_and_a_touched_file_is_hashed_not_prepared(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")
    first = prepared_task(tmp_path, tmp_path / "t.txt")
    train_bin = tmp_path / "out" / "prepared" / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    reads = []
    real = data_mod.TextSource.chunks
    monkeypatch.setattr(data_mod.TextSource, "chunks", lambda self, *a: reads.append(1) or real(self, *a))
    again = prepared_task(tmp_path, tmp_path / "t.txt")
    assert reads == [] and again.tokenizer == first.tokenizer, "an unchanged text is not read again"
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")  # same bytes, new mtime
    prepared_task(tmp_path, tmp_path / "t.txt")
    assert len(reads) == 1 and train_bin.stat().st_mtime_ns == stamp, "hashed once, the same: reused"


def test_ctrl_c_during_preparation_leaves_nothing_to_trust(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")

    def interrupted(tokenizer, chunks):
        yield tokenizer.encode_array(next(iter(chunks)))
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "encode_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepared_task(tmp_path, tmp_path / "t.txt")
    assert not (tmp_path / "out" / "prepared" / "meta.json").exists()
    monkeypatch.undo()
    task = prepared_task(tmp_path, tmp_path / "t.txt")
    assert len(task.data["train"]) + len(task.data["val"]) == len(CORPUS), "prepared again, in full"


@pytest.mark.parametrize("flags,message", [
    (["--tokenizer=bpe", "--vocab_size=200"], "--vocab_size=200 is too small for a byte-level BPE: it needs the 256 "
                                              "byte symbols and 1 special token, so 257 or more"),
    (["--tokenizer=bpe", "--vocab_size=5000"], "--vocab_size=5000 is too large for this text: it supports only"),
    (["--tokenizer=bpe"], "--tokenizer=bpe needs --vocab_size"),
    (["--tokenizer=broken.json"], "broken.json is not a tokenizer file that can be read"),
    (["--tokenizer=nounk/vocab.txt"], "has no [UNK] token"),
    (["--tokenizer=missing.json"], "--tokenizer=missing.json: no such file or folder"),
    (["--data=empty_folder"], "folder empty_folder holds no .txt files"),
    (["--data=two"], "b.txt is not UTF-8 text: byte 2 (0xff) cannot be decoded (byte 8 of the whole text)"),
])
def test_bad_tokenizer_and_data_input_is_one_clear_line(flags, message, in_tmp, capsys):
    (in_tmp / "text.txt").write_text(CORPUS, encoding="utf-8")
    (in_tmp / "broken.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    (in_tmp / "nounk").mkdir()
    (in_tmp / "nounk" / "vocab.txt").write_text("[PAD]\n天\n行\n", encoding="utf-8")
    (in_tmp / "empty_folder").mkdir()
    (in_tmp / "two").mkdir()
    (in_tmp / "two" / "a.txt").write_text("abcde", encoding="utf-8")
    (in_tmp / "two" / "b.txt").write_bytes(b"xy\xffz")
    code = train_text(in_tmp, in_tmp / "text.txt", in_tmp / "run", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not (in_tmp / "run" / "prepared" / "meta.json").exists(), "nothing half-made to reuse"
