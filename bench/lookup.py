"""Lookup quality and speed: the reference's flat cosine lookup against the entity-first index.

Quality (same KB, same run): a seeded knowledge base of Faker people and companies (>= 20k keys,
>= 40 relations) and query sets whose right answer is known: exact keys, case/spacing variants,
relation synonyms, name variants (middle name dropped or added), and absent keys (an unseen
entity; a known entity asked for a relation it lacks, by its canonical name and by a synonym).
Each query is scored right (the KB value), wrong fact (another value) or unknown. The synonyms
are never given to the index: it sees the KB only (no alias tables), as a model's novel wording.

Speed: at N keys (default 1M), the first --real-keys (default 100k) "entity relation" key strings
are embedded with all-MiniLM-L6-v2 (bf16 where the CPU has it; cached under bench/out/: on 2
shared cores this runs at 50-300 keys/s, so 1M real keys would take hours); the other N - real
vectors are noisy copies of real ones (see fill_with_neighbours), a harder, less clustered set
than real keys. Queries are real embeddings of synonym, name-variant and absent keys. HNSW and
IVF indexes are timed against exact flat search over the same vectors (real set, then the full
N), faiss on one thread, one query at a time (as a lookup during generation runs) and batched;
top-1 agreement with flat search is given strict (the same vector) and up to ties (a top-1 whose
cosine is within 1e-6 of flat search's), with the share of queries whose flat top-2 are near-exact
ties. Build time and index memory are given too; indexes are cached under bench/out/ with their
build time (built with --build-threads faiss threads, default 1). Then the production lookup at N
keys: the entity-first FuzzyIndex with its default vector index over the N/10 entity names (real
name embeddings): its name search's agreement with flat search over the same name vectors, and
its end-to-end time per lookup with the query's embedding included and excluded.

    .venv/bin/python bench/lookup.py quality [--people 2400 --companies 400]
    .venv/bin/python bench/lookup.py speed [--keys 1000000 --real-keys 100000 --build-threads 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "out"

# Canonical relation -> synonyms a model might write instead. Only the bench knows the synonyms.
PERSON_RELATIONS = {
    "Birth Date": ["Date of Birth", "Born On", "Birthday"],
    "Birth Place": ["Place of Birth", "Born In", "Birthplace"],
    "Death Date": ["Date of Death", "Died On"],
    "Death Place": ["Place of Death", "Died In"],
    "Nationality": ["Citizenship", "Country of Citizenship"],
    "Occupation": ["Profession", "Job"],
    "Employer": ["Works For", "Employed By"],
    "Spouse": ["Married To", "Husband or Wife"],
    "Father": ["Father's Name", "Dad"],
    "Mother": ["Mother's Name", "Mom"],
    "Number of Children": ["Children Count", "How Many Children"],
    "Alma Mater": ["University Attended", "Educated At"],
    "Academic Degree": ["Degree", "Highest Degree"],
    "Height": ["Body Height", "How Tall"],
    "Political Party": ["Party Affiliation", "Party Membership"],
    "Religion": ["Religious Affiliation", "Faith"],
    "Award": ["Prize Received", "Honor Received"],
    "Musical Instrument": ["Instrument Played", "Plays Instrument"],
    "Music Genre": ["Genre", "Style of Music"],
    "Sports Team": ["Team", "Plays For"],
    "Residence": ["Lives In", "Place of Residence"],
    "Email Address": ["Email", "E-mail"],
    "Phone Number": ["Telephone Number", "Telephone"],
    "Blood Type": ["Blood Group"],
    "Hobby": ["Pastime", "Leisure Activity"],
    "Native Language": ["Mother Tongue", "First Language"],
    "Net Worth": ["Wealth", "Personal Fortune"],
    "Eye Color": ["Colour of Eyes", "Eye Colour"],
}
COMPANY_RELATIONS = {
    "Founded Year": ["Year Founded", "Founding Year", "Established In"],
    "Headquarters": ["Headquarters Location", "Head Office", "Based In"],
    "Founder": ["Founded By", "Creator"],
    "Chief Executive Officer": ["CEO", "Chief Executive"],
    "Industry": ["Sector", "Business Sector"],
    "Annual Revenue": ["Revenue", "Yearly Turnover"],
    "Number of Employees": ["Employee Count", "Workforce Size", "Staff Count"],
    "Stock Ticker": ["Ticker Symbol", "Stock Symbol"],
    "Parent Company": ["Owned By", "Parent Organization"],
    "Website": ["Official Website", "Homepage"],
    "Slogan": ["Motto", "Tagline"],
    "Flagship Product": ["Main Product", "Best-Known Product"],
    "Stock Exchange": ["Listed On", "Exchange Listing"],
    "Auditor": ["Audit Firm", "Audited By"],
}
RELATIONS_PER_PERSON = 10
RELATIONS_PER_COMPANY = 8


def person_value(fake, relation: str) -> str:
    """A plausible Faker value for a person's relation."""
    rng = fake.random
    return {
        "Birth Date": lambda: fake.date_of_birth(minimum_age=20, maximum_age=90).strftime("%d %B %Y"),
        "Death Date": lambda: fake.date_between("-30y", "today").strftime("%d %B %Y"),
        "Birth Place": fake.city, "Death Place": fake.city, "Residence": fake.city,
        "Nationality": fake.country, "Occupation": fake.job, "Employer": fake.company,
        "Spouse": fake.name, "Father": fake.name_male, "Mother": fake.name_female,
        "Number of Children": lambda: str(rng.randint(0, 7)),
        "Alma Mater": lambda: f"University of {fake.city()}",
        "Academic Degree": lambda: rng.choice(["BA", "BSc", "MA", "MSc", "PhD", "MBA", "JD", "MD"]),
        "Height": lambda: f"{rng.randint(150, 205)} cm",
        "Political Party": lambda: f"{fake.word().title()} Party",
        "Religion": lambda: rng.choice(["Catholic", "Protestant", "Jewish", "Muslim", "Hindu", "Buddhist", "none"]),
        "Award": lambda: f"{fake.last_name()} Prize",
        "Musical Instrument": lambda: rng.choice(["piano", "violin", "cello", "guitar", "flute", "drums", "oboe"]),
        "Music Genre": lambda: rng.choice(["jazz", "blues", "folk", "rock", "classical", "hip hop", "soul"]),
        "Sports Team": lambda: f"{fake.city()} {fake.word().title()}s",
        "Email Address": fake.email, "Phone Number": fake.phone_number,
        "Blood Type": lambda: rng.choice(["A+", "A-", "B+", "B-", "AB+", "O+", "O-"]),
        "Hobby": lambda: rng.choice(["chess", "sailing", "gardening", "painting", "hiking", "fishing"]),
        "Native Language": fake.language_name,
        "Net Worth": lambda: f"{rng.randint(1, 900)} million dollars",
        "Eye Color": lambda: rng.choice(["blue", "green", "brown", "grey", "hazel"]),
    }[relation]()


