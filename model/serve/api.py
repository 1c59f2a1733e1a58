"""The OpenAI API over HTTP, on Starlette: what a request may say, and the answers' shapes.

    POST /v1/chat/completions   messages -> the assistant's reply (models with a chat template)
    POST /v1/completions        prompt(s) -> continuations (every model); logprobs and echo score text
    GET  /v1/models             the one model served
    POST /tokenize, /detokenize, GET /tokenizer_info   the model's tokenizer, as vLLM serves it
    GET  /                      the chat page

Each request becomes one of the engine's Requests (model/engine.py, which sample.py decodes through
too); replies come back whole or, with "stream": true, as server-sent events in the API's chunk
format, ending with `data: [DONE]`. Every mistake in a request is an OpenAI-style JSON error with
a 4xx status, and the server goes on serving. With logprobs and echo (the prompt's own scores) and
the tokenizer routes, lm-evaluation-harness's `local-completions` model evaluates the served model.
"""

import asyncio
import hmac
import json
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from itertools import accumulate

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from model.engine import QueueFull, Request, TextStream, draws
from model.errors import UserError
from model.tasks import chat_task, end_of_text
from model.tokenizer import UnknownCharacters, encode_as_transformers

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # developer: o1's system
# refused when set (0, false and null pass), never silently ignored
UNSUPPORTED = ("tools", "functions", "suffix", "presence_penalty", "frequency_penalty", "logit_bias")
DEFAULT_COMPLETION_TOKENS = 16  # the API's default max_tokens for /v1/completions (chat: the rest of the context)
MOST_LOGPROBS = 20  # alternatives a token at most (the chat API's top_logprobs limit; vLLM's default too)


