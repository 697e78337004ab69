"""Minimal-pair probes of language competence (BLiMP-style): does a model keep grammar and common knowledge in
its weights while tail facts move to the database?

Each probe is a pair of sentences that differ in one place, one grammatical (or true) and one not; a model
passes it when it gives the good sentence the higher log-probability (the whole sentence, read as a document
opening). Every pair is built from templates over the synthetic corpus's own vocabulary (Faker's en_US names,
the world's cities and universities, the fields' occupations, majors, awards and employers, the everyday prose
of its no-fact documents) with names no document uses, and a pair is dropped when either sentence occurs
verbatim in the training text. Four phenomena make the headline figure:

- subject-verb agreement: "Ada Vance was born in Lake Mira." / "Ada Vance were born in Lake Mira."
- pronoun-antecedent agreement (the possessive agrees with a gendered first name): "Mary Cole received her
  degree in 1987." / "Mary Cole received his degree in 1987."
- punctuation: sentence ends, the commas around an apposition, no comma between subject and verb, a final stop
- common knowledge: the corpus's everyday statements, which no database holds, in a new frame: "It is well known
  that fog is simply a cloud that touches the ground." / "... touches the dishes." (the last word swapped with
  another topic's statement, and the swap mirrored, so preferring some words scores exactly one half)

and field coherence is reported apart: what every person of a field has in common, a field's occupations going
with its majors, awards and employers ("Ada Vance, a chemist, majored in physics." / "..., majored in law.",
mirrored). Those values are tail facts an LMLM looks up, so the pattern across them may move out with them.

Both models read the plain text. An LMLM never saw a fact's value without a lookup call before it, so it also
reads each pair in its own format (``good_markup``: a call before each value, the values left out of the score
as they are left out of its training loss), the analogue of its normalized perplexity with database values.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date

from faker.providers.person.en_US import Provider as _PersonProvider

from schemas.markup import Annotated, LookupCall, PlacedCall, render
from tasks.ground_truth import GroundTruth
from tasks.synthetic_documents import NO_FACT_TOPICS, _article
from tasks.synthetic_world import CATEGORIES, FIELDS, WORDS, format_date, random_date

PHENOMENA = ("subject_verb_agreement", "pronoun_antecedent_agreement", "punctuation", "common_knowledge")
FIELD_COHERENCE = "field_coherence"  # reported apart: its pairs differ in values an LMLM looks up


@dataclass(frozen=True)
class MinimalPair:
    phenomenon: str
    template: str  # which template of the phenomenon built it
    good: str
    bad: str
    good_markup: str  # the same with a lookup call before each fact's value (how an LMLM trained on such text)
    bad_markup: str


class _Vocabulary:
    """What the templates fill in: fresh names, and the world's cities, universities and field vocabulary."""

    def __init__(self, gt: GroundTruth, rng: random.Random):
        self.rng = rng
        female, male = set(_PersonProvider.first_names_female), set(_PersonProvider.first_names_male)
        self.first = {"female": sorted(female - male), "male": sorted(male - female)}
        self.last = sorted(_PersonProvider.last_names)
        self.taken = {e.casefold() for e in gt.facts}  # names of the corpus's entities are not "fresh"
        by_type: dict[str, list[str]] = {}
        for entity, kind in gt.entity_type.items():
            by_type.setdefault(kind, []).append(entity)
        self.cities = sorted(by_type.get("city", [])) or ["Springfield"]
        self.universities = sorted(by_type.get("university", [])) or ["Northfield University"]

    def person(self, gender: str | None = None) -> tuple[str, str]:
        """(a full name no corpus entity has, its gender)."""
        gender = gender or self.rng.choice(("female", "male"))
        while True:
            name = f"{self.rng.choice(self.first[gender])} {self.rng.choice(self.last)}"
            if name.casefold() not in self.taken:
                return name, gender

    def city(self) -> str:
        return self.rng.choice(self.cities)

    def year(self) -> str:
        return str(self.rng.randint(1950, 2015))

    def date(self) -> tuple[str, str, str]:
        """(month, day, year) of a date as the corpus writes it."""
        month, day, year = format_date(random_date(self.rng, _EARLIEST, _LATEST)).replace(",", "").split()
        return month, day, year

    def field_word(self, category: str, what: str) -> str:
        """An occupation, major, award or employer name of ``category``'s field."""
        vocab = FIELDS[category]
        if what == "occupation":
            return self.rng.choice(vocab.occupations)
        if what == "major":
            return self.rng.choice(vocab.majors)
        pattern = self.rng.choice(vocab.awards if what == "award" else [e[0] for e in vocab.employers])
        return pattern.format(Surname=self.rng.choice(self.last), Surname2=self.rng.choice(self.last),
                              Word=self.rng.choice(WORDS), City=self.city())


