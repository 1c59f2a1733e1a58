"""Serving: the OpenAI API held to the official `openai` client, continuous batching held to
each request decoded alone, every bad request a 4xx, and the chat page in Chromium."""

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pytest
import torch

from conftest import ROOT, command
from test_browser import needs_browser, open_browser, sync_playwright

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import sample as sample_cli  # noqa: E402
from model.checkpoint import Checkpoint, open_model, save_checkpoint  # noqa: E402
from model.config import ServeConfig, load_config  # noqa: E402
from model.engine import Engine, Request, Rules, TextStream, complete  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.serve.server import listen, make_app  # noqa: E402
from model.tokenizer import CharTokenizer  # noqa: E402

NUMBERS = ["1010", "305", "7", "99", "2024", "18", "460", "5003", "71", "888", "12", "3000", "640", "9", "101", "55"]


@dataclass
class Running:
    url: str
    engine: Engine
    name: str

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@contextlib.contextmanager
def serving(out_dir, *flags):
    """The server as `python -m model.serve --out_dir=out_dir *flags` makes it, on a free port, in a thread."""
    app, engine, name = make_app(load_config(ServeConfig, [f"--out_dir={out_dir}", "--device=cpu", *flags]), quiet=True)
    engine.start()
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, name)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()
        engine.thread.join(30)


@pytest.fixture(scope="module")
def numerals(trained_numerals):
    """A model trained on prompt/completion pairs (305 -> 三百零五), served."""
    with serving(trained_numerals[0]) as running:
        yield running


@pytest.fixture(scope="module")
def sorter(trained_sort):
    with serving(trained_sort[0] / "out" / "sort") as running:
        yield running


def alone(out_dir, number):
    """The greedy reply the engine gives the question decoded alone."""
    opened = open_model(out_dir, quiet=True)
    task = opened.task
    ids = task.encode_messages([{"role": "user", "content": number}])
    reply = complete(opened.model, [ids], replace(task.rules, max_tokens=task.block_size + 1 - len(ids), temperature=0))
    return opened.tokenizer.decode(reply[0][:-1] if reply[0][-1] == task.end else reply[0])