def company_value(fake, relation: str) -> str:
    rng = fake.random
    return {
        "Founded Year": lambda: str(rng.randint(1850, 2020)), "Headquarters": fake.city, "Founder": fake.name,
        "Chief Executive Officer": fake.name, "Industry": fake.bs,
        "Annual Revenue": lambda: f"{rng.randint(2, 900)} million dollars",
        "Number of Employees": lambda: str(rng.randint(10, 90000)),
        "Stock Ticker": lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)),
        "Parent Company": fake.company, "Website": fake.url, "Slogan": fake.catch_phrase,
        "Flagship Product": lambda: f"{fake.word().title()} {rng.choice(['One', 'Pro', 'Max', 'X'])}",
        "Stock Exchange": lambda: rng.choice(["NYSE", "NASDAQ", "LSE", "TSX", "Euronext"]),
        "Auditor": fake.company,
    }[relation]()


def build_kb(n_people: int, n_companies: int, seed: int = 0):
    """(facts, people, companies): facts as (entity, relation, value); people as (first, middle, last).

    People are unique by (first, last), so dropping or adding a middle name names exactly one person.
    """
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    people, seen = [], set()
    while len(people) < n_people:
        first, last = fake.first_name(), fake.last_name()
        if (first, last) in seen:
            continue
        seen.add((first, last))
        middle = fake.first_name() if rng.random() < 0.5 else None
        people.append((first, middle, last))
    companies = sorted({fake.company() for _ in range(n_companies * 2)} - {" ".join(p[::2]) for p in people})
    companies = rng.sample(companies, min(n_companies, len(companies)))
    facts = []
    for p in people:
        name = " ".join(x for x in p if x)
        for rel in rng.sample(sorted(PERSON_RELATIONS), RELATIONS_PER_PERSON):
            facts.append((name, rel, person_value(fake, rel)))
    for c in companies:
        for rel in rng.sample(sorted(COMPANY_RELATIONS), RELATIONS_PER_COMPANY):
            facts.append((c, rel, company_value(fake, rel)))
    return facts, people, companies, seen


