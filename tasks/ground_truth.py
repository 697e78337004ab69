"""The synthetic corpus's ground truth as the evaluations read it: the value of every (entity, relation),
the people and their biographies, and the short names text uses for them (``tasks.synthetic`` writes it)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from lookup import normalize_key
from schemas.errors import UserInputError


@dataclass
class GroundTruth:
    """The synthetic world's facts: value per (entity, relation), people, and the short names text uses."""

    facts: dict[str, dict[str, str]]  # entity -> relation -> value
    entity_type: dict[str, str]
    people: list[tuple[str, str]]  # (entity, biography doc_id), in ground-truth order
    aliases: dict[str, str]  # normalised alias -> entity
    _by_key: dict[str, str] = field(default_factory=dict, repr=False)  # normalised name -> entity

    def __post_init__(self) -> None:
        self._by_key = {normalize_key(e): e for e in self.facts}

    def resolve(self, name: str) -> str | None:
        """The ground-truth entity a name (full name or alias) refers to, if any."""
        key = normalize_key(name)
        return self._by_key.get(key) or self.aliases.get(key)

    def value(self, entity: str, relation: str) -> str | None:
        rels = self.facts.get(entity, {})
        want = normalize_key(relation)
        return next((v for r, v in rels.items() if normalize_key(r) == want), None)


def load_ground_truth(folder: str) -> GroundTruth:
    """The ground truth ``tasks.synthetic.generate_corpus`` wrote (kb, people, aliases parquet files)."""
    import pyarrow.parquet as pq

    paths = {name: os.path.join(folder, f"{name}.parquet") for name in ("kb", "people", "aliases")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserInputError(f"ground truth {folder}: no {', '.join(os.path.basename(p) for p in missing)}; point "
                             "evaluation.ground_truth at the synthetic/ground_truth folder `lmlm run` wrote")
    facts: dict[str, dict[str, str]] = {}
    types: dict[str, str] = {}
    for row in pq.read_table(paths["kb"]).to_pylist():
        facts.setdefault(row["entity"], {})[row["relation"]] = row["value"]
        types[row["entity"]] = row["entity_type"]
    people = [(r["entity"], r["biography_doc_id"]) for r in pq.read_table(paths["people"]).to_pylist()]
    aliases = {normalize_key(r["alias"]): r["entity"] for r in pq.read_table(paths["aliases"]).to_pylist()}
    return GroundTruth(facts, types, people, aliases)


def sample_people(gt: GroundTruth, n: int, seed: int, exclude_doc=lambda doc_id: False) -> list[str]:
    """``n`` people (seeded), skipping those whose biography ``exclude_doc`` rejects (e.g. held out of training)."""
    pool = [p for p, doc in gt.people if not exclude_doc(doc)]
    return random.Random(f"people/{seed}").sample(pool, min(n, len(pool)))