def post(url, body, headers=None, raw=None):
    """(status, JSON answer) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(running, content, **kw):
    return running.client().chat.completions.create(
        model=running.name, messages=[{"role": "user", "content": content}], **kw)


def streamed_chat(running, content, **kw):
    """(the text of the joined chunks, the finish reason, usage) of a streamed chat completion."""
    text, reason, usage = "", None, None
    for chunk in chat(running, content, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


# ---- the API, through the official client ------------------------------------------------------------------

def test_chat_completion_is_the_greedy_reply_with_its_usage(numerals, trained_numerals):
    """Catches: the template not applied, the end of turn not stopping the reply, wrong token counts."""
    answer = chat(numerals, "1010", temperature=0)
    assert answer.choices[0].message.content == alone(trained_numerals[0], "1010") == "一千零一十"
    assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
    # <|user|> 1 0 1 0 <|end|> <|assistant|>, then 一 千 零 一 十 <|end|>
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 6, 13)
    assert [m.id for m in numerals.client().models.list()] == [numerals.name]


def test_streamed_chunks_join_to_the_whole_reply(numerals):
    """Catches: lost or repeated pieces in the stream, a missing finish chunk or usage chunk."""
    for number in NUMBERS[:4]:
        whole = chat(numerals, number, temperature=0)
        text, reason, usage = streamed_chat(numerals, number, temperature=0)
        assert (text, reason) == (whole.choices[0].message.content, "stop")
        assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_stop_at_length(numerals):
    """Catches: max_tokens not honoured, finish_reason 'length' missing, completion chunks unlike the whole."""
    client = numerals.client()
    whole = client.completions.create(model=numerals.name, prompt="3", max_tokens=3, temperature=0)
    parts = list(client.completions.create(model=numerals.name, prompt="3", max_tokens=3, temperature=0, stream=True))
    assert whole.usage.completion_tokens <= 3 and whole.object == "text_completion"
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    if whole.usage.completion_tokens == 3:
        assert whole.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def random_text_model(tmp_path_factory):
    """A tiny text model with random weights: every next token is about as likely, so sampled
    replies differ from seed to seed (a trained model may be sure of each token at any temperature)."""
    folder = tmp_path_factory.mktemp("random")
    torch.manual_seed(0)
    tok = CharTokenizer(list("abcdefghij \n"))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    save_checkpoint(Checkpoint(model.state_dict(), model.config, tok.to_dict(), {"type": "text"}), folder / "ckpt.pt")
    return folder


def test_a_seed_gives_the_same_tokens_through_the_server_sample_py_and_the_engine(random_text_model, capsys):
    """Catches: the seed ignored (or the global generator used), a sampling rule (top_k) lost on one
    path, or sample.py drawing its first sample otherwise than a request with its seed."""
    def completion(seed):
        return running.client().completions.create(model=running.name, prompt="abc", max_tokens=12, temperature=1.3,
                                                  seed=seed, extra_body={"top_k": 5}).choices[0].text  # as vLLM takes it
    with serving(random_text_model) as running:
        texts = [completion(seed) for seed in (1, 1, 2, 3)]
        greedy = [running.client().completions.create(model=running.name, prompt="abc", max_tokens=12, temperature=0,
                                                      seed=s).choices[0].text for s in (None, 9)]
    assert texts[0] == texts[1] and len(set(texts)) == 3, texts
    assert greedy[0] == greedy[1], "greedy ignores the seed"
    assert sample_cli.main([f"--ckpt={random_text_model}", "--start=abc", "--seed=1", "--temperature=1.3", "--top_k=5",
                            "--max_new_tokens=12", "--num_samples=1"]) == 0
    assert capsys.readouterr().out == "abc" + texts[0] + "\n"
    opened = open_model(random_text_model, quiet=True)
    rules = replace(opened.task.rules, max_tokens=12, temperature=1.3, top_k=5, seed=1)
    assert opened.tokenizer.decode(complete(opened.model, [opened.tokenizer.encode("abc")], rules)[0]) == texts[0]


def test_n_choices_are_sample_py_s_num_samples_whole_and_streamed(random_text_model, capsys):
    """Catches: choices drawn from one another's random numbers (or all from the same seed), a streamed
    choice's text sent under another's index, usage counting one choice."""
    args = dict(prompt="abc", max_tokens=10, temperature=1.3, seed=5)
    with serving(random_text_model) as running:
        client = running.client()
        whole = client.completions.create(model=running.name, n=3, **args)
        alone = [client.completions.create(model=running.name, **{**args, "seed": 5 + i}).choices[0].text
                 for i in range(3)]
        streamed = {0: "", 1: "", 2: ""}
        for chunk in client.completions.create(model=running.name, n=3, stream=True, **args):
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert texts == alone and len(set(texts)) == 3, "choice i draws as a request with seed + i does"
    assert [streamed[i] for i in range(3)] == texts
    assert whole.usage.completion_tokens == 30, "every choice's tokens count"
    assert sample_cli.main([f"--ckpt={random_text_model}", "--start=abc", "--seed=5", "--temperature=1.3",
                            "--max_new_tokens=10", "--num_samples=3"]) == 0
    assert capsys.readouterr().out == ("\n" + "-" * 40 + "\n").join("abc" + t for t in texts) + "\n"


def test_a_greedy_reply_is_the_same_through_the_server_sample_py_and_evaluation(numerals, trained_numerals, capsys):
    """Catches: one path with other rules (the end of turn, a banned marker) than the others: the chat
    reply, sample.py's and the tokens the held-out evaluation scores are one decoding."""
    from model.eval import exact_match
    served = chat(numerals, "1010", temperature=0).choices[0].message.content
    assert sample_cli.main([f"--out_dir={trained_numerals[0]}", "--start=1010", "--temperature=0", "--num_samples=1"]) == 0
    assert capsys.readouterr().out == served + "\n"
    opened = open_model(trained_numerals[0], quiet=True)
    task = opened.task
    pair = (task.encode_messages([{"role": "user", "content": "1010"}]), opened.tokenizer.encode(served) + [task.end])
    assert exact_match(opened.model, [pair], task.rules) == 1.0


def test_stop_strings_cut_the_reply_also_when_streamed(numerals):
    """Catches: the stop string left in the reply, or streamed before the tokens after it show it is one
    (零一 spans two tokens: 零 must be held back until 一 comes)."""
    assert chat(numerals, "1010", temperature=0, stop=["零一"]).choices[0].message.content == "一千"
    assert chat(numerals, "1010", temperature=0, stop=["零一"]).choices[0].finish_reason == "stop"
    assert streamed_chat(numerals, "1010", temperature=0, stop=["零一"])[:2] == ("一千", "stop")
    assert chat(numerals, "1010", temperature=0, stop="零二").choices[0].message.content == "一千零一十"