def unseen_people(n: int, seen_pairs: set, seed: int) -> list[str]:
    """Faker names whose (first, last) pair is not in the KB, half with a middle name."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed + 1)
    rng = random.Random(seed + 1)
    out = []
    while len(out) < n:
        first, last = fake.first_name(), fake.last_name()
        if (first, last) in seen_pairs:
            continue
        out.append(f"{first} {fake.first_name()} {last}" if rng.random() < 0.5 else f"{first} {last}")
    return out


def query_sets(facts, people, companies, seen_pairs, n: int, seed: int = 0) -> dict[str, list[tuple[str, str, str | None]]]:
    """Named query sets of (entity, relation, expected value or None for absent)."""
    rng = random.Random(seed + 2)
    by_entity: dict[str, dict[str, str]] = {}
    for e, r, v in facts:
        by_entity.setdefault(e, {})[r] = v
    person_names = {" ".join(x for x in p if x): p for p in people}
    sample = rng.sample(facts, n)
    synonyms = {**PERSON_RELATIONS, **COMPANY_RELATIONS}
    sets: dict[str, list] = {"exact key": [(e, r, v) for e, r, v in sample]}

    def scramble(s: str) -> str:  # case and spacing only
        words = [w.upper() if rng.random() < 0.3 else w.lower() if rng.random() < 0.5 else w for w in s.split()]
        return "  " * rng.randint(0, 1) + (" " * rng.randint(1, 3)).join(words) + " " * rng.randint(0, 2)

    sets["case/spacing"] = [(scramble(e), scramble(r), v) for e, r, v in sample]
    sets["relation synonym"] = [(e, rng.choice(synonyms[r]), v) for e, r, v in sample]
    dropped, added = [], []
    person_facts = [f for f in facts if f[0] in person_names]
    for e, r, v in rng.sample(person_facts, len(person_facts)):
        first, middle, last = person_names[e]
        if middle and len(dropped) < n:
            dropped.append((f"{first} {last}", r, v))
        elif not middle and len(added) < n:
            added.append((f"{first} {rng.choice(people)[0]} {last}", r, v))
    sets["name: middle dropped"] = dropped
    sets["name: middle added"] = added
    all_rels = sorted(PERSON_RELATIONS), sorted(COMPANY_RELATIONS)
    sets["absent: unseen entity"] = [
        (name, rng.choice(all_rels[0]), None) for name in unseen_people(n, seen_pairs, seed)
    ]
    missing, missing_syn = [], []
    entities = list(by_entity)
    while len(missing) < n:
        e = rng.choice(entities)
        rels = all_rels[0] if e in person_names else all_rels[1]
        r = rng.choice([x for x in rels if x not in by_entity[e]])
        missing.append((e, r, None))
        missing_syn.append((e, rng.choice(synonyms[r]), None))
    sets["absent: missing relation"] = missing
    sets["absent: missing relation (synonym)"] = missing_syn
    return sets


def score(index, queries) -> tuple[float, float, float]:
    """(right, wrong fact, unknown) fractions; right = the KB value, or unknown for an absent key."""
    results = index.lookup_batch([(e, r) for e, r, _ in queries])
    right = wrong = unknown = 0
    for (_, _, expected), res in zip(queries, results):
        if not res.hit:
            unknown += 1
            right += expected is None
        elif res.value == expected:
            right += 1
        else:
            wrong += 1
    n = len(queries)
    return right / n, wrong / n, unknown / n


def bench_quality(args) -> None:
    from models.embed import embed
    from lookup import FuzzyIndex, LookupDatabase, StoredFact

    t0 = time.perf_counter()
    facts, people, companies, seen = build_kb(args.people, args.companies, args.seed)
    sets = query_sets(facts, people, companies, seen, args.queries, args.seed)
    db = LookupDatabase(StoredFact(e, r, v) for e, r, v in facts)
    print(f"KB: {len(db)} keys, {len({f[0] for f in facts})} entities, {len({f[1] for f in facts})} relations; "
          f"{args.queries} queries per set (seed {args.seed})")
    indexes = {
        "reference (flat cosine >= 0.6)": FuzzyIndex(db, embed, mode="flat", threshold=0.6, vector_index="flat"),
        "entity-first (ours)": FuzzyIndex(db, embed, mode="entity-first", vector_index="flat"),
    }
    for name, index in indexes.items():
        t = time.perf_counter()
        index.lookup("x", "y")  # builds: embeds the KB
        print(f"  {name}: built in {time.perf_counter() - t:.1f} s")
    print(f"\n{'query set':38s}" + "".join(f"| {n:^32s}" for n in indexes))
    print(f"{'':38s}" + "| right   wrong fact  unknown        " * len(indexes))
    for set_name, queries in sets.items():
        row = f"{set_name:38s}"
        for index in indexes.values():
            r, w, u = score(index, queries)
            row += f"| {r:6.1%}  {w:9.1%}  {u:8.1%}        "
        print(row)
    print("(right = the KB's value; for the absent sets, right = unknown)")

    print("\nReference approach, threshold sweep (right on present-key sets / unknown on absent sets):")
    flat = indexes["reference (flat cosine >= 0.6)"]
    results = {k: flat.lookup_batch([(e, r) for e, r, _ in q]) for k, q in sets.items()}
    print(f"{'threshold':10s}" + "".join(f"| {k[:18]:18s}" for k in sets))
    for threshold in (0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        row = f"{threshold:<10}"
        for k, q in sets.items():
            ok = [(res.score >= threshold and res.value == exp) if exp is not None else (res.score < threshold)
                  for (_, _, exp), res in zip(q, results[k])]
            row += f"| {np.mean(ok):18.1%}"
        print(row)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")



def cached_vectors(name: str, texts: list[str], chunk: int = 20_000) -> np.ndarray:
    """Embeddings of ``texts`` (float16 on disk under bench/out/, resumable chunk by chunk)."""
    from models.embed import embed

    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, len(texts), chunk)):
        path = folder / f"{k:05d}.npy"
        if not path.exists():
            vecs = embed(texts[start:start + chunk]).astype(np.float16)
            np.save(path.with_suffix(".tmp.npy"), vecs)
            path.with_suffix(".tmp.npy").rename(path)
            done = start + len(vecs)
            print(f"    embedded {done}/{len(texts)} ({done / (time.perf_counter() - t0):.0f}/s this run)", flush=True)
        parts.append(np.load(path))
    vecs = np.concatenate(parts).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def fill_with_neighbours(real: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, float]:
    """``real`` plus n - len(real) vectors made from random real ones with noise, at the cosine that
    separates a real key from its nearest other key (so the fill is as crowded as the real keys)."""
    import faiss

    flat = faiss.IndexFlatIP(real.shape[1])
    flat.add(real)
    rng = np.random.default_rng(seed)
    sample = real[rng.choice(len(real), min(2000, len(real)), replace=False)]
    cos = float(np.median(flat.search(sample, 2)[0][:, 1]))
    sigma = np.sqrt((1 / cos**2 - 1) / real.shape[1])
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    out[:len(real)] = real
    for start in range(len(real), n, 100_000):
        end = min(n, start + 100_000)
        block = real[rng.integers(0, len(real), end - start)] + rng.normal(0, sigma, (end - start, real.shape[1]))
        out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, cos


TIE = 1e-6  # an ANN top-1 whose cosine is this close to flat search's top-1 counts as a tie, not a miss


def _hnsw(data: np.ndarray, m: int, ef_construction: int):
    import faiss

    index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(data)
    return index


def _ivf(data: np.ndarray, nlist: int, seed: int):
    import faiss

    quantizer = faiss.IndexFlatIP(data.shape[1])
    index = faiss.IndexIVFFlat(quantizer, data.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    sample = data[np.random.default_rng(seed).choice(len(data), min(len(data), 50 * nlist), replace=False)]
    index.train(sample)
    index.add(data)
    return index


def cached_index(name: str, data: np.ndarray, build, threads: int):
    """(faiss index, build seconds, MiB on disk = in memory): built once with ``threads`` faiss threads
    and kept under bench/out/ (its build time beside it)."""
    import json

    import faiss

    path, meta = OUT / f"{name}.faiss", OUT / f"{name}.json"
    if not (path.exists() and meta.exists()):
        print(f"    building {name} ({threads} faiss thread(s); cached in bench/out/)", flush=True)
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        index = build(data)
        seconds = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        faiss.write_index(index, str(path))
        meta.write_text(json.dumps({"build_s": seconds, "threads": threads}))
    info = json.loads(meta.read_text())
    return faiss.read_index(str(path)), info["build_s"], info["threads"], path.stat().st_size / 2**20


def exact_top1(data: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, cosines, gaps) of exact flat search: each query's top-1 and its cosine (recomputed in
    float64 among flat search's top 10), and the cosine gap to the runner-up."""
    import faiss

    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    ids = flat.search(queries, 10)[1]
    cos = np.einsum("qd,qkd->qk", queries.astype(np.float64), data[ids].astype(np.float64))
    order = np.argsort(-cos, axis=1)
    cos, ids = np.take_along_axis(cos, order, 1), np.take_along_axis(ids, order, 1)
    return ids[:, 0], cos[:, 0], cos[:, 0] - cos[:, 1]


