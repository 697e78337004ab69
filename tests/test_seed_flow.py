"""The seed-annotation flow with the `openai` backend against a loopback OpenAI-protocol server."""

import json
from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from openai_server import serve, with_faults, knowledge_script

from schemas.configs import (
    AnnotatorConfig,
    EndpointConfig,
    IngestConfig,
    SeedAnnotationConfig,
    SeedFlowConfig,
    SyntheticCorpusConfig,
)
from tasks.ingest import ingest_corpus
from tasks.synthetic import generate_corpus

SENTINEL = "sk-sentinel-9d2e41b7c0aa4f31b8e5"
KEY_ENV = "LMLM_TEST_SEED_KEY"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("seedflow")
    synth = generate_corpus(SyntheticCorpusConfig(n_people=30, n_organisation_docs=4, n_city_docs=2,
                                                  n_no_fact_docs=2, docs_per_file=20), str(root / "synthetic"))
    ingest_corpus(IngestConfig(inputs=synth.corpus_files, output=str(root / "shards")), run_id="test-ingest")
    gold = pq.read_table(Path(synth.ground_truth_dir) / "triplets.parquet").to_pylist()
    texts = {r["doc_id"]: r["text"] for r in pq.read_table(Path(synth.ground_truth_dir) / "annotated.parquet").to_pylist()}
    facts = defaultdict(list)
    for t in gold:
        facts[texts[t["doc_id"]]].append({"entity": t["entity"], "relation": t["relation"], "value": t["value"],
                                          "mention": t["value"]})
    return root, synth, dict(facts)


def _config(root, synth, base_url, workdir) -> SeedFlowConfig:
    endpoint = EndpointConfig(base_url=base_url, model="loopback", api_key_env=KEY_ENV, concurrency=8, timeout_s=2,
                              max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05)
    return SeedFlowConfig(
        workdir=str(workdir), document_shards=[str(root / "shards" / "documents")],
        ground_truth=synth.ground_truth_dir,
        seed=SeedAnnotationConfig(sample_docs=25, annotator=AnnotatorConfig(backend="openai", endpoint=endpoint)),
    )


def _all_text_under(path: Path) -> str:
    """Everything a user could read back from the outputs: files, shard rows and warehouse rows."""
    chunks = []
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        if f.suffix == ".parquet":
            chunks.append(json.dumps(pq.read_table(f).to_pylist(), default=str))
        elif f.suffix == ".duckdb":
            con = duckdb.connect(str(f), read_only=True)
            for (table,) in con.execute("select table_name from information_schema.tables").fetchall():
                chunks.append(str(con.execute(f'select * from "{table}"').fetchall()))
            con.close()
        else:
            chunks.append(f.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


@pytest.mark.slow
def test_seed_flow_over_a_faulty_endpoint_annotates_or_records_every_document_and_never_leaks_the_key(
        corpus, tmp_path, monkeypatch, prefect_harness, caplog, capfd):
    from prefect.client.orchestration import get_client

    from flows.seed import seed_annotation

    root, synth, facts = corpus
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    script = with_faults(knowledge_script(facts), rate=0.3, kinds=("malformed_json", "server_error"), seed=1)
    with serve(script) as server:
        report = seed_annotation(_config(root, synth, server.base_url, tmp_path))
        first_requests = len(server.chat_requests())
    assert report["docs"] == 25
    assert report["annotated"] + report["failed"] + report["rejected"] == 25
    assert sum(report["failure_reasons"].values()) == report["failed"]
    assert report["endpoint"]["requests_sent"] == first_requests
    assert report["quality_vs_gold"]["precision"] >= 0.9

    # a rerun pays nothing for what is cached: only the failed documents are asked again
    with serve(knowledge_script(facts)) as server:
        again = seed_annotation(_config(root, synth, server.base_url, tmp_path))
        assert len(server.chat_requests()) == report["failed"]
    assert again["failed"] == 0 and again["annotated"] + again["rejected"] == 25
    # a run with nothing left to do keeps the figures of the run that did the work, and says whose they are
    with serve(knowledge_script(facts)) as server:
        third = seed_annotation(_config(root, synth, server.base_url, tmp_path))
        assert server.chat_requests() == []
    assert third["skipped"] is True
    assert third["endpoint"]["requests_sent"] == again["endpoint"]["requests_sent"] == report["failed"]
    assert third["endpoint"]["figures_from_run"] == again["run_id"]
    on_disk = json.loads((tmp_path / "seed-report.json").read_text())
    assert on_disk["endpoint"]["requests_sent"] == report["failed"]

    async def artifacts():
        async with get_client() as client:
            return [a.data for a in await client.read_artifacts()]

    import asyncio

    published = json.dumps(asyncio.run(artifacts()), default=str)
    out, err = capfd.readouterr()
    for where, text in {"outputs": _all_text_under(tmp_path), "artifacts": published, "logs": caplog.text,
                        "stdout": out, "stderr": err}.items():
        assert SENTINEL not in text, f"API key found in {where}"
