"""Documents/s of the ``openai`` annotator against the loopback OpenAI server with a fixed latency.

For each concurrency, the ideal rate is concurrency / latency; the figure to watch is measured / ideal
(goal >= 0.8). As a baseline measured in the same run, the bare official client sends the same
requests at the same concurrency (no cache, no parsing, no retries): annotator / bare client shows what
the annotator itself costs, and the CPU ms per document shows when the client process, not the
endpoint, is the limit. A last run sets a requests-per-minute limit below what the concurrency allows,
to show the limiter holds it: there the ideal is the most the limit permits for this many documents (a
burst of one second's worth, then rpm / 60 a second), so a ratio above 1 would mean the limit was broken.
The server runs in its own process, so its work does not share the client's interpreter lock.

    .venv/bin/python bench/annotate_endpoint.py [--docs 200] [--latency 0.2] [--concurrency 1 8 64] [--rpm 1200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback server lives with the tests

import openai  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402
from openai_server import knowledge_script, sample_documents, serve_in_subprocess  # noqa: E402

from schemas.configs import AnnotatorConfig, EndpointConfig  # noqa: E402
from schemas.documents import Document  # noqa: E402
from tasks.annotate_openai import OpenAIAnnotator, few_shot_messages, load_prompt, response_format  # noqa: E402

MODEL = "loopback-model"


def annotator_run(base_url: str, docs: list[Document], concurrency: int, rpm: float | None) -> tuple[float, float, int]:
    """(seconds, client CPU seconds, failed documents) to annotate ``docs`` with an empty cache."""
    endpoint = EndpointConfig(base_url=base_url, model=MODEL, api_key_env="", concurrency=concurrency,
                              requests_per_minute=rpm, timeout_s=30)
    with tempfile.TemporaryDirectory() as cache:
        annotator = OpenAIAnnotator(AnnotatorConfig(backend="openai", endpoint=endpoint), cache)
        wall, cpu = time.perf_counter(), time.process_time()
        out = annotator.annotate(docs)
        return time.perf_counter() - wall, time.process_time() - cpu, sum(a.error is not None for a in out)


def bare_client_run(base_url: str, docs: list[Document], concurrency: int) -> tuple[float, float]:
    """(seconds, client CPU seconds) for the bare official client to send the same requests."""
    prompt = load_prompt("annotate-v1")
    few_shot, fmt = few_shot_messages(prompt, "json_schema"), response_format(prompt, "json_schema")

    async def run() -> None:
        slots = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=30) as client:
            async def one(text: str) -> None:
                async with slots:
                    await client.post("/chat/completions", cast_to=ChatCompletion, body=dict(
                        model=MODEL, messages=[*few_shot, {"role": "user", "content": text}], response_format=fmt))
            await asyncio.gather(*(one(d.text) for d in docs))

    wall, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rpm", type=float, default=1200, help="requests/min for the rate-limited run")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    pairs, facts = sample_documents(args.docs)
    docs = [Document(doc_id=i, text=t) for i, t in pairs]
    n = len(docs)
    print(f"{n} documents, server latency {args.latency * 1000:.0f} ms, cache empty each run, {os.cpu_count()} CPUs")
    print(f"{'concurrency':>11} {'rpm':>5} {'docs/s':>7} {'ideal':>6} {'ratio':>5} {'bare/s':>7} "
          f"{'vs bare':>7} {'cpu ms/doc':>10} {'bare cpu':>8} {'failed':>6}")
    with serve_in_subprocess(knowledge_script(facts), latency_s=args.latency) as base_url:
        annotator_run(base_url, docs[:8], 8, None)  # warm-up: imports, first connections
        for concurrency in args.concurrency:
            seconds, cpu, failed = annotator_run(base_url, docs, concurrency, None)
            bare_s, bare_cpu = bare_client_run(base_url, docs, concurrency)
            ideal = concurrency / args.latency
            print(f"{concurrency:>11} {'-':>5} {n / seconds:>7.1f} {ideal:>6.1f} {n / seconds / ideal:>5.2f} "
                  f"{n / bare_s:>7.1f} {bare_s / seconds:>7.2f} {cpu / n * 1000:>10.2f} {bare_cpu / n * 1000:>8.2f} "
                  f"{failed:>6}")
        concurrency, per_s = max(args.concurrency), args.rpm / 60
        seconds, cpu, failed = annotator_run(base_url, docs, concurrency, args.rpm)
        ideal = min(concurrency / args.latency, n / max((n - max(1.0, per_s)) / per_s, 1e-9))
        print(f"{concurrency:>11} {args.rpm:>5g} {n / seconds:>7.1f} {ideal:>6.1f} {n / seconds / ideal:>5.2f} "
              f"{'-':>7} {'-':>7} {cpu / n * 1000:>10.2f} {'-':>8} {failed:>6}")


if __name__ == "__main__":
    main()
