"""Minimal-pair probes of language competence (BLiMP-style): does a model keep grammar and common knowledge in
its weights while tail facts move to the database?

Each probe is a pair of sentences that differ in one place, one grammatical (or true) and one not; a model
passes it when it gives the good sentence the higher log-probability (whole sentence, read as a document
opening, no lookup calls: the LMLM is scored on plain text like the standard model). Four phenomena, every
pair built from templates over the synthetic corpus's own vocabulary (Faker's en_US names, the world's cities
and universities, the fields' occupations, majors, awards and employers) with names no document uses, and a
pair is dropped when either sentence occurs verbatim in the training text:

- subject-verb agreement: "Ada Vance was born in Lake Mira." / "Ada Vance were born in Lake Mira."
- pronoun-antecedent agreement (the possessive agrees with a gendered first name): "Mary Cole received her
  degree in 1987." / "Mary Cole received his degree in 1987."
- punctuation: sentence ends, commas in dates, no comma between subject and verb
- common knowledge: what holds for every person of the world rather than for one (a field's occupations go with
  its majors, awards and employers): "Ada Vance, a chemist, majored in physics." / "..., majored in law." Each
  such pair has a mirror with the fields swapped, so preferring the more frequent word scores exactly half.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date

from faker.providers.person.en_US import Provider as _PersonProvider

from tasks.ground_truth import GroundTruth
from tasks.synthetic_documents import _article
from tasks.synthetic_world import CATEGORIES, FIELDS, WORDS, format_date, random_date

PHENOMENA = ("subject_verb_agreement", "pronoun_antecedent_agreement", "punctuation", "common_knowledge")


@dataclass(frozen=True)
class MinimalPair:
    phenomenon: str
    template: str  # which template of the phenomenon built it
    good: str
    bad: str


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


# --------------------------------------------------------------------- templates: each returns (good, bad) pairs


def _agreement(v: _Vocabulary) -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def one_subject():
        n, city = v.person()[0], v.city()
        return [(f"{n} was born in {city}.", f"{n} were born in {city}.")]

    def two_subjects():
        a, b = v.person()[0], v.person()[0]
        city = v.city()
        return [(f"{a} and {b} were born in {city}.", f"{a} and {b} was born in {city}.")]

    def population():
        city, people = v.city(), f"{v.rng.randint(4_000, 900_000):,}"
        return [(f"{city} has a population of {people}.", f"{city} have a population of {people}.")]

    def occupation():
        n, job = v.person()[0], v.field_word(v.rng.choice(CATEGORIES), "occupation")
        return [(f"{n} is an American {job}.", f"{n} are an American {job}.")]

    def couple():
        a, b, year = v.person()[0], v.person()[0], v.year()
        return [(f"{a} and {b} were married in {year}.", f"{a} and {b} was married in {year}.")]

    return {"one subject": one_subject, "two subjects": two_subjects, "population": population,
            "occupation": occupation, "couple": couple}


def _pronouns(v: _Vocabulary) -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def pair(sentence: str) -> Callable[[], list[tuple[str, str]]]:
        def build():
            name, gender = v.person()
            fill = dict(N=name, city=v.city(), year=v.year(), employer=v.field_word(v.rng.choice(CATEGORIES), "employer"))
            good = sentence.format(s=_PRONOUNS[gender][1], p=_PRONOUNS[gender][2], **fill)
            bad = sentence.format(s=_PRONOUNS[_OTHER[gender]][1], p=_PRONOUNS[_OTHER[gender]][2], **fill)
            return [(good, bad)]
        return build

    return {
        "childhood": pair("{N} spent {p} early childhood in {city}."),
        "studies": pair("{N} completed {p} studies in {year}."),
        "degree": pair("{N} received {p} degree in {year}."),
        "grew up": pair("{N} grew up in {city}, where {s} was born."),
        "career": pair("{N} spent most of {p} career at {employer}."),
    }


def _punctuation(v: _Vocabulary) -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def sentence_end():
        name, gender = v.person()
        city, uni, she = v.city(), v.rng.choice(v.universities), _PRONOUNS[gender][0]
        return [(f"{name} was born in {city}. {she} studied at {uni}.", f"{name} was born in {city} {she} studied at {uni}.")]

    def subject_comma():
        n, employer = v.person()[0], v.field_word(v.rng.choice(CATEGORIES), "employer")
        return [(f"{n} worked for {employer}.", f"{n}, worked for {employer}.")]

    def date_comma():
        n, (month, day, year) = v.person()[0], v.date()
        return [(f"{n} was born on {month} {day}, {year}.", f"{n} was born on {month}, {day} {year}.")]

    def final_stop():
        n, uni = v.person()[0], v.rng.choice(v.universities)
        return [(f"{n} studied at {uni}.", f"{n} studied at {uni},")]

    return {"sentence end": sentence_end, "subject comma": subject_comma, "date comma": date_comma,
            "final stop": final_stop}


def _common_knowledge(v: _Vocabulary) -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def coherence(verb: str, what: str) -> Callable[[], list[tuple[str, str]]]:
        def build():
            f, g = v.rng.sample(CATEGORIES, 2)
            words = {c: v.field_word(c, what) for c in (f, g)}
            out = []
            for mine, other in ((f, g), (g, f)):  # the mirror: each word is once right and once wrong
                name, job = v.person()[0], v.field_word(mine, "occupation")
                lead = f"{name}, {_article(job)} {job}, {verb}"
                out.append((f"{lead} {words[mine]}.", f"{lead} {words[other]}."))
            return out
        return build

    return {"major": coherence("majored in", "major"), "award": coherence("received the", "award"),
            "employer": coherence("worked for", "employer")}


_BUILDERS = {"subject_verb_agreement": _agreement, "pronoun_antecedent_agreement": _pronouns,
             "punctuation": _punctuation, "common_knowledge": _common_knowledge}


def minimal_pairs(gt: GroundTruth, n_per_phenomenon: int, seed: int, seen: Callable[[str], bool] = lambda s: False,
                  ) -> list[MinimalPair]:
    """``n_per_phenomenon`` pairs of each phenomenon (seeded; templates taken in turn), none whose good or bad
    sentence ``seen`` reports in the training text."""
    rng = random.Random(f"minimal-pairs/{seed}")
    vocab = _Vocabulary(gt, rng)
    pairs = []
    for phenomenon in PHENOMENA:
        templates = list(_BUILDERS[phenomenon](vocab).items())
        got, tries, k = 0, 0, 0
        while got < n_per_phenomenon and tries < 50 * n_per_phenomenon:
            name, build = templates[k % len(templates)]
            k, tries = k + 1, tries + 1
            for good, bad in build():
                if got < n_per_phenomenon and not (seen(good) or seen(bad)):
                    pairs.append(MinimalPair(phenomenon, name, good, bad))
                    got += 1
    return pairs


def seen_in(texts: list[str]) -> Callable[[str], bool]:
    """Whether a sentence occurs verbatim in any of ``texts`` (e.g. the training documents' call-free text)."""
    corpus = "\n".join(texts)
    return lambda sentence: sentence in corpus


def score_pairs(pairs: list[MinimalPair], logprob: Callable[[list[str]], list[float]]) -> list[bool]:
    """For each pair, whether ``logprob`` (texts -> log-probabilities) prefers the good sentence."""
    scores = logprob([t for p in pairs for t in (p.good, p.bad)])
    return [scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))]


