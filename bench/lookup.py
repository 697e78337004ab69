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
N): search time per query, top-1 agreement with flat search, build time, index memory (indexes
are cached under bench/out/ with their build time). The entity-first lookup at N keys (N/10
entities, real name embeddings) is timed end to end, query embedding included.

    .venv/bin/python bench/lookup.py quality [--people 2400 --companies 400]
    .venv/bin/python bench/lookup.py speed [--keys 1000000 --real-keys 100000]
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
    from warehouse.lookup import Fact, FuzzyIndex, LookupDatabase

    t0 = time.perf_counter()
    facts, people, companies, seen = build_kb(args.people, args.companies, args.seed)
    sets = query_sets(facts, people, companies, seen, args.queries, args.seed)
    db = LookupDatabase(Fact(e, r, v) for e, r, v in facts)
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


def _hnsw(data: np.ndarray):
    import faiss

    index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
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


def cached_index(name: str, data: np.ndarray, build):
    """(faiss index, build seconds): built once and kept under bench/out/ (its build time beside it)."""
    import json

    import faiss

    path, meta = OUT / f"{name}.faiss", OUT / f"{name}.json"
    if path.exists() and meta.exists():
        return faiss.read_index(str(path)), json.loads(meta.read_text())["build_s"]
    t = time.perf_counter()
    index = build(data)
    seconds = time.perf_counter() - t
    faiss.write_index(index, str(path))
    meta.write_text(json.dumps({"build_s": seconds, "threads": faiss.omp_get_max_threads()}))
    return index, seconds


def time_per_query(search, queries: np.ndarray, k: int = 1) -> float:
    """Seconds per query, one query at a time (the latency a generation step sees)."""
    search(queries[:1], k)
    t = time.perf_counter()
    for i in range(len(queries)):
        search(queries[i:i + 1], k)
    return (time.perf_counter() - t) / len(queries)


def bench_speed(args) -> None:
    import faiss

    from warehouse.lookup import Fact, FuzzyIndex, LookupDatabase, VectorIndex

    n_people = args.keys * 9 // 10 // RELATIONS_PER_PERSON
    n_companies = (args.keys - n_people * RELATIONS_PER_PERSON) // RELATIONS_PER_COMPANY
    t = time.perf_counter()
    facts, people, companies, seen = build_kb(n_people, n_companies, args.seed)
    sets = query_sets(facts, people, companies, seen, args.queries, args.seed)
    print(f"KB: {len(facts)} keys, {n_people + len(companies)} entities ({time.perf_counter() - t:.0f} s)")
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
    rng = random.Random(args.seed)
    queries = rng.sample(queries, min(args.queries, len(queries)))
    from models.embed import embed

    q = embed(queries)
    print(f"\nVector search, {len(q)} queries (synonym, name-variant and absent keys), one query at a time, "
          f"faiss threads {faiss.omp_get_max_threads()}; top-1 agreement with exact flat search over the same vectors:")
    print(f"  {'vectors':34s} {'index':30s} {'build s':>8s} {'MiB':>6s} {'ms/query':>9s} {'x flat':>7s} {'top-1 agr.':>10s}")
    sets_of_vectors = {f"{real} real key vectors": vectors[:real]}
    if real < len(vectors):
        sets_of_vectors[f"{len(vectors)} ({real} real + noisy copies)"] = vectors
    for label, data in sets_of_vectors.items():
        flat = VectorIndex(data.shape[1], "flat")
        flat.add(data)
        truth = flat.search(q, 1)[1][:, 0]
        t_flat = time_per_query(flat.search, q[:100])
        print(f"  {label:34s} {'flat (exact)':30s} {0:8.1f} {flat.nbytes() / 2**20:6.0f} {t_flat * 1e3:9.2f} {1:7.0f} {1:10.3f}")
        del flat
        hnsw, build = cached_index(f"hnsw-{label.split()[0]}-{args.seed}", data, lambda d: _hnsw(d))
        mem = faiss.serialize_index(hnsw).nbytes
        for ef in (16, 32, 64, 128, 256, 512):
            hnsw.hnsw.efSearch = ef
            agree = float(np.mean(hnsw.search(q, 1)[1][:, 0] == truth))
            per = time_per_query(hnsw.search, q)
            print(f"  {label:34s} {f'HNSW M=32 efC=80 efSearch={ef}':30s} {build:8.1f} {mem / 2**20:6.0f} {per * 1e3:9.3f}"
                  f" {t_flat / per:7.0f} {agree:10.3f}")
        del hnsw
        nlist = 1024 if len(data) <= 200_000 else 4096
        ivf, build = cached_index(f"ivf{nlist}-{label.split()[0]}-{args.seed}", data, lambda d: _ivf(d, nlist, args.seed))
        mem = faiss.serialize_index(ivf).nbytes
        for nprobe in (8, 32, 128):
            ivf.nprobe = nprobe
            agree = float(np.mean(ivf.search(q, 1)[1][:, 0] == truth))
            per = time_per_query(ivf.search, q)
            print(f"  {label:34s} {f'IVF-Flat nlist={nlist} nprobe={nprobe}':30s} {build:8.1f} {mem / 2**20:6.0f}"
                  f" {per * 1e3:9.3f} {t_flat / per:7.0f} {agree:10.3f}")
        del ivf
    del vectors

    print(f"\nEntity-first lookup at {len(facts)} keys (end to end: query embedding + entity and relation resolution):")
    db = LookupDatabase(Fact(e, r, v) for e, r, v in facts)
    names = sorted({f[0] for f in facts})
    name_vecs = dict(zip(names, cached_vectors(f"entities-{len(names)}-seed{args.seed}", names)))

    def embed_cached(texts: list[str]) -> np.ndarray:  # the entity names come from the cache, the rest is embedded
        missing = [x for x in texts if x not in name_vecs]
        fresh = dict(zip(missing, embed(missing))) if missing else {}
        return np.stack([name_vecs[x] if x in name_vecs else fresh[x] for x in texts])

    t = time.perf_counter()
    index = FuzzyIndex(db, embed_cached, mode="entity-first")
    index.lookup("x", "y")
    print(f"  built in {time.perf_counter() - t:.1f} s ({index.names.index.kind} over {len(index.names.names)} entity names)")
    for name, qs in sets.items():
        keys_ = [(e, r) for e, r, _ in qs]
        t = time.perf_counter()
        for key in keys_:
            index.lookup(*key)
        per = (time.perf_counter() - t) / len(keys_)
        index.names._queries.clear(), index.relations._queries.clear()  # batched from a cold query cache
        t = time.perf_counter()
        index.lookup_batch(keys_)
        batched = (time.perf_counter() - t) / len(keys_)
        r, w, u = score(index, qs)
        print(f"  {name:38s} {per * 1e3:7.2f} ms/query alone, {batched * 1e3:6.2f} ms/query batched;"
              f" right {r:6.1%}, wrong fact {w:5.1%}")


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
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    {"quality": bench_quality, "speed": bench_speed}[args.what](args)


if __name__ == "__main__":
    main()
