"""Documents of the synthetic corpus: templates filled with an entity's facts, with the exact span of every value.

A biography states all of a person's facts (intro sentence first, the rest shuffled, pronouns and surname
references after the intro); organisation and city documents state all of their subject's facts and restate
facts of linked people and organisations; no-fact documents are everyday prose. Filler sentences keep every
document at or below ``TARGET_CALLS_PER_100_WORDS``. The sentences come from ``tasks/data/synthetic/``
(``templates.json``, ``mentions.json``, ``fillers.json``, and each field's fillers in ``fields.json``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from schemas.markup import LookupCall
from tasks.synthetic_world import FIELDS, Entity, load_vocabulary

URL_BASE = "https://synthetic.example"
TARGET_CALLS_PER_100_WORDS = 10.0  # below the reference's 12-per-100-words filter, with headroom
DOC_KINDS = ("biography", "organisation", "city", "no_facts")


def _keyed(table: dict[str, list[str]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """A data file's table keyed by "Relation + Relation" as {(relations): (templates)}."""
    return {tuple(key.split(" + ")) if key else (): tuple(templates) for key, templates in table.items()}


# Templates; their slots are described in templates.json.
_templates = load_vocabulary("templates")
INTRO_TEMPLATES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    type_: _keyed(table) for type_, table in _templates["intro"].items()}
TEMPLATES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    type_: _keyed(table) for type_, table in _templates["body"].items()}

# Mentions of linked entities in organisation and city documents: a lead ending in the full name,
# then one clause of that entity's facts (never the fact that links it to the document's subject).
_mentions_data = load_vocabulary("mentions")
MENTION_LEADS: dict[str, tuple[str, ...]] = {kind: tuple(leads) for kind, leads in _mentions_data["leads"].items()}
MENTION_CLAUSES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    type_: _keyed(table) for type_, table in _mentions_data["clauses"].items()}
MAX_MENTIONS = {"alumni": 4, "staff": 4, "natives": 4, "based": 2}

_fillers = load_vocabulary("fillers")
PERSON_FILLERS: tuple[str, ...] = tuple(_fillers["person"])
ORGANISATION_FILLERS: tuple[str, ...] = tuple(_fillers["organisation"])
CITY_FILLERS: tuple[str, ...] = tuple(_fillers["city"])
NO_FACT_TOPICS: dict[str, tuple[str, ...]] = {topic: tuple(pool) for topic, pool in _fillers["no_fact_topics"].items()}

# ---------------------------------------------------------------------------------------------
# Rendering templates with exact spans.

_SLOT_RE = re.compile(r"\{([^{}]+)\}")
_PRONOUNS = {  # S, s, P, p, O
    "female": ("She", "she", "Her", "her", "her"),
    "male": ("He", "he", "His", "his", "him"),
    None: ("It", "it", "Its", "its", "it"),
}


@dataclass
class Sentence:
    text: str
    facts: list[tuple[str, str, str, int]]  # (entity, relation, value, start within the sentence)
    mention: str | None = None  # the name form the sentence used for its entity, if any


@lru_cache(maxsize=None)
def _parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """A template as (literal, slot) pieces; the last slot is None."""
    pieces, pos = [], 0
    for m in _SLOT_RE.finditer(template):
        pieces.append((template[pos:m.start()], m[1]))
        pos = m.end()
    pieces.append((template[pos:], None))
    return tuple(pieces)


def _possessive(name: str) -> str:
    return name + "'s"


def _article(word: str) -> str:
    """"a" or "an" by sound: "a university", "an engineer"."""
    w = word.lower()
    if w.startswith(("uni", "use", "eu", "one")):
        return "a"
    return "an" if w[:1] in "aeiou" or w.startswith(("hour", "honor")) else "a"


