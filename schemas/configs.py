"""Typed configs of every flow (pydantic, so Prefect renders them as forms in the UI).

Locations are local paths or fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``memory://``,
``file://``). Secrets never appear here: an API key is read from the environment variable
named by the config, never stored.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class SyntheticCorpusConfig(BaseModel):
    """The embedded default corpus: fictional biographies with exact ground truth."""

    n_people: int = Field(300, ge=1, description="fictional people, each with >= 8 relations")
    n_organisation_docs: int = Field(40, ge=0, description="documents about organisations")
    n_city_docs: int = Field(20, ge=0, description="documents about cities")
    n_no_fact_docs: int = Field(20, ge=0, description="documents with no tail facts")
    seed: int = Field(0, description="same seed, same corpus, byte for byte")
    docs_per_file: int = Field(500, ge=1, description="documents per corpus JSONL file")
    compression: str = Field("gz", description="corpus file compression: none, gz or zst")


class IngestConfig(BaseModel):
    """Corpus files -> zstd Parquet document shards."""

    inputs: list[str] = Field(description="files, folders or glob patterns; local or fsspec URLs")
    output: str = Field(description="folder for document and quarantine shards")
    shard_docs: int = Field(50_000, ge=1, description="documents per document shard")
    text_field: str = Field("text", description="text column of JSONL/Parquet inputs")
    id_field: str = Field("id", description="id column; a content hash is used when absent")
    category_field: str | None = Field(None, description="column or metadata key holding a class label")
    workers: int = Field(2, ge=1, description="processes parsing input files in parallel")
    batch_bytes: int = Field(16 << 20, ge=1 << 16, description="bytes read per batch (bounds memory)")


class WarehouseConfig(BaseModel):
    path: str = Field("out/warehouse.duckdb", description="the DuckDB file (local path)")


class ValidationConfig(BaseModel):
    enabled: bool = True
    max_calls_per_100_words: float = Field(12.0, gt=0, description="the reference's density filter")
    fail_flow: bool = Field(True, description="stop the flow before the warehouse when a suite fails")


class SeedAnnotationConfig(BaseModel):
    """Seed annotation for the corpus flow. ``gold`` uses the synthetic corpus's ground truth."""

    annotator: str = Field("gold", description="gold (synthetic ground truth)")
    sample_docs: int | None = Field(None, ge=1, description="documents to annotate; all when unset")


class CorpusFlowConfig(BaseModel):
    """The corpus-processing job: corpus -> shards -> annotation -> warehouse -> validation -> report."""

    workdir: str = Field("out", description="where corpus, shards, warehouse and report go")
    corpus: list[str] | None = Field(
        None, description="corpus files/folders/globs; when unset, the synthetic corpus is generated"
    )
    synthetic: SyntheticCorpusConfig = Field(default_factory=SyntheticCorpusConfig)
    ingest_shard_docs: int = Field(50_000, ge=1)
    ingest_workers: int = Field(2, ge=1)
    seed: SeedAnnotationConfig = Field(default_factory=SeedAnnotationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    warehouse_path: str | None = Field(None, description="DuckDB file; default <workdir>/warehouse.duckdb")
