"""kb-align (distant supervision from a knowledge base), import of the reference's annotation files,
and the triplet scorer."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import markup as m
from schemas.configs import SyntheticCorpusConfig
from schemas.errors import UserInputError
from schemas.documents import Document
from tasks.annotate_kb import ImportedAnnotations, KBAlignAnnotator, load_kb
from tasks.evaluate_annotation import score_triplets, scored_calls

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lmlm-reference"

KB = [
    ("Marie Curie", "Birth City", "Warsaw"),
    ("Marie Curie", "Spouse", "Pierre Curie"),
    ("Marie Curie", "Award", "Nobel Prize in Physics"),
    ("Marie Curie", "Death Year", "1934"),
    ("Pierre Curie", "Birth City", "Paris"),
    ("Pierre Curie", "Death Year", "1906"),
    ("Sorbonne", "City", "Paris"),
]


def calls_of(annotator, text):
    ann = annotator.annotate_text(text)
    assert m.strip(m.render(ann)) == text
    # the text after each call: the space, the value's mention and the character after it
    return [(pc.call.entity, pc.call.relation, text[pc.offset:pc.offset + len(pc.call.value) + 2]) for pc in ann.calls]


# ---- knowledge base formats ---------------------------------------------------------------------


def test_kb_formats_load_the_same_triplets(tmp_path):
    rows = [{"entity": e, "relation": r, "value": v, "entity_type": "person"} for e, r, v in KB]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "kb.parquet")
    (tmp_path / "kb.json").write_text(json.dumps({"entities": [], "triplets": [list(t) for t in KB]}))
    (tmp_path / "kb.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n\n"
                                       + "\n".join(json.dumps(list(t)) for t in KB[4:]) + "\n")
    expected = sorted(KB)
    for source in (tmp_path / "kb.parquet", str(tmp_path / "kb.json"), tmp_path / "kb.jsonl",
                   pa.Table.from_pylist(rows), KB):
        triplets, bad = load_kb(source)
        assert sorted(triplets) == expected and bad == 0


def test_kb_rows_without_a_field_are_counted_not_used(tmp_path):
    triplets, bad = load_kb([("A", "r", "v"), ("A", "", "v"), ("A", "r", None), ("A", "r", "v"), ["B"], 7])
    assert triplets == [("A", "r", "v")] and bad == 4


def test_reference_json_quote_escapes_are_undone(tmp_path):
    (tmp_path / "db.json").write_text(json.dumps({"triplets": [["St George\\'s", "Tenure", "1964 to 1968"]]}))
    assert load_kb(tmp_path / "db.json")[0] == [("St George's", "Tenure", "1964 to 1968")]


@pytest.mark.parametrize("content,name,message", [
    (None, "missing.parquet", "no such file"),
    ("entity,relation,value\n", "kb.csv", "unknown format"),
    ('{"facts": []}', "kb.json", '"triplets"'),
    ("{not json", "kb.json", "not readable JSON"),
    ('{"entity": "A", "relation": "r", "value": "v"}\nnot json\n', "kb.jsonl", "line 2"),
])
def test_bad_kb_files_are_one_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserInputError, match=message):
        load_kb(path)


def test_kb_parquet_without_the_columns_names_them(tmp_path):
    pq.write_table(pa.table({"subject": ["A"], "relation": ["r"], "object": ["v"]}), tmp_path / "kb.parquet")
    with pytest.raises(UserInputError, match="entity, value"):
        KBAlignAnnotator(tmp_path / "kb.parquet")


def test_empty_kb_is_rejected():
    with pytest.raises(UserInputError, match="no usable"):
        KBAlignAnnotator([("A", "", "v")])


# ---- kb-align ---------------------------------------------------------------------------------


def test_facts_of_the_subject_are_placed_after_it_is_named():
    kb = KBAlignAnnotator(KB)
    text = ("Warsaw was a Russian city in 1867. Marie Curie was born in Warsaw. She married Pierre Curie "
            "and won the Nobel Prize in Physics. She died in 1934.")
    assert calls_of(kb, text) == [
        ("Marie Curie", "Birth City", " Warsaw."),
        ("Marie Curie", "Spouse", " Pierre Curie "),
        ("Marie Curie", "Award", " Nobel Prize in Physics."),
        ("Marie Curie", "Death Year", " 1934."),
    ]


def test_other_entities_facts_stay_in_their_sentences():
    kb = KBAlignAnnotator(KB)
    text = ("Marie Curie married Pierre Curie, who was born in Paris. She worked in Paris until 1934. "
            "Pierre Curie died in 1906.")
    got = calls_of(kb, text)
    assert ("Pierre Curie", "Birth City", " Paris.") in got  # in the sentence naming him, not "in Paris until"
    assert ("Pierre Curie", "Death Year", " 1906.") in got
    assert sum(e == "Pierre Curie" and r == "Birth City" for e, r, _ in got) == 1  # not the second Paris


def test_a_value_inside_a_longer_entity_name_is_not_its_mention():
    kb = KBAlignAnnotator(KB + [("Paris Observatory", "Founded Year", "1667")])
    text = "Pierre Curie worked at the Paris Observatory from 1890."
    assert ("Pierre Curie", "Birth City") not in {(e, r) for e, r, _ in calls_of(kb, text)}


def test_short_aliases_refer_only_to_entities_named_in_full():
    kb = KBAlignAnnotator(KB + [("Kelly May", "Birth Date", "May 8, 1955")], aliases={"May": "Kelly May"})
    text = "Andrew Cortez (born May 8, 1955) is a lawyer."
    assert calls_of(kb, text) == []  # "May" is a month here: Kelly May is never named
    text = "Kelly May is a lawyer. May was born on May 8, 1955."
    assert calls_of(kb, text) == [("Kelly May", "Birth Date", " May 8, 1955.")]


def test_entity_names_are_found_among_many_kb_entities():
    kb_rows = [(f"Person {i:05d}", "Birth Year", str(1900 + i % 100)) for i in range(20_000)]
    kb = KBAlignAnnotator(kb_rows + KB)
    text = "Person 00042 was born in 1942. Marie Curie died in 1934."
    assert calls_of(kb, text) == [("Person 00042", "Birth Year", " 1942."),
                                  ("Marie Curie", "Death Year", " 1934.")]


def test_annotator_protocol_and_versioning():
    kb = KBAlignAnnotator(KB)
    docs = [Document(doc_id="a", text="Marie Curie died in 1934."), Document(doc_id="b", text="No facts here.")]
    out = kb.annotate(docs)
    assert [a.doc_id for a in out] == ["a", "b"] and all(a.error is None for a in out)
    assert [m.strip(a.annotated_text) for a in out] == [d.text for d in docs]
    assert kb.name == "kb-align" and kb.prompt_id is None
    assert kb.version.startswith("kb-align-v1+")
    assert KBAlignAnnotator(list(reversed(KB))).version == kb.version  # content, not row order
    assert KBAlignAnnotator(KB[:-1]).version != kb.version


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from tasks.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("synthetic")
    generate_corpus(SyntheticCorpusConfig(n_people=300), str(out))
    return out / "ground_truth"


def test_kb_align_recovers_the_synthetic_gold_annotations(synthetic):
    kb = KBAlignAnnotator(synthetic / "kb.parquet", aliases=synthetic / "aliases.parquet")
    gold_rows = pq.read_table(synthetic / "annotated.parquet", columns=["doc_id", "text", "annotated_text"]).to_pylist()
    docs = [Document(doc_id=r["doc_id"], text=r["text"]) for r in gold_rows]
    predicted, gold = [], []
    for doc, row, out in zip(docs, gold_rows, kb.annotate(docs)):
        assert out.error is None and m.strip(out.annotated_text) == doc.text
        predicted += scored_calls(doc.doc_id, m.parse(out.annotated_text))
        gold += scored_calls(doc.doc_id, m.parse(row["annotated_text"]))
    gold_triplets = pq.read_table(synthetic / "triplets.parquet").num_rows
    assert len(gold) == gold_triplets
    score = score_triplets(predicted, gold)
    print("kb-align vs synthetic gold:", {k: round(v, 4) if isinstance(v, float) else v for k, v in score.items()})
    assert score["precision"] >= 0.98 and score["recall"] >= 0.95
    assert score["span_precision"] >= 0.98 and score["span_recall"] >= 0.95


# ---- scoring ----------------------------------------------------------------------------------


def test_score_triplets_counts_triplets_and_spans_as_multisets():
    gold = [("d", "A", "r", "v", 5), ("d", "A", "r", "v", 20), ("d", "B", "s", "w", 9)]
    predicted = [("d", "A", "r", "v", 5), ("d", "A", "r", "v", 30), ("d", "C", "t", "x", 1)]
    s = score_triplets(predicted, gold)
    assert (s["precision"], s["recall"]) == (2 / 3, 2 / 3)
    assert (s["span_precision"], s["span_recall"]) == (1 / 3, 1 / 3)
    assert s["n_predicted"] == 3 and s["n_gold"] == 3
    assert score_triplets([], gold)["precision"] == 1.0 and score_triplets([], gold)["recall"] == 0.0


# ---- import -----------------------------------------------------------------------------------


def write_examples(path, examples, **meta):
    path.write_text(json.dumps({"examples": examples, "metadata": meta}))


def test_import_maps_legacy_calls_onto_the_exact_source(tmp_path):
    source = "Marie Curie was born in Warsaw.  She died in 1934."
    annotated = ("Marie Curie was born in [dblookup('Marie Curie', 'Birth City') -> Warsaw] Warsaw. "
                 "She died in [dblookup('Marie Curie', 'Death Year') -> 1934] 1934.")
    write_examples(tmp_path / "a.json", [
        {"text": source, "annotated_text": annotated, "model_id": "gpt-4o", "prompt_id": "v7",
         "original_dataset_ids": ["q1", "q2"]},
        {"text": source, "annotated_text": annotated, "model_id": "gpt-4o", "prompt_id": "v7"},
        {"annotated_text": "no text"},
    ])
    imp = ImportedAnnotations(tmp_path / "a.json")
    assert imp.name == "import:gpt-4o" and imp.prompt_id == "v7" and imp.version.startswith("import-v1+")
    (doc,) = imp.documents
    assert doc.text == source and doc.doc_id.startswith("sha1:")
    (ann,) = imp.annotate([doc])
    assert m.strip(ann.annotated_text) == source
    assert [pc.call.value for pc in m.parse(ann.annotated_text).calls] == ["Warsaw", "1934"]
    assert imp.counts["kept"] == 2
    assert [reason for _, reason in imp.rejected] == [f"repeated text of {doc.doc_id}", "no text"]
    missing = imp.annotate([Document(doc_id="other", text="x")])[0]
    assert missing.annotated_text is None and "not in" in missing.error


@pytest.mark.parametrize("content,message", [("[1, 2]", "expected"), ("{oops", "not readable JSON")])
def test_bad_import_files_are_one_clear_error(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(UserInputError, match=message):
        ImportedAnnotations(tmp_path / "a.json")
    with pytest.raises(UserInputError, match="no such file"):
        ImportedAnnotations(tmp_path / "absent.json")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference data folder absent")
def test_import_of_the_reference_seed_file():
    imp = ImportedAnnotations(REFERENCE / "seed_gpt4o_squad_train.json")
    examples = json.loads((REFERENCE / "seed_gpt4o_squad_train.json").read_text())["examples"]
    assert len(imp.documents) + len(imp.rejected) == len(examples)
    assert imp.name == "import:gpt-4o" and imp.prompt_id == "gpt4o-v7.1"
    for doc, ann in imp.pairs():
        assert ann.text == doc.text
    assert {d.text for d in imp.documents} == {m.escape(e["text"]) for e in examples}
