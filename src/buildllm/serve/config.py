"""The server's knobs: ``ServeConfig`` for the Python API, ``ServeOptions`` for ``buildllm serve``.

Each field's trailing comment is its ``--help`` (``cli_options``).
"""

from __future__ import annotations

from dataclasses import dataclass

from buildllm.cli_options import InferenceOptions
from buildllm.errors import UserError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 makes the server reachable from other machines
    port: int = 8000  # the TCP port; 0 picks a free one
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on every /v1 route
    model_name: str | None = None  # the name clients send as "model" (default: the --model folder's name or the id)
    max_batch: int = 8  # requests decoded together in one batch; more wait for a free slot
    max_queue: int = 64  # requests allowed to wait for a slot; beyond that the server answers 429 at once
    context: int | None = None  # cap the context (prompt plus answer) at N tokens, and the KV cache with it (default: the model's)
    max_tokens: int = 256  # answer length for requests that do not set max_tokens
    max_n: int = 8  # the largest n (answers per request) accepted
    crop_prompts: bool = False  # keep the end of a prompt longer than the context instead of answering 400
    max_body: int = 1_000_000  # refuse request bodies over N bytes (413)
    cors_origin: tuple[str, ...] = ()  # allow browser pages from these origins (e.g. http://localhost:3000) to call the API; none by default
    shutdown_timeout: float = 30.0  # on Ctrl-C, seconds to let requests in flight finish before cancelling them

    def check(self) -> None:
        for name in ("max_batch", "max_tokens", "max_n", "max_body"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0 or not 0 <= self.port < 65536 or self.shutdown_timeout < 0:
            raise UserError("max_queue and shutdown_timeout must be >= 0 and port in [0, 65535]")
        if self.context is not None and self.context < 2:
            raise UserError(f"context must be at least 2 tokens, got {self.context}")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("api_key is empty: give a key or leave the option out")


@dataclass
class ServeOptions(ServeConfig, InferenceOptions):
    """``buildllm serve``'s options: the model to load (``InferenceOptions``) and the server's."""
