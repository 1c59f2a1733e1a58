"""GGUF files for llama.cpp and ollama, checked by llama.cpp itself (llama-cpp-python): our
tokens, our logits, our greedy replies; and the models llama.cpp cannot compute, refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import random_model
from test_hf_llama import chatml  # noqa: F401  (the fixture: a Qwen2 folder with ChatML)
from model.checkpoint import Checkpoint, open_model, save_checkpoint
from model.convert import main as convert_main
from model.engine import Rules, complete
from model.tokenizer import CharTokenizer

llama_cpp = pytest.importorskip("llama_cpp")  # a test extra that compiles llama.cpp; CI installs it

MIXED = ["天行健,君子以自强不息。", "Hello, world! 你好", "GPT-2 说: 1+1=2 🙂", "  spaces\tand\nlines "]


def llama(path, n_ctx):
    """llama.cpp on the file, its KV cache in float32 (its default, float16, rounds every key), and its
    weights as written: with its extra buffer types (AMX, repacked weights) llama-cpp-python 0.3.36
    crashed on every q8_0 file, llama.cpp's own quantizations too, on an AMX Xeon (this project's build
    machine); off, as llama.cpp's `--no-repack`. llama-cpp-python has no argument for it."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params  # what Llama() reads its model parameters from
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                               type_k=0, type_v=0, seed=0)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def their_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def their_greedy(llm, ids, n):
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) == n:
            return out


def to_gguf(src, dest, *flags):
    assert convert_main([str(src), str(dest), "--to=gguf", *flags]) == 0
    return dest


def char_model(tmp_path, **arch):
    """A random character model whose vocabulary has Chinese, English, punctuation, an emoji, space,
    tab and newline, with the chat template's special tokens."""
    chars = sorted(set("".join(MIXED)))
    tok = CharTokenizer(chars).with_specials(["<|user|>", "<|assistant|>", "<|end|>"])
    model = random_model(dtype=torch.float32, n_layer=2, n_head=4, n_embd=64, vocab_size=len(tok.itos),
                         block_size=96, **arch)
    save_checkpoint(Checkpoint(model.state_dict(), model.config, tok.to_dict(), {"type": "text"}), tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_llama_cpp_splits_text_into_our_character_ids(tmp_path):
    """Bug: a space written as itself (SentencePiece reads it as ▁), special tokens as plain text, or
    ids shifted by the padding rows."""
    path = to_gguf(char_model(tmp_path), tmp_path / "c.gguf")
    opened, llm = open_model(tmp_path / "ckpt.pt", quiet=True), llama(path, 96)
    for text in MIXED:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == opened.tokenizer.encode(text), text
        assert llm.detokenize(opened.tokenizer.encode(text)).decode() == text
    assert llm.tokenize("<|user|>你好<|end|>".encode(), add_bos=False, special=True) == \
        [opened.tokenizer.special_id("<|user|>"), *opened.tokenizer.encode("你好"), opened.tokenizer.special_id("<|end|>")]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_llama_family_logits_and_greedy_tokens_are_ours(tmp_path, kind):
    """Bug: Q and K rows not permuted for llama.cpp's interleaved RoPE (llama), the grouped K/V heads
    split wrongly, Qwen3's head_dim or q/k norms left out, an untied head written as tied."""
    arch = dict(positions="rope", normalization="rmsnorm", mlp="gated", activation="silu", bias=False,
                n_kv_head=2, rope_theta=1e6, head="untied" if kind != "qwen2" else "tied",
                qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", **({"head_dim": 24} if kind == "qwen3" else {}))
    path = to_gguf(char_model(tmp_path, **arch), tmp_path / "m.gguf")
    opened, llm = open_model(tmp_path / "ckpt.pt", quiet=True), llama(path, 96)
    ids = opened.tokenizer.encode(MIXED[0] + MIXED[1])
    with torch.no_grad():
        ours = opened.model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(their_logits(llm, ids) - ours).max() < 1e-4
    greedy = complete(opened.model, [ids[:4]], Rules(max_tokens=64, temperature=0.0))[0]
    assert their_greedy(llm, ids[:4], 64) == greedy


def test_a_trained_chat_model_answers_in_llama_cpp_as_in_sample_py(trained_chat, tmp_path):
    """Bug: the chat template, its end of turn or its markers missing from the metadata; logits of
    another layout (learned positions, the fused QKV); q8_0 weights that change the replies."""
    opened = open_model(trained_chat, quiet=True)
    task, tok = opened.task, opened.tokenizer
    f32, q8 = to_gguf(trained_chat, tmp_path / "chat.gguf"), to_gguf(trained_chat, tmp_path / "q8.gguf", "--outtype=q8_0")
    llm = llama(f32, task.block_size)
    messages = [{"role": "user", "content": "天行健的下一句是什么?"}]
    prompt = task.encode_messages(messages)
    with torch.no_grad():
        ours = opened.model(torch.tensor([prompt]))[0][0].numpy()
    # llama.cpp's gpt2 computes GELU from a float16 table (ggml's GELU_FP16): about 1e-3 on logits of
    # size 10; with that table emulated in torch the difference was 1.8e-4
    assert np.abs(their_logits(llm, prompt) - ours).max() < 5e-3
    room = task.block_size - len(prompt)
    greedy = complete(opened.model, [prompt], replace(task.rules, max_tokens=min(64, room), temperature=0.0))[0]
    assert their_greedy(llm, prompt, len(greedy)) == greedy
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=room, top_k=1, repeat_penalty=1.0)
    assert reply["choices"][0]["message"]["content"] == tok.decode(greedy[:-1]) == "君子以自强不息。"
    long = task.encode_messages([{"role": "user", "content": "你好"}])
    theirs_q8 = their_greedy(llama(q8, task.block_size), long, 64)
    ours_64 = complete(opened.model, [long], Rules(max_tokens=64, temperature=0.0))[0]
    assert sum(a == b for a, b in zip(theirs_q8, ours_64)) >= 0.95 * 64
    assert (tmp_path / "chat.Modelfile").read_text().startswith("FROM ./chat.gguf\n")
    assert 'PARAMETER stop "<|end|>"' in (tmp_path / "chat.Modelfile").read_text()


def test_a_bpe_model_and_its_tokens_in_llama_cpp(tmp_path):
    """Bug: merges written in the wrong order or form, added tokens left out of the list, the
    pre-tokenizer unnamed (llama.cpp would split the text otherwise)."""
    from model.tokenizer import train_bpe
    text = ("天行健,君子以自强不息。地势坤,君子以厚德载物。The quick brown fox jumps over the lazy dog. " * 30)
    tok = train_bpe([text], 320)
    model = random_model(dtype=torch.float32, n_layer=2, n_head=4, n_embd=64, vocab_size=tok.model_vocab_size(),
                         block_size=64, activation="gelu_tanh")
    save_checkpoint(Checkpoint(model.state_dict(), model.config, tok.to_dict(), {"type": "text"}), tmp_path / "ckpt.pt")
    llm = llama(to_gguf(tmp_path / "ckpt.pt", tmp_path / "b.gguf", "--outtype=f16"), 64)
    for s in MIXED + ["君子以厚德载物 the lazy dog!!", "emoji 🙂🙂 and ünïcödé"]:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s), s