def agreement(data: np.ndarray, queries: np.ndarray, ids: np.ndarray, truth_ids: np.ndarray,
              truth_cos: np.ndarray) -> tuple[float, float]:
    """(strict, up to ties): the share of queries whose top-1 ``ids`` is flat search's top-1, and the
    share whose top-1 has a cosine (float64) within TIE of flat search's top-1 cosine."""
    cos = np.einsum("qd,qd->q", queries.astype(np.float64), data[np.maximum(ids, 0)].astype(np.float64))
    cos[ids < 0] = -np.inf
    return float(np.mean(ids == truth_ids)), float(np.mean(cos >= truth_cos - TIE))


def ms_per_query(search, queries: np.ndarray, passes: int = 3) -> tuple[float, float, float]:
    """(alone wall, alone CPU, batched wall) milliseconds per query. Alone: each query searched on its
    own (the latency a generation step sees), the fastest of ``passes`` passes, in wall-clock time and
    in this thread's CPU time (what it would take on an idle core: the machine is shared). Batched:
    all queries in one call. The caller sets the faiss threads."""
    search(queries[:1], 1)
    wall, cpu = [], []
    for _ in range(passes):
        t, c = time.perf_counter(), time.thread_time()
        for i in range(len(queries)):
            search(queries[i:i + 1], 1)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    t = time.perf_counter()
    search(queries, 1)
    n = len(queries)
    return min(wall) / n * 1e3, min(cpu) / n * 1e3, (time.perf_counter() - t) / n * 1e3


