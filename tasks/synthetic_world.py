"""The world of the synthetic corpus: fictional people, universities, companies and cities with their facts.

``build_world(config)`` draws it from a seed: people's names and cities from Faker's ``en_US`` tables,
everything else from the vocabulary in ``tasks/data/synthetic/`` (``names.json``, ``fields.json``).
Every name is unique across the world, and no entity's name appears inside one of its own values.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from importlib import resources

from faker import Faker
from faker.providers.person.en_US import Provider as _PersonProvider

from schemas.configs import SyntheticCorpusConfig
from schemas.errors import UserInputError

PERSON_RELATIONS = (
    "Birth Date", "Birth City", "Occupation", "Alma Mater", "Major", "Graduation Year",
    "Employer", "Employer City", "Spouse", "Honor", "Child", "Death Date",
)
UNIVERSITY_RELATIONS = ("Founded Year", "Headquarters City", "President", "Enrollment")
COMPANY_RELATIONS = ("Founded Year", "Headquarters City", "Founder", "Chief Executive", "Industry")
CITY_RELATIONS = ("State", "Country", "Population", "Mayor", "Founded Year")
RELATIONS: tuple[str, ...] = tuple(dict.fromkeys(
    PERSON_RELATIONS + UNIVERSITY_RELATIONS + COMPANY_RELATIONS + CITY_RELATIONS
))
RELATIONS_BY_TYPE = {
    "person": PERSON_RELATIONS, "university": UNIVERSITY_RELATIONS,
    "company": COMPANY_RELATIONS, "city": CITY_RELATIONS,
}

# Biography categories (occupation fields); the class label for class-conditional models.
CATEGORIES = ("science", "arts", "sports", "business", "politics", "medicine", "law", "engineering")


def load_vocabulary(name: str) -> dict:
    """The data file ``tasks/data/synthetic/<name>.json`` (shipped with the package)."""
    file = resources.files("tasks") / "data" / "synthetic" / f"{name}.json"
    return json.loads(file.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Vocabulary. "{Surname}", "{Surname2}", "{Word}" and "{City}" are filled when names are drawn.

@dataclass(frozen=True)
class FieldVocab:
    """What people and organisations of one category are called and do."""

    occupations: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[tuple[str, str, str], ...]  # (name pattern, industry, noun)
    awards: tuple[str, ...]
    fillers: tuple[str, ...]


_names = load_vocabulary("names")
WORDS: tuple[str, ...] = tuple(_names["words"])
UNIVERSITY_PATTERNS = tuple((u["name"], u["noun"]) for u in _names["universities"])  # (name pattern, the noun text uses for it)
FIELDS: dict[str, FieldVocab] = {
    category: FieldVocab(tuple(f["occupations"]), tuple(f["majors"]),
                         tuple((e["name"], e["industry"], e["noun"]) for e in f["employers"]),
                         tuple(f["awards"]), tuple(f["fillers"]))
    for category, f in load_vocabulary("fields")["categories"].items()
}
if tuple(FIELDS) != CATEGORIES:
    raise ValueError(f"tasks/data/synthetic/fields.json: categories {tuple(FIELDS)} are not {CATEGORIES}")


@dataclass
class Entity:
    name: str
    type: str  # person, university, company, city
    category: str
    facts: dict[str, str] = field(default_factory=dict)
    gender: str | None = None  # people only
    surname: str | None = None  # people only
    kind: str | None = None  # organisations: the noun text uses ("university", "law firm", ...)


@dataclass
class World:
    people: list[Entity]
    universities: list[Entity]
    companies: list[Entity]
    cities: list[Entity]

    def entities(self) -> list[Entity]:
        return self.people + self.universities + self.companies + self.cities


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def format_date(d: date) -> str:
    """A date as the corpus writes it: "March 3, 1987"."""
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _weighted(table: dict[str, float]) -> tuple[list[str], list[float]]:
    names, cum, total = [], [], 0.0
    for name, weight in table.items():
        total += weight
        names.append(name)
        cum.append(total)
    return names, cum


# Faker's en_US name tables with their frequencies, drawn with our own rng (Faker's weighted draw is slow)
_FIRST_NAMES = {"female": _weighted(_PersonProvider.first_names_female), "male": _weighted(_PersonProvider.first_names_male)}
_LAST_NAMES = _weighted(_PersonProvider.last_names)


class _Names:
    """Unique names across the whole world (people, organisations, cities, name-valued facts)."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def first_name(self, gender: str) -> str:
        names, cum = _FIRST_NAMES[gender]
        return self.rng.choices(names, cum_weights=cum)[0]

    def last_name(self) -> str:
        return self.rng.choices(_LAST_NAMES[0], cum_weights=_LAST_NAMES[1])[0]

    def claim(self, draw, avoid: str | None = None) -> str:
        """A name from ``draw`` that no one has yet and that does not contain ``avoid``."""
        for _ in range(1000):
            name = draw()
            if name not in self.taken and not (avoid and avoid in name):
                self.taken.add(name)
                return name
        raise UserInputError("synthetic corpus: ran out of unique names; lower n_people or the document counts")

    def person(self, gender: str | None = None, surname: str | None = None, avoid: str | None = None) -> tuple[str, str, str]:
        """(full name, gender, surname) of a new person whose name does not contain ``avoid``."""
        gender = gender or self.rng.choice(("female", "male"))
        parts: list[str] = []

        def draw() -> str:
            parts[:] = [self.first_name(gender), surname or self.last_name()]
            return " ".join(parts)

        name = self.claim(draw, avoid)
        return name, gender, parts[1]

    def pattern(self, choices: tuple, cities: list[str] = ()) -> tuple[str, tuple | str, str | None]:
        """A new name from one of ``choices`` (a pattern, or a tuple that starts with one): (name, choice, city)."""
        drawn: list = [None, None]

        def draw() -> str:  # the pattern is redrawn each try: "{Word} University" alone runs out quickly
            choice = self.rng.choice(choices)
            pattern = choice[0] if isinstance(choice, tuple) else choice
            s1, s2 = self.last_name(), self.last_name()
            while s2 == s1:
                s2 = self.last_name()
            drawn[:] = [choice, self.rng.choice(cities) if cities else None]
            return pattern.format(Surname=s1, Surname2=s2, Word=self.rng.choice(WORDS), City=drawn[1])

        name = self.claim(draw)
        return name, drawn[0], drawn[1]