def test_the_sorter_completes_and_refuses_chat(sorter):
    """Catches: a task's own prompt rules skipped (the sorter reads 6 letters), chat allowed without a template."""
    client = sorter.client()
    assert client.completions.create(model=sorter.name, prompt="CBABBC", temperature=0).choices[0].text == "ABBBCC"
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        chat(sorter, "CBABBC")
    with pytest.raises(openai.BadRequestError, match="6 letters from ABC"):
        client.completions.create(model=sorter.name, prompt="CBAD")


# ---- many clients at once ------------------------------------------------------------------------------------

class Recording:
    """The model, noting how many rows each forward pass reads."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __call__(self, ids, **kw):
        self.rows.append(ids.size(0))
        return self.model(ids, **kw)


def test_sixteen_clients_at_once_each_get_what_they_get_alone(numerals, trained_numerals):
    """Catches: rows mixed up in the batch (a wrong position, mask or cache row after one leaves),
    and requests decoded one after another instead of together. The engine is held until all sixteen
    have come, so how fast the clients connect does not matter."""
    expected = [alone(trained_numerals[0], n) for n in NUMBERS]
    recording = Recording(numerals.engine.model)
    numerals.engine.model = recording
    try:
        with held(numerals.engine) as (gate, jobs, _), ThreadPoolExecutor(16) as pool:
            replies = [pool.submit(lambda n: streamed_chat(numerals, n, temperature=0)[0], n) for n in NUMBERS]
            wait_for(lambda: len(jobs) == 16, "all sixteen requests reached the engine")
            gate.set()
            got = [r.result() for r in replies]
    finally:
        numerals.engine.model = recording.model
    assert got == expected
    assert max(recording.rows) >= 15, "the requests were decoded together"


@contextlib.contextmanager
def held(engine):
    """The engine waits at a gate before each forward pass until the gate is set; -> (gate, jobs
    submitted, entered: set once a forward pass waits at the gate, i.e. the engine has taken a job)."""
    gate, entered, jobs, model, submit = threading.Event(), threading.Event(), [], engine.model, engine.submit
    engine.model = lambda *a, **kw: (entered.set(), gate.wait(10), model(*a, **kw))[2]
    engine.submit = lambda *requests: (jobs.extend(requests), submit(*requests))[1]
    try:
        yield gate, jobs, entered
    finally:
        gate.set()
        engine.model, engine.submit = model, submit


def wait_for(condition, what):
    deadline = time.time() + 10
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_place_and_stalls_no_one(numerals, trained_numerals, stream):
    """Catches: an abandoned request still decoded to its end (its row kept), or stalling the others."""
    body = json.dumps({"model": numerals.name, "messages": [{"role": "user", "content": "5003"}], "temperature": 0,
                       "stream": stream}).encode()
    with held(numerals.engine) as (gate, jobs, entered):
        with socket.create_connection(("127.0.0.1", int(numerals.url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            if stream:
                received = b""
                while b"data:" not in received:  # the stream has begun (its first chunk names the role)
                    received += s.recv(4096)
            # the engine has taken the job and reads its prompt (held at the gate): it will write one token, no
            # more; a client that left before that would leave the queue with none, which is right too
            assert entered.wait(10), "the engine took the request"
        wait_for(lambda: jobs[0].cancelled, "the server noticed the client went away")
        gate.set()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda n: streamed_chat(numerals, n, temperature=0)[0], NUMBERS[:4]))
    assert got == [alone(trained_numerals[0], n) for n in NUMBERS[:4]]
    assert alone(trained_numerals[0], "5003") == "五千零三"
    assert len(jobs[0].tokens) == 1, "the abandoned request left after its first token instead of writing 五千零三"
    wait_for(lambda: not numerals.engine.rows, "every row is free again")


# ---- bad requests ---------------------------------------------------------------------------------------------

def bad_requests(name):
    ok = {"model": name, "messages": [{"role": "user", "content": "305"}]}
    return [
        ("malformed JSON", "chat/completions", None, b'{"model": ', 400, "not valid JSON"),
        ("not an object", "chat/completions", [1, 2], None, 400, "JSON object"),
        ("nested too deeply", "chat/completions", None, b"[" * 100_000, 400, "nested too deeply"),
        ("a seed past 64 bits", "chat/completions", {**ok, "seed": 2 ** 64}, None, 400, "64-bit"),
        ("no messages", "chat/completions", {"model": name}, None, 400, "'messages'"),
        ("no model", "chat/completions", {"messages": ok["messages"]}, None, 400, "'model' is missing"),
        ("a wrong role", "chat/completions", {**ok, "messages": [{"role": "robot", "content": "x"}]}, None, 400,
         "role"),
        ("content not text", "chat/completions", {**ok, "messages": [{"role": "user", "content": 5}]}, None, 400,
         "content"),
        ("temperature a string", "chat/completions", {**ok, "temperature": "hot"}, None, 400, "must be a number"),
        ("temperature too high", "chat/completions", {**ok, "temperature": 7}, None, 400, "between 0 and 2"),
        ("stream not a boolean", "chat/completions", {**ok, "stream": "yes"}, None, 400, "boolean"),
        ("unknown model", "chat/completions", {**ok, "model": "gpt-4o"}, None, 404, "does not exist"),
        ("max_tokens 0", "chat/completions", {**ok, "max_tokens": 0}, None, 400, "at least 1"),
        ("max_tokens past the context", "chat/completions", {**ok, "max_completion_tokens": 500}, None, 400,
         "past the context"),
        ("a prompt longer than the context", "completions", {"model": name, "prompt": "1" * 40}, None, 400,
         "reads at most"),
        ("unknown characters", "completions", {"model": name, "prompt": "abc"}, None, 400, "does not know"),
        ("no choice", "completions", {"model": name, "prompt": "1", "n": 0}, None, 400, "'n' must be between 1 and 16"),
        ("more choices than rows", "completions", {"model": name, "prompt": "1", "n": 17}, None, 400, "'n' must be between"),
        ("a penalty we do not apply", "completions", {"model": name, "prompt": "1", "frequency_penalty": 0.5}, None,
         400, "not supported"),
        ("five stop strings", "completions", {"model": name, "prompt": "1", "stop": list("abcde")}, None, 400,
         "at most 4"),
        ("logprobs past 20", "completions", {"model": name, "prompt": "1", "logprobs": 21}, None, 400,
         "between 0 and 20"),
        ("logprobs streamed", "completions", {"model": name, "prompt": "1", "logprobs": 1, "stream": True}, None, 400,
         "without 'stream'"),
        ("top_logprobs without logprobs", "chat/completions", {**ok, "top_logprobs": 2}, None, 400, "needs 'logprobs'"),
        ("echo not a boolean", "completions", {"model": name, "prompt": "1", "echo": "yes"}, None, 400, "boolean"),
        ("a token id past the vocabulary", "completions", {"model": name, "prompt": [1, 99999]}, None, 400,
         "token id 99999"),
        ("a prompt of no tokens", "completions", {"model": name, "prompt": [[]]}, None, 400, "non-empty array"),
        ("no prompt", "completions", {"model": name, "prompt": []}, None, 400, "'prompt' must be"),
        ("more prompts than the queue", "completions", {"model": name, "prompt": ["1"] * 65}, None, 400, "at most 64"),
    ]


def test_every_bad_request_is_a_4xx_in_the_apis_shape_and_the_server_goes_on(numerals):
    """Catches: a 500 (or a hang) for anything a client can send, an error not in the API's shape."""
    for what, route, body, raw, status, words in bad_requests(numerals.name):
        code, answer = post(f"{numerals.url}/v1/{route}", body, raw=raw)
        assert code == status, what
        assert words in answer["error"]["message"] and answer["error"]["type"], what
    # a body over --max_body is refused from its Content-Length; sent only after the answer (as a client that asks
    # 'Expect: 100-continue' would), so the socket is not reset under a client still writing it
    connection = http.client.HTTPConnection("127.0.0.1", int(numerals.url.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "1100000")
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "this server takes at most 1,000,000" in json.loads(answer.read())["error"]["message"]
    connection.close()
    assert chat(numerals, "305", temperature=0).choices[0].message.content == "三百零五"


def test_a_lone_surrogate_in_any_field_is_a_4xx_never_a_500(numerals):
    """Catches: an error message quoting a client's value that cannot be encoded (a 500 with a
    traceback), or text that is not Unicode reaching the tokenizer. JSON may spell "\\ud800"."""
    bad = "a\ud800b"
    chat_body = {"model": numerals.name, "messages": [{"role": "user", "content": "305"}], "max_tokens": 4,
                 "temperature": 0, "top_p": 1, "top_k": 5, "n": 1, "stop": ["x"], "seed": 1, "stream": False,
                 "stream_options": {"include_usage": True}, "max_completion_tokens": 4, "logprobs": False}
    text_body = {**{k: v for k, v in chat_body.items() if k != "messages"}, "prompt": "305", "logprobs": 1, "echo": True}
    bodies = []
    for route, body in (("chat/completions", chat_body), ("completions", text_body)):
        bodies += [(route, {**body, key: bad}) for key in body]  # every field, of any kind, holding it
        bodies += [(route, {**body, "stop": [bad]}), (route, {**body, "stream_options": {"include_usage": bad}})]
    bodies += [("chat/completions", {**chat_body, "messages": [{"role": bad, "content": "305"}]}),
               ("chat/completions", {**chat_body, "messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]}),
               ("completions", {**text_body, "prompt": [bad]})]
    for route, body in bodies:
        code, answer = post(f"{numerals.url}/v1/{route}", None, raw=json.dumps(body).encode())  # ASCII: \ud800 escaped
        assert 400 <= code < 500 and answer["error"]["message"], (route, body, code, answer)
    assert chat(numerals, "305", temperature=0).choices[0].message.content == "三百零五", "and the server goes on"


def test_logprobs_and_echo_are_the_models_own_for_each_prompt_and_choice(numerals, trained_numerals):
    """Catches: a token scored by the logits of the position after it, scores taken after the banned
    tokens were masked, choices not in their prompts' order, the echoed text or the end token missing,
    the chat reply's end of turn among its tokens."""
    opened = open_model(trained_numerals[0], quiet=True)
    task, tok = opened.task, opened.tokenizer
    prompts = [task.encode_messages([{"role": "user", "content": q}]) for q in ("305", "7")]
    answer = numerals.client().completions.create(model=numerals.name, prompt=prompts, max_tokens=6, temperature=0,
                                                 logprobs=2, echo=True)
    assert [c.index for c in answer.choices] == [0, 1] and answer.usage.prompt_tokens == sum(map(len, prompts))
    for ids, choice, words in zip(prompts, answer.choices, ("三百零五", "七")):
        reply = complete(opened.model, [ids], replace(task.rules, max_tokens=6, temperature=0))[0]
        assert choice.text == tok.decode(ids) + words and reply[-1] == task.end
        seq = ids + reply
        with torch.no_grad():
            logp = torch.log_softmax(opened.model(torch.tensor([seq]))[0][0], dim=-1)
        lp = choice.logprobs
        assert lp.tokens == [tok.decode([i]) for i in seq] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.text_offset == [len(tok.decode(seq[:k])) for k in range(len(seq))]
        for k in range(1, len(seq)):
            assert abs(lp.token_logprobs[k] - logp[k - 1, seq[k]].item()) < 1e-4
            best = logp[k - 1].topk(2)
            expected = {tok.decode([i]): v for i, v in zip(best.indices.tolist(), best.values.tolist())}
            expected[tok.decode([seq[k]])] = logp[k - 1, seq[k]].item()
            assert lp.top_logprobs[k].keys() == expected.keys()
            assert all(abs(lp.top_logprobs[k][t] - v) < 1e-4 for t, v in expected.items())
    reply = chat(numerals, "305", temperature=0, logprobs=True, top_logprobs=3).choices[0]
    content = reply.logprobs.content
    assert "".join(t.token for t in content) == reply.message.content == "三百零五"
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content), "greedy: the best"
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    plain = numerals.client().completions.create(model=numerals.name, prompt="305", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None and not plain.choices[0].text.startswith("305"), "no echo asked"


def test_the_tokenizer_routes_are_vllms_and_read_markers_as_transformers_does(numerals, trained_numerals):
    """Catches: /tokenize reading a marker's spelling as characters (lm-eval's remote tokenizer would
    then score other tokens than the model was trained on), a missing end of text in /tokenizer_info."""
    tok = open_model(trained_numerals[0], quiet=True).tokenizer
    code, info = get_json(numerals.url + "/tokenizer_info")
    assert code == 200 and info["eos_token"] == "<|end|>" and "<|assistant|>" in info["chat_template"]
    code, ids = post(numerals.url + "/tokenize", {"prompt": "<|user|>305<|end|>"})
    assert code == 200 and ids["tokens"] == [tok.special_id("<|user|>"), *tok.encode("305"), tok.special_id("<|end|>")]
    assert post(numerals.url + "/detokenize", {"tokens": ids["tokens"]}) == (200, {"prompt": "<|user|>305<|end|>"})
    code, answer = post(numerals.url + "/detokenize", {"tokens": [-1]})
    assert code == 400 and "token id -1" in answer["error"]["message"]


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def test_the_official_client_sees_the_errors_as_its_own_kinds(numerals):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        numerals.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "1"}])
    with pytest.raises(openai.BadRequestError, match="past the context"):
        chat(numerals, "1", max_tokens=10_000)


