-- Warehouse tables. Idempotent: run on every writable connect; safe to run by hand in the DuckDB CLI.
--
-- Shards are the source of truth: documents, annotations and triplets are (re)loaded from them.
-- Everything a person or a corrector decides (aliases, fact edits) is a layer on top, recorded in
-- audit_log, so reloading shards never loses a decision.
--
-- The loaded tables carry no PRIMARY KEY on purpose: DuckDB's ART index makes bulk loads about
-- three times slower. warehouse.db keeps their keys unique (staged anti-join upsert), and the
-- tests check it. Timestamps are UTC.

CREATE TABLE IF NOT EXISTS meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- Lineage: one row per flow run (or load, import, edit session) that wrote rows here.
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    flow VARCHAR NOT NULL,             -- flow or command name, e.g. corpus, load, import
    config VARCHAR,                    -- JSON of the run's typed config
    inputs VARCHAR[],                  -- corpus files / shard URLs the run read
    code_version VARCHAR,              -- git describe or package version
    status VARCHAR NOT NULL,           -- RUNNING, COMPLETED, FAILED, ...
    counts VARCHAR,                    -- JSON of row counts the run produced
    started_at TIMESTAMP,
    finished_at TIMESTAMP
);

-- Which shard was loaded into which table by which run (shards are immutable once written).
CREATE TABLE IF NOT EXISTS shard_loads (
    table_name VARCHAR NOT NULL,
    shard_url VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    n_rows BIGINT,
    loaded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (table_name, shard_url, run_id)
);

-- schemas.shards.DOCUMENT_SCHEMA; key doc_id.
CREATE TABLE IF NOT EXISTS documents (
    doc_id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,             -- escaped source text; triplet spans index it
    content_hash VARCHAR NOT NULL,
    source VARCHAR,
    url VARCHAR,
    category VARCHAR,
    metadata VARCHAR,                  -- JSON object
    source_file VARCHAR NOT NULL,
    source_line BIGINT NOT NULL,
    run_id VARCHAR NOT NULL            -- the ingest run that wrote the shard
);

-- schemas.shards.ANNOTATED_SCHEMA; key (doc_id, text_version, annotator, annotator_version).
CREATE TABLE IF NOT EXISTS annotations (
    doc_id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    annotated_text VARCHAR NOT NULL,   -- canonical lookup markup
    n_calls INTEGER NOT NULL,
    text_version INTEGER NOT NULL,     -- 0 = original text, > 0 = rewrite
    annotator VARCHAR NOT NULL,
    annotator_version VARCHAR NOT NULL,
    prompt_id VARCHAR,
    category VARCHAR,
    url VARCHAR,
    run_id VARCHAR NOT NULL
);

-- schemas.shards.TRIPLET_SCHEMA; key triplet_id. Raw, as annotated: aliases are applied by views.
CREATE TABLE IF NOT EXISTS triplets (
    triplet_id VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    entity VARCHAR NOT NULL,
    relation VARCHAR NOT NULL,
    value VARCHAR NOT NULL,
    call_offset BIGINT NOT NULL,       -- where the call is inserted in the document text
    value_start BIGINT,                -- [value_start, value_end): the value's mention; null if none
    value_end BIGINT,
    source_url VARCHAR,
    annotator VARCHAR NOT NULL,
    annotator_version VARCHAR NOT NULL,
    prompt_id VARCHAR,
    run_id VARCHAR NOT NULL,           -- the annotation run that produced the triplet
    confidence FLOAT,
    CHECK (call_offset >= 0),
    CHECK ((value_start IS NULL) = (value_end IS NULL)),
    CHECK (value_start IS NULL OR (value_start >= 0 AND value_end >= value_start)),
    CHECK (confidence IS NULL OR (confidence >= 0 AND confidence <= 1))
);

-- Relation vocabulary: canonical names. source: observed (seen in loaded triplets), person,
-- corrector, seed, ...
CREATE TABLE IF NOT EXISTS relations (
    relation VARCHAR PRIMARY KEY,
    description VARCHAR,
    source VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- alias -> canonical name, applied by every view. A corrector proposes (reviewed = false); a person
-- reviews or overrides (reviewed = true); mapping an alias to itself rejects a proposal for good.
CREATE TABLE IF NOT EXISTS relation_aliases (
    alias VARCHAR PRIMARY KEY,
    relation VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    reviewed BOOLEAN NOT NULL DEFAULT false,
    updated_by VARCHAR,
    updated_at TIMESTAMP NOT NULL,
    audit_id BIGINT
);

CREATE TABLE IF NOT EXISTS entity_aliases (
    alias VARCHAR PRIMARY KEY,
    entity VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    reviewed BOOLEAN NOT NULL DEFAULT false,
    updated_by VARCHAR,
    updated_at TIMESTAMP NOT NULL,
    audit_id BIGINT
);

-- The edit layer over observed facts, one row per canonical (entity, relation): value set by a
-- person, or NULL = deleted. The facts view applies it; triplets are never touched.
CREATE TABLE IF NOT EXISTS fact_edits (
    entity VARCHAR NOT NULL,
    relation VARCHAR NOT NULL,
    value VARCHAR,
    reason VARCHAR NOT NULL,
    edited_by VARCHAR NOT NULL,
    edited_at TIMESTAMP NOT NULL,
    audit_id BIGINT NOT NULL,
    PRIMARY KEY (entity, relation)
);

CREATE SEQUENCE IF NOT EXISTS audit_id_seq START 1;

-- Every decision a person or a corrector made, append-only.
CREATE TABLE IF NOT EXISTS audit_log (
    audit_id BIGINT PRIMARY KEY DEFAULT nextval('audit_id_seq'),
    logged_at TIMESTAMP NOT NULL,
    actor VARCHAR NOT NULL,            -- user name, or corrector name and version
    action VARCHAR NOT NULL,           -- set_fact, delete_fact, set_entity_alias, set_relation_alias
    entity VARCHAR,
    relation VARCHAR,
    alias VARCHAR,
    old_value VARCHAR,                 -- set/delete_fact: JSON list of the values before; aliases: old target
    new_value VARCHAR,                 -- NULL for a delete
    reason VARCHAR NOT NULL
);
