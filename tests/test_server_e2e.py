"""End to end against a real ``prefect server start`` on loopback: ``lmlm serve`` registers the deployments,
a run triggered through the API (as the UI's Run button does) completes and its artifacts read back; a
serving process killed mid-run and restarted resumes without duplicating documents or triplets."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
SMALL = {"n_people": 24, "n_organisation_docs": 3, "n_city_docs": 2, "n_no_fact_docs": 1, "docs_per_file": 10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``ready()`` until it returns something truthy; fail naming ``what`` at the deadline or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Signal the process group and wait for it; SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on a free loopback port with its own PREFECT_HOME; yields (api url, env for clients)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api,
               GX_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    prefect = Path(sys.executable).parent / "prefect"
    log = home / "server.log"
    proc = subprocess.Popen([str(prefect if prefect.exists() else shutil.which("prefect")), "server", "start",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)

    def healthy():
        try:
            return urllib.request.urlopen(f"{api}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait("prefect server start", healthy, 180, proc, log)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server[0]}), get_client(sync_client=True) as c:
        yield c


class Serving:
    """``lmlm serve`` as its own process group (so a kill takes its flow-run subprocesses too)."""

    def __init__(self, env: dict, workdir: Path, log: Path):
        self.env, self.workdir, self.log = env, workdir, log
        self.proc: subprocess.Popen | None = None

    def start(self, client) -> None:
        seen = len(self.log.read_text()) if self.log.exists() else 0  # a restart appends to the same log
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--workdir", str(self.workdir)],
                                     cwd=PROJECT, env=self.env, start_new_session=True,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

        # it says so once every deployment is registered and it polls for runs
        _wait("lmlm serve registering and polling", lambda: "being served" in self.log.read_text()[seen:], 180,
              self.proc, self.log)
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["lmlm"])))
        self.deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in found}

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@pytest.fixture(scope="module")
def serving(server, client, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    s = Serving(server[1], root / "work", root / "serve.log")
    s.start(client)
    try:
        yield s
    finally:
        s.stop()


def _trigger(client, deployment, parameters: dict):
    """Create a run from a deployment through the API, as the UI's Run form does."""
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters)


def _finished(client, run_id, timeout_s: float = 300, log: Path | None = None):
    def final():
        run = client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    return _wait(f"flow run {run_id} finishing", final, timeout_s, log=log)


