"""Bulk annotation: per-shard outputs, skipping finished shards, the managed vLLM-style server, and a
SIGKILL mid-run followed by a rerun that equals an uninterrupted run."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas import markup
from schemas.configs import BulkAnnotationConfig, BulkFlowConfig, EndpointConfig
from schemas.errors import UserInputError
from schemas.shards import DOCUMENT_SCHEMA, content_hash
from tasks.bulk import build_bulk_annotator, bulk_annotate_shard, managed_server, server_healthy
from tasks.shardio import write_table_atomic
from test_annotator_model import FACTS, TEXTS, annotated, tiny_model

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny annotator that has memorised the test documents' calls, saved like the fine-tune flow does."""
    from models.annotator import build_examples, save_annotator
    from models.annotator_finetune import finetune
    from models.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS * 20, 400)
    model = tiny_model(tok).train()
    docs = [annotated(t, f) for t, f in zip(TEXTS, FACTS)]
    finetune(model, tok, build_examples(tok, docs, 384), epochs=60, batch_size=5, lr=1e-2, min_lr=1e-3,
             warmup_steps=5, log=lambda m: None)
    return save_annotator(model, tok, str(tmp_path_factory.mktemp("annotator") / "model"),
                          {"version": "tiny-test-v1", "max_source_tokens": 384})


def write_doc_shards(folder, n_shards: int, docs_per_shard: int = 3) -> list[str]:
    paths = []
    for s in range(n_shards):
        rows = []
        for k in range(docs_per_shard):
            text = TEXTS[(s + k) % len(TEXTS)] + ("" if k == 0 else f" Part {s}.{k}.")
            rows.append({"doc_id": f"doc-{s}-{k}", "text": text, "content_hash": content_hash(text), "source": "test",
                         "url": None, "category": None, "metadata": None, "source_file": "test.jsonl",
                         "source_line": k + 1, "run_id": "ingest"})
        paths.append(write_table_atomic(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA),
                                        str(folder / "documents" / f"part-{s:03d}.parquet")))
    return paths


def content_digest(path: str) -> str:
    """Hash of a shard's rows without the run id (which differs from run to run by design)."""
    t = pq.read_table(path)
    t = t.drop_columns([c for c in ("run_id",) if c in t.column_names]).sort_by("doc_id")
    return hashlib.sha256(json.dumps(t.to_pylist(), sort_keys=True, default=str).encode()).hexdigest()


def test_transformers_backend_writes_source_preserving_shards_and_skips_finished_ones(checkpoint, tmp_path):
    shard = write_doc_shards(tmp_path, 1)[0]
    cfg = BulkAnnotationConfig(backend="transformers", checkpoint=checkpoint, device="cpu")
    out = str(tmp_path / "bulk")
    first = bulk_annotate_shard(shard, cfg, checkpoint, out, "run-1", str(tmp_path / "cache"))
    assert not first.skipped and first.annotated == first.docs == 3 and first.failed == 0 and first.calls > 0
    rows = pq.read_table(first.annotated_shard).to_pylist()
    assert all(markup.strip(r["annotated_text"]) == r["text"] for r in rows)
    assert {r["annotator_version"] for r in rows} == {"tiny-test-v1"}
    assert pq.read_table(first.triplet_shard).num_rows == first.calls
    again = bulk_annotate_shard(shard, cfg, checkpoint, out, "run-2", str(tmp_path / "cache"))
    assert again.skipped and again.calls == first.calls
    assert pq.read_table(first.annotated_shard).column("run_id").to_pylist() == ["run-1"] * 3  # not rewritten


