"""The lookup markup grammar: round trips, stripping, the legacy form and escaping."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import markup as m

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lmlm-reference"

# Field text: no surrounding whitespace, no markup characters that could open a call.
field_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp"), blacklist_characters="<>[]|\n\r"),
    min_size=1, max_size=20,
).map(str.strip).filter(bool)
source_text = st.text(max_size=200)


@st.composite
def annotated(draw):
    text = m.escape(draw(source_text))
    n = draw(st.integers(0, 5))
    offsets = sorted(draw(st.lists(st.integers(0, len(text)), min_size=n, max_size=n)))
    calls = tuple(
        m.PlacedCall(o, m.LookupCall(draw(field_text), draw(field_text), draw(field_text))) for o in offsets
    )
    return m.Annotated(text, calls)


@settings(max_examples=300, deadline=None)
@given(annotated())
def test_parse_render_is_identity(ann):
    rendered = m.render(ann)
    assert m.parse(rendered) == ann
    assert m.render(m.parse(rendered)) == rendered


@settings(max_examples=300, deadline=None)
@given(annotated())
def test_strip_gives_back_the_source_exactly(ann):
    assert m.strip(m.render(ann)) == ann.text


@settings(max_examples=300, deadline=None)
@given(source_text)
def test_escape_is_reversible_and_inert(text):
    escaped = m.escape(text)
    assert m.unescape(escaped) == text
    assert m.parse(escaped).calls == ()
    assert m.parse_legacy(escaped).calls == ()
    assert "<|db_" not in escaped and "[dblookup(" not in escaped


def test_literal_special_tokens_in_a_document_never_become_a_lookup():
    doc = "Docs say: <|db_entity|> A<|db_relationship|> b<|db_return|> c<|db_end|> and [dblookup('A', 'b') -> c] end"
    with pytest.raises(m.MarkupError):
        m.parse(doc)  # unescaped, it would be read as markup (and the legacy call is stray)
    escaped = m.escape(doc)
    assert m.parse(escaped).calls == ()
    call = m.LookupCall("Ada Lovelace", "Birth Year", "1815")
    ann = m.Annotated(escaped, (m.PlacedCall(4, call),))
    assert m.parse(m.render(ann)) == ann
    assert m.unescape(m.strip(m.render(ann))) == doc


def test_canonical_and_legacy_forms_convert_both_ways():
    canonical = (
        "Napoleon was born in<|db_entity|> Napoleon<|db_relationship|> Birth Place<|db_return|> Ajaccio<|db_end|>"
        " Ajaccio in (<|db_entity|> Napoleon<|db_relationship|> Birth Year<|db_return|> 1769<|db_end|>1769)."
    )
    legacy = m.canonical_to_legacy(canonical)
    assert legacy == (
        "Napoleon was born in [dblookup('Napoleon', 'Birth Place') -> Ajaccio] Ajaccio in "
        "([dblookup('Napoleon', 'Birth Year') -> 1769] 1769)."
    )
    assert m.legacy_to_canonical(legacy) == canonical
    assert m.strip(canonical) == "Napoleon was born in Ajaccio in (1769)."


def test_malformed_calls_are_errors_or_dropped_with_a_reason():
    broken = "A<|db_entity|> X<|db_relationship|> y<|db_return|> z and no end"
    with pytest.raises(m.MarkupError, match="malformed call"):
        m.parse(broken)
    ann, errors = m.parse_lenient("x<|db_entity|> <|db_relationship|> r<|db_return|> v<|db_end|> v")
    assert ann.calls == () and errors and "entity" in errors[0]


def test_mention_span_skips_the_space_before_the_value():
    text = "born in Ajaccio"
    assert m.mention_span(text, 7, "Ajaccio") == (8, 15)
    assert m.mention_span(text, 7, "Paris") is None


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference data not present")
@pytest.mark.parametrize("name", ["seed_gpt4o_squad_train.json", "annotator_llama8b_dwiki.json"])
def test_reference_legacy_annotations_parse_and_round_trip(name):
    examples = json.loads((REFERENCE / name).read_text())["examples"]
    n_calls = n_errors = 0
    for ex in examples:
        ann, errors = m.parse_lenient(ex["annotated_text"], legacy=True)
        n_calls += len(ann.calls)
        n_errors += len(errors)
        assert m.parse(m.render(ann)) == ann
        assert m.parse_legacy(m.render(ann, legacy=True)) == ann
    assert n_calls > 3 * len(examples) and n_errors < 0.01 * n_calls
