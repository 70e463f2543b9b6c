"""The OpenAI request bodies the server accepts, checked field by field.

Every field is type-checked (a bool is not an integer, a string is not a list) and range-checked
here, before anything is queued; a bad one is a 400 naming the field, in OpenAI's error shape.
Fields of the OpenAI API that the runtime cannot honour (penalties, logit_bias, tools, ...) are
accepted only at their neutral values: anything else is refused rather than silently ignored. A
field the API does not have is refused too. Three extensions (as other local servers name them):
`top_k`, `repetition_penalty` and `ignore_eos`.

Unset sampling fields take the package's generation defaults, as in the library (GPT-Neo packages
default to greedy decoding; OpenAI's service defaults to temperature 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..options import MAX_TOP_LOGPROBS
from .settings import Limits

_MISSING = object()


class ApiError(Exception):
    """An error answered as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


class _Fields:
    """Takes a request object's fields one at a time; whatever is left at the end is unknown."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self._body = dict(body)
        self._prefix = prefix

    def _name(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def raw(self, name: str) -> Any:
        return self._body.pop(name, None)

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._body.pop(name, None)
        if value is None:
            if required:
                raise bad(self._name(name), f"'{self._name(name)}' is required")
            return None
        if not isinstance(value, str):
            raise bad(self._name(name), f"'{self._name(name)}' must be a string, got {_kind(value)}")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._body.pop(name, None)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(self._name(name), f"'{self._name(name)}' must be a boolean, got {_kind(value)}")
        return value

    def integer(self, name: str, *, minimum: int, maximum: int | None = None) -> int | None:
        value = self._body.pop(name, None)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 2.0 is the integer 2
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(self._name(name), f"'{self._name(name)}' must be an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise bad(self._name(name), f"'{self._name(name)}' must be {bounds}, got {value}")
        return value

    def number(self, name: str, *, minimum: float, maximum: float | None = None,
               open_minimum: bool = False) -> float | None:
        value = self._body.pop(name, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(self._name(name), f"'{self._name(name)}' must be a number, got {_kind(value)}")
        low = value <= minimum if open_minimum else value < minimum
        if low or (maximum is not None and value > maximum):
            lower = f"> {minimum:g}" if open_minimum else f">= {minimum:g}"
            bounds = lower if maximum is None else f"{lower} and <= {maximum:g}"
            raise bad(self._name(name), f"'{self._name(name)}' must be {bounds}, got {value:g}")
        return float(value)

    def neutral(self, name: str, neutral: Any, *, what: str) -> None:
        """A field the runtime cannot honour: accepted only at its neutral value (or null)."""
        if name not in self._body:
            return
        value = self._body.pop(name)
        kinds = (int, float) if type(neutral) in (int, float) else (type(neutral),)
        if value is None or (type(value) in kinds and value == neutral):
            return
        raise bad(self._name(name), f"'{self._name(name)}' is not supported by this server ({what})",
                  code="unsupported_parameter")

    def finish(self) -> None:
        if self._body:
            name = sorted(self._body)[0]
            raise bad(self._name(name), f"Unrecognized request argument supplied: {self._name(name)}",
                      code="unknown_parameter")


@dataclass(frozen=True)
class Sampling:
    """What both endpoints share: how many generations, how long, how to sample, how to answer."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool

    def overrides(self, choice: int) -> dict[str, Any]:
        """Generation options of choice number `choice` (None: the package's default). With a seed,
        choice j samples with seed + j, so that n sampled choices differ and each is reproducible."""
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                    seed=None if self.seed is None else self.seed + choice, stop_at_eos=not self.ignore_eos)


def _sampling(f: _Fields, limits: Limits, *, max_tokens_limit: int, chat: bool) -> Sampling:
    f.string("model")  # any name: a server serves one model (its id is in every response)
    f.string("user")
    max_tokens = f.integer("max_tokens", minimum=1)
    if chat:
        newer = f.integer("max_completion_tokens", minimum=1)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise bad("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' disagree: set one")
        max_tokens = newer if newer is not None else max_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad("max_tokens", f"'max_tokens' is {max_tokens}, more than this server allows ({max_tokens_limit})")
    temperature = f.number("temperature", minimum=0.0, maximum=2.0)
    top_p = f.number("top_p", minimum=0.0, maximum=1.0, open_minimum=True)
    top_k = f.integer("top_k", minimum=0)
    repetition_penalty = f.number("repetition_penalty", minimum=0.0, open_minimum=True)
    seed = f.integer("seed", minimum=0, maximum=2**63 - 1 - limits.max_choices)
    n = f.integer("n", minimum=1, maximum=limits.max_choices)
    stream = f.boolean("stream")
    options = f.raw("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got {_kind(options)}")
        sub = _Fields(options, "stream_options.")
        include_usage = sub.boolean("include_usage")
        sub.boolean("include_obfuscation")  # padding against length side channels: no use on a local server
        sub.finish()
    stop = _stop(f.raw("stop"), limits.max_stop)
    ignore_eos = f.boolean("ignore_eos")
    f.neutral("presence_penalty", 0, what="use repetition_penalty")
    f.neutral("frequency_penalty", 0, what="use repetition_penalty")
    f.neutral("logit_bias", {}, what="logit biases")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                    n=n or 1, stream=stream, include_usage=include_usage)


