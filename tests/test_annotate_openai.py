"""The ``openai`` annotator against a real OpenAI-protocol HTTP server on loopback (tests/openai_server.py)."""

import asyncio
import json
import logging

import pytest
from openai_server import Reply, fault_reply, knowledge_script, sample_documents, serve, with_faults

from schemas import markup
from schemas.configs import AnnotatorConfig, EndpointConfig
from schemas.errors import UserInputError
from tasks.align import place_facts
from schemas.documents import Document
from tasks.annotate_openai import OpenAIAnnotator, load_prompt, parse_facts
from tasks.endpoint import cache_key

SENTINEL = "sk-sentinel-3f9a1c77e2b04d5a9e61"
KEY_ENV = "LMLM_TEST_OPENAI_KEY"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


def annotator(server, cache_dir, **endpoint) -> OpenAIAnnotator:
    settings = dict(base_url=server.base_url, model="loopback-model", api_key_env=KEY_ENV, concurrency=8,
                    timeout_s=2.0, max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)
    cfg = AnnotatorConfig(backend="openai", endpoint=EndpointConfig(**{**settings, **endpoint}))
    return OpenAIAnnotator(cfg, str(cache_dir))


def documents(n: int, seed: int = 0) -> tuple[list[Document], dict]:
    pairs, facts = sample_documents(n, seed)
    return [Document(doc_id=i, text=t) for i, t in pairs], facts


def triplets(annotated_text: str) -> set[tuple[str, str, str]]:
    return {(pc.call.entity, pc.call.relation, pc.call.value) for pc in markup.parse(annotated_text).calls}


def expected(facts: list[dict]) -> set[tuple[str, str, str]]:
    return {(f["entity"], f["relation"], f["value"]) for f in facts}


def script_per_document(first_replies: list[Reply], then) -> callable:
    """Each document's first requests get ``first_replies`` in turn, later ones ``then``."""
    counts: dict[str, int] = {}

    def answer(body, n):
        doc = body["messages"][-1]["content"]
        k = counts[doc] = counts.get(doc, 0) + 1
        return first_replies[k - 1] if k <= len(first_replies) else then(body, n)

    return answer


def test_facts_are_inserted_and_the_source_text_is_unchanged(tmp_path):
    docs, facts = documents(6)
    empty = Document(doc_id="empty", text=" \n")
    with serve(knowledge_script(facts)) as server:
        *out, out_empty = annotator(server, tmp_path).annotate(docs + [empty])
        received = server.chat_requests()
    assert [a.doc_id for a in out] == [d.doc_id for d in docs]
    assert out_empty.annotated_text == empty.text  # answered without asking
    for doc, ann in zip(docs, out):
        assert ann.error is None
        assert markup.strip(ann.annotated_text) == doc.text
        assert triplets(ann.annotated_text) == expected(facts[doc.text])
        assert ann.prompt_tokens > 0 and ann.completion_tokens > 0
    assert len(received) == len(docs)
    assert all(r.response_format == "json_schema" for r in received)
    assert received[0].body["response_format"]["json_schema"]["strict"] is True
    assert {r.authorization for r in received} == {f"Bearer {SENTINEL}"}  # the key from the env var was sent


def test_malformed_json_is_retried_then_recorded_failed(tmp_path):
    docs, facts = documents(2)
    bad = fault_reply("malformed_json")
    always_bad_text = docs[1].text
    once = script_per_document([bad], knowledge_script(facts))
    with serve(lambda b, n: bad if b["messages"][-1]["content"] == always_bad_text else once(b, n)) as server:
        ann = annotator(server, tmp_path, max_attempts=3)
        out = ann.annotate(docs)
        sent = [r.document for r in server.chat_requests()]
    assert out[0].error is None and triplets(out[0].annotated_text) == expected(facts[docs[0].text])
    assert out[1].annotated_text is None and out[1].error.startswith("malformed_json after 3 attempts")
    assert sent.count(docs[0].text) == 2 and sent.count(always_bad_text) == 3
    assert ann.stats.failures == {"malformed_json": 1}
    assert ann.stats.retries["malformed_json"] == 1 + 2


def test_429_waits_at_least_retry_after(tmp_path):
    docs, facts = documents(1)
    limited = fault_reply("rate_limited", retry_after_s=1.0)
    with serve(script_per_document([limited], knowledge_script(facts))) as server:
        ann = annotator(server, tmp_path, backoff_base_s=0.01)
        out = ann.annotate(docs)
        first, second = server.chat_requests()
    assert out[0].error is None
    assert second.at - first.at >= 1.0  # the server's own clocks: the client waited out Retry-After
    assert ann.stats.retries == {"rate_limited": 1}


