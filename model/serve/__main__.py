"""python -m model.serve --out_dir=DIR [--host=127.0.0.1 --port=8000 --api_key=...]: serve a model
(our checkpoints, nanoGPT's, or a Hugging Face folder) over the OpenAI API, with a chat page at /."""

import sys

from model.config import run_command
from model.errors import UserError


def serve(argv):
    try:
        from model.serve.server import serve as run
    except ImportError as e:
        if e.name not in ("starlette", "uvicorn"):
            raise
        raise UserError(f"serving needs the [serve] extra ({e.name} is missing): pip install -e \".[serve]\"") from None
    return run(argv)  # Ctrl-C: run_command's 130 (uvicorn stops cleanly on it first)


if __name__ == "__main__":
    sys.exit(run_command(serve, sys.argv[1:]))
