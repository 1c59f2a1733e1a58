"""The server: a config -> the model opened, its engine, the app, and uvicorn serving it."""

import os
import socket
import sys
import threading

import uvicorn

from model.checkpoint import open_model
from model.config import ServeConfig, load_config
from model.engine import Engine
from model.errors import UserError
from model.serve.api import Served, create_app


def listen(host, port):
    """The server's socket, bound before the model loads: a port in use is one clear line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # from now on clients wait in the queue until the model is loaded and served
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    return sock


def make_app(cfg, quiet=False):
    """(the ASGI app, its engine, the model's name) for a ServeConfig."""
    opened = open_model(cfg, cfg.device, quiet=quiet, dtype=cfg.dtype)
    served = Served.of(opened, cfg.model_name)
    engine = Engine(opened.model, cfg.max_batch, cfg.max_queue)
    api_key = cfg.api_key or os.environ.get("SMALLGPT_API_KEY", "")
    if not api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"notice: serving {cfg.host} without --api_key: anyone who reaches this port can use the model",
              file=sys.stderr)
    return create_app(served, engine, api_key, cfg.max_body), engine, served.name


def serve(argv):
    cfg = load_config(ServeConfig, argv)
    sock = listen(cfg.host, cfg.port)
    app, engine, name = make_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def web():
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()  # the server ended (it failed to start): so does the command

    threading.Thread(target=web, name="http", daemon=True).start()
    host, port = sock.getsockname()[:2]
    print(f"serving {name!r} at http://{host}:{port}/ (the OpenAI API under /v1); Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        engine.run()  # the model in the main thread, the HTTP side in the other
    except KeyboardInterrupt:
        server.should_exit = True
        raise
    return 0