def ann_configs(n: int, seed: int):
    """(index label, cache name, build function, [(search parameter label, setter)], queries timed
    alone) for n vectors; "*" marks the production default (lookup.fuzzy's HNSW_*)."""
    from lookup.fuzzy import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    def ef(*values, default=False):
        return [(f"efSearch={v}" + ("*" if default and v == HNSW_EF_SEARCH else ""),
                 lambda index, v=v: setattr(index.hnsw, "efSearch", v)) for v in values]

    nlist = 1024 if n <= 200_000 else 4096
    return [
        ("HNSW M=32 efC=80 (session 1)", f"hnsw-{n}-{seed}", lambda d: _hnsw(d, 32, 80), ef(64, 128, 256, 512), 1000),
        (f"HNSW M={HNSW_M} efC={HNSW_EF_CONSTRUCTION}", f"hnsw-M{HNSW_M}-efc{HNSW_EF_CONSTRUCTION}-{n}-{seed}",
         lambda d: _hnsw(d, HNSW_M, HNSW_EF_CONSTRUCTION), ef(32, 64, 96, 128, 160, 192, 256, default=True), 1000),
        (f"IVF-Flat nlist={nlist}", f"ivf{nlist}-{n}-{seed}", lambda d: _ivf(d, nlist, seed),
         [(f"nprobe={v}", lambda index, v=v: setattr(index, "nprobe", v)) for v in (32, 128, 256)], 200),
    ]


