"""Lookup indexes: exact keys with aliases, fuzzy lookups that answer `unknown` for absent keys,
the key prefix tree for constrained decoding, and refreshes that pick up warehouse edits."""

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import UserInputError
from schemas.markup import DB_RELATIONSHIP, DB_RETURN
from lookup import (
    UNKNOWN,
    ExactIndex,
    FuzzyIndex,
    KeyTrie,
    LookupDatabase,
    StoredFact,
    is_name_variant,
    name_words,
    normalize_key,
    open_index,
    read_facts,
)

REFERENCE_DB = Path(__file__).resolve().parents[2] / "shared" / "data" / "lmlm-reference" / "database_dwiki_eval100.json"

FACTS = [
    StoredFact("Ada Lovelace", "Birth Place", "London", 3, ("https://example.org/ada",)),
    StoredFact("Ada Lovelace", "Birth Date", "10 December 1815", 2, ("doc-1",)),
    StoredFact("Ada Lovelace", "Spouse", "William King", 1, ("doc-2",)),
    StoredFact("Alan Mathison Turing", "Birth Place", "Maida Vale", 4, ("doc-3",)),
    StoredFact("Alan Mathison Turing", "Alma Mater", "King's College", 1, ("doc-3",)),
    StoredFact("Grace Hopper", "Birth Place", "New York City", 1, ("doc-4",)),
    StoredFact("Grace Hopper", "Death Date", "1 January 1992", 1, ("doc-4",)),
]


class TrigramEmbed:
    """A deterministic stand-in for the sentence encoder: hashed character trigrams, L2-normalised.
    Counts the texts it embeds, to check that refreshes embed only new names."""

    def __init__(self, dim: int = 512):
        self.dim, self.calls = dim, []

    def __call__(self, texts):
        self.calls.extend(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            t = f"  {t.lower()}  "
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j:j + 3].encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def write_parquet(path, facts):
    pq.write_table(pa.table({
        "entity": [f.entity for f in facts], "relation": [f.relation for f in facts], "value": [f.value for f in facts],
        "n_sources": [f.n_sources for f in facts], "sources": [list(f.sources) for f in facts],
        "source_urls": [[s for s in f.sources if s.startswith("http")] for f in facts],
    }), path)


def test_normalize_key_casefolds_collapses_spaces_and_strips_end_punctuation():
    assert normalize_key("  ADA   Lovelace. ") == "ada lovelace"
    assert normalize_key("«Birth\tPlace»") == "birth place"
    assert normalize_key("St. John's") == "st. john's"
    assert normalize_key("Straße") == normalize_key("STRASSE")


def test_exact_lookup_ignores_case_spacing_and_end_punctuation_and_cites_sources():
    index = ExactIndex(LookupDatabase(FACTS))
    r = index.lookup("  ada   LOVELACE ", "birth place.")
    assert (r.value, r.entity, r.relation, r.hit, r.sources) == ("London", "Ada Lovelace", "Birth Place", True,
                                                                 ["https://example.org/ada"])
    miss = index.lookup("Ada Lovelace", "Death Date")
    assert (miss.value, miss.hit, miss.entity, miss.sources) == (UNKNOWN, False, "Ada Lovelace", [])
    assert index.lookup("Charles Babbage", "Birth Place").entity is None


def test_exact_lookup_maps_names_through_the_alias_tables():
    db = LookupDatabase(FACTS, entity_aliases=[("Turing", "Alan Mathison Turing"), ("Lovelace", "Ada Lovelace")],
                        relation_aliases=[("Place of Birth", "Birth Place")])
    index = ExactIndex(db)
    assert index.lookup("turing", "place of birth").value == "Maida Vale"
    assert index.lookup("Lovelace", "Birth Date").value == "10 December 1815"


def test_an_alias_of_several_entities_answers_only_when_one_of_them_has_the_relation():
    db = LookupDatabase(FACTS, entity_aliases=[("A.", "Ada Lovelace"), ("A.", "Alan Mathison Turing")])
    index = ExactIndex(db)
    assert index.lookup("A.", "Alma Mater").value == "King's College"
    assert not index.lookup("A.", "Birth Place").hit  # both have one: ambiguous