_EARLIEST, _LATEST = date(1930, 1, 1), date(1998, 12, 31)  # the world's birth dates
_PRONOUNS = {"female": ("She", "she", "her"), "male": ("He", "he", "his")}
_OTHER = {"female": "male", "male": "female"}


# --------------------------------------------------------------------- sentences with their facts


Piece = str | tuple[str, str, str]  # literal text, or (value, entity, relation): a fact an annotator would look up


def _plain(pieces: list[Piece]) -> str:
    return "".join(p if isinstance(p, str) else p[0] for p in pieces)


def _annotated(pieces: list[Piece]) -> str:
    """The sentence as the LMLM trained on such text: a lookup call right before each fact's value mention."""
    text, calls = "", []
    for p in pieces:
        if isinstance(p, str):
            text += p
            continue
        value, entity, relation = p
        offset = len(text) - 1 if text.endswith(" ") else len(text)  # the canonical form: "in<call> Ajaccio"
        calls.append(PlacedCall(offset, LookupCall(entity, relation, value)))
        text += value
    return render(Annotated(text, tuple(calls)))


Template = Callable[[], list[tuple[list[Piece], list[Piece]]]]  # -> (good, bad) pieces, one pair or more


def _agreement(v: _Vocabulary) -> dict[str, Template]:
    def one_subject():
        n, city = v.person()[0], v.city()
        born = [(city, n, "Birth City"), "."]
        return [([n, " was born in ", *born], [n, " were born in ", *born])]

    def two_subjects():
        a, b, city = v.person()[0], v.person()[0], v.city()
        return [([f"{a} and {b} were born in ", (city, a, "Birth City"), "."],
                 [f"{a} and {b} was born in ", (city, a, "Birth City"), "."])]

    def population():
        city, people = v.city(), f"{v.rng.randint(4_000, 900_000):,}"
        return [([city, " has a population of ", (people, city, "Population"), "."],
                 [city, " have a population of ", (people, city, "Population"), "."])]

    def occupation():
        n, job = v.person()[0], v.field_word(v.rng.choice(CATEGORIES), "occupation")
        return [([n, " is an American ", (job, n, "Occupation"), "."], [n, " are an American ", (job, n, "Occupation"), "."])]

    def couple():
        a, b, year = v.person()[0], v.person()[0], v.year()
        return [([f"{a} and {b} were married in {year}."], [f"{a} and {b} was married in {year}."])]

    return {"one subject": one_subject, "two subjects": two_subjects, "population": population,
            "occupation": occupation, "couple": couple}


def _pronouns(v: _Vocabulary) -> dict[str, Template]:
    def pair(before: str, after: str, relation: str, value: Callable[[], str], tail: str = ".") -> Template:
        """"{N} {before with {p}/{s}} VALUE{tail with {p}/{s}}", the pronoun agreeing or not with N's gender."""
        def build():
            name, gender = v.person()
            fact = (value(), name, relation)

            def sentence(g: str) -> list[Piece]:
                s, p = _PRONOUNS[g][1], _PRONOUNS[g][2]
                return [name, before.format(s=s, p=p), fact, after.format(s=s, p=p) + tail]
            return [(sentence(gender), sentence(_OTHER[gender]))]
        return build

    employer = lambda: v.field_word(v.rng.choice(CATEGORIES), "employer")  # noqa: E731
    return {
        "childhood": pair(" spent {p} early childhood in ", "", "Birth City", v.city),
        "studies": pair(" completed {p} studies in ", "", "Graduation Year", v.year),
        "degree": pair(" received {p} degree in ", "", "Graduation Year", v.year),
        "grew up": pair(" grew up in ", ", where {s} was born", "Birth City", v.city),
        "career": pair(" spent most of {p} career at ", "", "Employer", employer),
    }