def render_template(template: str, entity: Entity, mention: str | None = None) -> Sentence:
    """A template filled for ``entity``: the first reference uses ``mention`` (else a pronoun), later ones pronouns.

    Every relation slot becomes a fact with its start offset in the sentence.
    """
    pron = _PRONOUNS[entity.gender]
    out: list[str] = []
    facts: list[tuple[str, str, str, int]] = []
    length = 0
    named = False
    used = None
    for literal, slot in _parse_template(template):
        out.append(literal)
        length += len(literal)
        if slot is None:
            break
        if slot == "N":
            s, named = entity.name, True
        elif slot in ("S", "s", "P", "p", "O"):
            if mention is not None and not named:
                named, used = True, mention
                name = mention[0].upper() + mention[1:] if slot in ("S", "P") else mention
                s = _possessive(name) if slot in ("P", "p") else name
            elif entity.type != "person" and slot in ("s", "O") and not named:
                s, named = "the " + entity.kind, True  # "of the city" reads better than "of it"
            else:
                s = pron["SsPpO".index(slot)]
        elif slot == "is":
            s = "was" if "Death Date" in entity.facts else "is"
        elif slot == "kind":
            s = entity.kind
        elif slot.startswith("a:"):
            target = slot[2:]
            s = _article(entity.kind if target == "kind" else entity.facts[target])
        else:
            s = entity.facts[slot]
            facts.append((entity.name, slot, s, length))
        out.append(s)
        length += len(s)
    return Sentence("".join(out), facts, used)


def _cover(relations: list[str], table: dict[tuple[str, ...], tuple[str, ...]], rng: random.Random) -> list[tuple[str, ...]]:
    """Template keys that together state each relation exactly once (combined keys chosen at random)."""
    remaining = set(relations)
    keys = []
    candidates = [k for k in table if k and set(k) <= remaining]
    while remaining:
        candidates = [k for k in candidates if set(k) <= remaining]
        key = rng.choice(candidates)
        keys.append(key)
        remaining -= set(key)
    return keys


def _name_forms(entity: Entity, text_values: list[str]) -> list[str | None]:
    """How later sentences may refer to the entity: pronoun (None), full name, short form."""
    if entity.type == "person":
        forms: list[str | None] = [None, None, None, None, entity.name]
        if not any(re.search(rf"\b{re.escape(entity.surname)}\b", v) for v in text_values):
            forms.append(entity.surname)  # only when no other name in the document shares the surname
        return forms
    return [None, None, entity.name, "the " + entity.kind]


@dataclass
class Doc:
    kind: str
    category: str
    subject: str | None
    url: str
    sentences: list[Sentence]
    paragraph_breaks: list[int]  # sentence indices that start a new paragraph
    aliases: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # extra metadata labels (reviews: sentiment, domain)


def _with_fillers(fixed: list[Sentence], body: list[Sentence], fillers: tuple[str, ...], rng: random.Random,
                  render_filler=lambda t: Sentence(t, [])) -> list[Sentence]:
    """``fixed`` first, then ``body`` and enough fillers (shuffled together) to keep calls <= the target density."""
    words = sum(len(s.text.split()) for s in fixed + body)
    calls = sum(len(s.facts) for s in fixed + body)
    pool = list(fillers)
    rng.shuffle(pool)
    extra = rng.randint(0, 2)  # a little more prose than strictly needed, so lengths vary
    chosen: list[Sentence] = []
    while pool and (100 * calls > TARGET_CALLS_PER_100_WORDS * words or extra > 0):
        if 100 * calls <= TARGET_CALLS_PER_100_WORDS * words:
            extra -= 1
        s = render_filler(pool.pop())
        chosen.append(s)
        words += len(s.text.split())
    if 100 * calls > TARGET_CALLS_PER_100_WORDS * words:
        raise AssertionError("filler pool too small for the call-density target")  # a vocabulary bug
    rest = body + chosen
    rng.shuffle(rest)
    return fixed + rest


