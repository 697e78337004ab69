"""The corrector: cleans annotated documents before they become seed data or warehouse rows.

Every step can be switched off (:class:`CorrectorConfig`) and reports how many calls it changed and
dropped. In order:

1. ``malformed``: calls whose fields hold line breaks, leftover markup syntax, or no letter or digit.
2. ``unify_relations``: relation names mapped to one vocabulary: rules (case, spacing, punctuation,
   a synonym table) then clusters of all-MiniLM-L6-v2 name embeddings (cosine >= relation_similarity).
3. ``unify_entities``: entity names mapped to one canonical name: spelling variants ("Arsenal_F.C." /
   "Arsenal F.C.") and short forms that name the same thing as a longer name in the same document
   ("Napoleon" -> "Napoleon Bonaparte"), conservatively.
4. ``entity_in_value`` / ``relation_in_value``: the reference's filters (the key leaks the answer).
5. ``future_references``: a call whose entity has not been named before it moves to the next mention of
   its value after the entity's first mention, or is dropped.
6. ``placement``: a call not immediately before its value's mention moves to the nearest mention
   (Levenshtein ratio >= placement_ratio) after the entity is introduced, or is dropped.
7. ``duplicates``: the same call twice at one place.
8. ``density``: documents with more than ``max_calls_per_100_words`` calls are dropped (with reason).
9. ``fluency_rewrite``: an optional ``rewrite(text) -> text`` callable (e.g. an endpoint); the rewrite is
   kept as a new text version with the calls mapped onto it, the original stays.

The text is never altered by steps 1-8: for every kept document, the stripped annotated text equals
the source text. Reviewed overrides (``relation_overrides``, ``entity_overrides``: alias -> name) win
over every computed mapping; the computed mappings come back as tables for review.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import markup
from schemas.configs import CorrectorConfig
from schemas.documents import Document
from schemas.errors import UserInputError
from tasks.align import (
    call_offset,
    entity_mentions,
    exact_mentions,
    first_non_space,
    mention_at,
    reverse_aliases,
    surface_forms,
    value_mentions,
)
from tasks.realign import realign

STEPS = ("malformed", "unify_relations", "unify_entities", "entity_in_value", "relation_in_value",
         "future_references", "placement", "duplicates", "density", "fluency_rewrite")

# Relation synonyms: normalised name -> canonical name. Only unambiguous phrasings.
RELATION_SYNONYMS: dict[str, str] = {}
for _canonical, _names in {
    "Birth Date": ("birth date", "date of birth", "born on", "birthdate", "dob", "birthday", "born"),
    "Birth Place": ("birth place", "birthplace", "place of birth", "born in", "born at"),
    "Birth Year": ("birth year", "year of birth", "year born"),
    "Death Date": ("death date", "date of death", "died on", "died"),
    "Death Place": ("death place", "place of death", "died in", "died at"),
    "Death Year": ("death year", "year of death", "year died"),
    "Cause of Death": ("cause of death", "death cause"),
    "Spouse": ("spouse", "married to", "wife", "husband", "spouse name"),
    "Child": ("child", "children", "kids"),
    "Founder": ("founder", "founded by", "established by"),
    "Founded Year": ("founded year", "founding year", "year founded", "year of founding", "founded in year",
                     "foundation year", "establishment year", "year established", "established year"),
    "Founded Date": ("founded date", "founding date", "foundation date", "establishment date", "date founded",
                     "date established", "established date"),
    "Headquarters": ("headquarters", "headquartered in", "headquarters location", "head office", "hq"),
    "Occupation": ("occupation", "profession", "job"),
    "Nationality": ("nationality", "citizenship"),
    "Alma Mater": ("alma mater", "educated at", "studied at", "university attended"),
    "Employer": ("employer", "employed by", "works for", "worked for"),
    "Population": ("population", "number of inhabitants", "inhabitants"),
    "Capital": ("capital", "capital city"),
    "Location": ("location", "located in", "situated in"),
    "Author": ("author", "written by"),
    "Release Date": ("release date", "released on", "date of release"),
    "Release Year": ("release year", "year of release", "year released"),
    "Nickname": ("nickname", "also known as", "aka"),
    "Award": ("award", "award received", "awards received"),
}.items():
    for _name in _names:
        RELATION_SYNONYMS[_name] = _canonical

# A longer name whose extra words include one of these names something else: "United States Navy" is
# not "United States", "University of Paris" is not "Paris".
_DIFFERENT_THING_WORDS = {
    "of", "university", "college", "school", "academy", "institute", "navy", "army", "air", "force", "river",
    "lake", "mount", "county", "state", "province", "city", "district", "company", "corporation", "party",
    "church", "cathedral", "museum", "department", "ministry", "government", "club", "team", "league", "band",
    "airport", "station", "street", "bridge", "railway", "hospital", "park", "island", "islands", "empire",
    "kingdom", "republic", "dynasty", "family", "house", "award", "prize", "cup", "festival", "war", "battle",
    "treaty", "act", "building", "tower", "hall", "center", "centre", "stadium", "records", "studios", "group",
    "foundation", "council", "committee", "court", "bank", "library", "theatre", "theater", "series", "film",
    "album", "song", "book", "novel", "show", "season", "day", "jr", "sr", "ii", "iii", "iv",
}
_MARKUP_DEBRIS_RE = re.compile(r"dblookup|->|'\)|\('|<\||\|>|[\r\n]")


@dataclass
class Rewrite:
    """A fluency rewrite of a corrected document: a new text version with the calls mapped onto it."""

    document: Document  # same doc_id, rewritten (escaped) text
    annotated: markup.Annotated
    text_version: int
    counts: dict  # realign counts of the calls carried over


@dataclass
class CorrectionResult:
    docs: list[tuple[Document, markup.Annotated]]  # corrected; strip(render(ann)) == doc.text
    dropped_docs: list[tuple[str, str]]  # (doc_id, reason)
    # step -> {"changed": calls changed, "dropped": calls dropped}; density also has "dropped_docs";
    # fluency_rewrite counts documents rewritten ("changed") and calls lost in rewritten text ("dropped")
    counts: dict[str, dict[str, int]]
    relation_aliases: list[dict]  # alias, canonical, source ("rule" | "embedding"), score
    entity_aliases: list[dict]  # alias, canonical, source ("rule"), score
    rewrites: list[Rewrite] = field(default_factory=list)
    rewrite_failures: list[tuple[str, str]] = field(default_factory=list)  # (doc_id, error)


# ---- names ------------------------------------------------------------------------------------


def spelling_key(name: str) -> str:
    """The form the corrector groups names by: case, spacing and punctuation folded away ("Date-of_Birth " ->
    "date of birth"); looser than the lookup key (lookup.normalize_key), which keeps inner punctuation."""
    return " ".join(re.sub(r"[^\w]+|_", " ", name.replace("\\'", "'").casefold()).split())


def _display(spellings: Counter) -> str:
    """The spelling to show for a group: without underscores (a title's URL form), most used, shortest, A-Z."""
    return min(spellings, key=lambda s: ("_" in s, -spellings[s], len(s), s))


# Words that turn a relation into a different one when only one of two names has them: direction
# ("Capital" / "Capital Of"), position ("Bordering Country East"), polarity ("Start" / "End").
_RELATION_CONTRAST_WORDS = {
    "by", "of", "to", "from", "in", "on", "at", "for", "with", "into", "over", "under", "after", "before", "since",
    "until", "between", "against", "than", "per", "via", "within", "without", "not", "non", "no", "pre", "post",
    "start", "end", "begin", "beginning", "first", "last", "final", "initial", "previous", "next", "former",
    "latter", "east", "west", "north", "south", "eastern", "western", "northern", "southern", "upper", "lower",
    "min", "max", "minimum", "maximum", "birth", "death", "born", "died", "increase", "decrease", "gain", "loss",
    "import", "export", "win", "won", "lost", "male", "female", "men", "women", "father", "mother", "son",
    "daughter", "husband", "wife", "predecessor", "successor", "parent", "child", "older", "younger", "high",
    "low", "highest", "lowest", "entry", "exit", "early", "late", "one", "two", "three", "second", "third",
}


def _relation_words(name: str) -> set[str]:
    words = set()
    for w in spelling_key(name).split():
        words.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)  # plural
    return words