def random_date(rng: random.Random, start: date, end: date) -> date:
    return start + timedelta(days=rng.randrange((end - start).days + 1))


def build_world(config: SyntheticCorpusConfig) -> World:
    """The seeded world: people with >= 10 facts each, and the universities, companies and cities they link to."""
    rng = random.Random(f"synthetic-bio/{config.seed}")  # str seeds keep negative seeds distinct
    fake = Faker("en_US")
    fake.seed_instance(rng.getrandbits(64))
    names = _Names(rng)
    n = config.n_people

    def city() -> Entity:
        c = Entity(names.claim(fake.city), "city", "geography", kind="city")
        c.facts = {
            "State": fake.state(), "Country": "United States",
            "Population": f"{rng.randint(4_000, 900_000):,}", "Mayor": names.person()[0],
            "Founded Year": str(rng.randint(1700, 1930)),
        }
        return c

    cities = [city() for _ in range(max(config.n_city_docs, 8, math.ceil(n / 15)))]
    city_names = [c.name for c in cities]

    def organisation(type_: str, category: str, patterns: tuple) -> Entity:
        name, choice, hq = names.pattern(patterns, city_names)  # "{City} United" is based in that city
        org = Entity(name, type_, category, kind=choice[-1])
        # founded before the oldest person (born 1930) studied or worked there
        org.facts = {"Founded Year": str(rng.randint(1800, 1945)), "Headquarters City": hq}
        if type_ == "university":
            org.facts["President"] = names.person()[0]
            org.facts["Enrollment"] = f"{rng.randint(1_500, 45_000):,}"
        else:
            org.facts["Founder"] = names.person()[0]
            org.facts["Chief Executive"] = names.person()[0]
            org.facts["Industry"] = choice[1]
        return org

    n_universities = max(2, math.ceil(n / 25))
    companies_per_field = max(2, math.ceil(n / 64), math.ceil((config.n_organisation_docs - n_universities) / len(CATEGORIES)))
    universities = [organisation("university", "education", UNIVERSITY_PATTERNS) for _ in range(n_universities)]
    companies = {cat: [organisation("company", cat, FIELDS[cat].employers) for _ in range(companies_per_field)]
                 for cat in CATEGORIES}
    awards = {cat: [names.pattern(FIELDS[cat].awards)[0]
                    for _ in range(max(3, math.ceil(n / len(CATEGORIES) / 10)))] for cat in CATEGORIES}

    # balanced categories: every block of len(CATEGORIES) people holds each category once
    categories = [c for _ in range(math.ceil(n / len(CATEGORIES))) for c in rng.sample(CATEGORIES, len(CATEGORIES))][:n]
    people = []
    for cat in categories:
        vocab = FIELDS[cat]
        name, gender, surname = names.person()
        p = Entity(name, "person", cat, gender=gender, surname=surname)
        born = random_date(rng, date(1930, 1, 1), date(1998, 12, 31))
        employer = rng.choice(companies[cat])
        p.facts = {
            "Birth Date": format_date(born),
            "Birth City": rng.choice(cities).name,
            "Occupation": rng.choice(vocab.occupations),
            "Alma Mater": rng.choice(universities).name,
            "Major": rng.choice(vocab.majors),
            "Graduation Year": str(born.year + rng.randint(21, 25)),
            "Employer": employer.name,
            "Employer City": employer.facts["Headquarters City"],
            "Spouse": names.person(avoid=name)[0],  # "John Fry" must not marry "John Frye"
            "Honor": rng.choice(awards[cat]),
        }
        if rng.random() < 0.35:
            p.facts["Child"] = names.person(surname=surname, avoid=name)[0]
        if born.year < 1960 and rng.random() < 0.3:
            p.facts["Death Date"] = format_date(random_date(rng, date(born.year + 45, 1, 1), date(2023, 12, 31)))
        people.append(p)
    world = World(people, universities, [c for cat in CATEGORIES for c in companies[cat]], cities)
    for e in world.entities():  # a value that contains its own entity would make distant supervision ambiguous
        for rel, value in e.facts.items():
            if e.name in value:
                raise AssertionError(f"entity inside its own value: {e.name!r} {rel} {value!r}")
    return world
