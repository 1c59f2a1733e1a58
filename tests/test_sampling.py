"""Sampling maths, the KV cache, and sample.py."""

import sys

import pytest
import torch

import sample as sample_cli
from conftest import EXPLAINER_ARCH, LLAMA_ARCH, MINGPT_ARCH, QWEN3_ARCH, ROOT, random_model, working_dir
from model.engine import Engine, Request, Rules, complete, generate, new_cache, next_token_probs, sample_next_token


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    e = [2.718281828459045 ** (x / 0.5) for x in (1.0, 2.0, 3.0)]
    expected = torch.tensor([[v / sum(e) for v in e]])
    torch.testing.assert_close(next_token_probs(logits, temperature=0.5), expected)


def test_temperature_zero_is_argmax_whatever_the_seed():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        ids = sample_next_token(logits, temperature=0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ids[:, 0], logits.argmax(-1))


def test_top_k_never_leaves_the_k_most_likely():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(1))
    allowed = set(logits[0].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next_token(logits, 2.0, top_k=3, generator=g).item() for _ in range(300)}
    assert drawn <= allowed and len(drawn) == 3
    assert torch.equal(next_token_probs(logits, 1.0, top_k=1000), next_token_probs(logits, 1.0)), "k > V is clamped"


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: (next_token_probs(logits, 1.0, top_p=p)[0] > 0).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    torch.testing.assert_close(next_token_probs(logits, 1.0, top_p=0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_same_seed_same_output():
    model = random_model(n_layer=1, n_head=2, n_embd=16, vocab_size=10, block_size=8, dtype=torch.float32)
    run = lambda s: generate(model, torch.zeros(2, 1, dtype=torch.long), 20, 1.0,  # noqa: E731
                             generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


ARCHS = pytest.mark.parametrize("arch", [{}, EXPLAINER_ARCH, MINGPT_ARCH, dict(LLAMA_ARCH, n_kv_head=1),
                                          dict(QWEN3_ARCH, n_kv_head=1, head_dim=12)],
                                 ids=["gpt2", "explainer", "mingpt", "llama", "qwen3"])


@ARCHS
@pytest.mark.parametrize("prompt_len", [1, 5, 8, 13])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_kv_cache_gives_the_same_tokens(prompt_len, attention, arch):
    """Greedy with and without the cache, for prompts shorter and longer than block_size=8,
    running far past block_size (the window shifts several times)."""
    model = random_model(seed=prompt_len, n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=8,
                         attention=attention, **arch)
    prompt = torch.randint(11, (3, prompt_len), generator=torch.Generator().manual_seed(0))
    cached = generate(model, prompt, 30, temperature=0.0, use_cache=True)
    plain = generate(model, prompt, 30, temperature=0.0, use_cache=False)
    assert torch.equal(cached, plain)


@ARCHS
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("chunks", [(5, 1, 1, 1), (2, 3, 3), (1, 4, 2, 1)])
@pytest.mark.parametrize("kind", ["plain", "static"])
def test_cached_logits_equal_full_recompute(attention, chunks, arch, kind):
    """Feeding the tokens in chunks through the cache, several new tokens at a time on a
    non-empty cache included, gives the logits of one full pass; the static cache (every step
    reads all its slots, the unwritten ones masked) too."""
    model = random_model(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=8, attention=attention, **arch)
    idx = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(0))
    full, _ = model(idx)
    cache, parts, t = new_cache(model, 2, kind=kind), [], 0
    for n in chunks:
        parts.append(model(idx[:, t:t + n], kv_cache=cache)[0])
        t += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12,
                               msg=lambda m: f"chunks {chunks}, {attention}: {m}")


@ARCHS
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_ragged_rows_each_get_the_logits_they_get_alone(attention, arch):
    """Serving's cache: prompts of 5, 2 and 7 tokens read row by row, then steps for all rows at once
    (each at its own position), then the first row left and the last moved into its place. Catches a
    position, mask or cache row taken from another sequence."""
    model = random_model(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=12, attention=attention, **arch)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(11, (1, n), generator=g) for n in (5, 2, 7)]
    cache = new_cache(model, 3, kind="ragged")
    for row, seq in enumerate(seqs):
        cache.use(row, row + 1)
        model(seq, kv_cache=cache)
    for _ in range(2):
        cache.use(0, 3)
        nxt = torch.randint(11, (3, 1), generator=g)
        logits = model(nxt, kv_cache=cache)[0][:, -1]
        seqs = [torch.cat([s, nxt[i:i + 1]], dim=1) for i, s in enumerate(seqs)]
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], model(seq)[0][0, -1], rtol=0, atol=1e-12)
    cache.move([2], [0])
    cache.use(0, 2)
    logits = model(torch.tensor([[3], [4]]), kv_cache=cache)[0][:, -1]
    for row, (seq, token) in enumerate(((seqs[2], 3), (seqs[1], 4))):
        torch.testing.assert_close(logits[row], model(torch.cat([seq, torch.tensor([[token]])], 1))[0][0, -1],
                                   rtol=0, atol=1e-12)


