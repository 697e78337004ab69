"""What a new user or operator meets first: a mistake in a config or an input ends in a few clear lines,
exit code 2, before any work starts (Prefect is never started) and with nothing created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lmlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LMLM_TEST_EMPTY_KEY": ""}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _fails_cleanly(result: subprocess.CompletedProcess, cwd: Path, *expected: str) -> list[str]:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert 1 <= len(lines) <= 3, result.stderr
    assert all(ln.startswith("lmlm: error: ") for ln in lines), result.stderr
    assert "Traceback" not in result.stderr and "temporary server" not in result.stderr  # Prefect never started
    for text in expected:
        assert text in result.stderr, result.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["run.yaml"]  # nothing created
    return lines


@pytest.mark.parametrize("config, expected", [
    ("wrokdir: out/x\n", ["run.yaml: wrokdir: unknown field, did you mean 'workdir'? (got 'out/x')"]),
    ("seed:\n  sample_doc: 5\n", ["seed.sample_doc: unknown field, did you mean 'sample_docs'?"]),
    ("workdir: out\n  corpus: [a\n", ["run.yaml:2:9: not valid YAML"]),
    ("- a list\n", ["run.yaml: the config must be a mapping of CorpusFlowConfig fields"]),
    ("corpus: [nope/data]\nseed: {annotator: {kb: kb.parquet}}\n",
     ["corpus: input 'nope/data' does not exist", "seed.annotator.kb: kb.parquet does not exist"]),
    ("seed: {annotator: {backend: spacy}}\n", ["seed.annotator.backend 'spacy' is unknown: use kb-align, openai"]),
    ("seed:\n  annotator:\n    backend: openai\n    endpoint: {base_url: 'http://127.0.0.1:9/v1', api_key_env: '',"
     " timeout_s: 5}\n", ["seed.annotator.endpoint.base_url http://127.0.0.1:9/v1: no answer to GET /models"]),
    ("task_runner: {kind: slurm}\n", ["task_runner.kind: Input should be 'threads', 'dask' or 'ray' (got 'slurm')"]),
])
def test_a_bad_config_or_input_ends_in_a_few_clear_lines_before_any_work(tmp_path, config, expected):
    (tmp_path / "run.yaml").write_text(config)
    _fails_cleanly(lmlm("run", "--config", "run.yaml", cwd=tmp_path), tmp_path, *expected)


def test_every_mistake_of_a_config_is_reported_at_once(tmp_path):
    (tmp_path / "run.yaml").write_text("wrokdir: out/x\ningest_workers: 0\nseed:\n  sample_doc: 5\n")
    lines = _fails_cleanly(lmlm("pipeline", "--config", "run.yaml", cwd=tmp_path), tmp_path)
    assert len(lines) == 3
    assert any("ingest_workers: Input should be greater than or equal to 1 (got 0)" in ln for ln in lines)


def test_lmlm_check_runs_the_preflight_alone(tmp_path):
    (tmp_path / "run.yaml").write_text(f"workdir: {tmp_path / 'out'}\n")
    result = lmlm("check", "--config", "run.yaml", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok: run.yaml"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_a_warehouse_another_process_writes_is_named_before_the_run(tmp_path):
    from schemas.configs import CorpusFlowConfig
    from flows.preflight import check_corpus_run

    holder = subprocess.Popen([sys.executable, "-c", "import sys; from warehouse import db; "
                               f"con = db.connect({str(tmp_path / 'w.duckdb')!r}); print('holding', flush=True); "
                               "sys.stdin.readline()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        problems = check_corpus_run(CorpusFlowConfig(workdir=str(tmp_path), warehouse_path=str(tmp_path / "w.duckdb")))
    finally:
        holder.communicate("\n", timeout=60)
    assert len(problems) == 1 and "is open for writing by another process" in problems[0]
    assert check_corpus_run(CorpusFlowConfig(workdir=str(tmp_path), warehouse_path=str(tmp_path / "w.duckdb"))) == []


def test_an_encoder_annotator_that_cannot_run_is_named_before_the_pipeline_starts(tmp_path):
    """The encoder kind (the default small annotator) runs in process: a missing encoder folder and a serving
    backend for it are reported at once, before any work."""
    (tmp_path / "run.yaml").write_text("small_annotator:\n  finetune: {encoder: {base: ./no-such-encoder}}\n"
                                       "  bulk: {backend: vllm, endpoint: {base_url: 'http://127.0.0.1:9/v1'}}\n")
    lines = _fails_cleanly(lmlm("pipeline", "--config", "run.yaml", cwd=tmp_path), tmp_path,
                           "small_annotator.finetune.encoder.base ./no-such-encoder: no such folder",
                           "small_annotator.bulk.backend 'vllm': the encoder annotator")
    assert any("set bulk.backend transformers, or finetune.kind generative" in ln for ln in lines)


def test_bulk_annotation_on_its_own_refuses_a_checkpoint_below_the_quality_gate(tmp_path):
    """`lmlm annotator bulk` reads the fine-tune report the checkpoint stores: below min_f1 it stops in one line,
    before Prefect starts or any shard is written."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "run.yaml").write_text("{}\n")
    work = tmp_path.parent / f"{tmp_path.name}-outside"
    checkpoint = work / "annotator" / "model"
    checkpoint.mkdir(parents=True)
    report = {"checkpoint": str(checkpoint), "version": "encoder:x", "base": "all-MiniLM-L6-v2", "parameters": 1,
              "train_docs": 12, "holdout_docs": 4, "train_examples": 12, "steps": 7, "epochs": 0.5, "train_seconds": 5.0,
              "holdout_quality": {"f1": 0.0, "entity_value_f1": 0.024}}
    (checkpoint / "annotator.json").write_text(json.dumps({"format": "lmlm-span-annotator-v1", "report": report}))
    shards = work / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"doc_id": ["d1"], "text": ["Ada was born in 1815."]}), shards / "part-0.parquet")
    result = lmlm("annotator", "bulk", str(shards), "--workdir", str(work), cwd=tmp_path)
    lines = _fails_cleanly(result, tmp_path, "held-out seed (entity, value) F1 is 0.024, below min_f1 0.25",
                           "--min-f1")
    assert len(lines) == 1
    assert not (work / "bulk").exists() and not (work / "warehouse.duckdb").exists()