def test_conflicting_values_resolve_to_the_best_sourced_one_like_the_conflicts_view():
    db = LookupDatabase([StoredFact("X Y", "Color", "red", 1), StoredFact("x y", "color", "blue", 3),
                         StoredFact("X Y", "Color", "green", 3)])
    assert len(db) == 1
    assert ExactIndex(db).lookup("X Y", "Color").value == "blue"  # 3 sources; 'blue' < 'green'


def test_name_variants_keep_first_and_last_word():
    assert is_name_variant(name_words("john smith"), name_words("john michael smith"))
    assert is_name_variant(name_words("john f. kennedy"), name_words("john kennedy"))
    assert not is_name_variant(name_words("andrea jones"), name_words("john andrea jones"))
    assert not is_name_variant(name_words("john smith"), name_words("jane smith"))
    assert not is_name_variant(name_words("smith"), name_words("john smith"))


@pytest.fixture
def fuzzy():
    embed = TrigramEmbed()
    return FuzzyIndex(LookupDatabase(FACTS), embed, vector_index="flat"), embed


def test_entity_first_resolves_name_variants_and_answers_unknown_for_absent_keys(fuzzy):
    index, _ = fuzzy
    assert index.lookup("Alan Turing", "Birth Place").value == "Maida Vale"  # middle name dropped
    assert index.lookup("Grace Brewster Hopper", "death date").value == "1 January 1992"  # added
    assert index.lookup("Ada Lovelace", "Death Date").value == UNKNOWN  # a relation the entity lacks
    unseen = index.lookup("Alan Smith", "Birth Place")
    assert (unseen.value, unseen.entity) == (UNKNOWN, None)
    assert index.lookup("Ada Byron", "Birth Place").value == UNKNOWN


def test_flat_mode_is_the_reference_nearest_neighbour_that_answers_a_wrong_fact_for_absent_keys():
    db = LookupDatabase(FACTS)
    flat = FuzzyIndex(db, TrigramEmbed(), mode="flat", threshold=0.6, vector_index="flat")
    assert flat.lookup("Ada Lovelace", "Birth Place").value == "London"
    wrong = flat.lookup("Ada Lovelace", "Death Place")  # absent: answered by the nearest key
    assert wrong.hit and (wrong.entity, wrong.relation) != ("Ada Lovelace", "Death Place")
    assert not flat.lookup("Zyx Qwv", "Colour").hit  # below the threshold


def test_batched_fuzzy_lookups_equal_single_lookups(fuzzy):
    index, _ = fuzzy
    keys = [("Alan Turing", "Birth Place"), ("ADA LOVELACE", "spouse"), ("Nobody Here", "Spouse"),
            ("Grace Hopper", "Birth Place"), ("Alan Turing", "Birth Place")]
    assert index.lookup_batch(keys) == [index.lookup(*k) for k in keys]


def test_refresh_picks_up_edits_and_embeds_only_new_names(tmp_path):
    path = tmp_path / "lookup.parquet"
    write_parquet(path, FACTS)
    db = LookupDatabase.load(path)
    embed = TrigramEmbed()
    index = FuzzyIndex(db, embed, vector_index="flat")
    assert index.lookup("Alan Turing", "Birth Place").value == "Maida Vale"
    embedded = len(embed.calls)
    edited = [f for f in FACTS if f.relation != "Spouse"]
    edited = [StoredFact(f.entity, f.relation, "Wilmslow", 1) if f.entity.startswith("Alan") and f.relation == "Birth Place" else f
              for f in edited] + [StoredFact("Katherine Johnson", "Birth Place", "White Sulphur Springs", 1)]
    write_parquet(path, edited)
    assert db.refresh() is True
    assert index.lookup("Alan Turing", "Birth Place").value == "Wilmslow"
    assert index.lookup("Ada Lovelace", "Spouse").value == UNKNOWN  # deleted
    assert index.lookup("Katherine Johnson", "Birth Place").value == "White Sulphur Springs"
    new = embed.calls[embedded:]
    assert "Katherine Johnson" in new and not {"Ada Lovelace", "Grace Hopper"} & set(new)
    assert db.refresh() is False  # nothing changed, nothing rebuilt


