"""Chat: the template that turns OpenAI messages into a prompt, the `/v1/chat/completions` bodies, and the bodies
of the tokenizer routes (which render messages too).

A checkpoint may carry its template as `chat_template.jinja` beside its weights (Hugging Face's file name and
its Jinja dialect: `messages`, `add_generation_prompt`, `raise_exception`, rendered in a sandbox, in worker processes
with time, memory and output limits: server/templates.py; it is test-rendered at load). A base model without one gets
DEFAULT_TEMPLATE, a plain transcript:

    You are a storyteller.          <- a system (or developer) message, then a blank line

    User: Tell me a story.
    Assistant: Once upon a time ...
    User: Another one.
    Assistant:                      <- the model continues from here

and generation also stops at "\\nUser:" (DEFAULT_STOP), so a base model does not write the user's next turn.

    python -c "from loopgpt.server.chat import *; print(ChatTemplate().render([{'role': 'user', 'content': 'Hi'}]))"
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import (
    APIError,
    FinishReason,
    OpenAIBody,
    OpenAIChunk,
    OpenAIResponse,
    Unsupported,
    documented,
)
from .templates import RENDER_TIMEOUT_S, SAMPLE, RenderWorkers, TemplateFailed, compile_template, render_text

TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_STOP = "\nUser:"
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplate:
    """A compiled chat template: the checkpoint's (`source`), rendered in worker processes with a time limit
    (server/templates.py), or the documented default, ours and linear in its input, rendered in the caller's thread.
    Every render stops past `max_chars` characters. `render` blocks: routes call it through the offload threads."""

    def __init__(self, source: str | None = None, origin: str = TEMPLATE_FILE, max_chars: int = 4 << 20,
                 timeout_s: float = RENDER_TIMEOUT_S):
        self.default = source is None
        self.source = DEFAULT_TEMPLATE if source is None else source
        self.origin, self.max_chars = origin, max_chars
        # A checkpoint's template is compiled in its workers too: compiling runs code (Jinja folds constants).
        self.template = compile_template(self.source) if self.default else None
        self.workers = None if self.default else RenderWorkers(self.source, max_chars, timeout_s)

    def check(self) -> None:
        """Compile and render a small conversation once (at load): a template that fails, hangs or explodes on it
        refuses the checkpoint with one sentence."""
        try:
            self._render(SAMPLE, True)
        except TemplateFailed as e:
            self.close()
            raise ValueError(f"{self.origin}: {e}, on a three-message test conversation at load; fix or remove "
                             "the file") from e

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template that fails on these messages or breaks a limit is the client's 400
        (`messages`)."""
        try:
            return self._render(messages, add_generation_prompt)
        except TemplateFailed as e:
            raise APIError(400, f"messages: {e}", "messages") from e

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if self.workers is None:
            return render_text(self.template, messages, add_generation_prompt, self.max_chars)
        return self.workers.render(messages, add_generation_prompt)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()

    @property
    def stops(self) -> list[str]:
        """Stop strings the template implies (the default's next user turn)."""
        return [DEFAULT_STOP] if self.default else []


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"] = Field(description="tool messages are not supported")
    content: str | Annotated[list[TextPart], documented(minItems=1)] = Field(description="text, or text parts")
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """The message as a template reads it: its text in one string."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


def check_conversation(messages: list[ChatMessage]) -> None:
    """What OpenAI refuses beyond the schema: no message, a message of no parts, instructions and nothing else."""
    if not messages:
        raise APIError(400, "messages is empty: give at least one message", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m.content, str) and not m.content:
            raise APIError(400, f"messages.{i}.content is an empty list: give text or at least one text part",
                           "messages")
    if all(m.role in ("system", "developer") for m in messages):
        raise APIError(400, "messages holds only system or developer instructions: give at least one user message",
                       "messages")


class PlainBody(BaseModel):
    """A body of the tokenizer routes: strict, unknown fields ignored, nothing refused beyond its schema."""

    model_config = ConfigDict(extra="ignore", strict=True)

    def check_supported(self) -> None:
        """Nothing to refuse (see parse_body)."""


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeBody(PlainBody):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-eval's remote tokenizer reads (vLLM's /tokenizer_info)."""

    tokenizer_class: str
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str
    model_max_length: int


class TokenizeBody(PlainBody):
    """vLLM's /tokenize: a prompt (encoded as /v1/completions encodes it) or chat messages (templated)."""

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], documented(minItems=1)] | None = Field(
        default=None, description="chat messages, rendered with the chat template (give prompt or messages)")
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(default=True, description="accepted; this tokenizer adds none")
    model: str | None = None

    def check_supported(self) -> None:
        if self.messages is not None:
            check_conversation(self.messages)


class ChatBody(OpenAIBody):
    """OpenAI's /v1/chat/completions, with loopgpt's `loops`, `speculative` and the other extra fields."""

    messages: Annotated[list[ChatMessage], documented(minItems=1)] = Field(description="the conversation so far")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="tokens to generate (wins over "
                                              "max_tokens); default: up to the context")
    logprobs: bool = Field(default=False, description="log-probabilities of each generated token, at this depth")
    top_logprobs: int | None = Field(default=None, ge=0, le=5, description="with logprobs: the k likeliest "
                                     "alternatives of each token")
    tools: Annotated[list | None, Unsupported] = None
    tool_choice: Annotated[Any, Unsupported] = None
    functions: Annotated[list | None, Unsupported] = None
    function_call: Annotated[Any, Unsupported] = None
    response_format: Annotated[dict | None, Unsupported] = None
    audio: Annotated[dict | None, Unsupported] = None
    prediction: Annotated[dict | None, Unsupported] = None
    web_search_options: Annotated[dict | None, Unsupported] = None
    default_max_tokens: ClassVar[int] = 1 << 30  # OpenAI's: as many as the context holds
    refused: ClassVar[tuple[str, ...]] = OpenAIBody.refused + ("tools", "tool_choice", "functions", "function_call",
                                                               "response_format", "audio", "prediction",
                                                               "web_search_options")

    def tokens_to_generate(self, n_prompt: int, context: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().tokens_to_generate(n_prompt, context)

    def check_supported(self) -> None:
        super().check_supported()
        check_conversation(self.messages)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def engine_fields(self) -> dict[str, Any]:
        return {**super().engine_fields(), "logprobs": (self.top_logprobs or 0) if self.logprobs else None}


# ---- responses ----

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatResponse(OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatChunk(OpenAIChunk):
    """One Server-Sent Event of a streamed /v1/chat/completions (OpenAI's `chat.completion.chunk`)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice] = Field(description="empty in the usage chunk")
