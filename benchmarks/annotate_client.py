"""Client overhead: chat requests per second against an instant loopback stub, concurrency 64.

    python benchmarks/annotate_client.py [--requests 2000] [--repeats 5] [--concurrency 64]

The stub (tests/llama_server.py's LoopbackServer answering a fixed completion) runs in its own process, so
the figure is the client's cost (JSON, HTTP/1.1 keep-alive, semaphore, accounting), not the server's.
Target: >= 200 requests/s on 2 cores (median of the repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def serve(port: int) -> None:
    from llama_server import LoopbackServer, stub_handler

    server = LoopbackServer(stub_handler('{"better": "A", "category": "style", "magnitude": 1, "confidence": 0.5, '
                                         '"rationale": "stub"}'), port=port)
    server.start()
    while True:
        time.sleep(3600)


async def burst(base_url: str, requests: int, concurrency: int) -> float:
    from perpair.llm import ChatClient, ChatClientConfig

    config = ChatClientConfig(base_urls=[base_url], model="stub", concurrency=concurrency)
    messages = [{"role": "user", "content": "Compare A and B. " * 20}]
    async with ChatClient(config) as client:
        await asyncio.gather(*(client.chat(messages, max_tokens=64) for _ in range(concurrency)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client.chat(messages, max_tokens=64, request_id=str(i)) for i in range(requests)))
        elapsed = time.perf_counter() - started
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    from llama_server import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        rates = [asyncio.run(burst(f"http://127.0.0.1:{port}/v1", args.requests, args.concurrency))
                 for _ in range(args.repeats)]
    finally:
        server.terminate()
        server.wait()
    print(f"client overhead: {statistics.median(rates):.0f} requests/s (median of {args.repeats} runs of "
          f"{args.requests} requests, concurrency {args.concurrency}; runs: {', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