def test_500_is_retried(tmp_path):
    docs, facts = documents(1)
    with serve(script_per_document([fault_reply("server_error")] * 2, knowledge_script(facts))) as server:
        ann = annotator(server, tmp_path)
        out = ann.annotate(docs)
        assert len(server.chat_requests()) == 3
    assert out[0].error is None
    assert ann.stats.retries == {"server_error": 2}


def test_a_hang_past_the_timeout_is_retried_and_then_recorded_failed(tmp_path):
    docs, facts = documents(2)
    hang = fault_reply("hang")
    once = script_per_document([hang], knowledge_script(facts))
    with serve(lambda b, n: hang if b["messages"][-1]["content"] == docs[1].text else once(b, n)) as server:
        ann = annotator(server, tmp_path, timeout_s=0.5, max_attempts=3)
        out = ann.annotate(docs)
    assert out[0].error is None and markup.strip(out[0].annotated_text) == docs[0].text
    assert out[1].error.startswith("timeout after 3 attempts")
    assert ann.stats.retries["timeout"] >= 3 and ann.stats.failures == {"timeout": 1}


def test_200_documents_with_faults_then_a_rerun_completes_only_the_failed(tmp_path):
    docs, facts = documents(200, seed=7)
    broken = {d.text for d in docs[::10]}  # a share of documents the endpoint cannot answer in run 1
    faulty = with_faults(knowledge_script(facts), rate=0.3, seed=3, retry_after_s=0.05)

    def first_run(body, n):
        return fault_reply("server_error") if body["messages"][-1]["content"] in broken else faulty(body, n)

    with serve(first_run) as server:
        ann = annotator(server, tmp_path, concurrency=16, timeout_s=0.3, max_attempts=3)
        out = ann.annotate(docs)
        n_requests = len(server.chat_requests())
    assert [a.doc_id for a in out] == [d.doc_id for d in docs]
    served_faults = sum(faulty.faults.values()) + 3 * len(broken)
    assert served_faults / n_requests >= 0.2
    failed = {a.doc_id for a in out if a.error is not None}
    for doc, a in zip(docs, out):
        assert (a.annotated_text is None) != (a.error is None)  # annotated, or failed with its reason
        if a.error is None:
            assert markup.strip(a.annotated_text) == doc.text
            assert triplets(a.annotated_text) == expected(facts[doc.text])
    assert {d.doc_id for d in docs if d.text in broken} <= failed
    assert ann.stats.annotated + ann.stats.failed == 200 and ann.stats.failed == len(failed)

    with serve(knowledge_script(facts)) as server:  # the rerun: a healthy endpoint, the same cache
        rerun = annotator(server, tmp_path, concurrency=16)
        again = rerun.annotate(docs)
        asked = [r.document for r in server.chat_requests()]
    assert sorted(asked) == sorted(d.text for d in docs if d.doc_id in failed)  # nothing for cached docs
    assert all(a.error is None for a in again)
    assert [a.annotated_text for a, b in zip(again, out) if b.error is None] == \
           [b.annotated_text for b in out if b.error is None]
    assert rerun.stats.cache_hits == 200 - len(failed) and rerun.stats.requests_sent == len(failed)