@ARCHS
@pytest.mark.parametrize("use_cache", [True, False])
def test_the_engine_writes_the_tokens_generate_writes(arch, use_cache):
    """The engine (what every command decodes with) against the short loop: five prompts of 1 to 13
    tokens share 3 rows (they join as others leave, new ones read together in one padded forward
    pass), run past block_size=8 (each row's window slides on its own), greedy; and seeded sampling.
    Catches padding a read token sees, a row's cache or window taken from another, a seed not the
    request's own."""
    model = random_model(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=8, dtype=torch.float32, **arch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(11, (n,), generator=g).tolist() for n in (1, 5, 8, 13, 3)]
    requests = Engine(model, max_batch=3, use_cache=use_cache).complete(
        [Request(p, Rules(max_tokens=20, temperature=0.0)) for p in prompts])
    for p, request in zip(prompts, requests):
        assert request.tokens == generate(model, torch.tensor([p]), 20, temperature=0.0)[0, len(p):].tolist(), p
    for seed in (1, 2):
        sampled = Engine(model, use_cache=use_cache).complete([Request(prompts[1], Rules(20, 1.0, top_k=6, seed=seed))])
        expected = generate(model, torch.tensor([prompts[1]]), 20, 1.0, top_k=6, generator=torch.Generator().manual_seed(seed))
        assert sampled[0].tokens == expected[0, 5:].tolist()


def test_rules_stop_a_reply_and_what_they_ban_is_never_drawn():
    """Catches: a stop id not ending the request (or missing from its tokens), a banned or padded id drawn."""
    model = random_model(n_layer=1, n_head=2, n_embd=16, vocab_size=11, block_size=16, dtype=torch.float32)
    free = complete(model, [[1, 2]], Rules(max_tokens=14, temperature=0.0))[0]
    stop = free[3]
    assert complete(model, [[1, 2]], Rules(max_tokens=14, temperature=0.0, stop_ids=(stop,)))[0] == free[:free.index(stop) + 1]
    drawn = complete(model, [[1, 2]] * 8, Rules(max_tokens=14, temperature=1.5, seed=0, banned=(3, 4), vocab_limit=8))
    assert not {t for row in drawn for t in row} & {3, 4, 8, 9, 10}


def test_compiled_decoding_gives_the_eager_tokens_and_compiles_once():
    """generate(compiled=True): the one-token step compiled over a static cache. Catches a step whose
    shapes or strides change from token to token (a recompile each step: error_on_recompile) and
    any difference in the tokens, past block_size too (the window starts again)."""
    model = random_model(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=8, dtype=torch.float32,
                         **dict(LLAMA_ARCH, n_kv_head=1))
    prompt = torch.randint(11, (1, 5), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()  # other tests compiled this forward with other guards
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, prompt, 20, temperature=0.0, compiled=True)
    assert torch.equal(compiled, generate(model, prompt, 20, temperature=0.0))


# ---- sample.py ----------------------------------------------------------------------------

def test_sort_start_prints_the_answer(trained_sort, capsys):
    base, _ = trained_sort
    with working_dir(base):
        assert sample_cli.main(["--start", "CBABBC"]) == 0, "uses the checkpoint train.py wrote last"
    captured = capsys.readouterr()
    assert captured.out.strip() == "CBABBC -> ABBBCC"
    assert "out/sort/ckpt.pt" in captured.err, "says which checkpoint it uses"


