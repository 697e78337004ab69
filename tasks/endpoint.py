"""Talking to an OpenAI-compatible endpoint: the API key from the environment, request and token rate
limits, Retry-After, and the on-disk answer cache that makes a rerun or a crash never pay twice.

The key is read at run time from the variable the config names and never logged or stored:
:func:`redact` masks it in anything that may be.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import openai

from schemas.configs import EndpointConfig
from schemas.errors import UserInputError

# ---------------------------------------------------------------- answer cache


def cache_key(prompt_id: str, model: str, output: str, text: str) -> str:
    """Cache key of one answer; ``output`` is "facts" (json_schema and json_object) or "inline"."""
    doc_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256(json.dumps([prompt_id, model, output, doc_hash]).encode("utf-8")).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def read_cached(cache_dir: Path, key: str) -> dict | None:
    """A cached answer, or None; an unreadable entry (torn by a crash elsewhere) counts as absent."""
    try:
        return json.loads(_cache_path(cache_dir, key).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_cached(cache_dir: Path, key: str, entry: dict) -> None:
    """Store an answer atomically (temp file + rename): a reader sees all of it or nothing."""
    path = _cache_path(cache_dir, key)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    data = json.dumps(entry, ensure_ascii=False)
    try:
        try:
            tmp.write_text(data, encoding="utf-8")
        except FileNotFoundError:  # first entry under this prefix
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- rate limit


class TokenBucket:
    """``per_minute`` units a minute, in bursts of at most one second's worth (at least one unit).

    A take larger than the burst waits for a full bucket and then drives it negative, so the
    long-run rate still holds.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, n: float) -> None:
        while True:
            self._refill()
            need = min(n, self.capacity)
            if self.level >= need:
                self.level -= n
                return
            await asyncio.sleep((need - self.level) / self.rate)

    def correct(self, extra: float) -> None:
        """Charge ``extra`` units more (or fewer, when negative) than were taken."""
        self._refill()
        self.level = min(self.capacity, self.level - extra)


class RateLimiter:
    """Requests/min and tokens/min limits (either may be off); waiters are served in arrival order."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self._lock = asyncio.Lock()

    async def acquire(self, estimated_tokens: int) -> None:
        async with self._lock:  # one waiter at a time keeps the order fair and the buckets consistent
            if self.requests:
                await self.requests.take(1)
            if self.tokens:
                await self.tokens.take(estimated_tokens)

    def settle(self, estimated_tokens: int, used_tokens: int) -> None:
        if self.tokens:
            self.tokens.correct(used_tokens - estimated_tokens)


def api_key(endpoint: EndpointConfig) -> str:
    """The key from the environment variable the config names; "EMPTY" when it names none (no auth)."""
    if not endpoint.api_key_env:
        return "EMPTY"
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise UserInputError(
            f"endpoint.api_key_env: environment variable {endpoint.api_key_env} is not set; export it with "
            f"your API key, or set api_key_env to \"\" for a server without authentication")
    return key


def retry_after_s(exc: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (Retry-After-Ms, Retry-After in seconds or as an HTTP date)."""
    headers = exc.response.headers
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None




def redact(text: str, key: str) -> str:
    """``text`` with the API key masked, for anything that may be logged or stored."""
    return text.replace(key, "***") if key and key != "EMPTY" else text
