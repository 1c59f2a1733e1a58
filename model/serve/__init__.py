"""Serving a model to the tools people use: the OpenAI API over HTTP and a chat page.

    python -m model.serve --out_dir=out/chat     # http://127.0.0.1:8000/ and /v1/...

api.py speaks the OpenAI API on Starlette, each request decoded by the one engine
(model/engine.py: continuous batching over a ragged KV cache); page.html is the chat page;
server.py starts it all. Needs the [serve] extra.
"""