def _word_variants(a: str, b: str) -> bool:
    """Two forms of one word: "published" / "publication", "geographic" / "geographical"."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n >= min(5, len(a), len(b)) and n >= 3


def may_merge_relations(a: str, b: str) -> bool:
    """Whether two relation names whose embeddings are close may be one relation: the same words up to
    plurals, order and word forms ("Notable Works" / "Notable Work", "Area Focus" / "Focus Area",
    "Published Year" / "Publication Year"). Names that differ by a word ("Endemic Species Count" /
    "Species Count"), a different word of the same kind ("Primary" / "Secondary", "Latitude" /
    "Longitude"), a number ("Acreage in 2002" / "in 2011") or a direction ("Capital" / "Capital Of")
    stay apart."""
    wa, wb = _relation_words(a), _relation_words(b)
    only_a, only_b = sorted(wa - wb), sorted(wb - wa)
    if len(only_a) != len(only_b) or (set(only_a) | set(only_b)) & _RELATION_CONTRAST_WORDS:
        return False
    if any(any(c.isdigit() for c in w) for w in only_a + only_b):
        return False
    for w in only_a:  # pair every differing word with a form of it in the other name
        partner = next((v for v in only_b if _word_variants(w, v)), None)
        if partner is None:
            return False
        only_b.remove(partner)
    return True


def relation_mapping(relations: Counter, similarity: float, embed=None,
                     overrides: dict[str, str] | None = None) -> tuple[dict[str, str], list[dict]]:
    """Every relation spelling -> its canonical name, and the table of computed (non-identity) mappings.

    Spellings whose normalised form is equal, or listed in :data:`RELATION_SYNONYMS`, share a name
    ("rule"); then each group joins the most similar more frequent group whose name's embedding has
    cosine >= ``similarity`` to its own and that :func:`may_merge_relations` allows ("embedding";
    leader clustering, so no chains). ``overrides`` win.
    """
    overrides = overrides or {}
    groups: dict[str, Counter] = defaultdict(Counter)
    for rel, n in relations.items():
        if rel not in overrides:
            key = spelling_key(rel)
            groups[RELATION_SYNONYMS.get(key, key)][rel] += n
    names = {key: (key if key in RELATION_SYNONYMS.values() else _display(sp)) for key, sp in groups.items()}
    order = sorted(groups, key=lambda k: (-sum(groups[k].values()), names[k]))
    leader_of = {k: k for k in order}
    score_of = {k: 1.0 for k in order}
    if embed is not None and len(order) > 1:
        import numpy as np

        vectors = np.asarray(embed([names[k] for k in order]), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        leaders: list[int] = []
        for i, key in enumerate(order):
            if leaders:
                sims = vectors[leaders] @ vectors[i]
                for j in np.argsort(-sims, kind="stable"):
                    if sims[j] < similarity:
                        break
                    if may_merge_relations(names[order[leaders[j]]], names[key]):
                        leader_of[key], score_of[key] = order[leaders[j]], float(sims[j])
                        break
                if leader_of[key] != key:
                    continue
            leaders.append(i)
    mapping, table = {}, []
    for key, spellings in groups.items():
        canonical = names[leader_of[key]]
        canonical = overrides.get(canonical, canonical)
        for rel in spellings:
            mapping[rel] = canonical
            if rel != canonical:
                by_embedding = leader_of[key] != key
                table.append({"alias": rel, "canonical": canonical, "source": "embedding" if by_embedding else "rule",
                              "score": score_of[key] if by_embedding else 1.0})
    for rel in relations:
        if rel in overrides:
            mapping[rel] = overrides[rel]
    return mapping, sorted(table, key=lambda r: r["alias"])


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(tok in it for tok in short)


_LOWER_WORD_RE = re.compile(r"(?<![\w-])[a-z]+(?![\w-])")
_NAME_PART_RE = re.compile(r"^[A-Z][^\W\d_]*(?:[.'’-][^\W\d_]*)*\.?$")


def short_form_of(short: str, long: str, common_words: set[str] | frozenset = frozenset()) -> bool:
    """``short`` is a conservative short form of ``long``: its words appear in order in ``long``, and
    every extra word is a capitalised name part (no digits) that is neither a word of ``common_words``
    (words the corpus writes in lower case: "arts", "grand") nor one that makes ``long`` name a
    different kind of thing ("Napoleon" / "Napoleon Bonaparte", not "Paris" / "University of Paris",
    "FIFA World Cup" / "1998 FIFA World Cup" or "Melbourne" / "Melbourne Arts Precinct"). Names with
    a qualifier or a possessive ("Agrarian Reform Law (Egypt)", "MCA, Inc.", "Kurt Warner's Arena
    Football") are never long forms."""
    s_words, l_words = short.replace("_", " ").split(), long.replace("_", " ").split()
    s_keys, l_keys = [spelling_key(w) for w in s_words], [spelling_key(w) for w in l_words]
    if not s_keys or len(s_keys) >= len(l_keys) or len(spelling_key(short)) < 3 or re.search(r"[(),:]|['’]s\b", long):
        return False
    if not _is_subsequence(s_keys, l_keys):
        return False
    extra = list(zip(l_words, l_keys))
    for key in s_keys:
        extra.remove(next(x for x in extra if x[1] == key))
    return all(_NAME_PART_RE.match(w) and k not in _DIFFERENT_THING_WORDS and k not in common_words for w, k in extra)


def entity_mapping(docs: list[tuple[str, Counter]], overrides: dict[str, str] | None = None) -> tuple[dict[str, str], list[dict]]:
    """Every entity spelling -> its canonical name, and the table of computed mappings ("rule").

    ``docs`` holds each document's text and the entity names its calls use. Spelling variants (equal once
    case, spacing and punctuation are folded) share the most used spelling. A short form maps to a
    longer name (:func:`short_form_of`, judged against the words the texts write in lower case) that
    the calls of the same document use and its text spells out, only if every document that uses the
    short form offers that same longer name and no other. Every row has score 1.0. ``overrides`` win.
    """
    overrides = overrides or {}
    spellings: dict[str, Counter] = defaultdict(Counter)
    for _, names in docs:
        for ent, n in names.items():
            if ent not in overrides:
                spellings[spelling_key(ent)][ent] += n
    display = {key: _display(sp) for key, sp in spellings.items()}
    common_words = {w for text, _ in docs for w in _LOWER_WORD_RE.findall(text)}
    longer_in: dict[str, Counter] = defaultdict(Counter)
    docs_with: Counter = Counter()
    conflicted: set[str] = set()
    for text, names in docs:
        by_key = {spelling_key(e): e for e in names if e not in overrides}
        for short, short_name in by_key.items():
            docs_with[short] += 1
            longer = {k for k, name in by_key.items() if k != short and short_form_of(short_name, name, common_words)
                      and any(exact_mentions(text, form) for form in surface_forms(name))}
            if len(longer) > 1:
                conflicted.add(short)
            elif longer:
                longer_in[short][longer.pop()] += 1
    canonical_key = {k: k for k in spellings}
    for short, longs in longer_in.items():
        if short not in conflicted and len(longs) == 1:
            (long, n), = longs.items()
            if n == docs_with[short]:  # a short form used anywhere without its long form stays itself
                canonical_key[short] = long
    def root(key: str) -> str:  # a long name may itself be a short form (chains end: names only grow)
        while canonical_key[key] != key:
            key = canonical_key[key]
        return key

    mapping, table = {}, []
    for key, sp in spellings.items():
        canonical = display[root(key)]
        canonical = overrides.get(canonical, canonical)
        for ent in sp:
            mapping[ent] = canonical
            if ent != canonical:
                table.append({"alias": ent, "canonical": canonical, "source": "rule", "score": 1.0})
    for _, names in docs:
        for ent in names:
            if ent in overrides:
                mapping[ent] = overrides[ent]
    return mapping, sorted(table, key=lambda r: r["alias"])


# ---- per-document steps -----------------------------------------------------------------------


def malformed(call: markup.LookupCall) -> bool:
    """Fields with line breaks or leftover markup syntax, or without a letter or digit."""
    return any(_MARKUP_DEBRIS_RE.search(x) or not re.search(r"\w", x) for x in (call.entity, call.relation, call.value))


def _relocate(text: str, pc: markup.PlacedCall, intro_end: int | None, ratio: float) -> int | None:
    """The canonical offset of the value's mention nearest after the call (else nearest before it), and
    after ``intro_end`` when given; None when there is none."""
    start = intro_end or 0
    spans, _ = value_mentions(text, pc.call.value, start, ratio=ratio)
    if not spans:
        return None
    after = [s for s, _ in spans if s >= pc.offset]
    return call_offset(text, after[0] if after else spans[-1][0])


def _intro_end(text: str, entity: str, aliases_of: dict[str, set[str]], cache: dict) -> int | None:
    if entity not in cache:
        spans = entity_mentions(text, surface_forms(entity, aliases_of))
        cache[entity] = spans[0][1] if spans else None
    return cache[entity]


def _value_at(text: str, offset: int, value: str, ratio: float) -> bool:
    anchor = first_non_space(text, offset)
    return call_offset(text, anchor) == offset and mention_at(text, anchor, value, ratio) is not None


def correct(docs: list[tuple[Document, markup.Annotated]], cfg: CorrectorConfig,
            relation_overrides: dict[str, str] | None = None, entity_overrides: dict[str, str] | None = None,
            embed=None, rewrite: Callable[[str], str] | None = None) -> CorrectionResult:
    """Run the enabled steps over annotated documents (see the module docstring).

    ``embed(names) -> vectors`` clusters relation names (default: all-MiniLM-L6-v2, loaded on first use;
    not used when ``cfg.relation_embeddings`` is false). ``rewrite(text) -> text`` is called per kept
    document when ``cfg.fluency_rewrite`` is on; it is required then.
    """
    if cfg.fluency_rewrite and rewrite is None:
        raise UserInputError("corrector.fluency_rewrite is on but no rewrite endpoint was given; "
                             "configure the endpoint or set corrector.fluency_rewrite to false")
    counts = {step: {"changed": 0, "dropped": 0} for step in STEPS}
    for doc, ann in docs:
        if ann.text != doc.text:
            raise ValueError(f"document {doc.doc_id}: annotated text does not strip to the document text")

    # 1. malformed calls
    work: list[tuple[Document, list[markup.PlacedCall]]] = []
    for doc, ann in docs:
        calls = list(ann.calls)
        if cfg.drop_malformed:
            kept = [pc for pc in calls if not malformed(pc.call)]
            counts["malformed"]["dropped"] += len(calls) - len(kept)
            calls = kept
        work.append((doc, calls))

    # 2-3. names: computed over the whole batch, so one spelling maps the same way everywhere
    relation_table: list[dict] = []
    entity_table: list[dict] = []
    rel_map: dict[str, str] = {}
    ent_map: dict[str, str] = {}
    if cfg.unify_relations:
        rels = Counter(pc.call.relation for _, calls in work for pc in calls)
        if cfg.relation_embeddings and embed is None:
            from models.embed import embed  # all-MiniLM-L6-v2, loaded on first use
        embedder = embed if cfg.relation_embeddings else None
        rel_map, relation_table = relation_mapping(rels, cfg.relation_similarity, embedder, relation_overrides)
    elif relation_overrides:
        rel_map = dict(relation_overrides)
    if cfg.unify_entities:
        per_doc = [(doc.text, Counter(pc.call.entity for pc in calls)) for doc, calls in work]
        ent_map, entity_table = entity_mapping(per_doc, entity_overrides)
    elif entity_overrides:
        ent_map = dict(entity_overrides)
    # every name mapped to an entity (computed or reviewed) introduces it in the text
    aliases_of = reverse_aliases({**{a: c for a, c in ent_map.items() if a != c}, **(entity_overrides or {})})

    result_docs: list[tuple[Document, markup.Annotated]] = []
    dropped_docs: list[tuple[str, str]] = []
    ratio = cfg.placement_ratio
    for doc, calls in work:
        text = doc.text
        renamed = []
        for pc in calls:
            call = pc.call
            relation, entity = rel_map.get(call.relation, call.relation), ent_map.get(call.entity, call.entity)
            if relation != call.relation:
                counts["unify_relations"]["changed"] += 1
            if entity != call.entity:
                counts["unify_entities"]["changed"] += 1
            if (relation, entity) != (call.relation, call.entity):
                call = markup.LookupCall(entity, relation, call.value)
            renamed.append(markup.PlacedCall(pc.offset, call))
        calls = renamed

        # 4. the key must not give the answer away
        for step, enabled, field_of in (("entity_in_value", cfg.drop_entity_in_value, lambda c: c.entity),
                                        ("relation_in_value", cfg.drop_relation_in_value, lambda c: c.relation)):
            if enabled:
                kept = [pc for pc in calls if field_of(pc.call).casefold() not in pc.call.value.casefold()]
                counts[step]["dropped"] += len(calls) - len(kept)
                calls = kept

        # 5-6. position: after the entity is named, right before the value's mention
        intro_cache: dict[str, int | None] = {}
        placed = []
        for pc in calls:
            offset = pc.offset
            intro = _intro_end(text, pc.call.entity, aliases_of, intro_cache) if cfg.future_references else None
            if cfg.future_references and (intro is None or intro > offset):
                target = None if intro is None else _relocate(text, pc, intro, ratio)
                if target is None:
                    counts["future_references"]["dropped"] += 1
                    continue
                counts["future_references"]["changed"] += 1
                offset = target
            if cfg.placement and not _value_at(text, offset, pc.call.value, ratio):
                target = _relocate(text, markup.PlacedCall(offset, pc.call), intro, ratio)
                if target is None:
                    counts["placement"]["dropped"] += 1
                    continue
                counts["placement"]["changed"] += 1
                offset = target
            placed.append(markup.PlacedCall(offset, pc.call))

        # 7. the same call twice at one place
        unique = list(dict.fromkeys(placed))
        counts["duplicates"]["dropped"] += len(placed) - len(unique)
        unique.sort(key=lambda c: c.offset)
        ann = markup.Annotated(text, tuple(unique))

        # 8. density
        if cfg.max_calls_per_100_words is not None and markup.calls_per_100_words(ann) > cfg.max_calls_per_100_words:
            counts["density"]["dropped"] += len(ann.calls)
            counts["density"]["dropped_docs"] = counts["density"].get("dropped_docs", 0) + 1
            dropped_docs.append((doc.doc_id, f"density: {markup.calls_per_100_words(ann):.1f} calls per 100 words "
                                              f"> {cfg.max_calls_per_100_words:g}"))
            continue
        result_docs.append((doc, ann))

    result = CorrectionResult(result_docs, dropped_docs, counts, relation_table, entity_table)
    if cfg.fluency_rewrite:
        _rewrite_all(result, rewrite)
    return result


def _rewrite_all(result: CorrectionResult, rewrite: Callable[[str], str]) -> None:
    """Text version 1 of every kept document: ``rewrite`` of its (unescaped) text, escaped again, with
    the calls mapped onto it by :func:`realign` (calls in rewritten stretches are dropped)."""
    counts = result.counts["fluency_rewrite"]
    for doc, ann in result.docs:
        try:
            new_text = rewrite(markup.unescape(doc.text))
        except Exception as exc:  # a failed rewrite keeps the original; it is reported, not fatal
            result.rewrite_failures.append((doc.doc_id, f"{type(exc).__name__}: {exc}"))
            continue
        if not isinstance(new_text, str) or not new_text.strip():
            result.rewrite_failures.append((doc.doc_id, "rewrite returned no text"))
            continue
        new_text = markup.escape(new_text)
        if new_text == doc.text:
            continue
        new_ann, moved = realign(new_text, markup.render(ann))
        counts["changed"] += 1
        counts["dropped"] += len(ann.calls) - len(new_ann.calls)
        result.rewrites.append(Rewrite(doc.model_copy(update={"text": new_text}), new_ann, 1, moved))
