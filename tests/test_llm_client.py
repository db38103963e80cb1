"""The OpenAI-compatible client against loopback stub servers: retries, back-off, Retry-After, time-outs,
malformed bodies, several base URLs, bounded concurrency, accounting, and secrets kept out of errors."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx2
import pytest

from llama_server import LoopbackServer, Reply, Request, chat_completion, stub_handler
from perpair.errors import PerpairError
from perpair.llm.client import ChatClient, ChatClientConfig, ChatError, _retry_after

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def config(url: str | list[str], **kw) -> ChatClientConfig:
    urls = [url] if isinstance(url, str) else url
    return ChatClientConfig(base_urls=[u + "/v1" for u in urls], model="m", **{**FAST, **kw})


def run(coro):
    return asyncio.run(coro)


def sequence_handler(replies: list[Reply], seen: list[Request]):
    """Answers with ``replies`` in turn, then with success."""
    async def handle(request: Request) -> Reply:
        seen.append(request)
        index = len(seen) - 1
        return replies[index] if index < len(replies) else Reply(body=chat_completion("ok"))
    return handle


def test_success_usage_cost_headers(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test-123")
    seen: list[Request] = []
    with LoopbackServer(sequence_handler([], seen)) as url:
        cfg = config(url, api_key_env="STUB_KEY", price_prompt_per_1k=1.0, price_completion_per_1k=2.0)

        async def go():
            async with ChatClient(cfg) as client:
                return await client.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3, request_id="call-1"), client.stats
        result, stats = run(go())
    assert result.content == "ok" and result.attempts == 1 and result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (10, 5)
    assert result.cost == pytest.approx(10 / 1000 * 1.0 + 5 / 1000 * 2.0)
    assert stats.calls_ok == 1 and stats.tokens == 15
    body = seen[0].json()
    assert body["model"] == "m" and body["logprobs"] is True and body["top_logprobs"] == 3
    assert seen[0].headers["authorization"] == "Bearer sk-test-123"
    assert seen[0].headers["x-client-request-id"] == "call-1"


def test_retries_429_with_retry_after_then_5xx():
    seen: list[Request] = []
    replies = [Reply(429, b"{}", {"Retry-After": "0.3"}), Reply(503, b"{}"), Reply(500, b"{}")]
    with LoopbackServer(sequence_handler(replies, seen)) as url:
        async def go():
            async with ChatClient(config(url, max_retries=3)) as client:
                started = time.monotonic()
                result = await client.chat([{"role": "user", "content": "x"}])
                return result, time.monotonic() - started, client.stats
        result, elapsed, stats = run(go())
    assert result.content == "ok" and result.attempts == 4 and stats.retries == 3
    assert elapsed >= 0.3  # Retry-After honoured


def test_gives_up_after_max_retries_and_4xx_fails_at_once():
    seen: list[Request] = []
    with LoopbackServer(sequence_handler([Reply(500, b"{}")] * 10, seen)) as url:
        async def go():
            async with ChatClient(config(url, max_retries=2)) as client:
                await client.chat([{"role": "user", "content": "x"}])
        with pytest.raises(ChatError) as info:
            run(go())
    assert info.value.attempts == 3 and len(seen) == 3 and info.value.status == 500
    assert "gave up after 3 attempts" in str(info.value)

    seen.clear()
    with LoopbackServer(sequence_handler([Reply(400, b'{"error": "bad"}')], seen)) as url:
        async def bad():
            async with ChatClient(config(url, max_retries=5)) as client:
                await client.chat([{"role": "user", "content": "x"}])
        with pytest.raises(ChatError) as info:
            run(bad())
    assert info.value.status == 400 and info.value.attempts == 1 and len(seen) == 1


@pytest.mark.parametrize("fault", [Reply(stall_s=2.0), Reply(200, b'{"choices": [{"mess'),
                                   Reply(200, chat_completion("x"), truncate=True), Reply(200, b'{"choices": []}')])
def test_timeouts_and_broken_bodies_are_retried(fault):
    seen: list[Request] = []
    with LoopbackServer(sequence_handler([fault], seen)) as url:
        async def go():
            async with ChatClient(config(url, timeout_s=0.5, max_retries=2)) as client:
                return await client.chat([{"role": "user", "content": "x"}])
        result = run(go())
    assert result.content == "ok" and result.attempts == 2


def test_connection_refused_is_retried_on_another_base_url():
    dead = "http://127.0.0.1:1"  # nothing listens on port 1
    seen: list[Request] = []
    with LoopbackServer(sequence_handler([], seen)) as url:
        async def go():
            async with ChatClient(config([dead, url], max_retries=3)) as client:
                return await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}]) for i in range(6)))
        results = run(go())
    assert all(r.content == "ok" for r in results) and len(seen) == 6


def test_base_urls_share_the_load_and_concurrency_is_bounded():
    state = {"now": 0, "peak": 0}

    async def slow(request: Request) -> Reply:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return Reply(body=chat_completion("ok"))

    counts = []
    with LoopbackServer(slow) as a, LoopbackServer(slow) as b:
        async def go():
            async with ChatClient(config([a, b], concurrency=4)) as client:
                await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}]) for i in range(40)))
                counts.extend(client.stats.per_url.values())
        run(go())
    assert sum(counts) == 40 and min(counts) >= 10  # both URLs served a fair share
    assert state["peak"] <= 4


def test_api_key_never_in_errors(monkeypatch):
    secret = "sk-very-secret-0123456789"
    monkeypatch.setenv("STUB_KEY", secret)

    async def echo(request: Request) -> Reply:  # a server that echoes the key back, as some do
        return Reply(401, f'{{"error": "bad key {request.headers["authorization"]}"}}'.encode())

    with LoopbackServer(echo) as url:
        cfg = config(url, api_key_env="STUB_KEY")

        async def go():
            async with ChatClient(cfg) as client:
                await client.chat([{"role": "user", "content": "x"}])
        with pytest.raises(ChatError) as info:
            run(go())
    assert secret not in str(info.value) and "***" in str(info.value)
    assert secret not in repr(cfg) and secret not in cfg.model_dump_json()


def test_missing_key_variable_is_named():
    with pytest.raises(PerpairError, match="PERPAIR_NO_SUCH_VAR"):
        ChatClient(ChatClientConfig(base_urls=["http://127.0.0.1:1/v1"], model="m", api_key_env="PERPAIR_NO_SUCH_VAR"))


def test_retry_after_forms():
    assert _retry_after(httpx2.Headers({"retry-after": "2"})) == 2.0
    assert _retry_after(httpx2.Headers({"retry-after-ms": "250"})) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(httpx2.Headers({"retry-after": date})) <= 31
    assert _retry_after(httpx2.Headers({})) is None


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ChatClientConfig(base_urls=["ftp://x"], model="m")
    with pytest.raises(ValueError):
        ChatClientConfig(base_urls=["http://x"], model="m", concurrency=0)
    with pytest.raises(ValueError):
        ChatClientConfig(base_urls=["http://x"], model="m", surprise=1)


def test_stub_handler_answers_models_and_chat():
    with LoopbackServer(stub_handler("hello")) as url:
        async def go():
            async with ChatClient(config(url)) as client:
                return await client.chat([{"role": "user", "content": "x"}])
        assert run(go()).content == "hello"


def test_a_remote_server_is_reached_through_the_environments_proxy_and_a_local_one_directly():
    """The client ignored HTTPS_PROXY, SSL_CERT_FILE and .netrc (trust_env off): behind a cluster's proxy every call
    to a remote teacher or judge timed out, retried, and was recorded as a failure. A server on this machine is
    still reached directly, whatever a proxy variable says."""
    async def opened(urls):
        client = ChatClient(ChatClientConfig(base_urls=urls, model="m"))
        await client.open()
        try:
            return client._http.trust_env
        finally:
            await client.close()

    assert asyncio.run(opened(["https://api.example.com/v1"])) is True
    assert asyncio.run(opened(["http://127.0.0.1:8000/v1", "http://localhost:8001/v1", "http://[::1]:8002/v1"])) \
        is False
