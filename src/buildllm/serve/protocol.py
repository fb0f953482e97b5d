"""The OpenAI API's request bodies, as strict pydantic models, and its error object.

A field of the wrong type (``"temperature": "hot"``, ``"max_tokens": 1.5``) and a field the API
does not know are refused rather than coerced or ignored: a client that sends ``logprobs`` or
``presence_penalty`` learns at once that this server does not do them. Ranges follow OpenAI's.
``top_k`` is buildllm's extension (the ``openai`` client sends it with ``extra_body``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

Number = StrictFloat | StrictInt
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with a list of text parts joined, as ``generation.chat`` takes it."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class StreamOptions(Body):
    include_usage: StrictBool = False


class SamplingBody(Body):
    """What both endpoints take besides their prompt."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(SamplingBody):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class CompletionRequest(SamplingBody):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]


class APIError(Exception):
    """An answer in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
