"""``run_server``: the app on uvicorn, until Ctrl-C.

On Ctrl-C (SIGINT) or SIGTERM uvicorn stops accepting connections and waits up to
``shutdown_timeout`` seconds for the requests in flight, streams included, to finish; then the
app's lifespan closes the engine, which cancels whatever is still decoding. The process exits 0.
A second Ctrl-C cancels what is in flight at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from buildllm.serve.app import create_app
from buildllm.serve.config import ServeConfig


class Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does (with port 0, the port it got)."""

    def __init__(self, config: uvicorn.Config, banner: str):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"{self.banner} on http://{host}:{port} (chat page at /, OpenAI API at /v1); Ctrl-C to stop",
                  flush=True)

    def handle_exit(self, sig, frame) -> None:
        # uvicorn would raise the signal again once shut down (a KeyboardInterrupt, exit 130); a
        # server that shut down as asked has done its job and exits 0.
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def served_name(source) -> str:
    """The name clients send as "model": a folder's name, or a model id as it is written."""
    path = Path(str(source))
    return path.resolve().name if path.exists() else str(source)


def run_server(loaded, config: ServeConfig | None = None, model_name: str | None = None) -> None:
    """Serve ``loaded`` (``load_model``'s result) over HTTP until Ctrl-C.

    ``model_name``: what clients send as "model" (default: ``config.model_name``, else
    ``served_name`` of where the model was loaded from).
    """
    config = config or ServeConfig()
    name = model_name or config.model_name or served_name(loaded.source)
    app = create_app(loaded, config, model_name=name)
    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                   timeout_graceful_shutdown=config.shutdown_timeout), f"serving {name}")
    server.run()
    print("stopped", file=sys.stderr)