def bench_speed(args) -> None:
    import faiss

    from models.embed import cpu_has_bf16, embed
    from lookup import VectorIndex

    n_people = args.keys * 9 // 10 // RELATIONS_PER_PERSON
    n_companies = (args.keys - n_people * RELATIONS_PER_PERSON) // RELATIONS_PER_COMPANY
    t = time.perf_counter()
    facts, people, companies, seen = build_kb(n_people, n_companies, args.seed)
    sets = query_sets(facts, people, companies, seen, args.queries, args.seed)
    print(f"KB: {len(facts)} keys, {n_people + len(companies)} entities ({time.perf_counter() - t:.0f} s); "
          f"embeddings in {'bf16' if cpu_has_bf16() else 'fp32 (no bf16 on this CPU)'}")
    keys = [f"{e} {r}" for e, r, _ in facts]
    real = min(args.real_keys or len(keys), len(keys))
    print(f"embedding {real} key strings (all-MiniLM-L6-v2, cached in bench/out/):", flush=True)
    vectors = cached_vectors(f"keys-{len(keys)}-seed{args.seed}", keys[:real])
    if real < len(keys):
        vectors, cos = fill_with_neighbours(vectors, len(keys), args.seed)
        print(f"  the other {len(keys) - real} vectors: real key vectors plus Gaussian noise, each at cosine "
              f"{cos:.3f} from its parent (the median cosine between a real key and its nearest other key)")
    queries = [f"{e} {r}" for name in ("relation synonym", "name: middle dropped", "absent: unseen entity",
                                      "absent: missing relation") for e, r, _ in sets[name]]
    queries = random.Random(args.seed).sample(queries, min(args.queries, len(queries)))
    q = embed(queries)
    faiss.omp_set_num_threads(1)  # per-query latency on one core, as a lookup inside generation sees it
    print(f"\nVector search: {len(q)} queries (synonym, name-variant and absent keys), faiss on 1 thread; ms/query "
          "alone = each query searched on its own (best of 3 passes; IVF: 200 queries, 1 pass), in wall-clock and "
          "CPU time; batched = all in one call. * = the production default. Top-1 agreement "
          f"with exact flat search over the same vectors: strict = the same vector; up to ties = a top-1 whose "
          f"cosine is within {TIE:g} of flat search's.")
    header = (f"  {'index':30s} {'search':13s} {'build s':>8s} {'MiB':>6s} {'ms alone':>9s} {'CPU ms':>7s}"
              f" {'ms batched':>10s} {'strict':>7s} {'ties':>6s}")
    sets_of_vectors = {f"{real} real key vectors": vectors[:real]}
    if real < len(vectors):
        sets_of_vectors[f"{len(vectors)} vectors ({real} real + noisy copies)"] = vectors
    for label, data in sets_of_vectors.items():
        truth_ids, truth_cos, gaps = exact_top1(data, q)
        print(f"\n{label}: flat top-1 and runner-up within 1e-5 of each other for {np.mean(gaps < 1e-5):.1%} of "
              f"queries, within 1e-3 for {np.mean(gaps < 1e-3):.1%} (median gap {np.median(gaps):.4f})")
        print(header)
        flat = VectorIndex(data.shape[1], "flat")
        flat.add(data)
        alone, cpu, batched = ms_per_query(flat.search, q[:100], passes=1)
        print(f"  {'flat (exact)':30s} {'':13s} {0:8.0f} {data.nbytes / 2**20:6.0f} {alone:9.2f} {cpu:7.2f}"
              f" {batched:10.2f} {1:7.3f} {1:6.3f}", flush=True)
        del flat
        for name, cache, build, knobs, timed in ann_configs(len(data), args.seed):
            index, build_s, threads, mib = cached_index(cache, data, build, args.build_threads)
            for knob, set_knob in knobs:
                set_knob(index)
                strict, ties = agreement(data, q, index.search(q, 1)[1][:, 0], truth_ids, truth_cos)
                alone, cpu, batched = ms_per_query(index.search, q[:timed], passes=3 if timed == len(q) else 1)
                print(f"  {name:30s} {knob:13s} {build_s:8.0f} {mib:6.0f} {alone:9.3f} {cpu:7.3f} {batched:10.3f}"
                      f" {strict:7.3f} {ties:6.3f}", flush=True)
            del index
    del vectors
    bench_entity_first(args, facts, sets)


