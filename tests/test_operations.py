"""Operations: deployments per flow, prefect.yaml, artifacts, the global LLM limit, one warehouse writer at a
time, and the task runner chosen by config (a sharded stage on a local 2-worker Dask cluster)."""

import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from schemas.configs import CorpusFlowConfig, IngestConfig, SyntheticCorpusConfig, TaskRunnerConfig
from schemas.errors import UserInputError

PROJECT = Path(__file__).resolve().parents[1]
SMALL = SyntheticCorpusConfig(n_people=24, n_organisation_docs=3, n_city_docs=2, n_no_fact_docs=1, docs_per_file=10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _duckdb_cli() -> str:
    cli = Path(sys.executable).parent / "duckdb"
    return str(cli) if cli.exists() else shutil.which("duckdb")


# ---------------------------------------------------------------- deployments


def test_every_registered_flow_gets_a_deployment_and_corpus_processing_its_cron(tmp_path):
    from flows.serve import REGISTRY, ServeConfig, build_deployments, load_flow

    cfg = ServeConfig(workdir=str(tmp_path), schedules={"corpus-processing": "15 3 * * 1"})
    deployments = {d.flow_name: d for d in build_deployments(cfg)}
    assert set(deployments) == {load_flow(r.entrypoint).name for r in REGISTRY} >= {"corpus-processing",
                                                                                      "seed-annotation"}
    corpus, seed = deployments["corpus-processing"], deployments["seed-annotation"]
    assert corpus.name == "scheduled" and [s.schedule.cron for s in corpus.schedules] == ["15 3 * * 1"]
    assert seed.name == "on-demand" and not seed.schedules
    # the UI renders its run form from this schema: the pydantic config's fields, with descriptions
    props = corpus._parameter_openapi_schema.model_dump()["definitions"]["CorpusFlowConfig"]["properties"]
    assert {"workdir", "corpus", "task_runner", "warehouse_wait_s"} <= set(props)
    # default parameters are valid configs that point at the serve workdir
    assert CorpusFlowConfig(**corpus.parameters["config"]).workdir == str(tmp_path)
    assert seed.parameters["config"]["document_shards"] == [os.path.join(str(tmp_path), "shards", "documents")]


def test_a_schedule_for_an_unknown_flow_is_a_clear_error():
    from flows.serve import ServeConfig, build_deployments

    with pytest.raises(UserInputError, match="unknown flow.*'corpus-procesing'.*registered flows are"):
        build_deployments(ServeConfig(schedules={"corpus-procesing": "0 2 * * *"}))


def test_a_schedule_can_be_switched_off_from_the_command_line(monkeypatch):
    from flows import cli, serve

    seen = {}
    monkeypatch.setattr(serve, "serve", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["serve", "--corpus-cron", "", "--llm-slots", "3"]) == 0
    assert seen["cfg"].schedules == {"corpus-processing": None} and seen["cfg"].llm_slots == 3


def test_prefect_yaml_deploys_every_registered_flow_from_a_loadable_entrypoint():
    from flows.serve import REGISTRY, ServeConfig, load_flow

    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    by_entry = {d["entrypoint"]: d for d in spec["deployments"]}
    for reg in REGISTRY:
        module, attr = reg.entrypoint.split(":")
        entry = f"{module.replace('.', '/')}.py:{attr}"
        assert entry in by_entry, f"{reg.entrypoint} is registered for lmlm serve but missing from prefect.yaml"
    for entry, d in by_entry.items():
        path, attr = entry.split(":")
        assert (PROJECT / path).exists()
        flow = load_flow(f"{path.removesuffix('.py').replace('/', '.')}:{attr}")
        assert d["work_pool"]["name"] == "lmlm"
        if flow.name in ServeConfig().schedules:  # the same default schedule as lmlm serve
            assert [s["cron"] for s in d["schedules"]] == [ServeConfig().schedules[flow.name]]
        if "config" in d.get("parameters", {}):
            flow.validate_parameters(d["parameters"])


# ---------------------------------------------------------------- artifacts


def test_charts_are_png_images():
    from flows.artifacts import MAX_BARS, bar_chart_png, line_chart_png

    bars = bar_chart_png({f"relation {i}": i for i in range(MAX_BARS + 10)}, "Triplets per relation")
    curve = line_chart_png({"train": [(s, 5 / (s + 1)) for s in range(50)], "holdout": [(0, 5.0), (49, 0.4)]},
                           "loss")
    assert bars.startswith(PNG_MAGIC) and curve.startswith(PNG_MAGIC)


# ---------------------------------------------------------------- one warehouse writer at a time


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    """Two document shards and two halves of the gold triplets of a small synthetic corpus."""
    from tasks.ingest import ingest_corpus
    from tasks.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("shards")
    corpus = generate_corpus(SMALL, str(root / "synthetic"))
    ingest_corpus(IngestConfig(inputs=corpus.corpus_files, output=str(root / "shards"), shard_docs=15), run_id="i")
    docs = sorted(str(p) for p in (root / "shards" / "documents").glob("*.parquet"))
    triplets = pq.read_table(corpus.triplets)
    half = triplets.num_rows // 2
    halves = []
    for i, part in enumerate((triplets.slice(0, half), triplets.slice(half))):
        halves.append(str(root / f"triplets-{i}.parquet"))
        pq.write_table(part, halves[-1])
    return docs, halves, triplets.num_rows


WRITER = """
import json, os, sys, time
from schemas.reports import RunRecord, WarehouseLoad
from tasks.load import load_warehouse
db, run_id, docs, triplets, ready, go = sys.argv[1:7]
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):  # both writers start together
    assert time.monotonic() < deadline
    time.sleep(0.01)
load = WarehouseLoad(run=RunRecord(run_id=run_id, flow="test", config={}, inputs=[]), documents=[docs], triplets=[triplets])
print(load_warehouse(db, load, wait_s=120).model_dump_json())
"""


def test_two_writers_at_once_both_finish_and_the_file_stays_whole(tmp_path, corpus_shards):
    from warehouse import db

    docs, halves, n_triplets = corpus_shards
    path, go = str(tmp_path / "wh.duckdb"), tmp_path / "go"
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WRITER, path, f"run-{i}", docs[i], halves[i], str(tmp_path / f"ready-{i}"), str(go)],
            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers did not start"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]

    con = db.connect(path, read_only=True)
    try:
        n_docs = sum(pq.read_metadata(d).num_rows for d in docs[:2])
        assert con.execute("SELECT count(*), count(DISTINCT doc_id) FROM documents").fetchone() == (n_docs, n_docs)
        assert con.execute("SELECT count(*), count(DISTINCT triplet_id) FROM triplets").fetchone() == (
            n_triplets, n_triplets)
        assert sorted(r[0] for r in con.execute("SELECT run_id FROM runs WHERE status = 'loaded'").fetchall()) == [
            "run-0", "run-1"]
    finally:
        con.close()
    # the stock CLI opens the file and reads every block of both tables (DuckDB verifies block checksums on read)
    out = subprocess.run([_duckdb_cli(), "-readonly", path, "-csv", "-noheader", "-c",
                          "SELECT count(*), sum(hash(d)) IS NOT NULL FROM documents AS d; "
                          "SELECT count(*), sum(hash(t)) IS NOT NULL FROM triplets AS t"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{n_docs},true", f"{n_triplets},true"]


HOLDER = """
import sys
from warehouse import db
con = db.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
con.close()
"""


def test_a_writer_that_cannot_get_the_file_in_time_fails_with_one_clear_line(tmp_path, corpus_shards):
    from schemas.reports import RunRecord, WarehouseLoad
    from tasks.load import load_warehouse
    from warehouse.db import WarehouseBusyError

    docs, halves, _ = corpus_shards
    path = str(tmp_path / "wh.duckdb")
    late = WarehouseLoad(run=RunRecord(run_id="late", flow="test", config={}, inputs=[]), documents=[docs[0]],
                         triplets=[halves[0]])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], cwd=PROJECT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(WarehouseBusyError) as err:
            load_warehouse(path, late, wait_s=0.5)
        message = str(err.value)
        assert "\n" not in message and path in message and "after waiting 0.5 s" in message
        assert "warehouse_wait_s" in message
    finally:
        holder.communicate("\n", timeout=60)
    # the holder's release lets the same load through, and the failed attempt left nothing behind
    counts = load_warehouse(path, late, wait_s=5)
    assert counts.documents_loaded["inserted"] == pq.read_metadata(docs[0]).num_rows


# ---------------------------------------------------------------- the global LLM endpoint limit


def _overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_the_global_limit_holds_llm_calls_across_concurrent_flow_runs(tmp_path, prefect_harness, monkeypatch):
    sys.path.insert(0, str(PROJECT / "tests"))
    from openai_server import knowledge_script, sample_documents, serve
    from prefect import flow

    from flows.serve import ensure_global_limit
    from schemas.configs import AnnotatorConfig, EndpointConfig
    from schemas.documents import Document
    from tasks.annotate_openai import OpenAIAnnotator

    monkeypatch.setenv("LMLM_TEST_KEY", "sk-test")
    pairs, facts = sample_documents(8)
    answered: dict[int, float] = {}
    script = knowledge_script(facts)

    def timed(body, n):  # runs after the server's latency: the request's end
        answered[n] = time.monotonic()
        return script(body, n)

    @flow(name="annotate-with-limit")
    def annotate_batch(base_url: str, limit: str | None, docs: list[tuple[str, str]], cache: str) -> int:
        cfg = AnnotatorConfig(backend="openai", endpoint=EndpointConfig(
            base_url=base_url, model="loopback-model", api_key_env="LMLM_TEST_KEY", concurrency=4, global_limit=limit,
            timeout_s=30, max_attempts=2))
        return len(OpenAIAnnotator(cfg, cache).annotate([Document(doc_id=i, text=t) for i, t in docs]))

    def most_in_flight(limit: str | None, tag: str) -> int:
        answered.clear()
        with serve(timed, latency_s=0.15) as server:
            runs = [threading.Thread(target=annotate_batch, args=(server.base_url, limit, pairs[k::2],
                                                                  str(tmp_path / f"{tag}-{k}"))) for k in range(2)]
            for t in runs:
                t.start()
            for t in runs:
                t.join(300)
            received = server.chat_requests()
        assert len(received) == len(pairs) == len(answered)
        return _overlap([(r.at, answered[r.n]) for r in received])

    assert ensure_global_limit("llm-test", 1) is True
    assert most_in_flight("llm-test", "limited") == 1
    assert most_in_flight(None, "free") > 1  # the same two runs without the limit overlap


def test_a_global_limit_missing_on_the_server_is_noted_once_per_run(tmp_path, prefect_harness, monkeypatch):
    sys.path.insert(0, str(PROJECT / "tests"))
    from openai_server import knowledge_script, sample_documents, serve
    from prefect import flow

    import flows  # noqa: F401  (installs Prefect's limits as the endpoint slots)
    from schemas.configs import AnnotatorConfig, EndpointConfig
    from schemas.documents import Document
    from tasks.annotate_openai import OpenAIAnnotator

    monkeypatch.setenv("LMLM_TEST_KEY", "sk-test")
    pairs, facts = sample_documents(6)

    @flow(name="annotate-without-the-limit")
    def annotate_batch(base_url: str, cache: str) -> int:
        cfg = AnnotatorConfig(backend="openai", endpoint=EndpointConfig(
            base_url=base_url, model="loopback-model", api_key_env="LMLM_TEST_KEY", concurrency=3,
            global_limit="llm-never-created", timeout_s=30, max_attempts=2))
        return len(OpenAIAnnotator(cfg, cache).annotate([Document(doc_id=i, text=t) for i, t in docs]))

    class Notes(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    docs, notes, handler = pairs, [], Notes()
    logging.getLogger("lmlm").addHandler(handler)
    try:
        with serve(knowledge_script(facts)) as server:
            assert annotate_batch(server.base_url, str(tmp_path / "cache")) == len(docs)
            assert len(server.chat_requests()) == len(docs)
    finally:
        logging.getLogger("lmlm").removeHandler(handler)
    notes = [n for n in notes if "llm-never-created" in n]
    assert len(notes) == 1 and "does not exist" in notes[0]


def test_endpoint_calls_outside_a_flow_run_need_no_server():
    import asyncio

    import flows  # noqa: F401  (installs Prefect's limits as the shared slots)
    from tasks.concurrency import shared_slot

    async def one_request():
        async with shared_slot("llm-endpoint"):  # no Prefect run: no slot to take, nothing to contact
            return True

    assert asyncio.run(one_request())


# ---------------------------------------------------------------- task runners


def test_the_task_runner_is_chosen_by_config():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    from flows.runners import build_task_runner

    assert isinstance(build_task_runner(TaskRunnerConfig()), ThreadPoolTaskRunner)
    assert isinstance(build_task_runner(TaskRunnerConfig(kind="dask", address="tcp://10.0.0.5:8786")), DaskTaskRunner)
    assert isinstance(build_task_runner(TaskRunnerConfig(kind="ray", address="ray://10.0.0.5:10001")), RayTaskRunner)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["dask", "ray"])
def test_corpus_flow_profiles_its_shards_on_a_local_two_worker_cluster(tmp_path, prefect_harness, cluster):
    from flows.corpus import corpus_processing

    def run(kind: str, workdir: Path) -> dict:
        return corpus_processing(CorpusFlowConfig(
            workdir=str(workdir), synthetic=SMALL, ingest_shard_docs=10,
            task_runner=TaskRunnerConfig(kind=kind, workers=2), validation={"enabled": False}))

    on_dask = run(cluster, tmp_path / "dask")
    on_threads = run("threads", tmp_path / "threads")
    prof = on_dask["profile"]
    assert prof["task_runner"] == cluster and prof["shards"] == len(on_dask["ingest"]["document_shards"]) == 3
    assert prof["documents"] == on_dask["ingest"]["docs_written"]
    # the shards ran in the cluster's worker processes, not in the flow's own process
    assert all(not w.endswith(f":{os.getpid()}") for w in prof["workers"]) and 1 <= len(prof["workers"]) <= 2
    assert all(w.endswith(f":{os.getpid()}") for w in on_threads["profile"]["workers"])
    strip = lambda p: {k: v for k, v in p.items() if k not in ("worker", "shard")}  # noqa: E731
    assert [strip(p) for p in prof["per_shard"]] == [strip(p) for p in on_threads["profile"]["per_shard"]]
    assert on_dask["warehouse_load"]["facts"] == on_threads["warehouse_load"]["facts"] > 0
    plots = sorted(p.name for p in (tmp_path / "dask" / "plots").iterdir())
    assert plots == ["categories.png", "relations.png"]
    assert (tmp_path / "dask" / "plots" / "relations.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_a_scheduled_run_picks_up_only_new_corpus_files(tmp_path, prefect_harness):
    from flows.corpus import corpus_processing
    from schemas.configs import SeedAnnotationConfig
    from tasks.synthetic import generate_corpus
    from warehouse import db

    corpus = generate_corpus(SMALL, str(tmp_path / "synthetic"))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    first, rest = corpus.corpus_files[:1], corpus.corpus_files[1:]
    kb = os.path.join(corpus.ground_truth_dir, "kb.parquet")
    seed = SeedAnnotationConfig.model_validate({"annotator": {"kb": kb}})
    config = CorpusFlowConfig(workdir=str(tmp_path / "work"), corpus=[str(incoming)], seed=seed,
                              validation={"enabled": False})
    shutil.copy(first[0], incoming)
    one = corpus_processing(config)
    for f in rest:  # new files land in the input location between two scheduled runs
        shutil.copy(f, incoming)
    two = corpus_processing(config)
    three = corpus_processing(config)
    assert (one["ingest"]["files_ingested"], two["ingest"]["files_ingested"], three["ingest"]["files_ingested"]) == (
        1, len(rest), 0)
    assert two["ingest"]["files_skipped"] == 1 and three["ingest"]["files_skipped"] == len(corpus.corpus_files)
    n_docs = sum(corpus.docs_by_kind.values())
    assert one["ingest"]["docs_written"] + two["ingest"]["docs_written"] == n_docs
    assert three["seed_annotation"]["skipped"] is True
    con = db.connect(three["warehouse"], read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT doc_id) FROM documents").fetchone() == (n_docs, n_docs)
        assert con.execute("SELECT count(*) = count(DISTINCT triplet_id) FROM triplets").fetchone() == (True,)
    finally:
        con.close()


def test_ops_commands_without_a_reachable_server_end_in_one_clear_line(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import cli

    assert cli.main(["trigger", "corpus-processing/scheduled", "--params", "[1]"]) == 2
    assert "--params must be a JSON object" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # the discard port: nobody answers
        for argv in (["trigger", "corpus-processing/scheduled"], ["mark-crashed", "0f0f"], ["serve"]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:9/api" in err


def test_progress_reaches_a_prefect_artifact_in_a_run_and_draws_no_bar_off_a_terminal(prefect_harness, capsys):
    import asyncio

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import flows.stages  # noqa: F401  (attaches the run's progress artifacts)
    from flows.progress import cli_bars
    from schemas import progress

    @task
    def work(n: int) -> None:
        for i in range(1, n + 1):
            progress.update("checking shards", i, n, "shards")

    @flow(name="progress-probe")
    def probe() -> None:
        work(5)

    with cli_bars():  # stderr is not a terminal under pytest: no bars
        probe()
    assert "━" not in capsys.readouterr().err

    async def latest():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["progress-checking-shards"])))
            return [a.data for a in found]

    assert 100.0 in asyncio.run(latest())