def test_a_full_queue_answers_429(trained_numerals):
    """Catches: an unbounded queue (requests pile up in memory) or a 500 when it is full."""
    with serving(trained_numerals[0], "--max_queue=1", "--max_batch=1") as running:
        with held(running.engine) as (gate, jobs, _), ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, running, "1", temperature=0)  # decoding, held at the gate
            wait_for(lambda: len(jobs) == 1 and not running.engine.waiting, "the first request is decoding")
            second = pool.submit(chat, running, "2", temperature=0)  # waiting in the queue's one place
            wait_for(lambda: len(jobs) == 2, "the second request is queued")
            code, answer = post(f"{running.url}/v1/completions", {"model": running.name, "prompt": "3"})
            gate.set()
            assert [first.result().choices[0].message.content, second.result().choices[0].message.content] == \
                ["一", "二"]
    assert code == 429 and answer["error"]["code"] == "rate_limit_exceeded"


def test_an_api_key_is_required_when_set(trained_numerals):
    """Catches: the key not checked on every route, or checked by prefix."""
    with serving(trained_numerals[0], "--api_key=s3cret") as running:
        for key in ("none", "s3cre", "s3cret-and-more", "S3CRET"):
            with pytest.raises(openai.AuthenticationError):
                running.client(api_key=key).models.list()
        code, answer = post(f"{running.url}/v1/completions", {"model": running.name, "prompt": "1"})
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        good = running.client(api_key="s3cret").chat.completions.create(
            model=running.name, messages=[{"role": "user", "content": "305"}], temperature=0)
        assert good.choices[0].message.content == "三百零五"