def hnsw_params(vi) -> str:
    """" M=.. efConstruction=.. efSearch=.." for a VectorIndex's HNSW graph, "" for flat search."""
    h = getattr(vi.index, "hnsw", None)
    return f" M={h.nb_neighbors(1)} efConstruction={h.efConstruction} efSearch={h.efSearch}" if h else ""


def bench_entity_first(args, facts, sets) -> None:
    """The production lookup at the full key count: entity names searched by vector, then relations."""
    import faiss

    from models.embed import embed
    from lookup import FuzzyIndex, LookupDatabase, StoredFact, normalize_key

    print(f"\nEntity-first lookup (production FuzzyIndex, default settings) at {len(facts)} keys:")
    db = LookupDatabase(StoredFact(e, r, v) for e, r, v in facts)
    names = sorted({f[0] for f in facts})
    name_vecs = dict(zip(names, cached_vectors(f"entities-{len(names)}-seed{args.seed}", names)))

    def embed_cached(texts: list[str]) -> np.ndarray:  # the KB's entity names come from the cache
        missing = [x for x in texts if x not in name_vecs]
        fresh = dict(zip(missing, embed(missing))) if missing else {}
        return np.stack([name_vecs[x] if x in name_vecs else fresh[x] for x in texts])

    faiss.omp_set_num_threads(args.build_threads)
    t = time.perf_counter()
    index = FuzzyIndex(db, embed_cached, mode="entity-first")
    index.lookup("x", "y")
    built = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    vi = index.names.index
    print(f"  built in {built:.0f} s with {args.build_threads} faiss thread(s): {vi.kind}{hnsw_params(vi)} over "
          f"{len(vi)} entity names, {vi.nbytes() / 2**20:.0f} MiB")
    # the names a lookup may search by vector: unseen and variant names (exact names never reach it)
    asked = sorted({normalize_key(e) for s in ("absent: unseen entity", "name: middle dropped", "name: middle added")
                    for e, _, _ in sets[s]})
    qv = index.names.query_vectors(asked)
    data = vi.vectors()
    truth_ids, truth_cos, gaps = exact_top1(data, qv)
    print(f"  entity-name vector search, {len(asked)} unseen and name-variant names against the {len(data)} name "
          f"vectors (flat top-1 and runner-up within 1e-5: {np.mean(gaps < 1e-5):.1%}); faiss on 1 thread:")
    hnsw = getattr(vi.index, "hnsw", None)
    default = hnsw.efSearch if hnsw is not None else None
    for ef in (64, 96, 128, 160, 192, 256) if hnsw is not None else (None,):
        if ef is not None:
            hnsw.efSearch = ef
        strict, ties = agreement(data, qv, vi.search(qv, 1)[1][:, 0], truth_ids, truth_cos)
        alone, cpu, batched = ms_per_query(vi.search, qv)
        label = f"efSearch={ef}" + ("*" if ef == default else "") if ef is not None else vi.kind
        print(f"    {label:14s} {alone:6.3f} ms/query alone ({cpu:.3f} CPU), {batched:.3f} batched; top-1 "
              f"agreement with exact flat search: strict {strict:.3f}, up to ties {ties:.3f}", flush=True)
    if hnsw is not None:
        hnsw.efSearch = default
    print("  ms/lookup alone with the query's embedding (empty query caches; first 100 keys of a set), without"
          " it (warm caches), and batched from empty caches:")
    print(f"  {'query set':38s} {'ms alone, embedding included':>29s} {'excluded':>9s} {'batched, incl.':>15s}"
          f" {'right':>7s} {'wrong fact':>10s}")
    caches = (index.names._queries, index.relations._queries)  # the query-embedding caches
    for name, qs in sets.items():
        keys_ = [(e, r) for e, r, _ in qs]
        cold = 0.0
        for key in keys_[:100]:  # the encoder dominates: 100 keys give the figure
            for c in caches:
                c.clear()
            t = time.perf_counter()
            index.lookup(*key)
            cold += time.perf_counter() - t
        index.lookup_batch(keys_)  # every query string embedded: now timed without the encoder
        t = time.perf_counter()
        for key in keys_:
            index.lookup(*key)
        warm = time.perf_counter() - t
        for c in caches:
            c.clear()
        t = time.perf_counter()
        index.lookup_batch(keys_)
        batched = time.perf_counter() - t
        r, w, _ = score(index, qs)
        n = len(keys_)
        print(f"  {name:38s} {cold / min(n, 100) * 1e3:29.2f} {warm / n * 1e3:9.3f} {batched / n * 1e3:15.2f}"
              f" {r:7.1%} {w:10.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--people", type=int, default=2400)
    q.add_argument("--companies", type=int, default=400)
    q.add_argument("--queries", type=int, default=500, help="queries per set")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    s = sub.add_parser("speed")
    s.add_argument("--keys", type=int, default=1_000_000)
    s.add_argument("--queries", type=int, default=1000)
    s.add_argument("--real-keys", type=int, default=100_000,
                   help="key strings embedded for real; the rest of --keys are noisy copies (0: embed all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--build-threads", type=int, default=1,
                   help="faiss threads while building indexes (default 1: the machine is shared)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    {"quality": bench_quality, "speed": bench_speed}[args.what](args)


if __name__ == "__main__":
    main()