# The stand-in for `vllm serve`: the loopback OpenAI server (tests/openai_server.py) on a given port,
# answering with inline markup of known facts; it drifts one mention ("Elif Moreau") and breaks one call.
STAND_IN = r"""
import asyncio, json, sys, time
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
import openai_server as o
port, facts = int(sys.argv[1]), json.load(open(sys.argv[2]))
start_server = asyncio.start_server
async def on_port(cb, host, _port, **kw):
    return await start_server(cb, host, port, **kw)
asyncio.start_server = on_port
script = o.knowledge_script(facts)
def answer(body, n):
    reply = script(body, n)
    reply.content = (reply.content.replace("<|db_end|> Elif Moreau", "<|db_end|> Elif Morrow")
                     .replace("<|db_relationship|> Birth Year", "<|db_relationship|>"))
    return reply
with o.serve(answer):
    while True:
        time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_backend_starts_the_server_repairs_drift_and_stops_the_server(checkpoint, tmp_path):
    shard = write_doc_shards(tmp_path, 1)[0]
    texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
    facts = {t: [{"entity": e, "relation": r, "value": v, "mention": v} for e, r, v in FACTS[TEXTS.index(t.split(" Part")[0])]]
             for t in texts}
    facts_path = tmp_path / "facts.json"
    facts_path.write_text(json.dumps(facts))
    port = _free_port()
    cfg = BulkAnnotationConfig(
        backend="vllm", checkpoint=checkpoint,
        endpoint=EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="annotator", api_key_env="",
                                structured_output="inline", max_attempts=2, backoff_base_s=0.1),
        server_command=[sys.executable, "-c", STAND_IN, str(port), str(facts_path), PROJECT],
        server_startup_timeout_s=60)
    with managed_server(cfg, log=lambda m: None) as proc:
        assert proc is not None and server_healthy(cfg.endpoint.base_url)
        report = bulk_annotate_shard(shard, cfg, checkpoint, str(tmp_path / "bulk"), "run-1", str(tmp_path / "cache"))
    assert proc.poll() is not None and not server_healthy(cfg.endpoint.base_url)  # the server it started is gone
    assert report.annotated == 3 and report.failed == 0
    rows = pq.read_table(report.annotated_shard).to_pylist()
    assert all(markup.strip(r["annotated_text"]) == r["text"] for r in rows)  # realigned onto the source
    got = {(c.call.entity, c.call.relation, c.call.value) for r in rows for c in markup.parse(r["annotated_text"]).calls}
    assert ("Ada Varga", "Birth City", "Tampere") in got and ("Bruno Okonkwo", "Major", "physics") in got
    assert ("Bruno Okonkwo", "Spouse", "Elif Moreau") in got  # mapped back onto the source's mention
    assert ("Ada Varga", "Birth Year", "1931") not in got  # broken call: dropped
    repairs = build_bulk_annotator(cfg, checkpoint, str(tmp_path / "cache")).stats.inline_repairs
    assert repairs["dropped_malformed"] >= 1  # and counted
    assert {r["annotator"] for r in rows} == {"vllm:annotator"}


def test_a_server_command_that_dies_is_one_clear_error(tmp_path):
    port = _free_port()
    cfg = BulkAnnotationConfig(backend="vllm", endpoint=EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1"),
                               server_command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(UserInputError, match="exited with status 3"):
        with managed_server(cfg, log=lambda m: None):
            pass


def test_no_server_and_no_command_is_one_clear_error():
    cfg = BulkAnnotationConfig(backend="vllm", endpoint=EndpointConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1"))
    with pytest.raises(UserInputError, match="server_command"):
        with managed_server(cfg, log=lambda m: None):
            pass


KILL_CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[2]]
import torch
torch.set_num_threads(1)
from flows.annotator import bulk_annotation
from schemas.configs import BulkFlowConfig
bulk_annotation(BulkFlowConfig.model_validate_json(open(sys.argv[1]).read()))
"""


def _warehouse_rows(path: str) -> list:
    from warehouse import db

    con = db.connect(path, read_only=True)
    try:
        return con.execute("SELECT doc_id, entity, relation, value, call_offset FROM triplets ORDER BY ALL").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(checkpoint, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from flows.annotator import bulk_annotation

    shards = write_doc_shards(tmp_path / "in", 8)
    bulk = BulkAnnotationConfig(backend="transformers", checkpoint=checkpoint, device="cpu", threads=1)
    straight = bulk_annotation(BulkFlowConfig(workdir=str(tmp_path / "straight"), document_shards=shards, bulk=bulk))

    work = tmp_path / "killed"
    config = BulkFlowConfig(workdir=str(work), document_shards=shards, bulk=bulk)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path / "config.json"), PROJECT], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = work / "bulk" / "_done"
    deadline = time.monotonic() + 300
    while not (done_dir.exists() and len(os.listdir(done_dir)) >= 2):  # wait for some finished shards
        assert child.poll() is None, "the bulk flow ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished within 300 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = sorted(os.listdir(done_dir))
    assert 2 <= len(finished) < len(shards), "the kill should land mid-run"
    stamps = {f: os.stat(work / "bulk" / "annotated" / f.removesuffix(".json")).st_mtime_ns for f in finished}

    rerun = bulk_annotation(config)
    assert rerun["shards_skipped"] == len(finished) and rerun["shards_processed"] == len(shards) - len(finished)
    for f, stamp in stamps.items():  # finished shards were not written again
        assert os.stat(work / "bulk" / "annotated" / f.removesuffix(".json")).st_mtime_ns == stamp
    for kind in ("annotated", "triplets"):
        for a, b in zip(straight[f"{'triplet' if kind == 'triplets' else 'annotated'}_shards"],
                        rerun[f"{'triplet' if kind == 'triplets' else 'annotated'}_shards"]):
            assert content_digest(a) == content_digest(b)
    assert not list((work / "bulk").rglob("*.tmp"))  # no torn files left behind
    assert _warehouse_rows(rerun["warehouse"]) == _warehouse_rows(straight["warehouse"])


@pytest.mark.slow
def test_shards_spread_over_a_local_dask_cluster_give_the_same_shards(checkpoint, tmp_path, prefect_harness):
    from flows.annotator import bulk_annotation
    from schemas.configs import TaskRunnerConfig

    shards = write_doc_shards(tmp_path / "in", 4)
    bulk = BulkAnnotationConfig(backend="transformers", checkpoint=checkpoint, device="cpu", threads=1)
    on_threads = bulk_annotation(BulkFlowConfig(workdir=str(tmp_path / "threads"), document_shards=shards, bulk=bulk,
                                                load_warehouse=False))
    spread = bulk.model_copy(update={"task_runner": TaskRunnerConfig(kind="dask", workers=2)})
    on_dask = bulk_annotation(BulkFlowConfig(workdir=str(tmp_path / "dask"), document_shards=shards, bulk=spread,
                                             load_warehouse=False))
    assert on_dask["shards_processed"] == len(shards) and on_dask["docs"] == on_threads["docs"]
    for a, b in zip(on_threads["annotated_shards"], on_dask["annotated_shards"]):
        assert content_digest(a) == content_digest(b)