def _punctuation(v: _Vocabulary) -> dict[str, Template]:
    def sentence_end():
        name, gender = v.person()
        city, uni, she = v.city(), v.rng.choice(v.universities), _PRONOUNS[gender][0]
        born, studied = (city, name, "Birth City"), (uni, name, "Alma Mater")
        return [([name, " was born in ", born, f". {she} studied at ", studied, "."],
                 [name, " was born in ", born, f" {she} studied at ", studied, "."])]

    def subject_comma():
        n, employer = v.person()[0], v.field_word(v.rng.choice(CATEGORIES), "employer")
        return [([n, " worked for ", (employer, n, "Employer"), "."], [n, ", worked for ", (employer, n, "Employer"), "."])]

    def apposition_comma():
        n, (month, day, year) = v.person()[0], v.date()
        job = v.field_word(v.rng.choice(CATEGORIES), "occupation")
        born, works = (f"{month} {day}, {year}", n, "Birth Date"), (job, n, "Occupation")
        return [([n, ", born on ", born, ", is an American ", works, "."],
                 [n, " born on ", born, ", is an American ", works, "."])]

    def final_stop():
        n, uni = v.person()[0], v.rng.choice(v.universities)
        return [([n, " studied at ", (uni, n, "Alma Mater"), "."], [n, " studied at ", (uni, n, "Alma Mater"), ","])]

    return {"sentence end": sentence_end, "subject comma": subject_comma, "apposition comma": apposition_comma,
            "final stop": final_stop}


_FRAMES = ("It is well known that {s}", "As most people know, {s}", "Everyone knows that {s}",
           "It is common knowledge that {s}")


def _common_knowledge(v: _Vocabulary) -> dict[str, Template]:
    """General statements of the corpus's everyday prose (never looked up: no database holds them), true as
    written, false with their last word swapped with another topic's; each swap is mirrored, so a preference for
    some words scores one half. A new opening sentence frames them, so no probe occurs in the training text."""
    statements = {t: [s for s in pool if s.rstrip(".").split()[-1].isalpha()] for t, pool in NO_FACT_TOPICS.items()}

    def build():
        t1, t2 = v.rng.sample(sorted(statements), 2)
        a, b = v.rng.choice(statements[t1]), v.rng.choice(statements[t2])
        head_a, last_a = a.rstrip(".").rsplit(" ", 1)
        head_b, last_b = b.rstrip(".").rsplit(" ", 1)
        frame = v.rng.choice(_FRAMES)

        def framed(head: str, last: str) -> list[Piece]:
            return [frame.format(s=head[0].lower() + head[1:]) + f" {last}."]
        return [(framed(head_a, last_a), framed(head_a, last_b)), (framed(head_b, last_b), framed(head_b, last_a))]

    return {"general statements": build}


def _field_coherence(v: _Vocabulary) -> dict[str, Template]:
    """What every person of a field has in common: a field's occupations go with its majors, awards and
    employers. The values are tail facts an LMLM looks up; the pattern across them is common to the field. Each
    pair has a mirror with the fields swapped, so a preference for some words scores exactly one half."""
    def coherence(verb: str, what: str, relation: str) -> Template:
        def build():
            f, g = v.rng.sample(CATEGORIES, 2)
            words = {c: v.field_word(c, what) for c in (f, g)}
            out = []
            for mine, other in ((f, g), (g, f)):
                name, job = v.person()[0], v.field_word(mine, "occupation")
                lead: list[Piece] = [f"{name}, {_article(job)} ", (job, name, "Occupation"), f", {verb} "]
                out.append(([*lead, (words[mine], name, relation), "."], [*lead, (words[other], name, relation), "."]))
            return out
        return build

    return {"major": coherence("majored in", "major", "Major"), "award": coherence("received the", "award", "Honor"),
            "employer": coherence("worked for", "employer", "Employer")}


_BUILDERS = {"subject_verb_agreement": _agreement, "pronoun_antecedent_agreement": _pronouns,
             "punctuation": _punctuation, "common_knowledge": _common_knowledge, "field_coherence": _field_coherence}


