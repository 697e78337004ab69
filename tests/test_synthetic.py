"""The synthetic biography corpus: determinism, Dolma form, and exact, self-consistent ground truth."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

from schemas.configs import SyntheticCorpusConfig
from schemas.errors import UserInputError
from schemas.markup import calls_per_100_words, mention_span, parse, strip
from schemas.shards import ANNOTATED_SCHEMA, TRIPLET_SCHEMA, triplet_id
from tasks.synthetic import generate_corpus
from tasks.synthetic_documents import DOC_KINDS, INTRO_TEMPLATES, MENTION_CLAUSES, TEMPLATES
from tasks.synthetic_world import CATEGORIES, RELATIONS, RELATIONS_BY_TYPE

PROJECT = Path(__file__).resolve().parents[1]
SMALL = SyntheticCorpusConfig(n_people=80, n_organisation_docs=12, n_city_docs=6, n_no_fact_docs=6,
                              docs_per_file=25, seed=7)
_SLOT = re.compile(r"\{([^{}]+)\}")


def _read_jsonl(path: str) -> list[dict]:
    data = Path(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _digests(out_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    result = generate_corpus(SMALL, str(out))
    gt = {name: pq.read_table(getattr(result, name)).to_pylist()
          for name in ("annotated", "triplets", "kb", "aliases", "people", "documents")}
    docs = [rec for f in result.corpus_files for rec in _read_jsonl(f)]
    return out, result, gt, docs


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(corpus, tmp_path):
    out, _, _, _ = corpus
    generate_corpus(SMALL, str(tmp_path / "again"))
    assert _digests(tmp_path / "again") == _digests(out)
    generate_corpus(SMALL.model_copy(update={"seed": 8}), str(tmp_path / "other"))
    other = _digests(tmp_path / "other")
    assert set(other) == set(_digests(out))
    assert all(other[k] != v for k, v in _digests(out).items())


def test_output_does_not_depend_on_the_python_hash_seed(corpus, tmp_path):
    out, _, _, _ = corpus
    code = ("import sys; from schemas.configs import SyntheticCorpusConfig as C; from tasks.synthetic import generate_corpus;"
            f"generate_corpus(C(**{SMALL.model_dump()!r}), sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], cwd=PROJECT, env=env, check=True)
    assert _digests(tmp_path / "fresh") == _digests(out)


def test_corpus_files_are_dolma_jsonl_with_stable_ids(corpus):
    out, result, gt, docs = corpus
    total = SMALL.n_people + SMALL.n_organisation_docs + SMALL.n_city_docs + SMALL.n_no_fact_docs
    assert len(docs) == total
    assert [os.path.basename(f) for f in result.corpus_files] == [
        f"synthetic-bio-{i:05d}.jsonl.gz" for i in range(-(-total // SMALL.docs_per_file))]
    assert all(len(_read_jsonl(f)) <= SMALL.docs_per_file for f in result.corpus_files)
    for rec in docs:
        assert set(rec) == {"id", "text", "source", "added", "created", "metadata"}
        assert re.fullmatch(r"synbio-\d{6}", rec["id"]) and rec["source"] == "synthetic-bio"
        assert rec["metadata"]["kind"] in DOC_KINDS and rec["metadata"]["category"]
        assert rec["metadata"]["url"].startswith("https://synthetic.example/")
        assert rec["text"] and rec["added"].endswith("Z") and rec["created"].endswith("Z")
    assert len({r["id"] for r in docs}) == len({r["metadata"]["url"] for r in docs}) == total
    assert len({r["text"] for r in docs}) == total  # the ingester drops exact duplicates
    assert [r["id"] for r in docs] == [r["doc_id"] for r in gt["annotated"]]
    assert result.docs_by_kind == {"biography": SMALL.n_people, "organisation": SMALL.n_organisation_docs,
                                   "city": SMALL.n_city_docs, "no_facts": SMALL.n_no_fact_docs}
    assert Counter(r["metadata"]["kind"] for r in docs) == result.docs_by_kind


def test_documents_table_points_at_each_document(corpus):
    out, _, gt, docs = corpus
    by_id = {r["id"]: r for r in docs}
    for row in gt["documents"]:
        rec = _read_jsonl(str(out / "corpus" / row["corpus_file"]))[row["line"] - 1]
        assert rec["id"] == row["doc_id"]
        assert rec["metadata"] == {"category": row["category"], "url": row["url"], "kind": row["kind"]}
        if row["kind"] == "no_facts":
            assert row["subject"] is None
        else:
            assert row["subject"] in by_id[row["doc_id"]]["text"]


def test_ground_truth_tables_follow_the_shard_schemas(corpus):
    _, result, _, _ = corpus
    assert pq.read_schema(result.annotated).remove_metadata() == ANNOTATED_SCHEMA
    assert pq.read_schema(result.triplets).remove_metadata() == TRIPLET_SCHEMA


def test_gold_annotations_strip_to_the_text_and_match_the_triplets(corpus):
    _, result, gt, docs = corpus
    text_of = {r["id"]: r["text"] for r in docs}
    triplets = defaultdict(list)
    for t in gt["triplets"]:
        triplets[t["doc_id"]].append((t["call_offset"], t["entity"], t["relation"], t["value"]))
    for row in gt["annotated"]:
        assert row["text"] == text_of[row["doc_id"]] == strip(row["annotated_text"])
        ann = parse(row["annotated_text"])
        assert ann.text == row["text"] and row["n_calls"] == len(ann.calls)
        assert (row["annotator"], row["annotator_version"], row["run_id"]) == ("gold", "synthetic-v1", "ground-truth")
        got = [(pc.offset, pc.call.entity, pc.call.relation, pc.call.value) for pc in ann.calls]
        assert got == sorted(triplets[row["doc_id"]])
    assert result.n_calls == len(gt["triplets"]) == sum(r["n_calls"] for r in gt["annotated"])


def test_each_call_sits_before_the_whitespace_of_its_value_mention(corpus):
    _, _, gt, docs = corpus
    text_of = {r["id"]: r["text"] for r in docs}
    for t in gt["triplets"]:
        text = text_of[t["doc_id"]]
        start, end = t["value_start"], t["value_end"]
        assert text[start:end] == t["value"]
        assert mention_span(text, t["call_offset"], t["value"]) == (start, end)
        assert t["call_offset"] == 0 or not text[t["call_offset"] - 1].isspace()
        assert t["triplet_id"] == triplet_id(t["doc_id"], t["call_offset"], t["entity"], t["relation"], t["value"], "gold")
        assert t["confidence"] == 1.0 and t["annotator"] == "gold"


def test_every_call_refers_to_an_entity_already_named_in_full(corpus):
    _, _, gt, docs = corpus
    text_of = {r["id"]: r["text"] for r in docs}
    for t in gt["triplets"]:
        first = text_of[t["doc_id"]].find(t["entity"])
        assert 0 <= first and first + len(t["entity"]) <= t["call_offset"], t


def test_call_density_stays_within_the_reference_filter(corpus):
    _, _, gt, _ = corpus
    for row in gt["annotated"]:
        assert calls_per_100_words(parse(row["annotated_text"])) <= 12.0, row["doc_id"]


def test_every_stated_fact_is_in_the_knowledge_base(corpus):
    _, _, gt, _ = corpus
    kb = {(r["entity"], r["relation"], r["value"]) for r in gt["kb"]}
    assert all((t["entity"], t["relation"], t["value"]) in kb for t in gt["triplets"])
    assert {r["relation"] for r in gt["kb"]} == set(RELATIONS)
    assert len(kb) == len(gt["kb"])  # one value per (entity, relation): the lookup key is unambiguous
    assert len({(r["entity"], r["relation"]) for r in gt["kb"]}) == len(gt["kb"])


def test_every_person_has_eight_or_more_facts_all_stated_in_one_biography(corpus):
    _, result, gt, _ = corpus
    facts = defaultdict(dict)
    for r in gt["kb"]:
        if r["entity_type"] == "person":
            facts[r["entity"]][r["relation"]] = r["value"]
    assert len(facts) == result.n_people == SMALL.n_people == len(gt["people"])
    bio_of = {d["subject"]: d["doc_id"] for d in gt["documents"] if d["kind"] == "biography"}
    assert len(bio_of) == SMALL.n_people  # one main biography per person
    stated = defaultdict(dict)
    for t in gt["triplets"]:
        if bio_of.get(t["entity"]) == t["doc_id"]:
            stated[t["entity"]][t["relation"]] = t["value"]
    for person in gt["people"]:
        assert person["biography_doc_id"] == bio_of[person["entity"]]
        assert len(facts[person["entity"]]) >= 8
        assert stated[person["entity"]] == facts[person["entity"]]


def test_facts_recur_across_documents(corpus):
    _, _, gt, _ = corpus
    kind = {d["doc_id"]: d["kind"] for d in gt["documents"]}
    people = {p["entity"] for p in gt["people"]}
    restated = {(t["entity"], t["relation"]) for t in gt["triplets"]
                if t["entity"] in people and kind[t["doc_id"]] != "biography"}
    assert restated  # organisation and city documents restate facts of linked people
    subjects = {d["subject"] for d in gt["documents"] if d["kind"] in ("organisation", "city")}
    assert {t["entity"] for t in gt["triplets"] if kind[t["doc_id"]] != "biography"} - people <= subjects | {
        r["entity"] for r in gt["kb"] if r["entity_type"] != "person"}


def test_no_fact_documents_have_no_calls_and_name_no_entity(corpus):
    _, _, gt, docs = corpus
    entities = {r["entity"] for r in gt["kb"]}
    no_fact = {d["doc_id"] for d in gt["documents"] if d["kind"] == "no_facts"}
    assert len(no_fact) == SMALL.n_no_fact_docs
    assert all(r["n_calls"] == 0 for r in gt["annotated"] if r["doc_id"] in no_fact)
    for rec in docs:
        if rec["id"] in no_fact:
            assert not any(e in rec["text"] for e in entities)


def test_no_entity_is_contained_in_its_own_values(corpus):
    _, _, gt, _ = corpus
    assert not [r for r in gt["kb"] if r["entity"] in r["value"]]


def test_people_names_are_unique_and_categories_balanced(corpus):
    _, _, gt, docs = corpus
    names = [p["entity"] for p in gt["people"]]
    assert len(set(names)) == len(names)
    counts = Counter(p["category"] for p in gt["people"])
    assert set(counts) == set(CATEGORIES)
    assert max(counts.values()) - min(counts.values()) <= 1
    bio_categories = Counter(r["metadata"]["category"] for r in docs if r["metadata"]["kind"] == "biography")
    assert bio_categories == counts


def test_aliases_are_surnames_used_in_place_of_the_full_name(corpus):
    _, _, gt, docs = corpus
    bio_text = {d["subject"]: next(r["text"] for r in docs if r["id"] == d["doc_id"])
                for d in gt["documents"] if d["kind"] == "biography"}
    assert gt["aliases"]
    for a in gt["aliases"]:
        assert a["entity"].endswith(" " + a["alias"])
        assert re.search(rf"\b{re.escape(a['alias'])}\b", bio_text[a["entity"]].replace(a["entity"], ""))


def test_dates_are_written_month_day_year(corpus):
    _, _, gt, _ = corpus
    dates = [r["value"] for r in gt["kb"] if r["relation"] in ("Birth Date", "Death Date")]
    assert dates and all(re.fullmatch(r"(January|February|March|April|May|June|July|August|September|"
                                      r"October|November|December) [1-9]\d?, \d{4}", d) for d in dates)


def test_each_relation_has_five_or_more_templates_with_valid_slots():
    for entity_type, relations in RELATIONS_BY_TYPE.items():
        table = TEMPLATES[entity_type]
        for relation in relations:
            assert sum(len(ts) for key, ts in table.items() if relation in key) >= 5, (entity_type, relation)
        tables = [table, INTRO_TEMPLATES[entity_type], MENTION_CLAUSES.get(entity_type, {})]
        for t in tables:
            for key, templates in t.items():
                assert set(key) <= set(relations), (entity_type, key)
                for template in templates:  # every relation slot is in the key, and the key's relations are all used
                    slots = {s for s in _SLOT.findall(template) if s in RELATIONS}
                    assert slots == set(key), template
    assert set(RELATIONS) == {r for rels in RELATIONS_BY_TYPE.values() for r in rels}


@pytest.mark.parametrize("compression,suffix", [("none", ".jsonl"), ("zst", ".jsonl.zst")])
def test_other_compressions_hold_the_same_documents(corpus, tmp_path, compression, suffix):
    _, _, _, docs = corpus
    result = generate_corpus(SMALL.model_copy(update={"compression": compression}), str(tmp_path))
    assert all(f.endswith(suffix) for f in result.corpus_files)
    assert [r for f in result.corpus_files for r in _read_jsonl(f)] == docs


def test_a_smaller_rerun_leaves_no_stale_corpus_files(tmp_path):
    tiny = SyntheticCorpusConfig(n_people=10, n_organisation_docs=2, n_city_docs=1, n_no_fact_docs=1, docs_per_file=3)
    assert len(generate_corpus(tiny, str(tmp_path)).corpus_files) == 5
    result = generate_corpus(tiny.model_copy(update={"docs_per_file": 100}), str(tmp_path))
    assert sorted(str(p) for p in (tmp_path / "corpus").iterdir()) == result.corpus_files


def test_other_seeds_and_sizes_keep_the_invariants(tmp_path):
    for seed, n in ((-3, 1), (3, 9), (11, 33)):
        config = SyntheticCorpusConfig(n_people=n, n_organisation_docs=3, n_city_docs=2, n_no_fact_docs=2, seed=seed)
        result = generate_corpus(config, str(tmp_path / str(seed)))
        ann = pq.read_table(result.annotated).to_pylist()
        assert sum(result.docs_by_kind.values()) == len(ann) == n + 7
        for row in ann:
            parsed = parse(row["annotated_text"])
            assert parsed.text == row["text"] and calls_per_100_words(parsed) <= 12.0
        for t in pq.read_table(result.triplets).to_pylist():
            text = next(r["text"] for r in ann if r["doc_id"] == t["doc_id"])
            assert text[t["value_start"]:t["value_end"]] == t["value"]
            assert 0 <= text.find(t["entity"]) < t["call_offset"]


def test_bad_compression_or_remote_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="compression='bz2'.*none, gz, zst"):
        generate_corpus(SyntheticCorpusConfig(n_people=2, compression="bz2"), str(tmp_path))
    with pytest.raises(UserInputError, match="s3://bucket/x.*local folder"):
        generate_corpus(SyntheticCorpusConfig(n_people=2), "s3://bucket/x")


# sha256 of the corpus file of SyntheticCorpusConfig() as main wrote it before reviews existed (issue 16)
DEFAULT_CORPUS_SHA256 = "a61ebf35bf983b6a09dd55a580b60a96e827e1cfbea64060e7e529767c4ea191"


def test_the_default_corpus_is_byte_identical_to_the_one_before_reviews(tmp_path):
    result = generate_corpus(SyntheticCorpusConfig(), str(tmp_path))
    assert [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in result.corpus_files] == [DEFAULT_CORPUS_SHA256]
    assert "review" not in result.docs_by_kind


def test_reviews_are_balanced_labelled_opinion_documents_without_facts(tmp_path):
    result = generate_corpus(SMALL.model_copy(update={"n_review_docs": 40}), str(tmp_path))
    docs = [r for f in result.corpus_files for r in _read_jsonl(f)]
    reviews = [d for d in docs if d["metadata"]["kind"] == "review"]
    assert result.docs_by_kind["review"] == len(reviews) == 40
    assert Counter(d["metadata"]["sentiment"] for d in reviews) == {"positive": 20, "negative": 20}
    assert {d["metadata"]["category"] for d in reviews} == {"review"}
    assert all(not _SLOT.search(d["text"]) and d["text"][0].isupper() for d in reviews)
    gold = {r["doc_id"]: r for r in pq.read_table(result.annotated).to_pylist()}
    assert all(gold[d["id"]]["n_calls"] == 0 for d in reviews)
    # the other families are those of the same config without reviews
    plain = generate_corpus(SMALL, str(tmp_path / "plain"))
    assert sorted(d["text"] for d in docs if d["metadata"]["kind"] != "review") == \
        sorted(r["text"] for f in plain.corpus_files for r in _read_jsonl(f))
