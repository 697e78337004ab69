"""The pairwise LLM judge against a real OpenAI-protocol HTTP server on loopback (tests/openai_server.py)."""

import asyncio
import json
from pathlib import Path

import pytest
from openai_server import Reply, serve

from schemas.configs import EndpointConfig
from schemas.errors import UserInputError
from tasks.pairwise_judge import pairwise_win_rate, parse_verdict

SENTINEL = "sk-sentinel-7c2e91d04ab84f3f8e55"
KEY_ENV = "LMLM_TEST_JUDGE_KEY"
MARKER = "zebra"
N = 8


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


def judge(server, **overrides) -> EndpointConfig:
    settings = {"base_url": server.base_url, "model": "loopback-judge", "api_key_env": KEY_ENV, "concurrency": 4,
                "timeout_s": 2.0, "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return EndpointConfig(**{**settings, **overrides})


def pairs(n: int = N) -> tuple[list[str], list[str], list[str]]:
    """Prefixes, continuations with the marker, continuations without it."""
    prefixes = [f"Story {i} begins on a quiet morning." for i in range(n)]
    marked = [f"Then a {MARKER} walked past house number {i}." for i in range(n)]
    plain = [f"Then nothing at all happened at house number {i}." for i in range(n)]
    return prefixes, marked, plain


def shown_first(body: dict) -> str:
    """"A" when the marked continuation is the first one shown (as A), else "B"."""
    user = body["messages"][-1]["content"]
    marked = user.index(MARKER)
    plain = user.index("nothing at all")
    return "A" if marked < plain else "B"


def marker_judge(body: dict, n: int) -> str:
    return json.dumps({"winner": shown_first(body)})


def test_the_marked_side_wins_in_either_presentation_order():
    prefixes, marked, plain = pairs()
    with serve(marker_judge) as server:
        for_a = pairwise_win_rate(judge(server), prefixes, marked, plain)
        for_b = pairwise_win_rate(judge(server), prefixes, plain, marked)
        firsts = [shown_first(r.body) for r in server.chat_requests()]
    assert (for_a["a_wins"], for_a["b_wins"], for_a["ties"], for_a["win_rate"]) == (N, 0, 0, 1.0)
    assert (for_b["a_wins"], for_b["b_wins"], for_b["ties"], for_b["win_rate"]) == (0, N, 0, 0.0)
    assert for_a["ci95"] == [1.0, 1.0] and for_b["ci95"] == [0.0, 0.0]
    assert for_a["pairs"] == N and for_a["unparsed"] == 0 and for_a["judge_model"] == "loopback-judge"
    # every pair was shown both ways round, so the marked text stood first exactly half the time
    assert len(firsts) == 4 * N and firsts.count("A") == firsts.count("B") == 2 * N


def test_a_judge_that_always_picks_the_first_text_scores_a_tie():
    prefixes, marked, plain = pairs()
    with serve(lambda body, n: "A") as server:
        report = pairwise_win_rate(judge(server), prefixes, marked, plain)
    assert (report["a_wins"], report["b_wins"], report["ties"], report["win_rate"]) == (0, 0, N, 0.5)


def test_a_mixed_judge_gives_a_seeded_interval_around_the_rate():
    prefixes, marked, plain = pairs()
    a = [marked[i] if i % 3 else plain[i] for i in range(N)]  # a is the marked one in 5 of 8 pairs
    b = [plain[i] if i % 3 else marked[i] for i in range(N)]
    with serve(marker_judge) as server:
        first = pairwise_win_rate(judge(server), prefixes, a, b, seed=3)
        again = pairwise_win_rate(judge(server), prefixes, a, b, seed=3)
    assert (first["a_wins"], first["b_wins"]) == (5, 3) and first["win_rate"] == pytest.approx(5 / 8)
    low, high = first["ci95"]
    assert low < first["win_rate"] < high and again["ci95"] == first["ci95"]


def test_unparseable_answers_are_counted_as_unparsed_ties():
    prefixes, marked, plain = pairs()
    garbage = ["I would rather not say.", '{"winner": "C"}', "", "Continuation A is fine but continuation B too."]

    def script(body, n):
        i = int(body["messages"][-1]["content"].split("Story ")[1].split(" ")[0])
        return garbage[i % len(garbage)] if i < 4 else marker_judge(body, n)

    with serve(script) as server:
        report = pairwise_win_rate(judge(server), prefixes, marked, plain)
    assert report["unparsed"] == 4 and report["a_wins"] == N - 4 and report["ties"] == 4
    assert report["win_rate"] == pytest.approx((N - 4 + 2) / N)


def test_answers_are_cached_without_the_key(tmp_path):
    prefixes, marked, plain = pairs()
    with serve(marker_judge) as server:
        first = pairwise_win_rate(judge(server), prefixes, marked, plain, cache_dir=str(tmp_path))
        sent = len(server.chat_requests())
        again = pairwise_win_rate(judge(server), prefixes, marked, plain, cache_dir=str(tmp_path))
        assert len(server.chat_requests()) == sent == 2 * N  # the rerun asked nothing
        assert {r.authorization for r in server.chat_requests()} == {f"Bearer {SENTINEL}"}
    assert again["cache_hits"] == 2 * N and again["win_rate"] == first["win_rate"] == 1.0
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert len(files) == 2 * N and not any(SENTINEL in p.read_text() for p in files)
    assert SENTINEL not in json.dumps(first) and SENTINEL not in json.dumps(again)


def test_overload_is_retried_and_a_request_that_never_succeeds_is_a_failed_tie():
    prefixes, marked, plain = pairs(4)
    seen: dict[str, int] = {}

    def script(body, n):
        user = body["messages"][-1]["content"]
        seen[user] = seen.get(user, 0) + 1
        if "Story 0 " in user:
            return Reply(status=500)  # every attempt fails
        if seen[user] == 1:
            return Reply(status=429, headers={"Retry-After": "0"})
        return marker_judge(body, n)

    with serve(script) as server:
        report = pairwise_win_rate(judge(server), prefixes, marked, plain)
    assert (report["a_wins"], report["ties"], report["failed"]) == (3, 1, 1)
    assert max(v for u, v in seen.items() if "Story 0 " in u) == 3  # max_attempts


def test_it_runs_when_called_from_inside_an_event_loop():
    prefixes, marked, plain = pairs(2)

    async def caller(server):
        return pairwise_win_rate(judge(server), prefixes, marked, plain)

    with serve(marker_judge) as server:
        assert asyncio.run(caller(server))["win_rate"] == 1.0


def test_identical_continuations_are_a_tie_without_a_request():
    prefixes, marked, _ = pairs(3)
    with serve(marker_judge) as server:
        report = pairwise_win_rate(judge(server), prefixes, marked, marked)
        assert server.chat_requests() == []
    assert (report["ties"], report["win_rate"], report["requests"]) == (3, 0.5, 0)


def test_a_missing_key_variable_is_one_clear_line(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    prefixes, marked, plain = pairs(1)
    with serve(marker_judge) as server, pytest.raises(UserInputError, match=KEY_ENV) as err:
        pairwise_win_rate(judge(server), prefixes, marked, plain)
    assert "\n" not in str(err.value) and "export" in str(err.value)


def test_a_rejected_key_is_one_clear_line():
    prefixes, marked, plain = pairs(2)
    with serve(lambda body, n: Reply(status=401, error="bad key")) as server, \
            pytest.raises(UserInputError, match="rejected the API key") as err:
        pairwise_win_rate(judge(server), prefixes, marked, plain)
    assert SENTINEL not in str(err.value)


@pytest.mark.parametrize("answer, verdict", [
    ("A", "A"), ("b", "B"), (" Tie ", "tie"), ('```json\n{"winner": "B"}\n```', "B"), ('{"Winner": "a"}', "A"),
    ('{"winner": "A"', "A"), ("Answer: A", "A"), ("**B**", "B"), ("(A)", "A"), ("The winner is B.", "B"),
    ("Continuation A is more coherent.", "A"), ("It's a tie.", "tie"), ('<think>{"winner": "B"}</think>A', "A"),
    ('{"winner": "C"}', None), ("", None), (None, None), ("A or B", None),
    ("Continuation A is better than continuation B.", None),
])
def test_verdicts_are_read_from_json_or_plain_text(answer, verdict):
    assert parse_verdict(answer) == verdict