def test_hnsw_index_answers_like_the_flat_one():
    facts = [StoredFact(f"Person{i} Surname{i}", "Birth Place", f"City {i}") for i in range(300)]
    db = LookupDatabase(facts)
    flat = FuzzyIndex(db, TrigramEmbed(), mode="flat", vector_index="flat")
    auto = FuzzyIndex(db, TrigramEmbed(), mode="flat", vector_index="auto", hnsw_min=100)
    keys = [(f"person{i} surname{i}", "birth place") for i in range(0, 300, 7)]
    auto.lookup("x", "y")
    assert auto.names.index.kind == "hnsw"
    assert [r.value for r in auto.lookup_batch(keys)] == [r.value for r in flat.lookup_batch(keys)]


def test_entity_first_hnsw_resolves_names_like_flat_search():
    facts = [StoredFact(f"Person{i} Surname{i}", "Birth Place", f"City {i}") for i in range(300)]
    db = LookupDatabase(facts)
    options = dict(mode="entity-first", entity_threshold=0.6)  # reordered names reach the vector search
    flat = FuzzyIndex(db, TrigramEmbed(), vector_index="flat", **options)
    auto = FuzzyIndex(db, TrigramEmbed(), vector_index="auto", hnsw_min=100, **options)
    keys = [(f"Surname{i} Person{i}", "Birth Place") for i in range(0, 300, 7)] + [("Nobody Atall", "Birth Place")]
    got, want = auto.lookup_batch(keys), flat.lookup_batch(keys)
    assert auto.names.index.kind == "hnsw"
    assert sum(r.hit for r in want) >= 40  # the set exercises the vector search, not only misses
    assert [(r.value, r.entity) for r in got] == [(r.value, r.entity) for r in want]
    assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)


def test_read_facts_rejects_bad_files_naming_them(tmp_path):
    with pytest.raises(UserInputError, match="missing.parquet not found"):
        read_facts(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserInputError, match="junk.parquet: not a readable Parquet"):
        read_facts(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"entity": ["A B"], "value": ["v"]}), tmp_path / "cols.parquet")
    with pytest.raises(UserInputError, match=r"missing column\(s\) \['relation'\]"):
        read_facts(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"entity": ["A B"], "relation": ["r"], "value": ["x<|db_end|>"]}), tmp_path / "markup.parquet")
    with pytest.raises(UserInputError, match="markup.parquet, row 0"):
        read_facts(tmp_path / "markup.parquet")
    with pytest.raises(UserInputError, match="lookup mode 'nearest'"):
        open_index(LookupDatabase(FACTS), "nearest")
    with pytest.raises(UserInputError, match="needs an embedding function"):
        open_index(LookupDatabase(FACTS), "fuzzy")


@pytest.mark.skipif(not REFERENCE_DB.exists(), reason="reference data not available")
def test_every_key_of_the_reference_database_is_found():
    import orjson

    triplets = orjson.loads(REFERENCE_DB.read_bytes())["triplets"]
    db = LookupDatabase.load(REFERENCE_DB)
    index = ExactIndex(db)
    values = {}
    for e, r, v in triplets:
        values.setdefault((normalize_key(e), normalize_key(r)), set()).add(v)
    results = index.lookup_batch([(e, r) for e, r, _ in triplets])
    assert all(res.hit and res.value in values[normalize_key(e), normalize_key(r)]
               for (e, r, _), res in zip(triplets, results))


def test_warehouse_export_and_direct_connection_give_the_same_database(tmp_path):
    from warehouse.db import connect
    from warehouse.edits import edit_fact, set_alias
    from warehouse.lookup_db import export_lookup_db, import_reference_db

    ref = tmp_path / "db.json"
    ref.write_text('{"triplets": [["Ada Lovelace", "Birth Place", "London"], ["Alan Turing", "Birth Place", "Maida Vale"]]}')
    con = connect(tmp_path / "w.duckdb")
    import_reference_db(con, str(ref), "run-1")
    export_lookup_db(con, parquet_path=str(tmp_path / "lookup.parquet"))
    from_file, from_con = LookupDatabase.load(tmp_path / "lookup.parquet"), LookupDatabase.load(con)
    assert from_file.facts == from_con.facts
    assert ExactIndex(from_con).lookup("ada lovelace", "birth place").sources == ["import:db.json"]
    set_alias(con, "entity", "Turing", "Alan Turing", reason="short name")
    edit_fact(con, "Ada Lovelace", "Birth Place", None, reason="test deletion")
    assert from_con.refresh() is True
    index = ExactIndex(from_con)
    assert index.lookup("Turing", "Birth Place").value == "Maida Vale"
    assert index.lookup("Ada Lovelace", "Birth Place").value == UNKNOWN


