"""The synthetic biography corpus: fictional people, organisations and cities with exact ground truth.

``generate_corpus(config, out_dir)`` builds a seeded world (``tasks.synthetic_world``: Faker ``en_US``
names and cities, the rest from the vocabulary in ``tasks/data/synthetic/``), writes its documents
(``tasks.synthetic_documents``) as Dolma JSONL, and writes the ground truth that later stages measure
against::

    out_dir/corpus/synthetic-bio-00000.jsonl.gz ...   Dolma: id, text, source, added, created, metadata
    out_dir/ground_truth/annotated.parquet            ANNOTATED_SCHEMA, one row per document (gold calls)
    out_dir/ground_truth/triplets.parquet             TRIPLET_SCHEMA, one row per gold call, with spans
    out_dir/ground_truth/kb.parquet                   every fact of every entity (stated or not)
    out_dir/ground_truth/aliases.parquet              short names used in text -> canonical entity
    out_dir/ground_truth/people.parquet               per person: category, gender, biography doc
    out_dir/ground_truth/documents.parquet            per document: kind, category, subject, file, line

Documents: one biography per person (all of the person's facts, intro sentence first, the rest
shuffled, pronouns and surname references after the intro); organisation and city documents that
state all of their subject's facts and restate facts of linked people ("Among its alumni is X
(born ...)"); and documents with no tail facts at all. Non-fact filler sentences keep every
document at or below ``TARGET_CALLS_PER_100_WORDS``.

Gold calls always name the canonical full entity name, whatever form the text uses (pronoun,
surname); a call is placed before the whitespace that precedes the value's mention, and only
after the entity's full name has appeared in the document. Every value appears verbatim in text.
The same config and seed give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import random
from datetime import date, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from schemas.configs import SyntheticCorpusConfig
from schemas.errors import UserInputError
from schemas.markup import Annotated, PlacedCall, render
from schemas.shards import ANNOTATED_SCHEMA, SHARD_COMPRESSION, TRIPLET_SCHEMA, triplet_id
from tasks.synthetic_documents import (
    DOC_KINDS,
    URL_BASE,
    assemble,
    biography,
    no_fact_document,
    slug,
    subject_document,
)
from tasks.synthetic_reviews import REVIEW_KIND, review_documents
from tasks.synthetic_world import build_world, random_date

SOURCE = "synthetic-bio"
ANNOTATOR = "gold"
ANNOTATOR_VERSION = "synthetic-v1"
RUN_ID = "ground-truth"
COMPRESSIONS = {"none": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}

# ---------------------------------------------------------------------------------------------
# Output tables beside the shard schemas.

KB_SCHEMA = pa.schema([
    pa.field("entity", pa.string(), nullable=False),
    pa.field("relation", pa.string(), nullable=False),
    pa.field("value", pa.string(), nullable=False),
    pa.field("entity_type", pa.string(), nullable=False),  # person, university, company, city
])
ALIAS_SCHEMA = pa.schema([
    pa.field("alias", pa.string(), nullable=False),  # the short form used in text (a surname)
    pa.field("entity", pa.string(), nullable=False),  # the canonical name every gold call uses
])
PEOPLE_SCHEMA = pa.schema([
    pa.field("entity", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("gender", pa.string(), nullable=False),
    pa.field("biography_doc_id", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
])
DOCUMENTS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("subject", pa.string()),  # the entity the document is about; null for no_facts
    pa.field("url", pa.string(), nullable=False),
    pa.field("corpus_file", pa.string(), nullable=False),  # file name under corpus/
    pa.field("line", pa.int64(), nullable=False),  # 1-based line in that file
])


class SyntheticCorpus(BaseModel):
    """Where the corpus and its ground truth were written, and what they hold."""

    corpus_files: list[str]
    ground_truth_dir: str
    annotated: str
    triplets: str
    kb: str
    aliases: str
    people: str
    documents: str
    n_people: int
    docs_by_kind: dict[str, int]
    n_facts: int  # rows of the knowledge base
    n_calls: int  # gold calls in the corpus (rows of triplets.parquet)
    seed: int


# ---------------------------------------------------------------------------------------------
# Writing.

def _check_config(config: SyntheticCorpusConfig, out_dir: str) -> str:
    if config.compression not in COMPRESSIONS:
        raise UserInputError(
            f"SyntheticCorpusConfig.compression={config.compression!r} is not supported; use one of {', '.join(COMPRESSIONS)}"
        )
    if out_dir.startswith("file://"):
        out_dir = out_dir[len("file://"):]
    if "://" in out_dir:
        raise UserInputError(f"synthetic corpus out_dir {out_dir!r} must be a local folder; generate locally, then copy")
    return out_dir


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gz":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:  # no name or time: reproducible
            gz.write(data)
        return buf.getvalue()
    if compression == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def _write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression=SHARD_COMPRESSION)


def generate_corpus(config: SyntheticCorpusConfig, out_dir: str) -> SyntheticCorpus:
    """Write the synthetic corpus (Dolma JSONL) and its ground truth under ``out_dir``; same seed, same bytes.

    Corpus files left by an earlier run in ``out_dir/corpus`` (``synthetic-bio-*.jsonl*``) are replaced.
    """
    out_dir = _check_config(config, out_dir)
    world = build_world(config)
    rng = random.Random(f"synthetic-bio-docs/{config.seed}")

    docs = [biography(p, rng) for p in world.people]
    # organisation and city documents go first to the subjects with the most links
    alumni = {u.name: [] for u in world.universities}
    staff = {c.name: [] for c in world.companies}
    natives = {c.name: [] for c in world.cities}
    based = {c.name: [] for c in world.cities}
    for p in world.people:
        alumni[p.facts["Alma Mater"]].append(p)
        staff[p.facts["Employer"]].append(p)
        natives[p.facts["Birth City"]].append(p)
    for o in world.universities + world.companies:
        based[o.facts["Headquarters City"]].append(o)
    orgs = world.universities + world.companies
    rng.shuffle(orgs)
    orgs.sort(key=lambda o: -min(len((alumni if o.type == "university" else staff)[o.name]), 3))
    for org in orgs[:config.n_organisation_docs]:
        if org.type == "university":
            linked = [(alumni[org.name], "alumni", ("Alma Mater",))]
        else:
            linked = [(staff[org.name], "staff", ("Employer", "Employer City"))]
        docs.append(subject_document(org, linked, rng))
    cities = list(world.cities)
    rng.shuffle(cities)
    cities.sort(key=lambda c: -min(len(natives[c.name]), 3))
    for city in cities[:config.n_city_docs]:
        linked = [(natives[city.name], "natives", ("Birth City",)), (based[city.name], "based", ("Headquarters City",))]
        docs.append(subject_document(city, linked, rng))
    seen_texts = set()
    for i in range(config.n_no_fact_docs):
        for _ in range(100):  # the ingester drops exact duplicates, so every text must be new
            doc = no_fact_document(i, rng)
            text = assemble(doc)[0]
            if text not in seen_texts:
                break
        else:
            raise AssertionError("no-fact topics too small for distinct documents")
        seen_texts.add(text)
        docs.append(doc)
    if config.n_review_docs:  # reviews draw from an rng of their own: a config without them gives the same bytes
        for doc in review_documents(config.n_review_docs, world, config.seed):
            if assemble(doc)[0] not in seen_texts:
                seen_texts.add(assemble(doc)[0])
                docs.append(doc)
    rng.shuffle(docs)

    out = Path(out_dir)
    corpus_dir, gt_dir = out / "corpus", out / "ground_truth"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for stale in corpus_dir.glob("synthetic-bio-*.jsonl*"):  # a smaller rerun must not leave old files behind
        stale.unlink()

    width = max(6, len(str(len(docs) - 1)))
    added = (date(2024, 1, 1) + timedelta(days=config.seed % 366)).isoformat() + "T00:00:00.000Z"
    lines_by_file: dict[str, list[bytes]] = {}
    annotated, triplets, documents, people_rows, alias_rows = [], [], [], {}, {}
    n_calls = 0
    texts = set()
    for i, doc in enumerate(docs):
        doc_id = f"synbio-{i:0{width}d}"
        text, calls = assemble(doc)
        if text in texts:
            raise AssertionError(f"duplicate document text: {text[:80]!r}")
        texts.add(text)
        file_name = f"synthetic-bio-{i // config.docs_per_file:05d}{COMPRESSIONS[config.compression]}"
        created = random_date(rng, date(2010, 1, 1), date(2023, 12, 31)).isoformat() + "T00:00:00.000Z"
        record = {"id": doc_id, "text": text, "source": SOURCE, "added": added, "created": created,
                  "metadata": {"category": doc.category, "url": doc.url, "kind": doc.kind, **doc.labels}}
        lines = lines_by_file.setdefault(file_name, [])
        lines.append(orjson.dumps(record) + b"\n")
        documents.append({"doc_id": doc_id, "kind": doc.kind, "category": doc.category, "subject": doc.subject,
                          "url": doc.url, "corpus_file": file_name, "line": len(lines)})
        ann = Annotated(text, tuple(PlacedCall(off, call) for off, call, _ in calls))
        annotated.append({"doc_id": doc_id, "text": text, "annotated_text": render(ann), "n_calls": len(calls),
                          "text_version": 0, "annotator": ANNOTATOR, "annotator_version": ANNOTATOR_VERSION,
                          "prompt_id": None, "category": doc.category, "url": doc.url, "run_id": RUN_ID})
        for off, call, start in calls:
            triplets.append({
                "triplet_id": triplet_id(doc_id, off, call.entity, call.relation, call.value, ANNOTATOR),
                "doc_id": doc_id, "entity": call.entity, "relation": call.relation, "value": call.value,
                "call_offset": off, "value_start": start, "value_end": start + len(call.value),
                "source_url": doc.url, "annotator": ANNOTATOR, "annotator_version": ANNOTATOR_VERSION,
                "prompt_id": None, "run_id": RUN_ID, "confidence": 1.0,
            })
        n_calls += len(calls)
        if doc.kind == "biography":
            people_rows[doc.subject] = doc_id
        for alias, entity in doc.aliases:
            alias_rows[(alias, entity)] = None

    corpus_files = []
    for file_name, lines in lines_by_file.items():
        path = corpus_dir / file_name
        path.write_bytes(_compress(b"".join(lines), config.compression))
        corpus_files.append(str(path))

    kb = [{"entity": e.name, "relation": r, "value": v, "entity_type": e.type}
          for e in world.entities() for r, v in e.facts.items()]
    paths = {name: gt_dir / f"{name}.parquet" for name in ("annotated", "triplets", "kb", "aliases", "people", "documents")}
    _write_parquet(annotated, ANNOTATED_SCHEMA, paths["annotated"])
    _write_parquet(triplets, TRIPLET_SCHEMA, paths["triplets"])
    _write_parquet(kb, KB_SCHEMA, paths["kb"])
    _write_parquet([{"alias": a, "entity": e} for a, e in alias_rows], ALIAS_SCHEMA, paths["aliases"])
    _write_parquet([{"entity": p.name, "category": p.category, "gender": p.gender,
                     "biography_doc_id": people_rows[p.name], "url": f"{URL_BASE}/people/{slug(p.name)}"}
                    for p in world.people], PEOPLE_SCHEMA, paths["people"])
    _write_parquet(documents, DOCUMENTS_SCHEMA, paths["documents"])

    kinds = DOC_KINDS + ((REVIEW_KIND,) if config.n_review_docs else ())
    by_kind = {k: sum(d.kind == k for d in docs) for k in kinds}
    return SyntheticCorpus(
        corpus_files=corpus_files, ground_truth_dir=str(gt_dir), **{k: str(v) for k, v in paths.items()},
        n_people=len(world.people), docs_by_kind=by_kind, n_facts=len(kb), n_calls=n_calls, seed=config.seed,
    )

