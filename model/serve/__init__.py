"""Serving a model to the tools people use: the OpenAI API over HTTP and a chat page.

    python -m model.serve --out_dir=out/chat     # http://127.0.0.1:8000/ and /v1/...

engine.py decodes many requests together (continuous batching over a ragged KV cache); api.py
speaks the OpenAI API on Starlette; page.html is the chat page. Needs the [serve] extra.
"""
