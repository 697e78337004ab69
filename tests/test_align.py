"""Fact placement and realignment: calls land right before the value's mention, after the entity is
introduced, and the source text is never altered."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import markup as m
from tasks.align import Fact, mention_at, place_facts, sentence_spans
from tasks.realign import realign

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lmlm-reference"


def calls_before_mentions(ann: m.Annotated) -> bool:
    """Every call is at its canonical place: before the whitespace preceding a mention of its value."""
    for pc in ann.calls:
        anchor = pc.offset
        while anchor < len(ann.text) and ann.text[anchor].isspace():
            anchor += 1
        if pc.offset > 0 and ann.text[pc.offset - 1].isspace():
            return False
        if mention_at(ann.text, anchor, pc.call.value) is None:
            return False
    return True


def placed(ann: m.Annotated) -> list[tuple[str, str, str, str]]:
    """(entity, relation, value, text after the call) of every call."""
    return [(pc.call.entity, pc.call.relation, pc.call.value, ann.text[pc.offset:pc.offset + 15]) for pc in ann.calls]


# ---- place_facts ------------------------------------------------------------------------------


def test_call_goes_before_the_space_preceding_the_value():
    text = "Napoleon was born in Ajaccio, Corsica."
    ann, unplaced = place_facts(text, [Fact(entity="Napoleon", relation="birthplace", value="Ajaccio")])
    assert unplaced == []
    assert m.render(ann) == ("Napoleon was born in<|db_entity|> Napoleon<|db_relationship|> birthplace"
                             "<|db_return|> Ajaccio<|db_end|> Ajaccio, Corsica.")
    assert m.strip(m.render(ann)) == text


def test_value_mentioned_before_the_entity_uses_the_later_mention():
    text = "Ajaccio is a port. Napoleon was born in Ajaccio."
    ann, _ = place_facts(text, [Fact(entity="Napoleon", relation="birthplace", value="Ajaccio")])
    assert [pc.offset for pc in ann.calls] == [text.rindex(" Ajaccio")]


def test_value_only_before_the_entity_is_not_placed():
    text = "Ajaccio is a port where Napoleon lived."
    ann, unplaced = place_facts(text, [Fact(entity="Napoleon", relation="birthplace", value="Ajaccio")])
    assert ann.calls == ()
    assert [r for _, r in unplaced] == ["mention_before_entity"]


def test_alias_introduces_the_entity():
    text = "Bonaparte was born in Ajaccio."
    facts = [Fact(entity="Napoleon Bonaparte", relation="birthplace", value="Ajaccio")]
    assert place_facts(text, facts)[1][0][1] == "entity_not_introduced"
    ann, unplaced = place_facts(text, facts, aliases={"Bonaparte": "Napoleon Bonaparte"})
    assert unplaced == [] and ann.calls[0].call.entity == "Napoleon Bonaparte"


def test_wikipedia_title_forms_introduce_the_entity():
    text = "Arsenal_F.C.: The club won the double in 1971."
    ann, unplaced = place_facts(text, [Fact(entity="Arsenal F.C.", relation="first double", value="1971")])
    assert unplaced == [] and len(ann.calls) == 1


def test_unplaceable_facts_come_back_with_their_reason():
    text = "Marie Curie was born in Warsaw."
    facts = [
        Fact(entity="Marie Curie", relation="birthplace", value="Warsaw"),
        Fact(entity="Marie Curie", relation="birthplace", value="Warsaw"),
        Fact(entity="Marie Curie", relation="spouse", value="Pierre Curie"),
        Fact(entity="Albert Einstein", relation="birthplace", value="Ulm"),
        Fact(entity="Marie Curie", relation="bad", value="x<|db_end|>"),
        Fact(entity="Marie Curie", relation=" padded", value="Warsaw"),
    ]
    ann, unplaced = place_facts(text, facts)
    assert len(ann.calls) == 1
    assert [r for _, r in unplaced] == ["duplicate", "mention_not_found", "entity_not_introduced", "malformed",
                                        "malformed"]
    assert ann.text == text


def test_case_insensitive_then_fuzzy_matches():
    text = "Napoleon was born in AJACCIO. He later lived on Saint-Helena island."
    facts = [Fact(entity="Napoleon", relation="birthplace", value="Ajaccio"),
             Fact(entity="Napoleon", relation="exile", value="Saint Helena")]
    ann, unplaced = place_facts(text, facts)
    assert unplaced == []
    assert [t for *_, t in placed(ann)] == [" AJACCIO. He la", " Saint-Helena i"]


def test_fuzzy_match_does_not_take_another_word_form():
    text = "Ann Lee is a judge. She hears appeals."
    ann, unplaced = place_facts(text, [Fact(entity="Ann Lee", relation="occupation", value="judges")])
    assert ann.calls == ()  # "judge" is within ratio 0.9 of "judges", but it is another form of the word
    text = "Ann Lee works as a civil engineering consultant."
    ann, unplaced = place_facts(text, [Fact(entity="Ann Lee", relation="occupation", value="civil engineer")])
    assert ann.calls == () and unplaced[0][1] == "mention_not_found"


def test_values_match_whole_words_only():
    text = "The Mayor of Ajaccio met Napoleon in May."
    ann, _ = place_facts(text, [Fact(entity="Napoleon", relation="meeting month", value="May")])
    assert [t for *_, t in placed(ann)] == [" May."]


def test_mention_field_is_searched_instead_of_the_value():
    text = "Napoleon was born in 1769 in Ajaccio."
    fact = Fact(entity="Napoleon", relation="birth date", value="15 August 1769", mention="1769")
    ann, unplaced = place_facts(text, [fact])
    assert unplaced == [] and ann.calls[0].call.value == "15 August 1769"
    assert text[ann.calls[0].offset:].startswith(" 1769")


def test_whitespace_in_value_matches_any_whitespace_run():
    text = "The glacier is 4.5\u00a0km long; Mont Blanc\nGlacier is near."
    ann, unplaced = place_facts(text, [Fact(entity="glacier", relation="length", value="4.5 km")])
    assert unplaced == [] and text[ann.calls[0].offset:].startswith(" 4.5\u00a0km")


def test_shared_value_goes_to_the_nearest_preceding_entity():
    text = "Anna Berg was born in Oslo. Tom Lie was also born in Oslo."
    facts = [Fact(entity="Anna Berg", relation="birthplace", value="Oslo"),
             Fact(entity="Tom Lie", relation="birthplace", value="Oslo")]
    ann, unplaced = place_facts(text, facts)
    assert unplaced == []
    assert [(pc.call.entity, pc.offset) for pc in ann.calls] == [
        ("Anna Berg", text.index(" Oslo")), ("Tom Lie", text.rindex(" Oslo"))]


def test_sentence_scope_keeps_other_entities_to_their_sentences():
    text = ("Nancyberg is a city in Idaho. Kelly Gardner, a native, won the Lee Prize. "
            "Nancyberg hosts the Lee Prize ceremony.")
    facts = [Fact(entity="Nancyberg", relation="state", value="Idaho"),
             Fact(entity="Kelly Gardner", relation="award", value="Lee Prize"),
             Fact(entity="Kelly Gardner", relation="home state", value="Idaho")]
    ann, unplaced = place_facts(text, facts, scope="sentence")
    assert [(pc.call.entity, pc.call.relation) for pc in ann.calls] == [("Nancyberg", "state"), ("Kelly Gardner", "award")]
    assert text[ann.calls[1].offset:].startswith(" Lee Prize.")
    assert unplaced[0][1] == "mention_outside_entity_sentence"


def test_a_name_inside_a_longer_name_is_not_a_mention():
    text = "Rita Moss studied at Paris University. She was born in Paris."
    facts = [Fact(entity="Rita Moss", relation="birthplace", value="Paris"),
             Fact(entity="Paris University", relation="founded", value="1150")]
    ann, _ = place_facts(text, facts)
    assert [t for *_, t in placed(ann)] == [" Paris."]


def test_sentence_spans_do_not_split_initials_or_titles():
    text = "Dr. Smith met Edward N. Buxton. They left.\n\nNew paragraph"
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Dr. Smith met Edward N. Buxton.", "They left.", "New paragraph"]


words = st.sampled_from(["Ann", "Bo", "Cy", "born", "in", "Oslo", "Rome", "1990", "and", "the", ",", ".", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(words, min_size=1, max_size=40), st.lists(st.tuples(words, words), max_size=6))
def test_placement_never_alters_the_text(tokens, pairs):
    text = " ".join(tokens)
    facts = [Fact(entity=e, relation="r", value=v) for e, v in pairs]
    ann, unplaced = place_facts(text, facts)
    assert ann.text == text and m.strip(m.render(ann)) == text
    assert len(ann.calls) + len(unplaced) == len(facts)
    assert calls_before_mentions(ann)


# ---- realign ----------------------------------------------------------------------------------


def call(e, r, v):
    return m.render_call(m.LookupCall(e, r, v))


def test_unchanged_text_keeps_every_call_where_it_is():
    source = "Napoleon was born in Ajaccio in 1769."
    annotated = f"Napoleon was born in{call('Napoleon', 'birthplace', 'Ajaccio')} Ajaccio in 1769."
    ann, counts = realign(source, annotated)
    assert ann == m.parse(annotated)
    assert counts["kept"] == 1 and counts["moved"] == 0


def test_whitespace_drift_maps_calls_back_onto_the_source():
    source = "Napoleon  was born\nin Ajaccio.\n\nHe died in 1821."
    annotated = (f"Napoleon was born in{call('Napoleon', 'birthplace', 'Ajaccio')} Ajaccio. "
                 f"He died in{call('Napoleon', 'death year', '1821')} 1821.")
    ann, counts = realign(source, annotated)
    assert ann.text == source and m.strip(m.render(ann)) == source
    assert counts["kept"] == 2 and calls_before_mentions(ann)


def test_call_whose_mention_was_rewritten_is_dropped():
    source = "Napoleon was born in Ajaccio in 1769."
    annotated = f"Napoleon was born in{call('Napoleon', 'birthplace', 'Bastia')} Bastia in{call('Napoleon', 'year', '1769')} 1769."
    ann, counts = realign(source, annotated)
    assert [pc.call.value for pc in ann.calls] == ["1769"]
    assert counts["dropped_changed_region"] == 1 and counts["kept"] == 1


def test_calls_in_added_text_are_dropped_and_truncation_keeps_the_rest():
    source = "Marie Curie was born in Warsaw. She won two Nobel Prizes. She died in 1934."
    annotated = (f"Marie Curie was born in{call('Marie Curie', 'birthplace', 'Warsaw')} Warsaw. "
                 f"She studied in{call('Marie Curie', 'study city', 'Paris')} Paris. She won")
    ann, counts = realign(source, annotated)
    assert [pc.call.value for pc in ann.calls] == ["Warsaw"]
    assert counts == {"kept": 1, "moved": 0, "dropped_changed_region": 1, "dropped_lost_mention": 0,
                      "dropped_malformed": 0}


def test_value_shifted_by_an_edit_next_to_it_is_found_nearby():
    source = "The county seat lies 48\u00a0km from Yibin, at Elon College (now Elon University)."
    annotated = (f"The county seat lies{call('Gao', 'distance', '48 km')} 48 km from Yibin, "
                 f"at{call('Gao', 'college', 'Elon University')} Elon University.")
    ann, counts = realign(source, annotated)
    assert calls_before_mentions(ann)
    assert [source[pc.offset:pc.offset + 8] for pc in ann.calls] == [" 48\u00a0km f", " Elon Un"]
    assert source[ann.calls[1].offset:].startswith(" Elon University)")
    assert counts["moved"] == 1


def test_legacy_markup_with_escaped_quotes():
    source = "St George's Cathedral was built in 1850."
    annotated = "St George's Cathedral was built in [dblookup('St George\\'s Cathedral', 'built') -> 1850] 1850."
    ann, counts = realign(source, annotated, legacy=True)
    assert ann.calls[0].call.entity == "St George's Cathedral"
    assert counts["kept"] == 1 and calls_before_mentions(ann)


def test_malformed_legacy_calls_are_counted():
    source = "Ajaccio is in Corsica."
    annotated = "Ajaccio is in [dblookup('Ajaccio', '') -> Corsica] Corsica."
    ann, counts = realign(source, annotated, legacy=True)
    assert ann.calls == () and counts["dropped_malformed"] >= 1


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference data folder absent")
@pytest.mark.parametrize("name", ["seed_gpt4o_squad_train.json", "annotator_llama8b_dwiki.json"])
def test_reference_annotations_realign_onto_their_exact_source(name):
    examples = json.loads((REFERENCE / name).read_text())["examples"]
    for ex in examples:
        parsed, _ = m.parse_lenient(ex["annotated_text"], legacy=True)
        ann, counts = realign(ex["text"], ex["annotated_text"], legacy=True)
        assert ann.text == ex["text"] and m.strip(m.render(ann)) == ex["text"]
        # every parsed call is either kept or counted as dropped: none is lost silently
        assert counts["kept"] + counts["dropped_changed_region"] + counts["dropped_lost_mention"] == len(parsed.calls)
        if parsed.text == ex["text"]:  # nothing drifted: every call stays exactly where it was
            assert [pc.offset for pc in ann.calls] == [pc.offset for pc in parsed.calls]
