-- Views a data engineer queries. Recreated on every writable connect. They use only functions the
-- stock DuckDB CLI 1.5 has, so `duckdb warehouse.duckdb -c "select * from facts"` works.

-- Triplets with entity and relation mapped through the alias tables (alias -> canonical name).
CREATE OR REPLACE VIEW canonical_triplets AS
SELECT
    coalesce(ea.entity, t.entity) AS canonical_entity,
    coalesce(ra.relation, t.relation) AS canonical_relation,
    t.*
FROM triplets AS t
LEFT JOIN entity_aliases AS ea ON ea.alias = t.entity
LEFT JOIN relation_aliases AS ra ON ra.alias = t.relation;

-- What the annotators said, deduplicated: one row per canonical (entity, relation, value).
CREATE OR REPLACE VIEW observed_facts AS
SELECT
    canonical_entity AS entity,
    canonical_relation AS relation,
    value,
    count(DISTINCT doc_id) AS n_sources,
    count(*) AS n_triplets,
    list(DISTINCT doc_id ORDER BY doc_id) AS doc_ids,
    coalesce(list(DISTINCT source_url ORDER BY source_url) FILTER (WHERE source_url IS NOT NULL),
             []::VARCHAR[]) AS source_urls,
    list(DISTINCT annotator ORDER BY annotator) AS annotators,
    max(confidence) AS max_confidence
FROM canonical_triplets
GROUP BY canonical_entity, canonical_relation, value;

-- The canonical facts: observed facts with the edit layer applied. An edited (entity, relation)
-- shows only its edited value (provenance 'edit', with the observed sources that agree with it);
-- a deleted one does not appear.
CREATE OR REPLACE VIEW facts AS
SELECT
    o.entity, o.relation, o.value, o.n_sources, o.n_triplets, o.doc_ids, o.source_urls,
    o.annotators, o.max_confidence,
    'observed' AS provenance,
    NULL::BIGINT AS edit_audit_id,
    NULL::VARCHAR AS edited_by,
    NULL::VARCHAR AS edit_reason
FROM observed_facts AS o
WHERE NOT EXISTS (
    SELECT 1 FROM fact_edits AS e WHERE e.entity = o.entity AND e.relation = o.relation
)
UNION ALL
SELECT
    e.entity, e.relation, e.value,
    coalesce(o.n_sources, 0),
    coalesce(o.n_triplets, 0),
    coalesce(o.doc_ids, []::VARCHAR[]),
    coalesce(o.source_urls, []::VARCHAR[]),
    coalesce(o.annotators, []::VARCHAR[]),
    o.max_confidence,
    'edit',
    e.audit_id,
    e.edited_by,
    e.reason
FROM fact_edits AS e
LEFT JOIN observed_facts AS o
    ON o.entity = e.entity AND o.relation = e.relation AND o.value = e.value
WHERE e.value IS NOT NULL;

-- Same canonical entity and relation, more than one value (after edits: an edit resolves one).
CREATE OR REPLACE VIEW conflicts AS
SELECT
    entity,
    relation,
    count(*) AS n_values,
    list(value ORDER BY n_sources DESC, value) AS candidate_values,
    list(n_sources ORDER BY n_sources DESC, value) AS candidate_sources
FROM facts
GROUP BY entity, relation
HAVING count(*) > 1;

-- Per canonical relation: how much, about how many entities, how varied, how contested.
CREATE OR REPLACE VIEW relation_stats AS
WITH observed AS (
    SELECT
        canonical_relation AS relation,
        count(*) AS n_triplets,
        count(DISTINCT canonical_entity) AS n_entities,
        count(DISTINCT value) AS n_values,
        count(DISTINCT doc_id) AS n_docs,
        count(DISTINCT relation) AS n_surface_forms
    FROM canonical_triplets
    GROUP BY canonical_relation
),
current_facts AS (
    SELECT relation, count(*) AS n_facts FROM facts GROUP BY relation
),
contested AS (
    SELECT relation, count(*) AS n_conflicts FROM conflicts GROUP BY relation
),
vocabulary AS (
    SELECT relation, source, description FROM relations
    WHERE relation NOT IN (SELECT alias FROM relation_aliases WHERE alias <> relation)
)
SELECT
    coalesce(v.relation, o.relation) AS relation,
    v.source,
    v.description,
    coalesce(o.n_triplets, 0) AS n_triplets,
    coalesce(o.n_entities, 0) AS n_entities,
    coalesce(o.n_values, 0) AS n_values,
    coalesce(o.n_docs, 0) AS n_docs,
    coalesce(o.n_surface_forms, 0) AS n_surface_forms,
    coalesce(f.n_facts, 0) AS n_facts,
    coalesce(c.n_conflicts, 0) AS n_conflicts
FROM vocabulary AS v
FULL OUTER JOIN observed AS o ON o.relation = v.relation
LEFT JOIN current_facts AS f ON f.relation = coalesce(v.relation, o.relation)
LEFT JOIN contested AS c ON c.relation = coalesce(v.relation, o.relation);

-- Grounding: each triplet with the words it came from, its document and the run that made it.
CREATE OR REPLACE VIEW triplet_sources AS
SELECT
    t.triplet_id,
    t.canonical_entity AS entity,
    t.canonical_relation AS relation,
    t.value,
    t.entity AS raw_entity,
    t.relation AS raw_relation,
    t.doc_id,
    t.call_offset,
    t.value_start,
    t.value_end,
    -- spans are 0-based, end-exclusive character offsets; substring is 1-based
    CASE WHEN t.value_start IS NOT NULL
        THEN substring(d.text, t.value_start + 1, t.value_end - t.value_start) END AS value_mention,
    substring(d.text, greatest(t.call_offset - 100, 0) + 1, 200) AS context,
    coalesce(t.source_url, d.url) AS source_url,
    d.source AS document_source,
    d.source_file,
    d.source_line,
    t.annotator,
    t.annotator_version,
    t.prompt_id,
    t.confidence,
    t.run_id,
    r.flow AS run_flow,
    r.code_version AS run_code_version,
    r.status AS run_status,
    r.started_at AS run_started_at,
    d.run_id AS document_run_id
FROM canonical_triplets AS t
LEFT JOIN documents AS d ON d.doc_id = t.doc_id
LEFT JOIN runs AS r ON r.run_id = t.run_id;
