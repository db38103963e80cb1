"""An asynchronous client for OpenAI-compatible chat-completion endpoints (OpenAI, vLLM, SGLang, llama.cpp
server, Ollama).

What it adds over a bare HTTP call, and why:

- **Bounded concurrency** (one semaphore over HTTP requests in flight; back-off sleeps do not hold a slot),
  so a run of 60k requests never opens 60k sockets.
- **Retries** with exponential back-off and jitter on 429, 408, 5xx, time-outs, connection errors and
  malformed or truncated response bodies; a server's ``Retry-After`` (or ``retry-after-ms``) is honoured.
  Other 4xx answers are the caller's mistake and fail at once. The bound is ``max_retries`` per call.
- **Several base URLs** share the load: each attempt goes to the URL with the fewest requests in flight
  (ties in turn), and a retry prefers another URL than the one that just failed.
- **Accounting**: token usage and cost (prices per 1k tokens from the config) per call and in total.
- **Secrets**: the API key is read from the environment variable the config names, sent only in the
  ``Authorization`` header, and redacted from every error message.

Nothing here knows about annotation or judging: callers build the messages and read the result.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from perpair.errors import PerpairError

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
BODY_SHOWN = 300  # characters of an error body quoted in a ChatError


def _loopback(url: str) -> bool:
    """Whether ``url`` names this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatClientConfig(BaseModel):
    """Where and how to call a chat endpoint. Holds the *name* of the API-key variable, never the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_urls: list[str] = Field(min_length=1, description="Endpoint roots, e.g. http://host:8000/v1.")
    model: str = Field(min_length=1, description="The model name sent with each request.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    concurrency: int = Field(16, ge=1, le=4096, description="HTTP requests in flight at most.")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one HTTP attempt, connect to last byte.")
    connect_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(5, ge=0, le=100, description="Retries per call after the first attempt.")
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    retry_after_max_s: float = Field(300.0, ge=0, description="Cap on a server's Retry-After.")
    price_prompt_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 prompt tokens.")
    price_completion_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 completion tokens.")

    @field_validator("base_urls")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base URL {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in urls]


@dataclass
class ChatResult:
    """One successful chat completion (the first choice)."""

    content: str | None
    finish_reason: str | None
    logprobs: list[dict[str, Any]] | None  # choices[0].logprobs.content: token, logprob, top_logprobs
    prompt_tokens: int
    completion_tokens: int
    cost: float
    attempts: int  # HTTP attempts this call took, 1 when the first one succeeded
    base_url: str
    latency_s: float
    response: dict[str, Any]  # the whole decoded response body


class ChatError(PerpairError):
    """A call that failed for good: a non-retryable answer, or retries exhausted.

    The message is built when it is shown, so a caller that adds attempts of its own (a teacher probing the
    server's output forms) reports the attempts the call really took.
    """

    def __init__(self, reason: str, *, status: int | None = None, attempts: int = 0, retryable: bool = False):
        self.reason = reason
        self.status = status
        self.attempts = attempts
        self.retryable = retryable
        super().__init__(reason)

    def __str__(self) -> str:
        if not self.retryable:
            return self.reason
        return f"{self.reason} (gave up after {self.attempts} attempt{'' if self.attempts == 1 else 's'})"


@dataclass
class ClientStats:
    """Running totals over every call of one client (read by progress displays)."""

    requests: int = 0  # HTTP attempts sent
    calls_ok: int = 0
    calls_failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    per_url: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class ChatClient:
    """``async with ChatClient(config) as client: result = await client.chat(messages)``.

    ``transport`` replaces the network (tests); ``api_key`` overrides the environment variable.
    """

    def __init__(self, config: ChatClientConfig, *, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, seed: int | None = None):
        self.config = config
        if api_key is None and config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise PerpairError(f"the API key variable {config.api_key_env} is not set in the environment")
        self._secret = api_key or None
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight = {url: 0 for url in config.base_urls}
        self._turn = 0
        self._rng = random.Random(seed)
        self.stats = ClientStats(per_url={url: 0 for url in config.base_urls})

    async def __aenter__(self) -> ChatClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._http is not None:
            return
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        # the environment's proxy, CA bundle and .netrc for a remote server (a cluster behind a proxy timed out
        # every call); a server on this machine is reached directly, whatever a proxy variable says
        remote = not all(_loopback(url) for url in cfg.base_urls)
        self._http = httpx.AsyncClient(
            headers=headers, transport=self._transport, trust_env=remote,
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency))
        self._semaphore = asyncio.Semaphore(cfg.concurrency)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` (servers sometimes echo it in errors)."""
        return text.replace(self._secret, "***") if self._secret else text

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None,
                   temperature: float | None = None, response_format: dict[str, Any] | None = None,
                   logprobs: bool = False, top_logprobs: int | None = None, seed: int | None = None,
                   stop: list[str] | None = None, extra_body: dict[str, Any] | None = None,
                   request_id: str | None = None, max_retries: int | None = None) -> ChatResult:
        """One chat completion, retried as the config says; raises :class:`ChatError` when it fails for good.

        ``request_id`` is sent as ``X-Client-Request-Id`` so servers and proxies can trace retries of one call;
        ``max_retries`` overrides the config's for this call (0 to probe what a server accepts).
        """
        body: dict[str, Any] = {"model": self.config.model, "messages": messages}
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature),
                           ("response_format", response_format), ("seed", seed), ("stop", stop),
                           ("top_logprobs", top_logprobs)):
            if value is not None:
                body[key] = value
        if logprobs:
            body["logprobs"] = True
        body.update(extra_body or {})
        payload = json.dumps(body, ensure_ascii=False).encode()
        headers = {"X-Client-Request-Id": request_id} if request_id else {}
        return await self._call(payload, headers, self.config.max_retries if max_retries is None else max_retries)

    async def _call(self, payload: bytes, headers: dict[str, str], max_retries: int) -> ChatResult:
        if self._http is None:
            await self.open()
        started = time.monotonic()
        last_url: str | None = None
        for attempt in range(1, max_retries + 2):
            url = self._pick_url(avoid=last_url)
            try:
                response = await self._attempt(url, payload, headers)
            except _Retryable as exc:
                last_url = url
                if attempt > max_retries:
                    self.stats.calls_failed += 1
                    raise ChatError(exc.reason, status=exc.status, attempts=attempt, retryable=True) from None
                delay = self.backoff_delay(attempt, exc.retry_after)
                self.stats.retries += 1
                log.debug("retrying in %.2fs after %s (attempt %d)", delay, exc.reason, attempt)
                await asyncio.sleep(delay)
                continue
            except ChatError as exc:
                exc.attempts = attempt
                self.stats.calls_failed += 1
                raise
            return self._result(response, url, attempt, time.monotonic() - started)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _attempt(self, url: str, payload: bytes, headers: dict[str, str]) -> dict[str, Any]:
        assert self._http is not None and self._semaphore is not None
        async with self._semaphore:
            self._inflight[url] += 1
            self.stats.requests += 1
            self.stats.per_url[url] += 1
            try:
                # A total deadline per attempt: httpx's own time-outs are per read, so a server trickling
                # bytes could otherwise hold a slot for ever.
                async with asyncio.timeout(self.config.timeout_s):
                    response = await self._http.post(url + "/chat/completions", content=payload, headers=headers)
            except (TimeoutError, httpx.TimeoutException):
                raise _Retryable(f"timed out after {self.config.timeout_s:g}s") from None
            except httpx.TransportError as exc:
                raise _Retryable(self.redact(f"connection error: {type(exc).__name__}: {exc}")) from None
            finally:
                self._inflight[url] -= 1
        status = response.status_code
        if status == 200:
            try:
                decoded = json.loads(response.content)
                choice = decoded["choices"][0]
                if not isinstance(choice, dict) or "message" not in choice:
                    raise KeyError("message")
            except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
                raise _Retryable(f"malformed response body ({type(exc).__name__})", status) from None
            if (problem := _shape_problem(decoded)) is not None:
                raise _Retryable(f"malformed response body ({problem})", status)
            return decoded
        text = self.redact(response.text[:BODY_SHOWN])
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}: {text}", status, _retry_after(response.headers))
        raise ChatError(f"HTTP {status} from {url}: {text}{self._auth_hint(status)}", status=status)

    def _auth_hint(self, status: int) -> str:
        """What to check when the server refuses the credentials: the key's variable, or that none is sent."""
        if status not in (401, 403):
            return ""
        if not self._secret:
            return (" (no API key was sent: name the environment variable that holds it with api_key_env in "
                    "the teacher's config, or --api-key-env VAR)")
        if self.config.api_key_env:
            return f" (the API key was read from the environment variable {self.config.api_key_env}: check it)"
        return " (the API key given was refused)"

    def _pick_url(self, avoid: str | None) -> str:
        urls = self.config.base_urls
        if len(urls) == 1:
            return urls[0]
        self._turn += 1
        order = urls[self._turn % len(urls):] + urls[:self._turn % len(urls)]
        candidates = [u for u in order if u != avoid] or order
        return min(candidates, key=lambda u: self._inflight[u])

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (Retry-After honoured, else exponential + jitter)."""
        cfg = self.config
        if retry_after is not None:
            # Honour the server, plus a little jitter so a burst of 429s does not come back in lockstep.
            wait = min(retry_after, cfg.retry_after_max_s)
            return wait + self._rng.uniform(0, 0.1 * wait + 0.01)
        ceiling = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
        return self._rng.uniform(ceiling / 2, ceiling)  # "equal jitter": never retries immediately

    def _result(self, decoded: dict[str, Any], url: str, attempts: int, latency: float) -> ChatResult:
        choice = decoded["choices"][0]
        message = choice.get("message") or {}
        usage = decoded.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        cfg = self.config
        cost = prompt_tokens / 1000 * cfg.price_prompt_per_1k + completion_tokens / 1000 * cfg.price_completion_per_1k
        stats = self.stats
        stats.calls_ok += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        stats.cost += cost
        logprobs = choice.get("logprobs")
        return ChatResult(
            content=message.get("content"), finish_reason=choice.get("finish_reason"),
            logprobs=logprobs.get("content") if isinstance(logprobs, dict) else None,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost, attempts=attempts,
            base_url=url, latency_s=latency, response=decoded)


def _shape_problem(decoded: dict[str, Any]) -> str | None:
    """What in a 200 answer's body is not of the chat-completion form the result is read from (None: nothing):
    a message that is no object, content that is no string, usage counts that are no whole numbers. Read as they
    were, they ended the whole run in a traceback (or counted negative tokens)."""
    choice = decoded["choices"][0]
    message = choice["message"]
    if message is not None and not isinstance(message, dict):
        return f"choices[0].message is not an object ({type(message).__name__})"
    content = (message or {}).get("content")
    if content is not None and not isinstance(content, str):
        return f"choices[0].message.content is not a string ({type(content).__name__})"
    logprobs = choice.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, dict):
        return f"choices[0].logprobs is not an object ({type(logprobs).__name__})"
    usage = decoded.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return f"usage is not an object ({type(usage).__name__})"
    for name in ("prompt_tokens", "completion_tokens"):
        value = (usage or {}).get(name)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if value is not None and (isinstance(value, bool) or not whole or value < 0):
            return f"usage.{name} is {value!r}, not a whole number of tokens"
    return None


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date."""
    if (value := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