def _stop(value: Any, most: int) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"'stop' must be a string or an array of strings, got {_kind(value)}")
    if len(stops) > most:
        raise bad("stop", f"'stop' has {len(stops)} strings; at most {most} are allowed")
    if any(not s for s in stops):
        raise bad("stop", "'stop' strings must not be empty")
    for s in stops:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: no generated text can contain it
            raise bad("stop", f"'stop' holds a string that is not valid Unicode (character {exc.start})") from None
    return tuple(stops)


Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]
    sampling: Sampling
    logprobs: int | None
    """Top alternatives per token in the legacy format (0: only the chosen tokens'); None: no log-probs."""
    echo: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]
    """{"role": system|user|assistant, "content": text}, in order."""
    sampling: Sampling
    logprobs: bool
    top_logprobs: int


def parse_completion(body: Any, limits: Limits, *, max_tokens_limit: int) -> CompletionRequest:
    f = _fields(body)
    prompts = _prompts(f.raw("prompt"))
    sampling = _sampling(f, limits, max_tokens_limit=max_tokens_limit, chat=False)
    logprobs = f.integer("logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    echo = f.boolean("echo")
    if echo and logprobs is not None:
        raise bad("echo", "'echo' together with 'logprobs' is not supported (the prompt's log-probs)",
                  code="unsupported_parameter")
    best_of = f.integer("best_of", minimum=1)
    if best_of is not None and best_of != sampling.n:
        raise bad("best_of", "'best_of' other than 'n' is not supported", code="unsupported_parameter")
    f.neutral("suffix", "", what="insertion")
    f.finish()
    if len(prompts) * sampling.n > limits.max_choices:
        raise bad("n", f"{len(prompts)} prompt(s) x n={sampling.n} is {len(prompts) * sampling.n} generations; "
                       f"this server allows at most {limits.max_choices} per request")
    return CompletionRequest(prompts=prompts, sampling=sampling, logprobs=logprobs, echo=echo)


def _prompts(value: Any) -> tuple[Prompt, ...]:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    if value is None:
        raise bad("prompt", "'prompt' is required")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(_is_tokens(p) for p in value):
            return (tuple(value),)
        if all(isinstance(p, list) and p and all(_is_tokens(t) for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    raise bad("prompt", "'prompt' must be a string, an array of strings, an array of token ids (integers) "
                        "or an array of such arrays, and not empty")


def _is_tokens(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: Any, limits: Limits, *, max_tokens_limit: int) -> ChatRequest:
    f = _fields(body)
    messages = _messages(f.raw("messages"))
    sampling = _sampling(f, limits, max_tokens_limit=max_tokens_limit, chat=True)
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    response_format = f.raw("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format", "only the 'text' response format is supported", code="unsupported_parameter")
    for name in ("tools", "functions"):
        f.neutral(name, [], what="tool calls")
    for name in ("tool_choice", "function_call"):
        f.neutral(name, "none", what="tool calls")
    f.boolean("parallel_tool_calls")  # only meaningful with tools, which are refused above
    f.finish()
    return ChatRequest(messages=messages, sampling=sampling, logprobs=logprobs, top_logprobs=top or 0)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if value is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(value, list) or not value:
        raise bad("messages", f"'messages' must be a non-empty array, got {_kind(value)}")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"'{where}' must be an object, got {_kind(message)}")
        m = _Fields(message, f"{where}.")
        role = m.string("role", required=True)
        if role not in _ROLES:
            raise bad(f"{where}.role", f"'{where}.role' is {role!r}: this server takes system, developer, "
                                       "user and assistant messages (no tools)")
        content = _content(m.raw("content"), f"{where}.content")
        m.string("name")  # a participant's name: the transcript format has one name per role
        m.finish()
        out.append({"role": _ROLES[role], "content": content})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """Text, or an array of text parts (joined); images, audio and files are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]", f"'{where}[{j}]' must be a text part ({{\"type\": \"text\", "
                                           "\"text\": ...}): this model reads text only")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"'{where}' must be a string or an array of text parts, got {_kind(value)}")


def _fields(body: Any) -> _Fields:
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}")
    return _Fields(body)
