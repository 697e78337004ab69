"""An LLM judge's pairwise win rate: which of two continuations of the same prefix is better (coherence by
default), asked of any OpenAI-compatible chat endpoint.

Position bias is removed by asking about every pair twice, once in each order; a side wins a pair only when
both answers pick it, anything else is a tie. A judge that always names the first text therefore scores 0.5.

The key is read from the variable the config names (:func:`tasks.endpoint.api_key`) and is never logged,
returned or cached; answers are cached on disk (:mod:`tasks.endpoint`) so a rerun pays only for new pairs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import openai

from schemas.configs import EndpointConfig
from schemas.errors import UserInputError
from tasks.annotate_openai import FATAL_STATUS, RETRYABLE_STATUS
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

logger = logging.getLogger(f"lmlm.{__name__}")  # flows/ attach the lmlm logger to Prefect's run log

PROMPT_ID = "pairwise-v1"  # part of every cache key: change it when the prompt text changes
BOOTSTRAP_SAMPLES = 2000
CRITERIA = {
    "coherence": "which continuation follows on from the beginning more coherently and is more consistent "
                 "with common sense",
}


# ----------------------------------------------------------------------------- prompt and answer


def system_prompt(criterion: str) -> str:
    question = CRITERIA.get(criterion, f"which continuation is better in {criterion}")
    return (f"You compare two continuations, A and B, of the same beginning of a text. Decide {question}. "
            "Length and the order in which they are shown do not matter. "
            'Reply with JSON only: {"winner": "A"}, {"winner": "B"} or {"winner": "tie"}.')


def user_prompt(prefix: str, first: str, second: str) -> str:
    return f"Beginning:\n{prefix}\n\nContinuation A:\n{first}\n\nContinuation B:\n{second}"


_LABEL = re.compile(r"^(?:the\s+)?(?:continuation|option|text|answer|winner|choice)?\s*[:\-]?\s*\(?([ab]|tie)\)?$")
_ANSWERED = re.compile(r"\b(?:winner|answer|verdict|choice)[\"']?\s*(?:is|:|=)\s*[\"'*(\[]*\s*(a|b|tie)\b")
_NAMED = re.compile(r"\b(?:continuation|option|text)\s+([ab])\b")


def parse_verdict(content: str | None) -> str | None:
    """"A", "B" or "tie" from a judge's answer (JSON, maybe in a code fence, or plain text; any case);
    None when it names no single verdict."""
    text = re.sub(r"<think>.*?</think>", "", content or "", flags=re.DOTALL).strip()  # a reasoning model's notes
    if match := re.search(r"\{.*\}", text, re.DOTALL):
        try:
            data = json.loads(match[0])
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            fields = {str(k).lower(): v for k, v in data.items()}
            value = next((fields[k] for k in ("winner", "verdict", "answer", "choice", "better") if k in fields), None)
            return _label(str(value)) if value is not None else None
    text = text.lower()
    if (label := _label(text)) is not None:
        return label
    if match := _ANSWERED.search(text):
        return _label(match[1])
    named = set(_NAMED.findall(text))
    if len(named) == 1 and not re.search(r"\btie\b", text):
        return _label(named.pop())
    if not named and re.fullmatch(r"[^a-z]*(?:it'?s\s+)?(?:a\s+)?tie\b.*", text, re.DOTALL):
        return "tie"
    return None


def _label(text: str) -> str | None:
    bare = re.sub(r"[\s\"'`*_.!]+$", "", re.sub(r"^[\s\"'`*_]+", "", text.lower()))
    match = _LABEL.match(bare)
    return None if match is None else ("tie" if match[1] == "tie" else match[1].upper())


# ----------------------------------------------------------------------------- win rate


def pairwise_win_rate(endpoint: EndpointConfig, prefixes: list[str], a: list[str], b: list[str], *,
                      cache_dir: str | None = None, seed: int = 0, criterion: str = "coherence") -> dict:
    """How often the judge prefers ``a[i]`` to ``b[i]`` as a continuation of ``prefixes[i]``.

    Each pair is asked twice, with A/B in both orders (position bias removed): a side wins only when both
    answers pick it; a split, a "tie", an unparseable answer or a request that failed after
    ``endpoint.max_attempts`` make the pair a tie. Identical continuations are a tie without a request.

    Returns pairs, a_wins, b_wins, ties, unparsed (pairs with an answer naming no verdict; also in ties),
    failed (pairs with a request that got no answer; also in ties), win_rate = (a_wins + ties / 2) / pairs,
    ci95 (percentile bootstrap over pairs, seeded by ``seed``), judge_model, requests and cache_hits.
    win_rate and ci95 are None when there are no pairs.

    Raises UserInputError when the key's variable is unset, the key or model is rejected, or the endpoint
    cannot be reached at all.
    """
    if not len(prefixes) == len(a) == len(b):
        raise ValueError(f"prefixes, a and b differ in length: {len(prefixes)}, {len(a)}, {len(b)}")
    key = api_key(endpoint)  # fail before any work; the key itself goes only into the client
    system = system_prompt(criterion)
    asked = [i for i in range(len(a)) if a[i].strip() != b[i].strip()]
    users = [user_prompt(prefixes[i], *order) for i in asked for order in ((a[i], b[i]), (b[i], a[i]))]
    cache = Path(cache_dir.removeprefix("file://")) if cache_dir else None
    coro = _ask_all(endpoint, key, system, users, cache)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        answers, stats = asyncio.run(coro)
    else:  # called from inside an event loop: run on a private one, keeping the caller's context
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answers, stats = pool.submit(contextvars.copy_context().run, asyncio.run, coro).result()

    scores = np.full(len(a), 0.5)
    unparsed = failed = 0
    for j, i in enumerate(asked):
        forward, backward = answers[2 * j], answers[2 * j + 1]
        if forward is None or backward is None:
            failed += 1
            continue
        first, second = parse_verdict(forward), parse_verdict(backward)
        if first is None or second is None:
            unparsed += 1
            continue
        swapped = {"A": "B", "B": "A"}.get(second, second)  # the second request showed b as A
        if first == swapped == "A":
            scores[i] = 1.0
        elif first == swapped == "B":
            scores[i] = 0.0
    n = len(scores)
    report = {"pairs": n, "a_wins": int((scores == 1.0).sum()), "b_wins": int((scores == 0.0).sum()),
              "ties": int((scores == 0.5).sum()), "unparsed": unparsed, "failed": failed,
              "win_rate": float(scores.mean()) if n else None, "ci95": bootstrap_ci95(scores, seed),
              "judge_model": endpoint.model, **stats}
    logger.info("pairwise judge %s (%s): %d pairs, A %d / B %d / tie %d (%d unparsed, %d failed), win rate %s",
                endpoint.model, criterion, n, report["a_wins"], report["b_wins"], report["ties"], unparsed, failed,
                f"{report['win_rate']:.3f}" if n else "n/a")
    return report


def bootstrap_ci95(scores: np.ndarray, seed: int) -> list[float] | None:
    """2.5th and 97.5th percentiles of the mean score over pairs resampled with replacement."""
    if len(scores) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(BOOTSTRAP_SAMPLES, len(scores)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# ----------------------------------------------------------------------------- requests


async def _ask_all(ep: EndpointConfig, key: str, system: str, users: list[str],
                   cache: Path | None) -> tuple[list[str | None], dict]:
    """Each user prompt's answer text ("" when empty), or None when no answer came after every attempt."""
    output = "inline" if ep.structured_output == "inline" else "json"
    slots = asyncio.Semaphore(ep.concurrency)
    limiter = RateLimiter(ep.requests_per_minute, ep.tokens_per_minute)
    stats = {"requests": 0, "cache_hits": 0}
    reached = [False]  # any HTTP answer at all: tells an unreachable endpoint from a flaky one
    answers: list[str | None] = [None] * len(users)

    async def ask(client: openai.AsyncOpenAI, j: int) -> None:
        ckey = cache_key(PROMPT_ID, ep.model, output, f"{system}\n\n{users[j]}")
        if cache is not None and (entry := read_cached(cache, ckey)) is not None:
            stats["cache_hits"] += 1
            answers[j] = entry["content"]
            return
        request = {"model": ep.model, "temperature": ep.temperature, "max_tokens": ep.max_tokens,
                   "messages": [{"role": "system", "content": system}, {"role": "user", "content": users[j]}]}
        if output == "json":
            request["response_format"] = {"type": "json_object"}
        estimate = (len(system) + len(users[j])) // 4 + 16  # ~4 characters a token
        detail = ""
        for attempt in range(1, ep.max_attempts + 1):
            retry_after = None
            try:
                async with slots:
                    await limiter.acquire(estimate)
                    async with shared_slot(ep.global_limit):  # shared with every flow run, held only in flight
                        stats["requests"] += 1
                        completion = await client.chat.completions.create(**request)
                reached[0] = True
            except openai.APIStatusError as exc:
                reached[0] = True
                limiter.settle(estimate, 0)
                said = exc.body.get("message") if isinstance(exc.body, dict) else None
                detail = redact(f"HTTP {exc.status_code}: {said or exc.message}", key)
                if exc.status_code in FATAL_STATUS:
                    raise UserInputError(
                        f"judge endpoint {ep.base_url} model {ep.model!r}: {FATAL_STATUS[exc.status_code]} "
                        f"({detail}); check the judge's base_url, model and ${ep.api_key_env or '(no key)'}") from None
                if exc.status_code in (400, 422) and "response_format" in detail.lower():
                    raise UserInputError(f"judge endpoint {ep.base_url} does not accept JSON output ({detail}); "
                                         "set the judge's structured_output to inline") from None
                if exc.status_code not in RETRYABLE_STATUS and exc.status_code < 500:
                    break
                retry_after = retry_after_s(exc) if exc.status_code in (429, 503) else None
            except openai.APITimeoutError:
                limiter.settle(estimate, 0)
                detail = f"no answer within {ep.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                limiter.settle(estimate, 0)
                detail = redact(f"{exc.message} ({exc.__cause__ or ''})", key)
            else:
                usage = completion.usage
                limiter.settle(estimate, usage.total_tokens if usage else estimate)
                content = (completion.choices[0].message.content if completion.choices else None) or ""
                answers[j] = content
                if cache is not None:
                    write_cached(cache, ckey, {"prompt_id": PROMPT_ID, "model": ep.model, "output": output,
                                               "content": content})
                return
            if attempt < ep.max_attempts:
                base = min(ep.backoff_max_s, ep.backoff_base_s * 2 ** (attempt - 1))
                delay = base / 2 + random.uniform(0, base / 2)  # half fixed, half jitter
                await asyncio.sleep(max(delay, retry_after or 0.0))
        if not reached[0]:
            raise UserInputError(f"judge endpoint {ep.base_url}: cannot reach it ({detail}); check the judge's "
                                 "base_url and that the server is running")
        logger.warning("pairwise judge: no answer from %s after %d attempts: %s", ep.base_url, attempt, detail)

    try:
        async with (openai.AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0,
                                       timeout=ep.timeout_s) as client,
                    asyncio.TaskGroup() as group):
            for j in range(len(users)):
                group.create_task(ask(client, j))
    except* UserInputError as eg:
        raise eg.exceptions[0] from None
    return answers, stats