def minimal_pairs(gt: GroundTruth, n_per_phenomenon: int, seed: int, seen: Callable[[str], bool] = lambda s: False,
                  ) -> list[MinimalPair]:
    """``n_per_phenomenon`` pairs of each phenomenon, field coherence included (seeded; templates taken in turn),
    none whose good or bad sentence ``seen`` reports in the training text."""
    rng = random.Random(f"minimal-pairs/{seed}")
    vocab = _Vocabulary(gt, rng)
    pairs = []
    for phenomenon in (*PHENOMENA, FIELD_COHERENCE):
        templates = list(_BUILDERS[phenomenon](vocab).items())
        got, tries, k = 0, 0, 0
        while got < n_per_phenomenon and tries < 50 * n_per_phenomenon:
            name, build = templates[k % len(templates)]
            k, tries = k + 1, tries + 1
            for good, bad in build():
                plain = _plain(good), _plain(bad)
                if got < n_per_phenomenon and not (seen(plain[0]) or seen(plain[1])):
                    pairs.append(MinimalPair(phenomenon, name, *plain, _annotated(good), _annotated(bad)))
                    got += 1
    return pairs


def seen_in(texts: list[str]) -> Callable[[str], bool]:
    """Whether a sentence occurs verbatim in any of ``texts`` (e.g. the training documents' call-free text)."""
    corpus = "\n".join(texts)
    return lambda sentence: sentence in corpus


def score_pairs(pairs: list[MinimalPair], logprob: Callable[[list[str]], list[float]], markup: bool = False) -> list[bool]:
    """For each pair, whether ``logprob`` (texts -> log-probabilities) prefers the good sentence; ``markup``: the
    sentences with their lookup calls (the LMLM's own format) instead of the plain text."""
    texts = [t for p in pairs for t in ((p.good_markup, p.bad_markup) if markup else (p.good, p.bad))]
    scores = logprob(texts)
    return [scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))]


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def minimal_pair_report(gt: GroundTruth, logprob: Callable[[list[str]], list[float]], *, n_per_phenomenon: int,
                        draws: int, seed: int, seen: Callable[[str], bool] = lambda s: False,
                        markup_logprob: Callable[[list[str]], list[float]] | None = None) -> dict:
    """Accuracy (share of pairs where the good sentence scores higher) over ``draws`` independent draws of pairs:
    mean and standard deviation over the draws, over the four phenomena together (``accuracy``) and per phenomenon
    (field coherence reported apart, not in ``accuracy``), and a few pairs of the first draw with the verdict.

    ``logprob`` scores plain text. ``markup_logprob`` (an LMLM: log-probability over the tokens it trains on, the
    looked-up values left out) scores the same pairs in its own format, a lookup call before each fact's value,
    as ``with_lookups``; field coherence is left out there, since its pairs differ only in looked-up values."""
    plain: dict[str, list[float]] = {p: [] for p in ("all", *PHENOMENA, FIELD_COHERENCE)}
    own: dict[str, list[float]] = {p: [] for p in ("all", *PHENOMENA)}
    examples = []
    for d in range(draws):
        pairs = minimal_pairs(gt, n_per_phenomenon, seed * 1000 + d, seen)
        core = [p for p in pairs if p.phenomenon in PHENOMENA]
        for table, ok, scored in ((plain, score_pairs(pairs, logprob), pairs),
                                  *(((own, score_pairs(core, markup_logprob, markup=True), core),) if markup_logprob else ())):
            verdicts = list(zip(scored, ok))
            mine = [o for p, o in verdicts if p.phenomenon in PHENOMENA]
            table["all"].append(sum(mine) / len(mine))
            for phenomenon in table:
                if phenomenon != "all":
                    got = [o for p, o in verdicts if p.phenomenon == phenomenon]
                    table[phenomenon].append(sum(got) / len(got) if got else float("nan"))
            if d == 0 and table is plain:
                examples = [{**asdict(p), "preferred_good": o} for p, o in verdicts[::max(1, n_per_phenomenon // 3)]]
    report = {"pairs_per_draw": n_per_phenomenon * len(PHENOMENA), "draws": draws,
              "accuracy": _spread(plain["all"])["mean"], "accuracy_std": _spread(plain["all"])["std"],
              "by_phenomenon": {p: _spread(v) for p, v in plain.items() if p != "all"}, "examples": examples}
    if markup_logprob is not None:
        report["with_lookups"] = {"accuracy": _spread(own["all"])["mean"], "accuracy_std": _spread(own["all"])["std"],
                                  "by_phenomenon": {p: _spread(v) for p, v in own.items() if p != "all"}}
    return report