class RequestError(Exception):
    """What is wrong with a request: its status and the API's error fields."""

    def __init__(self, message, status=400, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def error_body(message, kind, param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiJSON(JSONResponse):
    """JSON as the API writes it, readable UTF-8; a message that quotes a client's lone surrogate
    is written with it escaped (\\ud800), never a failed encoding and a 500."""

    def render(self, content):
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


@dataclass
class Served:
    """The model a server serves and how text becomes its tokens: `task` encodes a prompt for
    /v1/completions, `chat` (a ChatTask, or None: no template) a conversation."""
    name: str
    task: object
    chat: object
    tokenizer: object
    block_size: int
    created: int

    @classmethod
    def of(cls, opened, name=""):
        if opened.tokenizer is None:
            raise UserError(f"{opened.path} has no vocabulary (a nanoGPT checkpoint keeps it in meta.pkl): pass "
                            f"--meta=path/to/meta.pkl so requests can be read")
        name = name or (opened.path.parent.name if opened.path.is_file() else opened.path.name)
        return cls(name, opened.task, chat_task(opened.ckpt, opened.task), opened.tokenizer,
                   opened.model.config.block_size, int(opened.path.stat().st_mtime))


# ---- reading a request ------------------------------------------------------------------------

KINDS = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def get(body, name, kind, default=None, where=""):
    """body[name] if it is of the JSON kind given, default if absent or null, else RequestError."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, KINDS[kind]) or (isinstance(value, bool) and kind != "boolean"):
        raise RequestError(f"'{where}{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got "
                           f"{json.dumps(value, ensure_ascii=False)[:40]}", param=where + name)
    return value


def in_range(body, name, default, low, high):
    value = get(body, name, "number", default)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


async def read_body(request, limit):
    """The request's JSON object, read no further than `limit` bytes."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise RequestError(f"the request body is {int(size):,} bytes; this server takes at most {limit:,}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is over {limit:,} bytes, the most this server takes", 413)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


def unicode_text(text, param):
    """A request's text must be Unicode that UTF-8 can write: a lone surrogate (JSON's "\\ud800") is a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"'{param}' is not valid Unicode text: it holds a lone surrogate at character {e.start}",
                           param=param) from None
    return text


def read_messages(body):
    """The conversation: a non-empty list of {role, content}, content a string or text parts."""
    messages = get(body, "messages", "array")
    if not messages:
        raise RequestError("'messages' must be a non-empty array of {\"role\": ..., \"content\": ...}",
                           param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"'{where}role' must be one of {', '.join(ROLES)}", param=where + "role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"'{where}content' must be a string or a list of text parts",
                               param=where + "content")
        out.append({"role": ROLES[m["role"]], "content": unicode_text(content, where + "content")})
    return out


def read_prompts(body, served):
    """The prompts' ids and texts, as the API takes them: a string, strings, token ids (a list of
    ints) or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("'prompt' must be a string, an array of strings, or token ids (an array of integers, or "
                           "arrays of them)", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((encoded(served.task.encode_prompt, unicode_text(p, f"prompt[{i}]")), p))
        else:
            out.append((read_ids(p, served, f"prompt[{i}]"), None))
    return out


def read_ids(ids, served, param):
    """Token ids a request gives: a non-empty list of ids the tokenizer has."""
    size = served.tokenizer.vocab_size
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"'{param}' must be a string or a non-empty array of token ids", param=param)
    bad = [t for t in ids if not 0 <= t < size]
    if bad:
        raise RequestError(f"'{param}' holds the token id {bad[0]}; this model's ids are 0 to {size - 1}", param=param)
    return ids


def read_logprobs(body, chat):
    """How many alternatives a token the reply's logprobs list (None: no logprobs): the chat API's
    logprobs (a boolean) with top_logprobs, the completions API's logprobs (a number)."""
    if chat:
        n = get(body, "top_logprobs", "integer")
        if not get(body, "logprobs", "boolean", False):
            if n is not None:
                raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        name, n = "top_logprobs", 0 if n is None else n
    else:
        name, n = "logprobs", get(body, "logprobs", "integer")
        if n is None:
            return None
    if not 0 <= n <= MOST_LOGPROBS:
        raise RequestError(f"'{name}' must be between 0 and {MOST_LOGPROBS}, got {n}", param=name)
    if get(body, "stream", "boolean", False):
        raise RequestError("logprobs are not streamed by this server: ask for them without 'stream'", param="stream")
    return n


def encoded(encode, text):
    try:
        return encode(text)
    except UnknownCharacters as e:
        raise RequestError(f"the model does not know the characters {''.join(e.missing)!r}; rephrase without them") \
            from None
    except UserError as e:
        raise RequestError(str(e)) from None


def read_top_k(body):
    """top_k as vLLM's OpenAI server takes it: absent, null, 0 or -1 consider every token."""
    top_k = get(body, "top_k", "integer", -1)
    if top_k < -1:
        raise RequestError(f"'top_k' must be at least 1 (or 0 or -1 for every token), got {top_k}", param="top_k")
    return top_k if top_k > 0 else None


def read_requests(body, served, prompt, chat, most, echo=False):
    """The engine Requests a body asks for (one a choice, `n` of them, at most `most`), its prompt's
    ids given; every option checked. Choice i draws with seed + i, as sample.py's sample i does.
    chat: whether it is a chat completion (by default it may take the rest of the context; a
    completion 16 tokens), whose text starts afresh; a completion's continues its prompt. echo:
    the prompt's tokens are scored too (with logprobs)."""
    for name in UNSUPPORTED:
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    n = get(body, "n", "integer", 1)
    if not 1 <= n <= most:
        raise RequestError(f"'n' must be between 1 and {most} (the choices are decoded together), got {n}", param="n")
    room = served.block_size + 1 - len(prompt)  # the last token written is never read back
    if room < 1:
        raise RequestError(f"the prompt is {len(prompt)} tokens; this model reads at most {served.block_size} "
                           f"(its block_size): shorten it", code="context_length_exceeded")
    asked = {name: get(body, name, "integer") for name in ("max_tokens", "max_completion_tokens")}  # both checked
    name = "max_completion_tokens" if asked["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    max_tokens = max_tokens if asked[name] is None else asked[name]
    if max_tokens < 1:
        raise RequestError(f"'{name}' must be at least 1, got {max_tokens}", param=name)
    if max_tokens > room:
        raise RequestError(f"'{name}' is {max_tokens}, past the context: the prompt takes {len(prompt)} of the "
                           f"model's {served.block_size + 1} tokens, so at most {room} can follow", param=name,
                           code="context_length_exceeded")
    temperature, top_p = in_range(body, "temperature", 1.0, 0, 2), in_range(body, "top_p", 1.0, 0, 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or an array of at most 4 strings", param="stop")
    for i, s in enumerate(stop):
        unicode_text(s, f"stop[{i}]")
    seed = get(body, "seed", "integer")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:
        raise RequestError(f"'seed' must be a 64-bit integer, got {seed}", param="seed")
    base = (served.chat or served.task).rules  # a model trained to answer stops at its end of turn, on both routes
    logprobs = read_logprobs(body, chat)
    rules = replace(base, max_tokens=max_tokens, temperature=0.0 if top_p == 0 else temperature, top_k=read_top_k(body),
                    top_p=top_p or 1.0, seed=seed, stop=tuple(stop), logprobs=logprobs,
                    prompt_logprobs=logprobs if echo else None)
    return [Request(prompt, r, TextStream(served.tokenizer, r.stop, context=() if chat else prompt)) for r in draws(rules, n)]


# ---- answering -----------------------------------------------------------------------------

@dataclass
class Reply:
    """How one request's answer is written: its id, kind (chat or text) and model."""
    kind: str
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def usage(self, jobs):
        n = sum(len(job.tokens) for job in jobs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def choice(self, index, text, reason, delta=None, logprobs=None):
        """Choice `index` of a reply; for a chat chunk, `delta` is the message's part it brings."""
        if self.kind == "text":
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if delta is not None:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason}

    def whole(self, texts, reasons, jobs, logprobs):
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [self.choice(i, t, r, logprobs=lp) for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))],
                "usage": self.usage(jobs)}

    def chunk(self, choices, usage=None):
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return f"data: {json.dumps(body if usage is None else {**body, 'usage': usage}, ensure_ascii=False)}\n\n"


