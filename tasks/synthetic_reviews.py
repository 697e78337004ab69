"""Review documents of the synthetic corpus: opinion-bearing text with a sentiment label (issue 16's attribute data).

Generated only when ``SyntheticCorpusConfig.n_review_docs`` > 0, from an rng of their own, so the corpus of every
config without reviews stays byte-identical. A review (of a restaurant, hotel, book or film in the corpus's world)
opens with one to three neutral sentences, then states its opinion mostly through events and details ("we waited
forty minutes before anyone took our order") rather than one sentiment word, sometimes with a sentence of the other
polarity, and usually closes with a verdict. Its label is ``metadata.sentiment`` (positive or negative); its
category is ``review``. The sentences are in ``tasks/data/synthetic/reviews.json``.
"""

from __future__ import annotations

import random

from tasks.synthetic_documents import URL_BASE, Doc, Sentence, _paragraph_breaks, slug
from tasks.synthetic_world import WORDS, World, _Names, load_vocabulary

REVIEW_KIND = "review"
REVIEW_CATEGORY = "review"
SENTIMENTS = ("positive", "negative")

_vocabulary = load_vocabulary("reviews")
DOMAINS: dict[str, dict] = _vocabulary["domains"]
CONTRAST: dict[str, list[str]] = _vocabulary["contrast"]
WEEKDAYS: tuple[str, ...] = tuple(_vocabulary["weekdays"])


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def review(index: int, world: World, names: _Names, rng: random.Random) -> Doc:
    """One review: neutral opening, opinion body of one polarity (with an occasional contrast sentence and neutral
    remarks), closing verdict. Sentiment alternates with ``index``, so the family is balanced."""
    sentiment = SENTIMENTS[index % 2]
    domain_name = rng.choice(sorted(DOMAINS))
    domain = DOMAINS[domain_name]
    city = rng.choice(world.cities).name
    person = names.person()[0]
    name = names.claim(lambda: rng.choice(domain["names"]).format(
        Surname=names.last_name(), Word=rng.choice(WORDS), city=city))
    slots = {"name": name, "city": city, "person": person, "weekday": rng.choice(WEEKDAYS)}

    def sentence(template: str) -> Sentence:
        return Sentence(_fill(template, {**slots, "item": rng.choice(domain["items"])}), [])

    opening = [sentence(t) for t in rng.sample(domain["openings"], rng.randint(1, 3))]
    body = [sentence(t) for t in rng.sample(domain[sentiment], rng.randint(3, 5))]
    if rng.random() < 0.4:
        body.append(sentence(rng.choice(CONTRAST[sentiment])))
    body += [sentence(t) for t in rng.sample(domain["neutral"], rng.randint(0, 2))]
    rng.shuffle(body)
    closing = [sentence(rng.choice(domain["closing"][sentiment]))] if rng.random() < 0.7 else []
    sentences = opening + body + closing
    doc = Doc(REVIEW_KIND, REVIEW_CATEGORY, name, f"{URL_BASE}/reviews/{slug(name)}-{domain_name}",
              sentences, _paragraph_breaks(len(sentences), rng) if len(sentences) > 7 else [])
    doc.labels = {"sentiment": sentiment, "domain": domain_name}
    return doc


def review_documents(n: int, world: World, seed: int) -> list[Doc]:
    """``n`` reviews (half positive, half negative) about places and works of ``world``; names never clash with
    the world's."""
    rng = random.Random(f"synthetic-reviews/{seed}")
    names = _Names(rng)
    names.taken.update(e.name for e in world.entities())
    return [review(i, world, names, rng) for i in range(n)]