@pytest.mark.parametrize("arch, message", [
    (dict(positions="sinusoidal"), "cannot hold positions='sinusoidal'"),
    (dict(norm="post"), "cannot hold norm='post'"),
    (dict(activation="relu"), "computes a GELU feed-forward, not activation='relu'"),
])
def test_what_llama_cpp_does_not_compute_is_one_line(tmp_path, capsys, arch, message):
    """Bug: a file written that llama.cpp would run wrongly (or refuse only when it loads)."""
    src = char_model(tmp_path, **arch)
    assert convert_main([str(src), str(tmp_path / "x.gguf"), "--to=gguf"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_bad_destinations_and_outtypes_are_one_line(tmp_path, capsys):
    src = char_model(tmp_path)
    (tmp_path / "taken.gguf").write_text("mine")
    for dest, flags, message in ((tmp_path / "x.bin", [], "ending in .gguf"),
                                 (tmp_path / "taken.gguf", [], "already holds taken.gguf"),
                                 (tmp_path / "x.gguf", ["--outtype=q4"], "--outtype must be one of f32, f16, bf16, q8_0")):
        assert convert_main([str(src), str(dest), "--to=gguf", *flags]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "taken.gguf").read_text() == "mine"


def test_a_qwen2_folder_with_chatml_answers_in_llama_cpp_as_in_sample_py(chatml, tmp_path):
    """Bug: a folder's own Jinja template not carried, its end of turn (<|im_end|>) not the eos, its
    ChatML marker drawable."""
    from model.tasks import chat_task
    opened = open_model(chatml, quiet=True)
    task = chat_task(opened.ckpt, opened.task)
    llm = llama(to_gguf(chatml, tmp_path / "qwen.gguf"), 64)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox?"}]
    prompt = task.encode_messages(messages)
    with torch.no_grad():
        ours = opened.model(torch.tensor([prompt]))[0][0].numpy()
    assert np.abs(their_logits(llm, prompt) - ours).max() < 1e-4
    room = 64 - len(prompt)
    reply = complete(opened.model, [prompt], replace(task.rules, max_tokens=room, temperature=0.0))[0]
    theirs = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=room, top_k=1, repeat_penalty=1.0,
                                        logit_bias={i: -1e9 for i in task.rules.banned})
    # this random model ends its turn at once: llama.cpp must know <|im_end|> as the end to stop there too
    assert reply == [task.end] and theirs["choices"][0]["finish_reason"] == "stop"
    assert theirs["choices"][0]["message"]["content"] == ""
    assert their_greedy(llm, prompt, 20) == complete(opened.model, [prompt], Rules(max_tokens=20, temperature=0.0))[0]