# ---- the parts ---------------------------------------------------------------------------------------------------

class Chars:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def stream_text(stop, text):
    s, out = TextStream(Chars(), stop), []
    for ch in text:
        delta, stopped = s.add(ord(ch))
        out.append(delta)
        if stopped:
            return out, True
    return out + [s.finish()], False


def test_stop_text_holds_back_only_what_may_begin_a_stop_string():
    """Catches: text sent that turns out to be a stop string's start, or text held back forever."""
    assert stream_text(["END"], "abcENDxyz") == (["a", "b", "c", "", "", ""], True)
    assert stream_text(["END"], "abEaEN!") == (["a", "b", "", "Ea", "", "", "EN!", ""], False)
    assert stream_text([], "ab") == (["a", "b", ""], False)
    assert stream_text(["xy", "b"], "aab") == (["a", "a", ""], True)


def test_a_job_stops_at_its_end_token_without_its_text():
    """Catches: the end-of-turn token's text (<|end|>) written into the reply."""
    events = []
    job = Request([1], Rules(max_tokens=10, stop_ids=(0,)), TextStream(Chars()), events.append)
    assert not job.add(ord("h")) and job.add(0)
    assert events == [("text", "h"), ("end", "stop")] and job.tokens == [ord("h"), 0] and job.reply() == [ord("h")]


