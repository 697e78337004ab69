"""A real OpenAI-compatible chat-completions server on loopback, answering from a script.

For tests and benchmarks of endpoint clients: it speaks HTTP/1.1 on 127.0.0.1 (a free port), serves
``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health``, and records every request it
receives (body, Authorization header, arrival time). Answers come from a *script*, a callable
``(request_json, n) -> Reply | str`` (a string is the assistant's content); :func:`knowledge_script`
answers with known facts for known documents, :func:`with_faults` mixes in malformed JSON, 429 with
Retry-After, 500 and hangs past the client's timeout.

    with serve(knowledge_script(facts_by_text)) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="...")
        ...
        assert len(server.received) == ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Iterator

DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END = "<|db_entity|>", "<|db_relationship|>", "<|db_return|>", "<|db_end|>"


@dataclass
class Reply:
    """One scripted answer. ``hang`` holds the request open until the server stops (or ``hang_s``)."""

    content: str | None = None  # the assistant message, for status 200
    status: int = 200
    error: str = ""  # error message, for status >= 400
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    raw_body: bytes | None = None  # sent as is (a broken protocol answer), overriding the rest
    finish_reason: str = "stop"
    usage: bool = True  # include token usage


@dataclass
class Received:
    n: int  # 0-based arrival order
    path: str
    body: dict | None
    authorization: str | None
    at: float  # time.monotonic() on arrival

    @property
    def document(self) -> str | None:
        """The last user message: the document, for the annotator's prompt."""
        msgs = (self.body or {}).get("messages") or []
        users = [m.get("content") for m in msgs if m.get("role") == "user"]
        return users[-1] if users else None

    @property
    def response_format(self) -> str | None:
        return ((self.body or {}).get("response_format") or {}).get("type")


Script = Callable[[dict, int], "Reply | str"]


class OpenAIServer:
    """The server; use :func:`serve`. ``response_formats``: the response_format types it accepts.

    One asyncio loop on a background thread serves every connection (HTTP/1.1 keep-alive), so many
    concurrent requests cost no threads; ``hang`` and ``latency_s`` waits end when the server stops.
    """

    def __init__(self, script: Script, latency_s: float = 0.0,
                 response_formats: tuple[str, ...] = ("json_schema", "json_object"),
                 model: str = "loopback-model", hang_s: float = 30.0):
        self.script = script
        self.latency_s = latency_s
        self.response_formats = response_formats
        self.model = model
        self.hang_s = hang_s
        self.received: list[Received] = []
        self.port = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._connections: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True,
                                        name="openai-loopback")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_requests(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path.endswith("/chat/completions")]

    def start(self) -> "OpenAIServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(self._connections):  # ends hangs, latency waits and idle keep-alive reads
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length") or 0))
                answer = await self._answer(method, path, headers, raw)
                if answer is None:  # a hang: the client gave up long ago
                    break
                status, body, extra = answer
                head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
                        f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(asyncio.current_task())
            writer.close()

    async def _answer(self, method: str, path: str, headers: dict, raw: bytes) -> tuple[int, bytes, dict] | None:
        try:
            body = json.loads(raw) if method == "POST" else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        with self._lock:
            n = len(self.received)
            self.received.append(Received(n, path, body, headers.get("authorization"), time.monotonic()))
        route = path.split("?")[0].rstrip("/")
        if method == "GET" and route.endswith("/models"):
            return _json(200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "loopback"}]})
        if method == "GET" and route == "/health":
            return _json(200, {"status": "ok"})
        if method != "POST" or not route.endswith("/chat/completions"):
            return _json(404, _error(f"no route {method} {path}", "not_found"))
        if not isinstance(body, dict):
            return _json(400, _error("request body is not a JSON object", "invalid_request_error"))
        fmt = (body.get("response_format") or {}).get("type")
        if fmt and fmt not in self.response_formats:
            return _json(400, _error(f"response_format type '{fmt}' is not supported by this server",
                                     "invalid_request_error", param="response_format"))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        reply = self.script(body, n)
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if reply.hang:
            await asyncio.sleep(self.hang_s)
            return None
        if reply.raw_body is not None:
            return reply.status, reply.raw_body, reply.headers
        if reply.status >= 400:
            kind = {429: "rate_limit_exceeded", 500: "server_error"}.get(reply.status, "invalid_request_error")
            return _json(reply.status, _error(reply.error or f"scripted {reply.status}", kind), reply.headers)
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4
        completion_tokens = len(reply.content or "") // 4
        answer = {
            "id": f"chatcmpl-loopback-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason, "logprobs": None}],
        }
        if reply.usage:
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}
        return _json(200, answer, reply.headers)


