"""The OpenAI request schema dgrt serves, with the diffusion sampler's settings as extra fields.

Unknown fields are refused, not ignored: a client that sets `temperature` or `top_p` would otherwise get
answers it did not ask for (block diffusion has a temperature schedule, `t_min` to `t_max`, instead).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # as OpenAI's API


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take: OpenAI's that apply, then the diffusion sampler's."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The diffusion sampler (SamplerConfig's fields; None: the model's generation_config.json).
    steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    # dgrt's extension: stream each refining draft of the canvas too (chunks with a `dgrt` field).
    drafts: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"'stop' takes at most {MAX_STOP_STRINGS} strings; got {len(stops)}.")
        return stops

    def sampler_settings(self) -> dict[str, Any]:
        names = ("steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold")
        return {n: getattr(self, n) for n in names if n in self.model_fields_set}

    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[int]

    def prompt_value(self) -> str | list[int]:
        return self.prompt