def token_text(tokenizer, i):
    """A token as the logprobs show it: its text, or (a byte-level token that ends inside a
    character) its bytes written bytes:\\xe4\\xbd, so distinct tokens never share a name."""
    raw = tokenizer.token_bytes(i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_logprobs(tokenizer, job, echo):
    """A completion's logprobs in the API's shape: each token (the prompt's first, with echo), its
    log-probability (null for the prompt's first, which nothing predicts), {token: logprob} of the
    most likely ones and the token itself, and where its text starts in the choice's text."""
    ids, scores = (job.prompt + job.tokens, job.prompt_logprobs + job.logprobs) if echo else (job.tokens, job.logprobs)
    tokens = [token_text(tokenizer, i) for i in ids]
    offsets = list(accumulate(map(len, tokens), initial=0))[:-1]  # where each token's text starts
    top = [None if s is None else {**{token_text(tokenizer, i): lp for i, lp in s.top}, t: s.logprob}
           for t, s in zip(tokens, scores)]
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer, job):
    """A chat reply's logprobs in the API's shape: for each token of the reply (not the end of turn),
    its text, log-probability and bytes, and the most likely tokens'."""
    def entry(i, logprob):
        return {"token": token_text(tokenizer, i), "logprob": logprob, "bytes": list(tokenizer.token_bytes(i))}
    return {"content": [{**entry(i, s.logprob), "top_logprobs": [entry(j, lp) for j, lp in s.top]}
                        for i, s in zip(job.reply(), job.logprobs)], "refusal": None}


async def until_disconnected(receive, work):
    """Await work() unless the client goes away first (then work is cancelled) -> whether it finished."""
    finished = False
    async with anyio.create_task_group() as group:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        await work()
        finished = True
        group.cancel_scope.cancel()
    return finished


class Mailbox:
    """Events from the engine's thread to the requests' queues on the event loop. A step's events go
    over together, in one call: one wake-up of the loop a step, not one a token of every request."""

    def __init__(self, loop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def post(self, queue, event):
        """From the engine's thread: event for the request reading `queue`."""
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:  # a delivery is on its way already
                return
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self):
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class EventStream(StreamingResponse):
    """Server-sent events that stop the moment the client goes away, whatever the ASGI server."""
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        async def stream():
            try:
                await self.stream_response(send)
            except OSError:  # the client went away while we wrote
                pass
        await until_disconnected(receive, stream)