def test_the_api_key_appears_nowhere(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    docs, facts = documents(12)
    echo = Reply(status=400, error=f"Bad request made with key {SENTINEL}")  # a server that echoes the key
    faulty = with_faults(knowledge_script(facts), rate=0.4, seed=1, retry_after_s=0.05)
    with serve(lambda b, n: echo if b["messages"][-1]["content"] == docs[0].text else faulty(b, n)) as server:
        ann = annotator(server, tmp_path, timeout_s=0.3)
        out = ann.annotate(docs)
        assert server.chat_requests()[0].authorization == f"Bearer {SENTINEL}"
    with serve(lambda b, n: Reply(status=401, error=f"Incorrect API key provided: {SENTINEL}")) as server:
        with pytest.raises(UserInputError) as denied:
            annotator(server, tmp_path / "other").annotate(docs[:1])
    assert out[0].error.startswith("http_400") and "***" in out[0].error
    assert KEY_ENV in str(denied.value)
    captured = capsys.readouterr()
    artifacts = [captured.out, captured.err, caplog.text, str(denied.value), repr(ann.__dict__),
                 ann.stats.model_dump_json(), json.dumps([a.model_dump() for a in out])]
    artifacts += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(artifacts) > 7  # the cache was written
    assert not [a for a in artifacts if SENTINEL in a]


def test_json_schema_rejection_falls_back_to_json_object_then_inline(tmp_path):
    docs, facts = documents(8)
    with serve(knowledge_script(facts), response_formats=("json_object",)) as server:
        ann = annotator(server, tmp_path / "a")
        out = ann.annotate(docs)
        formats = [r.response_format for r in server.chat_requests()]
    assert ann.stats.output_mode == "json_object" and len(ann.stats.downgrades) == 1
    assert formats.count("json_object") == len(docs) and set(formats) == {"json_schema", "json_object"}
    assert all(triplets(a.annotated_text) == expected(facts[d.text]) for d, a in zip(docs, out))

    with serve(knowledge_script(facts), response_formats=()) as server:
        ann = annotator(server, tmp_path / "b")
        out = ann.annotate(docs)
        last = server.chat_requests()[-1]
    assert ann.stats.output_mode == "inline" and len(ann.stats.downgrades) == 2
    assert last.response_format is None
    for doc, a in zip(docs, out):
        assert markup.strip(a.annotated_text) == doc.text
        assert triplets(a.annotated_text) == expected(facts[doc.text])


def test_a_rerun_after_a_downgrade_sends_nothing(tmp_path):
    docs, facts = documents(4)
    with serve(knowledge_script(facts), response_formats=()) as server:
        annotator(server, tmp_path).annotate(docs)
    with serve(knowledge_script(facts), response_formats=()) as server:
        again = annotator(server, tmp_path).annotate(docs)
        assert server.chat_requests() == []
    assert all(a.error is None for a in again)


def test_a_torn_cache_entry_is_asked_again(tmp_path):
    docs, facts = documents(2)
    with serve(knowledge_script(facts)) as server:
        first = annotator(server, tmp_path).annotate(docs)
    (entry,) = tmp_path.rglob(cache_key("annotate-v1", "loopback-model", "facts", docs[1].text) + ".json")
    entry.write_text(entry.read_text()[:20])  # as a crash elsewhere might leave it
    with serve(knowledge_script(facts)) as server:
        again = annotator(server, tmp_path).annotate(docs)
        assert [r.document for r in server.chat_requests()] == [docs[1].text]
    assert [a.annotated_text for a in again] == [a.annotated_text for a in first]


def test_client_errors_are_not_retried(tmp_path):
    docs, _ = documents(1)
    with serve(lambda b, n: Reply(status=400, error="This model's maximum context length is 8 tokens")) as server:
        out = annotator(server, tmp_path).annotate(docs)
        assert len(server.chat_requests()) == 1
    assert out[0].error.startswith("http_400") and "maximum context length" in out[0].error


def test_missing_key_variable_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with serve(lambda b, n: "{}") as server:
        with pytest.raises(UserInputError, match=KEY_ENV):
            annotator(server, tmp_path)
        no_auth = annotator(server, tmp_path, api_key_env="")  # a local vLLM server without a key
        no_auth.annotate(documents(1)[0])
        assert server.chat_requests()[0].authorization == "Bearer EMPTY"


def test_an_unreachable_endpoint_is_a_user_error(tmp_path):
    with serve(lambda b, n: "{}") as server:
        pass  # started and stopped: its port now refuses connections
    with pytest.raises(UserInputError, match="endpoint.base_url"):
        annotator(server, tmp_path, max_attempts=2).annotate(documents(1)[0])


def test_annotate_works_inside_a_running_event_loop(tmp_path):
    docs, facts = documents(2)
    with serve(knowledge_script(facts)) as server:
        ann = annotator(server, tmp_path)

        async def from_async_code():
            return ann.annotate(docs)

        out = asyncio.run(from_async_code())
    assert all(a.error is None for a in out)


def test_answers_in_code_fences_and_partly_malformed_items_are_used():
    facts, dropped = parse_facts('```json\n{"facts": [{"entity": "A", "relation": "r", "value": "v", '
                                 '"mention": "v"}, {"entity": "B"}]}\n```')
    assert [f.entity for f in facts] == ["A"] and dropped == 1


def test_unknown_prompt_id_is_a_user_error():
    assert load_prompt("annotate-v1").examples
    with pytest.raises(UserInputError, match="annotate-v1"):
        load_prompt("annotate-v0")


def test_every_few_shot_fact_is_quoted_from_its_example():
    for ex in load_prompt("annotate-v1").examples:
        assert all(f.mention in ex.text for f in ex.facts)
        assert place_facts(ex.text, ex.facts)[1] == []  # the inline examples show every fact