def _artifacts(client, run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


def test_deployments_are_registered_with_the_schedule_and_the_llm_limit(serving, client):
    corpus = serving.deployments["corpus-processing/scheduled"]
    assert [s.schedule.cron for s in corpus.schedules] == ["0 2 * * *"]
    assert {"seed-annotation/on-demand", "annotator-finetune/on-demand", "bulk-annotation/on-demand"} <= set(
        serving.deployments)
    assert all(not d.schedules for name, d in serving.deployments.items() if name != "corpus-processing/scheduled")
    assert client.read_global_concurrency_limit_by_name("llm-endpoint").limit == 8


@pytest.fixture(scope="module")
def corpus_run(serving, client, tmp_path_factory):
    """A corpus-processing run triggered through the API, finished; yields (flow run, its workdir)."""
    workdir = tmp_path_factory.mktemp("triggered")
    run = _trigger(client, serving.deployments["corpus-processing/scheduled"],
                   {"config": {"workdir": str(workdir), "synthetic": SMALL, "ingest_shard_docs": 10}})
    return _finished(client, run.id, log=serving.log), workdir


def test_a_run_triggered_through_the_api_completes_with_its_artifacts(corpus_run, serving, client):
    from warehouse import db

    run, workdir = corpus_run
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{serving.log.read_text()[-3000:]}"

    artifacts = _artifacts(client, run.id)
    assert {"corpus-stage-counts", "corpus-report", "corpus-relations", "corpus-relation-histogram",
            "corpus-categories", "corpus-document-shards", "corpus-quarantine-reasons", "corpus-outputs",
            "seed-annotation", "validation-documents", "validation-warehouse"} <= set(artifacts)
    stages = [row["stage"] for row in json.loads(artifacts["corpus-stage-counts"].data)]
    assert stages == ["ingest", "seed_annotation", "warehouse_load"]
    histogram = artifacts["corpus-relation-histogram"]
    assert histogram.type == "image" and histogram.data.startswith("data:image/png;base64,")
    png = base64.b64decode(histogram.data.split(",", 1)[1])
    assert png == (workdir / "plots" / "relations.png").read_bytes()
    relations = {row["relation"]: row["triplets"] for row in json.loads(artifacts["corpus-relations"].data)}
    con = db.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        assert relations == dict(con.execute("SELECT relation, n_triplets FROM relation_stats "
                                             "WHERE n_triplets > 0").fetchall())
    finally:
        con.close()
    assert str(workdir / "warehouse.duckdb") in artifacts["corpus-outputs"].data


def test_a_retraining_run_triggered_through_the_api_completes_with_its_loss_curve(corpus_run, serving, client):
    _, workdir = corpus_run
    params = {"config": {"workdir": str(workdir), "seed_shards": [str(workdir / "seed" / "annotated")],
                         "finetune": {"base": "annotator-tiny", "time_budget_s": 10, "holdout_fraction": 0}}}
    run = _trigger(client, serving.deployments["annotator-finetune/on-demand"], params)
    run = _finished(client, run.id, timeout_s=600, log=serving.log)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{serving.log.read_text()[-3000:]}"
    report = json.loads((workdir / "finetune-report.json").read_text())
    assert report["steps"] > 0 and Path(report["checkpoint"]).exists()
    artifacts = _artifacts(client, run.id)
    curve = artifacts["annotator-training-curve"]
    assert curve.type == "image"
    assert base64.b64decode(curve.data.split(",", 1)[1]) == Path(report["curve_png"]).read_bytes()
    assert report["checkpoint"] in artifacts["annotator-finetune"].data


def test_a_killed_serving_process_restarts_and_the_rerun_adds_no_duplicates(serving, client, tmp_path):
    from prefect.states import Crashed

    from warehouse import db

    workdir = tmp_path / "killed"
    params = {"config": {"workdir": str(workdir), "synthetic": {**SMALL, "n_people": 60}, "ingest_shard_docs": 20,
                         "validation": {"enabled": False}}}
    deployment = serving.deployments["corpus-processing/scheduled"]
    first = _trigger(client, deployment, params)
    # ingest has finished and the seed sample is being annotated or loaded: kill the server's runner and its run
    _wait("the first run reaching annotation", lambda: (workdir / "seed").exists(), 300, serving.proc, serving.log)
    serving.kill()
    assert client.read_flow_run(first.id).state.is_running()  # killed mid-run: nobody reported an end
    # what an operator does for a run whose process died (lmlm mark-crashed): frees the deployment's slot
    client.set_flow_run_state(first.id, Crashed(message="serving process killed"), force=True)

    serving.start(client)
    second = _finished(client, _trigger(client, deployment, params).id, log=serving.log)
    assert second.state.is_completed(), f"{second.state.name}: {second.state.message}"

    report = json.loads((workdir / "report.json").read_text())
    n_docs = 60 + SMALL["n_organisation_docs"] + SMALL["n_city_docs"] + SMALL["n_no_fact_docs"]
    doc_ids = [i for s in (workdir / "shards" / "documents").glob("*.parquet")
               for i in pq.read_table(s, columns=["doc_id"])["doc_id"].to_pylist()]
    assert len(doc_ids) == len(set(doc_ids)) == n_docs  # the shards hold every document once
    con = db.connect(str(workdir / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT doc_id) FROM documents").fetchone() == (n_docs, n_docs)
        n, distinct = con.execute("SELECT count(*), count(DISTINCT triplet_id) FROM triplets").fetchone()
        assert n == distinct == report["seed_annotation"]["calls"] > 0
        ann = con.execute("SELECT count(*), count(DISTINCT (doc_id, text_version, annotator, annotator_version)) "
                          "FROM annotations").fetchone()
        assert ann[0] == ann[1] == report["seed_annotation"]["annotated"]
    finally:
        con.close()