class Api:
    """The routes, over one served model and its engine."""

    def __init__(self, served, engine, api_key="", max_body=1_000_000):
        self.served, self.engine, self.api_key, self.max_body = served, engine, api_key, max_body
        self.mailbox = None  # made when the app starts, on its event loop

    def check_key(self, request):
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise RequestError("no API key given: send the header 'Authorization: Bearer YOUR_KEY'", 401,
                               code="invalid_api_key")
        if not hmac.compare_digest(given[7:].encode(), self.api_key.encode()):  # in constant time
            raise RequestError("the API key is not this server's", 401, code="invalid_api_key")

    async def request(self, request):
        """The request's body once its key and model are right."""
        self.check_key(request)
        body = await read_body(request, self.max_body)
        model = get(body, "model", "string")
        if model is None:
            raise RequestError(f"'model' is missing: this server serves {self.served.name!r}", param="model")
        if model != self.served.name:
            raise RequestError(f"the model {model!r} does not exist; this server serves {self.served.name!r}", 404,
                               param="model", code="model_not_found")
        return body

    async def chat_completions(self, request):
        body = await self.request(request)
        chat = self.served.chat
        if chat is None:
            raise RequestError(f"{self.served.name!r} has no chat template (it was not trained on conversations and "
                               f"its folder has none): use /v1/completions", param="messages")
        prompt = encoded(chat.encode_messages, read_messages(body))
        jobs = read_requests(body, self.served, prompt, True, self.engine.max_batch)
        return await self.answer(request, body, jobs, "chat", len(prompt))

    async def completions(self, request):
        """Each prompt's n choices, in order (choice index = prompt's index x n + its own); with echo, a
        choice's text begins with its prompt's."""
        body = await self.request(request)
        prompts, echo = read_prompts(body, self.served), get(body, "echo", "boolean", False)
        jobs, echoes = [], []
        for ids, text in prompts:
            choices = read_requests(body, self.served, ids, False, self.engine.max_batch, echo)
            jobs += choices
            echoes += [self.served.tokenizer.decode(ids) if text is None else text] * len(choices) if echo else []
        if len(jobs) > self.engine.max_queue:
            raise RequestError(f"{len(prompts)} prompts of {len(jobs) // len(prompts)} choices each are {len(jobs)} "
                               f"completions; this server takes at most {self.engine.max_queue} a request",
                               param="prompt")
        return await self.answer(request, body, jobs, "text", sum(len(ids) for ids, _ in prompts), echoes)

    async def answer(self, request, body, jobs, kind, prompt_tokens, echoes=()):
        """Queue the jobs (one a choice); the reply whole, or streamed as events. echoes: the text each
        choice begins with (its prompt's)."""
        stream = get(body, "stream", "boolean", False)
        usage = get(get(body, "stream_options", "object", {}), "include_usage", "boolean", False, "stream_options.")
        reply, events = Reply(kind, self.served.name, prompt_tokens), asyncio.Queue()
        for i, job in enumerate(jobs):
            job.emit = lambda event, i=i: self.mailbox.post(events, (i, *event))
        try:
            self.engine.submit(*jobs)
        except QueueFull as e:
            raise RequestError(f"the server is busy ({e}); try again shortly", 429, code="rate_limit_exceeded",
                               kind="requests") from None
        if stream:
            return EventStream(self.events(jobs, events, reply, usage, echoes))
        texts, reasons = list(echoes) or [""] * len(jobs), [None] * len(jobs)

        async def collect():
            while None in reasons:
                i, kind, value = await events.get()
                if kind == "text":
                    texts[i] += value
                else:
                    reasons[i] = value

        if not await until_disconnected(request.receive, collect):
            self.engine.cancel(*jobs)
            return ApiJSON({})  # nobody is there to read it
        if "error" in reasons:
            return ApiJSON(error_body("the server failed while decoding (see its log)", "server_error"), 500)
        return ApiJSON(reply.whole(texts, reasons, jobs, [self.logprobs(job, kind, bool(echoes)) for job in jobs]))

    def logprobs(self, job, kind, echo):
        if job.rules.logprobs is None:
            return None
        return text_logprobs(self.served.tokenizer, job, echo) if kind == "text" else chat_logprobs(self.served.tokenizer, job)

    async def events(self, jobs, events, reply, usage, echoes=()):
        """The reply as server-sent events, each chunk the text that came for each choice; the jobs leave
        the batch if the client goes away."""
        ended = set()
        try:
            if reply.kind == "chat":
                yield reply.chunk([reply.choice(i, "", None, {"role": "assistant", "content": ""}) for i in range(len(jobs))])
            if echoes:
                yield reply.chunk([reply.choice(i, text, None) for i, text in enumerate(echoes)])
            while len(ended) < len(jobs):
                came = [await events.get()]
                while not events.empty():  # the client fell behind: what came goes as one chunk
                    came.append(events.get_nowait())
                if any(kind == "end" and value == "error" for _, kind, value in came):
                    yield f"data: {json.dumps(error_body('the server failed while decoding', 'server_error'))}\n\n"
                    return
                texts = {}
                for i, kind, value in came:
                    texts[i] = texts.get(i, "") + (value if kind == "text" else "")
                if any(texts.values()):
                    yield reply.chunk([reply.choice(i, t, None, {"content": t}) for i, t in texts.items() if t])
                finished = [(i, value) for i, kind, value in came if kind == "end"]
                if finished:
                    yield reply.chunk([reply.choice(i, "", value, {}) for i, value in finished])
                ended.update(i for i, _ in finished)
            if usage:
                yield reply.chunk([], reply.usage(jobs))
            yield "data: [DONE]\n\n"
        finally:
            if len(ended) < len(jobs):
                self.engine.cancel(*jobs)

    async def models(self, request):
        self.check_key(request)
        return ApiJSON({"object": "list", "data": [self.model_card()]})

    async def model(self, request):
        self.check_key(request)
        if request.path_params["name"] != self.served.name:
            raise RequestError(f"the model {request.path_params['name']!r} does not exist; this server serves "
                               f"{self.served.name!r}", 404, code="model_not_found")
        return ApiJSON(self.model_card())

    async def tokenize(self, request):
        """vLLM's POST /tokenize: a text's ids as transformers reads it (special tokens' spellings are
        those tokens), which is how lm-eval's remote tokenizer sees them."""
        self.check_key(request)
        body = await read_body(request, self.max_body)
        text = get(body, "prompt", "string")
        if text is None:
            raise RequestError("'prompt' (the text to tokenize) is missing", param="prompt")
        ids = encode_as_transformers(self.served.tokenizer, unicode_text(text, "prompt"))
        return ApiJSON({"count": len(ids), "max_model_len": self.served.block_size, "tokens": ids})

    async def detokenize(self, request):
        self.check_key(request)
        body = await read_body(request, self.max_body)
        ids = read_ids(body.get("tokens"), self.served, "tokens") if body.get("tokens") != [] else []
        return ApiJSON({"prompt": self.served.tokenizer.decode(ids)})

    async def tokenizer_info(self, request):
        """vLLM's GET /tokenizer_info, the fields transformers' tokenizer_config.json names: the end of text
        (a chat model's end of turn), the chat template, the longest input."""
        self.check_key(request)
        tokenizer, chat = self.served.tokenizer, self.served.chat
        end = end_of_text(chat, tokenizer)
        eos = None if end is None else tokenizer.decode([end])
        return ApiJSON({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
                        "pad_token": eos, "chat_template": chat.template.jinja() if chat else None,
                        "model_max_length": self.served.block_size})

    def model_card(self):
        return {"id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "smallgpt"}

    async def page(self, request):
        chat = self.served.chat
        config = json.dumps({"model": self.served.name, "chat": chat is not None, "key": bool(self.api_key),
                             "turns": chat.turns if chat else 0}).replace("<", "\\u003c")
        html = resources.files("model.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{CONFIG}}", config))


async def request_error(request, e):
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return ApiJSON(error_body(str(e), e.kind, e.param, e.code), e.status, headers=headers)


async def http_error(request, e):
    """Starlette's own 404 and 405 in the API's error shape."""
    return ApiJSON(error_body(f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error"),
                        e.status_code)


def create_app(served, engine, api_key="", max_body=1_000_000):
    """The ASGI app, handing requests to `engine` (which its caller runs)."""
    api = Api(served, engine, api_key, max_body)

    @asynccontextmanager
    async def lifespan(app):
        api.mailbox = Mailbox(asyncio.get_running_loop())
        yield

    routes = [Route("/", api.page), Route("/v1/models", api.models), Route("/v1/models/{name:path}", api.model),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/tokenize", api.tokenize, methods=["POST"]), Route("/detokenize", api.detokenize, methods=["POST"]),
              Route("/tokenizer_info", api.tokenizer_info)]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={RequestError: request_error, HTTPException: http_error})