def _paragraph_breaks(n: int, rng: random.Random) -> list[int]:
    breaks, i = [], rng.randint(3, 6)
    while i < n - 1:
        breaks.append(i)
        i += rng.randint(3, 6)
    return breaks


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def biography(person: Entity, rng: random.Random) -> Doc:
    """All of the person's facts: an intro with the full name, then shuffled sentences and fillers."""
    intro_table = INTRO_TEMPLATES["person"]
    intro_key = rng.choice([k for k in intro_table if set(k) <= set(person.facts)])
    intro = render_template(rng.choice(intro_table[intro_key]), person)
    table = TEMPLATES["person"]
    forms = _name_forms(person, list(person.facts.values()))
    body = []
    for key in _cover([r for r in person.facts if r not in intro_key], table, rng):
        body.append(render_template(rng.choice(table[key]), person, rng.choice(forms)))
    sentences = _with_fillers([intro], body, FIELDS[person.category].fillers + PERSON_FILLERS, rng,
                              lambda t: render_template(t, person, rng.choice(forms)))
    used_surname = any(s.mention == person.surname for s in sentences)
    return Doc("biography", person.category, person.name, f"{URL_BASE}/people/{slug(person.name)}",
               sentences, _paragraph_breaks(len(sentences), rng),
               [(person.surname, person.name)] if used_surname else [])


def _mentions(linked: list[Entity], lead_kind: str, exclude: tuple[str, ...], rng: random.Random) -> list[Sentence]:
    """Sentences that name up to MAX_MENTIONS linked entities and restate one or two of their facts."""
    out = []
    for e in rng.sample(linked, min(len(linked), MAX_MENTIONS[lead_kind])):
        table = MENTION_CLAUSES[e.type]
        keys = [k for k in table if not set(k) & set(exclude) and set(k) <= set(e.facts)]
        clause = rng.choice(table[rng.choice(keys)])
        s = render_template(rng.choice(MENTION_LEADS[lead_kind]) + clause + ".", e)
        out.append(s)
    return out


def subject_document(subject: Entity, linked: list[tuple[list[Entity], str, tuple[str, ...]]], rng: random.Random) -> Doc:
    """An organisation or city document: all of the subject's facts, plus mentions of linked entities."""
    intro_table = INTRO_TEMPLATES[subject.type]
    intro_key = rng.choice([k for k in intro_table if set(k) <= set(subject.facts)])
    intro = render_template(rng.choice(intro_table[intro_key]), subject)
    table = TEMPLATES[subject.type]
    forms = _name_forms(subject, [])
    body = [render_template(rng.choice(table[key]), subject, rng.choice(forms))
            for key in _cover([r for r in subject.facts if r not in intro_key], table, rng)]
    for entities, lead_kind, exclude in linked:
        body += _mentions(entities, lead_kind, exclude, rng)
    if subject.type == "city":
        kind, fillers = "city", CITY_FILLERS
        url = f"{URL_BASE}/cities/{slug(subject.name)}"
    else:
        kind, fillers = "organisation", ORGANISATION_FILLERS
        url = f"{URL_BASE}/organisations/{slug(subject.name)}"
    sentences = _with_fillers([intro], body, fillers, rng)
    return Doc(kind, subject.category, subject.name, url, sentences, _paragraph_breaks(len(sentences), rng))


def no_fact_document(index: int, rng: random.Random) -> Doc:
    """General prose on an everyday topic, with no tail facts."""
    topic = rng.choice(sorted(NO_FACT_TOPICS))
    pool = NO_FACT_TOPICS[topic]
    sentences = [Sentence(t, []) for t in rng.sample(pool, rng.randint(5, min(9, len(pool))))]
    return Doc("no_facts", "general", None, f"{URL_BASE}/notes/{topic}-{index}", sentences,
               _paragraph_breaks(len(sentences), rng))


def assemble(doc: Doc) -> tuple[str, list[tuple[int, LookupCall, int]]]:
    """The document's text and its gold calls as (call offset, call, value start)."""
    parts: list[str] = []
    calls: list[tuple[int, LookupCall, int]] = []
    length = 0
    breaks = set(doc.paragraph_breaks)
    for i, s in enumerate(doc.sentences):
        if i:
            sep = "\n\n" if i in breaks else " "
            parts.append(sep)
            length += len(sep)
        for entity, relation, value, start in s.facts:
            calls.append((0, LookupCall(entity, relation, value), length + start))
        parts.append(s.text)
        length += len(s.text)
    text = "".join(parts)
    placed = []
    for _, call, start in calls:
        offset = start
        while offset > 0 and text[offset - 1].isspace():  # before the whitespace that precedes the mention
            offset -= 1
        placed.append((offset, call, start))
    placed.sort(key=lambda c: c[2])
    return text, placed