def test_sort_random_inputs_and_eval(trained_sort, capsys):
    base, _ = trained_sort
    assert sample_cli.main([f"--out_dir={base / 'out' / 'sort'}", "--num_samples=5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all("(right;" in ln or "(wrong" in ln for ln in lines)
    assert sample_cli.main([f"--out_dir={base / 'out' / 'sort'}", "--eval"]) == 0
    out = capsys.readouterr().out
    assert "held-out inputs: 100.0% of 146" in out and "training inputs:" in out and "of 583" in out


def test_text_samples_stream_and_are_seeded(trained_chinese, capsys):
    base, _ = trained_chinese
    args = [f"--out_dir={base / 'out' / 'chinese'}", "--start=天行健", "--max_new_tokens=21", "--num_samples=1"]
    assert sample_cli.main(args + ["--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("天行健,君子以自强不息,地势坤,君子以厚德载物。")
    outputs = []
    for seed in (7, 7, 8):
        assert sample_cli.main(args + ["--temperature=1.5", f"--seed={seed}", "--max_new_tokens=60"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1], "the same seed must give the same text"
    assert outputs[0] != outputs[2], "another seed must give another text"


def test_num_samples_are_one_batch_seeded_and_separated(trained_chinese, capsys):
    base, _ = trained_chinese
    args = [f"--out_dir={base / 'out' / 'chinese'}", "--start=天", "--max_new_tokens=30", "--temperature=2",
            "--num_samples=4"]
    assert sample_cli.main(args) == 0
    samples = capsys.readouterr().out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 4 and all(s.startswith("天") and len(s) == 31 for s in samples), samples
    assert len(set(samples)) > 1, "the rows of one batch are drawn independently"
    assert sample_cli.main(args) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n" + "-" * 40 + "\n") == samples, "seeded: the same again"


@pytest.mark.parametrize("args,message", [
    (["--temperature=-1"], "temperature must be 0 (greedy) or more, got -1.0"),
    (["--top_p=0"], "top_p must be in (0, 1], got 0.0"),
    (["--top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--top_k=0"], "top_k must be at least 1"),
    (["--max_new_tokens=-5"], "max_new_tokens must not be negative, got -5"),
    (["--start=天行x"], "1 character(s) not in the vocabulary: 'x'; change the text, or pass --drop_unknown=True"),
])
def test_bad_flags_are_clear_errors(trained_chinese, capsys, args, message):
    base, _ = trained_chinese
    assert sample_cli.main([f"--out_dir={base / 'out' / 'chinese'}", *args]) == 2
    assert message in capsys.readouterr().err


def test_drop_unknown_and_long_prompt(trained_chinese, capsys):
    base, _ = trained_chinese
    out_dir = f"--out_dir={base / 'out' / 'chinese'}"
    assert sample_cli.main([out_dir, "--start=天x行健", "--drop_unknown", "--max_new_tokens=3", "--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("天行健,君子")
    long = "白日依山尽,黄河入海流。\n" * 3
    assert sample_cli.main([out_dir, f"--start={long}", "--max_new_tokens=2", "--num_samples=1"]) == 0
    assert "the prompt has 39 tokens; the model reads its last 24 (block_size)" in capsys.readouterr().err


def test_a_prompt_file_that_is_not_utf8_is_one_line(trained_chinese, tmp_path, capsys):
    """Bug: --start=FILE:path with a GBK (or binary) file ended in a UnicodeDecodeError traceback."""
    (tmp_path / "gbk.txt").write_bytes("天行健".encode("gbk"))
    assert sample_cli.main([f"--out_dir={trained_chinese[0] / 'out' / 'chinese'}", f"--start=FILE:{tmp_path / 'gbk.txt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'gbk.txt'} is not UTF-8 text: byte 0") and "iconv -f GBK" in err


def test_ctrl_c_while_writing_ends_cleanly(trained_chinese, monkeypatch, capsys):
    """Bug: Ctrl-C while sample.py writes a long continuation ended in a KeyboardInterrupt traceback."""
    from model.engine import Engine
    rounds, real = [], Engine.round

    def interrupted(self, joining):  # Ctrl-C arrives while the engine decodes its fifth token
        rounds.append(1)
        if len(rounds) == 5:
            raise KeyboardInterrupt
        return real(self, joining)

    monkeypatch.setattr(Engine, "round", interrupted)
    code = sample_cli.main([f"--out_dir={trained_chinese[0] / 'out' / 'chinese'}", "--start=天", "--max_new_tokens=1000",
                            "--num_samples=1"])
    out, err = capsys.readouterr()
    assert code == 130 and len(out) == 5 and "Traceback" not in err, (out, err)  # 天 and the 4 tokens it wrote


def test_a_reader_that_stops_reading_ends_it_quietly(trained_chinese):
    """Bug: sample.py | head ended in a BrokenPipeError traceback (and another at exit)."""
    import subprocess
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--out_dir={trained_chinese[0] / 'out' / 'chinese'}",
                             "--start=天", "--max_new_tokens=100000", "--num_samples=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(20)
    proc.stdout.close()  # as head does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and "Traceback" not in err and "Exception ignored" not in err, err


def test_no_checkpoint_says_how_to_train_one(capsys, in_tmp):
    assert sample_cli.main([]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint found" in err and "python train.py configs/sort.py" in err


def test_sort_start_must_be_valid(trained_sort, capsys):
    base, _ = trained_sort
    assert sample_cli.main([f"--out_dir={base / 'out' / 'sort'}", "--start=CBAD"]) == 2
    assert "a prompt must be 6 letters from ABC, got 'CBAD'" in capsys.readouterr().err