def test_key_trie_allows_exactly_the_continuations_of_database_keys(tokenizer):
    db = LookupDatabase(FACTS)
    trie = KeyTrie(db, tokenizer)
    keys = {tuple(tokenizer(f" {f.entity}{DB_RELATIONSHIP} {f.relation}{DB_RETURN}", add_special_tokens=False)["input_ids"])
            for f in FACTS}
    assert len(trie) == len(keys)
    assert sorted(trie.allowed_next([])) == sorted({k[0] for k in keys})
    for key in keys:  # every key can be spelled, token by token
        for i in range(len(key)):
            assert key[i] in trie.allowed_next(key[:i])
        assert trie.allowed_next(key) == []
    assert trie.allowed_next([tokenizer.eos_token_id]) == []
    write = tokenizer(" Ada Lovelace", add_special_tokens=False)["input_ids"]
    rel = tokenizer.convert_tokens_to_ids(DB_RELATIONSHIP)
    assert rel in trie.allowed_next(write)


def test_key_trie_follows_refreshes(tmp_path, tokenizer):
    path = tmp_path / "lookup.parquet"
    write_parquet(path, FACTS)
    db = LookupDatabase.load(path)
    trie = KeyTrie(db, tokenizer)
    grace = tokenizer(" Grace Hopper", add_special_tokens=False)["input_ids"]
    assert trie.allowed_next(grace)
    write_parquet(path, [f for f in FACTS if f.entity != "Grace Hopper"])
    db.refresh()
    assert trie.allowed_next(grace) == []
    assert trie.lookup("Grace Hopper", "Birth Place").value == UNKNOWN


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import train_tokenizer

    texts = [f"{f.entity} {f.relation} {f.value}." for f in FACTS] * 3
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


@pytest.mark.slow
def test_minilm_entity_first_handles_synonyms_and_refuses_absent_keys():
    embed = pytest.importorskip("models.embed").embed
    facts = [StoredFact("Maria Keller", "Birth Date", "3 May 1950"), StoredFact("Maria Keller", "Birth Place", "Basel"),
             StoredFact("Maria Keller", "Occupation", "chemist"), StoredFact("Tom Brandt", "Death Date", "1 June 2001"),
             StoredFact("Tom Brandt", "Birth Date", "2 July 1931"), StoredFact("Tom Brandt", "Spouse", "Eva Brandt")]
    index = FuzzyIndex(LookupDatabase(facts), embed)
    assert index.lookup("Maria Keller", "Date of Birth").value == "3 May 1950"
    assert index.lookup("Maria Anna Keller", "place of birth").value == "Basel"
    assert index.lookup("Maria Keller", "Date of Death").value == UNKNOWN  # Tom has one; Maria does not
    assert index.lookup("Mario Kellner", "Birth Place").value == UNKNOWN
    flat = FuzzyIndex(LookupDatabase(facts), embed, mode="flat")
    assert flat.lookup("Maria Keller", "Date of Death").hit  # the reference answers a wrong fact


def test_an_empty_database_answers_unknown_in_every_mode(tokenizer):
    db = LookupDatabase([])
    for index in (ExactIndex(db), FuzzyIndex(db, TrigramEmbed()), FuzzyIndex(db, TrigramEmbed(), mode="flat"),
                  KeyTrie(db, tokenizer)):
        assert [r.value for r in index.lookup_batch([("Ada Lovelace", "Birth Place")])] == [UNKNOWN]
    assert KeyTrie(db, tokenizer).allowed_next([]) == []