def minimal_pair_report(gt: GroundTruth, logprob: Callable[[list[str]], list[float]], *, n_per_phenomenon: int,
                        draws: int, seed: int, seen: Callable[[str], bool] = lambda s: False) -> dict:
    """Accuracy (share of pairs where the good sentence scores higher) over ``draws`` independent draws of pairs:
    mean and standard deviation over the draws, overall and per phenomenon, and a few pairs of the first draw
    with the verdict."""
    overall: list[float] = []
    per: dict[str, list[float]] = {p: [] for p in PHENOMENA}
    examples = []
    for d in range(draws):
        pairs = minimal_pairs(gt, n_per_phenomenon, seed * 1000 + d, seen)
        ok = score_pairs(pairs, logprob)
        overall.append(sum(ok) / len(ok) if ok else float("nan"))
        for phenomenon in PHENOMENA:
            mine = [o for p, o in zip(pairs, ok) if p.phenomenon == phenomenon]
            per[phenomenon].append(sum(mine) / len(mine) if mine else float("nan"))
        if d == 0:
            examples = [{**asdict(p), "preferred_good": o} for p, o in list(zip(pairs, ok))[::max(1, n_per_phenomenon // 3)]]

    def spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {"pairs_per_draw": n_per_phenomenon * len(PHENOMENA), "draws": draws, "accuracy": spread(overall)["mean"],
            "accuracy_std": spread(overall)["std"], "by_phenomenon": {p: spread(v) for p, v in per.items()},
            "examples": examples}
