"""The ``openai`` annotator: tail-knowledge facts from any OpenAI-compatible chat endpoint.

The endpoint (OpenAI, a ``vllm serve`` server, any compatible server) is asked for JSON facts
``{entity, relation, value, mention}``; the calls are then inserted programmatically
(:func:`tasks.align.place_facts`), so the source text is never altered. Endpoints without JSON-schema
support are downgraded to ``json_object`` and then to inline markup mapped back onto the source
(:func:`tasks.realign.realign`); the downgrade is remembered for the rest of the run.

Requests run concurrently under a request/token rate limit; 429 (Retry-After honoured), 5xx, 408/409,
timeouts, connection errors and malformed answers are retried with exponential backoff and jitter, up
to ``max_attempts``; then the document is returned as failed with its reason (never lost) and retried
on the next run. Every parsed answer is cached on disk under (prompt id, model, output kind, document
hash), so a rerun or a crash never pays twice. The API key is read from the environment at run time
and is never logged, stored, or put into an error message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
import random
import re
import time
from importlib import resources
from pathlib import Path

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, Field, ValidationError

from schemas import markup
from schemas.configs import AnnotatorConfig, EndpointConfig
from schemas.documents import Annotation, Document
from schemas.errors import UserInputError
from tasks.align import Fact, place_facts
from tasks.concurrency import shared_slot
from tasks.endpoint import (
    RateLimiter,
    api_key,
    cache_key,
    read_cached,
    redact,
    retry_after_s,
    write_cached,
)
from tasks.realign import realign

logger = logging.getLogger(f"lmlm.{__name__}")  # flows/ attach the lmlm logger to Prefect's run log

MODES = ("json_schema", "json_object", "inline")  # downgrade order: each falls back to the next
RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_STATUS = {401: "the endpoint rejected the API key", 403: "the API key may not use this model",
                404: "the endpoint has no such model or path"}


# ---------------------------------------------------------------- prompt


class PromptExample(BaseModel):
    text: str
    facts: list[Fact]


class Prompt(BaseModel):
    """A versioned prompt file ``tasks/prompts/<prompt_id>.json``."""

    prompt_id: str
    description: str = ""
    system_json: str  # instructions for the JSON-facts answer
    system_inline: str  # instructions for the inline-markup answer (endpoints without JSON output)
    schema_name: str
    output_schema: dict  # JSON schema of the answer: {"facts": [{entity, relation, value, mention}]}
    examples: list[PromptExample]


def load_prompt(prompt_id: str) -> Prompt:
    """The prompt shipped as ``tasks/prompts/<prompt_id>.json``; an unknown id is a UserInputError."""
    folder = resources.files("tasks") / "prompts"
    file = folder / f"{prompt_id}.json"
    if not file.is_file():
        known = sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))
        raise UserInputError(
            f"annotator.prompt_id {prompt_id!r}: no prompt file tasks/prompts/{prompt_id}.json; "
            f"use one of: {', '.join(known)}")
    prompt = Prompt.model_validate_json(file.read_text(encoding="utf-8"))
    if prompt.prompt_id != prompt_id:
        raise ValueError(f"tasks/prompts/{prompt_id}.json declares prompt_id {prompt.prompt_id!r}")
    return prompt


def few_shot_messages(prompt: Prompt, mode: str) -> list[dict]:
    """System instructions, then the few-shot examples as user/assistant turns."""
    messages = [{"role": "system", "content": prompt.system_inline if mode == "inline" else prompt.system_json}]
    for ex in prompt.examples:
        messages.append({"role": "user", "content": ex.text})
        messages.append({"role": "assistant", "content": _example_answer(ex, mode)})
    return messages


def _example_answer(ex: PromptExample, mode: str) -> str:
    if mode == "inline":  # the inline example is rendered from the same facts, so both forms agree
        return markup.render(place_facts(ex.text, ex.facts)[0])
    return json.dumps({"facts": [f.model_dump() for f in ex.facts]}, ensure_ascii=False)


def response_format(prompt: Prompt, mode: str) -> dict | None:
    if mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": prompt.schema_name, "schema": prompt.output_schema, "strict": True}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


# ---------------------------------------------------------------- answers


class MalformedAnswer(ValueError):
    """An answer that is not the JSON the prompt asked for."""


_FENCE_RE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_facts(content: str) -> tuple[list[Fact], int]:
    """The facts of a JSON answer and the number of malformed items dropped from it.

    Accepts ``{"facts": [...]}``, a bare list, and either inside a Markdown code fence; raises
    :class:`MalformedAnswer` when the answer as a whole is not such JSON.
    """
    fenced = _FENCE_RE.match(content)
    try:
        data = json.loads(fenced[1] if fenced else content)
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(f"not JSON: {exc}") from None
    items = data.get("facts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MalformedAnswer("JSON without a 'facts' list")
    facts, dropped = [], 0
    for item in items:
        try:
            facts.append(Fact.model_validate(item))
        except ValidationError:
            dropped += 1
    return facts, dropped


# ---------------------------------------------------------------- annotator


def _output_kind(mode: str) -> str:
    return "inline" if mode == "inline" else "facts"


class AnnotatorStats(BaseModel):
    """What runs of an OpenAIAnnotator did and cost, summed over its ``annotate`` calls (for the report)."""

    documents: int = 0
    annotated: int = 0
    failed: int = 0
    failures: dict[str, int] = Field(default_factory=dict, description="failed documents by cause")
    cache_hits: int = 0
    requests_sent: int = 0
    retries: dict[str, int] = Field(default_factory=dict, description="retried requests by cause")
    output_mode: str = ""
    downgrades: list[str] = Field(default_factory=list, description="e.g. 'json_schema -> json_object: <reason>'")
    facts_placed: int = 0
    facts_unplaced: dict[str, int] = Field(default_factory=dict, description="facts not inserted, by reason")
    facts_malformed: int = 0
    inline_repairs: dict[str, int] = Field(default_factory=dict)
    usage_missing: int = Field(0, description="answers without token usage (estimated as chars/4)")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_usd: float = 0.0
    wall_s: float = 0.0


def _rejects_response_format(exc: openai.APIStatusError) -> bool:
    text = f"{exc.message} {exc.body}".lower()
    return exc.status_code in (400, 422) and any(w in text for w in ("response_format", "json_schema", "json_object"))


class _Failure(Exception):
    """A document that ran out of attempts or hit a non-retryable answer; ``reason`` is its record."""

    def __init__(self, cause: str, reason: str):
        super().__init__(reason)
        self.cause = cause
        self.reason = reason


class _Run:
    """State of one ``annotate`` call: the client, limits, and the output mode after downgrades."""

    def __init__(self, client: openai.AsyncOpenAI, endpoint: EndpointConfig, mode: str):
        self.client = client
        self.slots = asyncio.Semaphore(endpoint.concurrency)
        self.limiter = RateLimiter(endpoint.requests_per_minute, endpoint.tokens_per_minute)
        self.mode = mode
        self.reached = False  # any HTTP answer at all: tells an unreachable endpoint from a flaky one


class OpenAIAnnotator:
    """Annotator backend ``openai`` (see module docstring); implements :class:`tasks.annotate.Annotator`."""

    def __init__(self, cfg: AnnotatorConfig, cache_dir: str):
        self.endpoint = cfg.endpoint
        if self.endpoint.structured_output not in MODES:
            raise UserInputError(
                f"endpoint.structured_output {self.endpoint.structured_output!r}: use one of {', '.join(MODES)}")
        if "://" in cache_dir and not cache_dir.startswith("file://"):
            raise UserInputError(f"annotator.cache_dir {cache_dir!r}: the response cache must be a local folder")
        api_key(self.endpoint)  # fail now, not after the first batch; the key itself is not kept
        self.prompt = load_prompt(cfg.prompt_id)
        self.prompt_id = cfg.prompt_id
        self.name = f"openai:{self.endpoint.model}"
        self.version = f"{self.endpoint.model}@{cfg.prompt_id}"
        self.cache_dir = Path(cache_dir.removeprefix("file://"))
        self.stats = AnnotatorStats(output_mode=self.endpoint.structured_output)
        self._few_shot = {m: few_shot_messages(self.prompt, m) for m in MODES}  # the same for every document
        self._prefix_chars = {m: sum(len(x["content"]) for x in self._few_shot[m]) for m in MODES}

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        """One Annotation per document, same order: annotated text, or the reason it failed.

        Raises UserInputError only for what no document can get past: a missing or rejected key, an
        unknown model, an endpoint that cannot be reached. Answers received so far stay cached.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.annotate_async(docs))
        # called from inside an event loop (a notebook, an async task): run on a private loop, keeping the
        # caller's context (the Prefect run and its API settings, which the global limit needs)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(contextvars.copy_context().run, asyncio.run, self.annotate_async(docs)).result()

    async def annotate_async(self, docs: list[Document]) -> list[Annotation]:
        """:meth:`annotate` for callers that already run an event loop."""
        started = time.monotonic()
        ep = self.endpoint
        key = api_key(ep)
        before = self.stats.model_copy(deep=True)
        results: list[Annotation | None] = [None] * len(docs)
        try:
            async with openai.AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0,
                                          timeout=ep.timeout_s) as client:
                run = _Run(client, ep, self.stats.output_mode or ep.structured_output)
                pending = iter(enumerate(docs))

                async def worker() -> None:
                    for i, doc in pending:
                        results[i] = await self._annotate_one(doc, run, key)

                # more workers than slots, so documents waiting out a backoff leave their slot to others
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(len(docs), 4 * ep.concurrency)):
                        group.create_task(worker())
        except* UserInputError as eg:
            raise eg.exceptions[0] from None
        finally:
            self.stats.wall_s += time.monotonic() - started
            self.stats.estimated_cost_usd = (self.stats.prompt_tokens * ep.input_price_per_mtok
                                             + self.stats.completion_tokens * ep.output_price_per_mtok) / 1e6
        self.stats.documents += len(docs)
        done = [r for r in results if r is not None]
        now = self.stats
        logger.info(
            "%s: %d documents, %d failed, %d from cache, %d requests, %d+%d tokens, ~$%.4f",
            self.name, len(docs), sum(r.error is not None for r in done), now.cache_hits - before.cache_hits,
            now.requests_sent - before.requests_sent, now.prompt_tokens - before.prompt_tokens,
            now.completion_tokens - before.completion_tokens, now.estimated_cost_usd - before.estimated_cost_usd)
        return done

    # -- one document

    async def _annotate_one(self, doc: Document, run: _Run, key: str) -> Annotation:
        if not doc.text.strip():  # nothing to ask about
            self.stats.annotated += 1
            return Annotation(doc_id=doc.doc_id, annotated_text=doc.text)
        for mode in MODES[MODES.index(self.endpoint.structured_output):]:
            entry = read_cached(self.cache_dir, cache_key(self.prompt_id, self.endpoint.model,
                                                           _output_kind(mode), doc.text))
            if entry is not None:
                self.stats.cache_hits += 1
                return self._annotation(doc, entry, prompt_tokens=0, completion_tokens=0)
        usage = [0, 0]
        try:
            entry = await self._request_answer(doc, run, usage, key)
        except _Failure as failure:
            self.stats.failed += 1
            self.stats.failures[failure.cause] = self.stats.failures.get(failure.cause, 0) + 1
            return Annotation(doc_id=doc.doc_id, error=failure.reason, prompt_tokens=usage[0],
                              completion_tokens=usage[1])
        write_cached(self.cache_dir, cache_key(self.prompt_id, self.endpoint.model, entry["output"], doc.text), entry)
        return self._annotation(doc, entry, prompt_tokens=usage[0], completion_tokens=usage[1])

    async def _request_answer(self, doc: Document, run: _Run, usage: list[int], key: str) -> dict:
        """A parsed answer (the cache entry), after at most ``max_attempts`` attempts; else _Failure."""
        ep = self.endpoint
        attempt = 0
        while True:
            attempt += 1
            mode = run.mode
            messages = [*self._few_shot[mode], {"role": "user", "content": doc.text}]
            prompt_estimate = (self._prefix_chars[mode] + len(doc.text)) // 4  # ~4 characters a token
            estimate = prompt_estimate + min(ep.max_tokens, len(doc.text) // 4 + 64)
            request = dict(model=ep.model, messages=messages, temperature=ep.temperature, max_tokens=ep.max_tokens)
            if (fmt := response_format(self.prompt, mode)) is not None:
                request["response_format"] = fmt
            retry_after = None
            try:
                async with run.slots:
                    await run.limiter.acquire(estimate)
                    async with shared_slot(ep.global_limit):  # shared with every flow run, held only in flight
                        self.stats.requests_sent += 1
                        # the client's generic post: same auth, timeout and errors as chat.completions.create,
                        # without re-validating our plain-JSON body (~10 ms of CPU a request with a few-shot prompt)
                        completion = await run.client.post("/chat/completions", cast_to=ChatCompletion, body=request)
                run.reached = True
            except openai.APIStatusError as exc:
                run.reached = True
                run.limiter.settle(estimate, 0)
                status = exc.status_code
                said = exc.body.get("message") if isinstance(exc.body, dict) else None
                detail = redact(f"HTTP {status}: {said or exc.message}", key)
                if mode != "inline" and _rejects_response_format(exc):
                    self._downgrade(run, mode, detail)
                    attempt -= 1  # a capability probe, not an attempt at this document
                    continue
                if status in FATAL_STATUS:
                    raise UserInputError(
                        f"endpoint {ep.base_url} model {ep.model!r}: {FATAL_STATUS[status]} ({detail}); check "
                        f"endpoint.base_url, endpoint.model and ${ep.api_key_env or '(no key)'}") from None
                if status not in RETRYABLE_STATUS and status < 500:
                    raise _Failure(f"http_{status}", f"http_{status}: {detail}") from None
                cause = "rate_limited" if status == 429 else "server_error" if status >= 500 else f"http_{status}"
                retry_after = retry_after_s(exc) if status in (429, 503) else None
            except openai.APITimeoutError:
                run.limiter.settle(estimate, 0)
                cause, detail = "timeout", f"no answer within {ep.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                run.limiter.settle(estimate, 0)
                cause, detail = "connection", redact(f"{exc.message} ({exc.__cause__ or ''})", key)
            else:
                entry, cause, detail = self._parse_completion(completion, mode, prompt_estimate, estimate, usage, run)
                if entry is not None:
                    return entry
            if attempt >= ep.max_attempts:
                if cause == "connection" and not run.reached:
                    raise UserInputError(f"endpoint.base_url {ep.base_url}: cannot reach the endpoint ({detail}); "
                                         f"check the URL and that the server is running")
                raise _Failure(cause, f"{cause} after {attempt} attempts: {detail}")
            self.stats.retries[cause] = self.stats.retries.get(cause, 0) + 1
            await asyncio.sleep(self._backoff_s(attempt, retry_after, cause))

    def _parse_completion(self, completion, mode: str, prompt_estimate: int, estimate: int, usage: list[int],
                          run: _Run):
        """(cache entry, None, None) for a usable answer, else (None, cause, detail) to retry on."""
        text_out = completion.choices[0].message.content if completion.choices else None
        finish = completion.choices[0].finish_reason if completion.choices else None
        if completion.usage is not None:
            spent = (completion.usage.prompt_tokens or 0, completion.usage.completion_tokens or 0)
        else:
            self.stats.usage_missing += 1
            spent = (prompt_estimate, len(text_out or "") // 4)
        usage[0] += spent[0]
        usage[1] += spent[1]
        self.stats.prompt_tokens += spent[0]
        self.stats.completion_tokens += spent[1]
        run.limiter.settle(estimate, spent[0] + spent[1])
        cause = "truncated" if finish == "length" else "malformed_json"
        if not text_out:
            return None, cause, f"empty answer (finish_reason={finish})"
        entry = {"prompt_id": self.prompt_id, "model": self.endpoint.model, "output": _output_kind(mode),
                 "mode": mode, "finish_reason": finish, "usage": {"prompt_tokens": spent[0],
                                                                  "completion_tokens": spent[1]}}
        if mode == "inline":
            return {**entry, "annotated_text": text_out}, None, None
        try:
            facts, dropped = parse_facts(text_out)
        except MalformedAnswer as exc:
            return None, cause, f"{exc} (finish_reason={finish})"
        return {**entry, "facts": [f.model_dump() for f in facts], "malformed_items": dropped}, None, None

    def _annotation(self, doc: Document, entry: dict, prompt_tokens: int, completion_tokens: int) -> Annotation:
        """The annotated document from a cached or fresh answer; the source text is never altered."""
        if entry["output"] == "inline":
            ann, repairs = realign(doc.text, entry["annotated_text"])
            for k, v in repairs.items():
                self.stats.inline_repairs[k] = self.stats.inline_repairs.get(k, 0) + v
        else:
            ann, unplaced = place_facts(doc.text, [Fact.model_validate(f) for f in entry["facts"]])
            for _, reason in unplaced:
                self.stats.facts_unplaced[reason] = self.stats.facts_unplaced.get(reason, 0) + 1
            self.stats.facts_malformed += entry.get("malformed_items", 0)
        self.stats.facts_placed += len(ann.calls)
        self.stats.annotated += 1
        return Annotation(doc_id=doc.doc_id, annotated_text=markup.render(ann), prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens)

    def _downgrade(self, run: _Run, rejected: str, detail: str) -> None:
        if run.mode != rejected:  # another request already downgraded
            return
        run.mode = MODES[MODES.index(rejected) + 1]
        self.stats.output_mode = run.mode
        self.stats.downgrades.append(f"{rejected} -> {run.mode}: {detail}")
        logger.warning("%s: endpoint rejected response_format %s (%s); using %s for the rest of the run",
                              self.name, rejected, detail, run.mode)

    def _backoff_s(self, attempt: int, retry_after: float | None, cause: str) -> float:
        """Exponential backoff with jitter (half fixed, half random); never shorter than Retry-After."""
        ep = self.endpoint
        if cause == "malformed_json":
            return 0.0  # a bad answer is not overload: ask again at once
        base = min(ep.backoff_max_s, ep.backoff_base_s * 2 ** (attempt - 1))
        delay = base / 2 + random.uniform(0, base / 2)
        return max(delay, retry_after) if retry_after is not None else delay