# ---- the command and the page ---------------------------------------------------------------------------------

def test_the_command_serves_until_ctrl_c_and_names_a_busy_port(trained_sort):
    out_dir = trained_sort[0] / "out" / "sort"
    busy = listen("127.0.0.1", 0)
    busy.listen()
    port = busy.getsockname()[1]
    failed = subprocess.run([sys.executable, "-m", "model.serve", f"--out_dir={out_dir}", f"--port={port}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in failed.stderr
    busy.close()
    proc = subprocess.Popen(command("-m model.serve", f"--out_dir={out_dir}", "--port=0"),
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before serving"
        url = line.split(" at ")[1].split("/ ")[0]
        assert post(url + "/v1/completions", {"model": "sort", "prompt": "CCBAAB", "temperature": 0})[1][
            "choices"][0]["text"] == "AABBCC"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 130 and "Traceback" not in proc.stderr.read(), "Ctrl-C stops it cleanly, with the shell's code"


@needs_browser
def test_the_chat_page_streams_replies_in_chromium(numerals):
    """Catches: a page that asks the network for anything but this server, mis-reads the event stream,
    forgets the conversation, or leaves console errors."""
    with sync_playwright() as play:
        browser = open_browser(play)
        page, errors, asked = browser.new_page(), [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: asked.append(r.url))
        page.goto(numerals.url + "/")
        page.fill("#temperature", "0")
        for n, (number, reply) in enumerate((("1010", "一千零一十"), ("305", "三百零五")), 1):
            page.fill("#input", number)
            page.press("#input", "Enter")
            page.wait_for_function(f"document.body.dataset.state === 'idle' && "
                                   f"document.querySelectorAll('.assistant .text').length === {n}")
            assert page.locator(".assistant .text").last.text_content() == reply
        assert page.locator(".user .text").all_text_contents() == ["1010", "305"]
        # the model reads 16 tokens: the second question did not fit after the first exchange, which was left out
        assert "left out" in page.locator(".notice").text_content()
        page.click("#new")
        assert page.locator(".message").count() == 0
        browser.close()
    refused = "Failed to load resource: the server responded with a status of 400 (Bad Request)"  # the one too long
    assert errors == [refused]
    assert asked and all(url.startswith(numerals.url + "/") for url in asked)


@needs_browser
def test_the_page_says_once_when_a_conversation_is_longer_than_the_training_ones(trained_chat):
    """Catches: the page keeping a history longer than any the model saw without a word, or saying so each turn."""
    with serving(trained_chat) as running, sync_playwright() as play:
        browser = open_browser(play)
        page = browser.new_page()
        page.goto(running.url + "/")
        page.fill("#temperature", "0")
        for n, text in enumerate(["你好", "天行健的下一句是什么?", "谢谢", "你好", "谢谢"], 1):  # the training conversation
            page.fill("#input", text)  # and two exchanges more
            page.press("#input", "Enter")
            page.wait_for_function(f"document.body.dataset.state === 'idle' && "
                                   f"document.querySelectorAll('.assistant .text').length === {n}")
            longer = [t for t in page.locator(".notice").all_text_contents() if "longer than any" in t]
            assert len(longer) == (1 if n > 3 else 0), (n, longer)
        assert "trained on, 3 exchange(s) at most" in longer[0]
        browser.close()


@needs_browser
def test_the_page_continues_text_for_a_model_without_a_chat_template(sorter):
    """Catches: the page sending a chat to a model that has no template (a 400) instead of a completion."""
    with sync_playwright() as play:
        browser = open_browser(play)
        page = browser.new_page()
        page.goto(sorter.url + "/")
        assert "completion" in page.locator("#mode").text_content()
        page.fill("#temperature", "0")
        page.fill("#input", "CBABBC")
        page.press("#input", "Enter")
        page.wait_for_function("document.body.dataset.state === 'idle' && "
                               "document.querySelectorAll('.assistant .text').length === 1")
        assert page.locator(".assistant .text").text_content() == "ABBBCC"
        browser.close()


def test_sampling_and_serving_never_import_the_training_loop():
    """Catches an import that drags the training loop (and what only it needs) into the commands that only
    use a model."""
    code = ("import sys, sample, model.serve.server; "
            "print(sorted(m for m in sys.modules if m in ('model.trainer', 'model.start', 'model.memory')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ctrl_c_delivered_to_another_thread_still_stops_an_idle_server(tmp_path):
    """Bug: the engine's main thread waiting for requests with no timeout never ran Python's SIGINT handler when
    the system delivered Ctrl-C to the HTTP thread (seen once under load: the server never exited)."""
    script = tmp_path / "idle.py"
    script.write_text(
        "import signal, sys, threading, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from model.engine import Engine\n"
        "from model.gpt import GPT, GPTConfig\n"
        "engine = Engine(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=5, block_size=4)).eval())\n"
        "def other():\n"
        "    time.sleep(0.5)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread, not the main one\n"
        "threading.Thread(target=other, daemon=True).start()\n"
        "try:\n"
        "    engine.run()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, timeout=30, capture_output=True, text=True)
    assert done.returncode == 130, done.stderr