def test_fine_tuning_on_document_shards_instead_of_annotated_ones_is_one_line(tmp_path):
    """Pointing `lmlm annotator finetune` at a seed folder that also holds plain document shards names the shard
    without annotations and where the annotated ones are, before Prefect starts or a checkpoint is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "run.yaml").write_text("{}\n")
    seed = tmp_path.parent / f"{tmp_path.name}-seed"
    (seed / "documents").mkdir(parents=True)
    (seed / "annotated").mkdir()
    pq.write_table(pa.table({"doc_id": ["d1"], "text": ["Ada was born in 1815."]}), seed / "documents" / "s.parquet")
    pq.write_table(pa.table({"doc_id": ["d1"], "text": ["Ada was born in 1815."],
                             "annotated_text": ["Ada was born in 1815."]}), seed / "annotated" / "s.parquet")
    work = tmp_path.parent / f"{tmp_path.name}-work"
    result = lmlm("annotator", "finetune", str(seed), "--workdir", str(work), cwd=tmp_path)
    lines = _fails_cleanly(result, tmp_path, "documents/s.parquet has no annotated_text column",
                           "pass the seed's annotated shards")
    assert len(lines) == 1 and not work.exists()


def test_a_section_given_in_part_keeps_the_defaults_of_the_fields_it_does_not_name():
    """``star: {train: {steps: 600}}`` changes the step count only: the batch, warm-up and weight decay stay STAR-LDM's
    (its config's defaults), not the bare training budget's; a typo inside the section is still an unknown field."""
    from pydantic import ValidationError

    from schemas.diffusion_configs import TrainingBudget
    from schemas.star_configs import StarFlowConfig

    given = StarFlowConfig.model_validate({"star": {"train": {"steps": 600}}, "lm": {"token_budget": 1000}})
    default = StarFlowConfig()
    assert given.star.train == default.star.train.model_copy(update={"steps": 600})
    assert given.star.train.batch_size != TrainingBudget().batch_size  # the parent's default, not the class's
    assert given.lm == default.lm.model_copy(update={"token_budget": 1000})
    assert given.star.soft_tokens == default.star.soft_tokens
    with pytest.raises(ValidationError, match="setps"):
        StarFlowConfig.model_validate({"star": {"train": {"setps": 600}}})