def _json(status: int, obj: dict, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    return status, json.dumps(obj).encode("utf-8"), dict(headers or {})


def _error(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@contextlib.contextmanager
def serve(script: Script, **options) -> Iterator[OpenAIServer]:
    """A running :class:`OpenAIServer`; stopped (hangs released) on exit."""
    server = OpenAIServer(script, **options).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_in_subprocess(script: Script, **options) -> Iterator[str]:
    """:func:`serve` in a forked child process, so the server does not share the caller's interpreter
    lock (for benchmarks); yields the base URL."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(child, script, options), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("loopback OpenAI server process did not start")
        yield parent.recv()
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def _serve_child(conn, script: Script, options: dict) -> None:
    with serve(script, **options) as server:
        conn.send(server.base_url)
        conn.recv()


# ---------------------------------------------------------------- scripts


def inline_markup(text: str, facts: list[dict]) -> str:
    """``text`` with a canonical call before each fact's mention (an independent, naive renderer)."""
    inserts = []
    for f in facts:
        pos = text.find(f.get("mention") or f["value"])
        if pos < 0:
            continue
        while pos > 0 and text[pos - 1].isspace():  # the call goes before the mention's leading space
            pos -= 1
        call = f"{DB_ENTITY} {f['entity']}{DB_RELATIONSHIP} {f['relation']}{DB_RETURN} {f['value']}{DB_END}"
        inserts.append((pos, call))
    out, last = [], 0
    for pos, call in sorted(inserts, key=lambda x: x[0]):
        out += [text[last:pos], call]
        last = pos
    return "".join(out) + text[last:]


def knowledge_script(facts_by_text: dict[str, list[dict]]) -> Script:
    """Answers with the known facts of each document (none for unknown ones): JSON when the request
    asks for a response_format, inline markup otherwise."""

    def answer(body: dict, n: int) -> Reply:
        doc = Received(n, "", body, None, 0.0).document or ""
        facts = facts_by_text.get(doc, [])
        if (body.get("response_format") or {}).get("type"):
            return Reply(content=json.dumps({"facts": facts}))
        return Reply(content=inline_markup(doc, facts))

    return answer


FAULTS = ("malformed_json", "rate_limited", "server_error", "hang")


def fault_reply(kind: str, retry_after_s: float = 1.0) -> Reply:
    if kind == "malformed_json":
        return Reply(content='{"facts": [{"entity": "x", "relation": ')
    if kind == "rate_limited":
        return Reply(status=429, error="Rate limit reached, slow down", headers={"Retry-After": f"{retry_after_s:g}"})
    if kind == "server_error":
        return Reply(status=500, error="The server had an error while processing your request")
    if kind == "hang":
        return Reply(hang=True)
    raise ValueError(f"unknown fault {kind!r}; use one of {FAULTS}")


def with_faults(script: Script, rate: float, kinds: tuple[str, ...] = FAULTS, seed: int = 0,
                retry_after_s: float = 1.0) -> Script:
    """``script`` with a fault instead of the answer on a ``rate`` share of requests.

    Whether the k-th request for a document faults, and how, depends only on (seed, document, k), so
    a run's faults do not depend on the order in which concurrent requests arrive. ``.faults`` on the
    returned script counts the faults served by kind.
    """
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    served: Counter[str] = Counter()

    def answer(body: dict, n: int) -> Reply | str:
        doc = Received(n, "", body, None, 0.0).document or ""
        with lock:
            k = seen[doc]
            seen[doc] += 1
        rng = random.Random(hashlib.sha256(f"{seed}:{k}:{doc}".encode()).digest())
        if rng.random() < rate:
            kind = rng.choice(kinds)
            with lock:
                served[kind] += 1
            return fault_reply(kind, retry_after_s)
        return script(body, n)

    answer.faults = served
    return answer


def sample_documents(n: int, seed: int = 0) -> tuple[list[tuple[str, str]], dict[str, list[dict]]]:
    """``n`` short fictional biographies as (doc_id, text), and each text's facts (entity, relation,
    value, mention) for :func:`knowledge_script`."""
    rng = random.Random(seed)
    first = ["Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
    last = ["Varga", "Okonkwo", "Lindqvist", "Moreau", "Tanaka", "Alves", "Novak", "Brennan"]
    cities = ["Tampere", "Ghent", "Cuenca", "Lviv", "Matsue", "Bergamo", "Dunedin", "Kraków"]
    employers = ["Harwell Instruments", "the Royal Ballet", "Nordic Rail", "Quilmes Observatory"]
    docs, facts_by_text = [], {}
    for i in range(n):
        name = f"{rng.choice(first)} {rng.choice(last)} {i}"
        city, year, employer = rng.choice(cities), str(rng.randint(1900, 1999)), rng.choice(employers)
        text = f"{name} was born in {city} in {year}. Later {name.split()[0]} worked for {employer} for many years."
        facts = [{"entity": name, "relation": "birthplace", "value": city, "mention": city},
                 {"entity": name, "relation": "birth year", "value": year, "mention": year},
                 {"entity": name, "relation": "employer", "value": employer.removeprefix("the "),
                  "mention": employer.removeprefix("the ")}]
        docs.append((f"doc-{i:05d}", text))
        facts_by_text[text] = facts
    return docs, facts_by_text
