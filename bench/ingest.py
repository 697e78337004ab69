"""Ingestion throughput against two baselines, in one run over the same generated Dolma-style files.

    .venv/bin/python bench/ingest.py                  # 300 MB corpus (a couple of minutes)
    .venv/bin/python bench/ingest.py --size-mb 2000   # the memory check: peak RSS while ingesting 2 GB

Contenders, each in its own subprocess, one after the other:

- ours:    tasks.ingest.ingest_corpus (hashing, dedup, escaping, quarantine and manifest on)
- pyarrow: pyarrow.json.read_json + pq.write_table(compression="zstd"), one file at a time
- duckdb:  COPY (SELECT * FROM read_json('*.jsonl.gz')) TO parquet (COMPRESSION zstd)

Throughput is docs/s and MB/s of uncompressed input (wall clock, and per CPU-second of the contender's
whole process tree), printed with its ratio to pyarrow; with
``--repeat N`` the contenders take turns N times and each one's best round is shown (the others too). Peak memory is
sampled every 20 ms as the summed RSS of the contender's process tree (shared pages count once per
process, so this overstates a multi-process contender) and, per process, the kernel's max RSS.
The corpus files hold a few duplicates, empty texts and literal markup; the malformed JSON and invalid
UTF-8 lines sit in one extra small file that only ours reads, because both baselines abort on them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import orjson

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = ("common-crawl", "c4", "wiki", "books", "stack-exchange")


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "an", "el", "or", "is", "qu", "th", "ber", "st"]
    words = {"".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(60_000)}
    words |= {"café", "Zürich", "naïve", "São", "Ελλάδα", "Москва", "東京", "it’s", "—", "“quoted”"}
    return np.array(sorted(words), dtype=object)


def _sentences(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
    idx = rng.choice(len(vocab), size=n * 16, p=weights / weights.sum())
    lengths = rng.integers(6, 26, size=n)
    out, pos = [], 0
    for length in lengths.tolist():
        words = vocab[idx[pos:pos + length]] if pos + length <= len(idx) else vocab[idx[:length]]
        pos = (pos + length) % (len(idx) - 32)
        out.append(" ".join(words).capitalize() + ".")
    return out


def _write_file(args: tuple) -> tuple[str, int, int]:
    """One gzipped Dolma-style file of about ``target`` uncompressed bytes: (path, bytes, lines)."""
    path, file_index, target, seed = args
    rng = np.random.default_rng(seed + file_index)
    pool = _sentences(seed, 20_000)  # same pool in every file: exact duplicates across files are possible
    lines, size, kept_texts = [], 0, []
    while size < target:
        n = len(lines)
        doc_no = f"{file_index:04d}-{n:07d}"
        roll = rng.random()
        if roll < 0.01 and kept_texts:  # an exact duplicate of an earlier text, under a new id
            text = kept_texts[int(rng.integers(len(kept_texts)))]
        elif roll < 0.0102:
            text = ""
        else:
            picks = rng.integers(0, len(pool), size=max(2, int(rng.lognormal(3.2, 0.7))))
            text = f"Document {doc_no}. " + " ".join(pool[i] for i in picks.tolist())
            if roll > 0.9995:
                text += " It literally says <|db_entity|> X<|db_relationship|> y<|db_return|> z<|db_end|>."
            if len(kept_texts) < 1000:
                kept_texts.append(text)
        record = {
            "id": f"bench-{doc_no}", "text": text, "source": SOURCES[n % len(SOURCES)],
            "added": "2024-01-01T00:00:00.000Z", "created": "2019-06-01T00:00:00.000Z",
            "metadata": {"url": f"https://example.org/{doc_no}", "language": "en",
                         "language_score": round(float(rng.random()), 4), "length": len(text)},
        }
        line = orjson.dumps(record) + b"\n"
        lines.append(line)
        size += len(line)
    data = b"".join(lines)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(data)
    return path, len(data), len(lines)


def generate_corpus(folder: Path, size_mb: int, file_mb: int, seed: int = 0) -> dict:
    """Gzipped Dolma-style files totalling ``size_mb`` uncompressed (reused when already there)."""
    spec = {"size_mb": size_mb, "file_mb": file_mb, "seed": seed, "version": 1}
    done = folder / "_spec.json"
    if done.exists() and json.loads(done.read_text())["spec"] == spec:
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    n_files = max(1, round(size_mb / file_mb))
    jobs = [(str(folder / "data" / f"part-{i:04d}.jsonl.gz"), i, size_mb * 1_000_000 // n_files, seed)
            for i in range(n_files)]
    with ProcessPoolExecutor(2) as pool:
        made = list(pool.map(_write_file, jobs))
    bad = [b'{"id": "bad-1", "text": "cut off', b'{"id": "bad-2", "text": "caf\xe9 latin-1"}', b"[1, 2, 3]",
           b'{"id": "bad-3"}', b'{"id": "bad-4", "text": 42}', b'{"id": "ok-1", "text": "a good line"}']
    (folder / "bad").mkdir()
    with gzip.open(folder / "bad" / "bad.jsonl.gz", "wb") as f:
        f.write(b"\n".join(bad) + b"\n")
    info = {"spec": spec, "files": [m[0] for m in made], "bytes": sum(m[1] for m in made),
            "docs": sum(m[2] for m in made), "compressed_bytes": sum(os.path.getsize(m[0]) for m in made)}
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- contenders (run in a subprocess)


def run_ours(corpus: Path, out: Path, workers: int) -> dict:
    sys.path.insert(0, str(PROJECT))
    from flows.runners import process_pool
    from schemas.configs import IngestConfig
    from tasks.ingest import ingest_corpus

    report = ingest_corpus(IngestConfig(inputs=[str(corpus / "data"), str(corpus / "bad")], output=str(out),
                                        workers=workers), run_id="bench", runner=process_pool(workers))
    return report.model_dump(exclude={"document_shards", "quarantine_shards"})


def run_pyarrow(corpus: Path, out: Path, workers: int) -> dict:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    rows = 0
    for path in sorted((corpus / "data").glob("*.jsonl.gz")):
        table = pj.read_json(path)
        pq.write_table(table, out / (path.name.split(".")[0] + ".parquet"), compression="zstd")
        rows += table.num_rows
    return {"rows": rows}


def run_duckdb(corpus: Path, out: Path, workers: int) -> dict:
    import duckdb

    out.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_json('{corpus / 'data'}/*.jsonl.gz', format='newline_delimited')) "
                f"TO '{out / 'documents.parquet'}' (FORMAT parquet, COMPRESSION zstd)")
    rows = con.execute(f"SELECT count(*) FROM '{out / 'documents.parquet'}'").fetchone()[0]
    return {"rows": rows}


CONTENDERS = {"ours": run_ours, "pyarrow": run_pyarrow, "duckdb": run_duckdb}


# ---------------------------------------------------------------- measuring


def _tree_rss(root: int) -> int:
    """Summed RSS in bytes of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        children = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            pass
    return total


def measure(name: str, corpus: Path, out_root: Path, workers: int) -> dict:
    out = out_root / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, __file__, "--contender", name, "--corpus", str(corpus), "--out", str(out),
           "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    peak, done = [0], threading.Event()

    def sample() -> None:  # never waits on the child: os.wait4 below must reap it to get its rusage
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(proc.stdout.read() or b"{}")
    if proc.returncode:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    output_bytes = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    shutil.rmtree(out, ignore_errors=True)
    return {"name": name, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_tree_rss": peak[0], "max_process_rss": usage.ru_maxrss * 1024,
            "output_bytes": output_bytes, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=300, help="uncompressed corpus size to generate")
    ap.add_argument("--file-mb", type=int, default=100, help="uncompressed size of each corpus file")
    ap.add_argument("--workdir", default="/tmp/lmlm-bench-ingest", help="corpus and outputs go here")
    ap.add_argument("--workers", type=int, default=2, help="ingest worker processes (ours)")
    ap.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (contenders interleaved); the best round counts")
    ap.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:  # inside the measured subprocess
        print(json.dumps(CONTENDERS[args.contender](Path(args.corpus), Path(args.out), args.workers)))
        return

    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    corpus_dir = workdir / f"corpus-{args.size_mb}mb"
    info = generate_corpus(corpus_dir, args.size_mb, args.file_mb)
    mb, docs = info["bytes"] / 1e6, info["docs"]
    print(f"corpus: {len(info['files'])} gzipped JSONL files, {mb:.0f} MB uncompressed "
          f"({info['compressed_bytes'] / 1e6:.0f} MB gz), {docs} docs  [{time.perf_counter() - t0:.0f} s to make "
          f"or find]; {os.cpu_count()} CPUs")
    runs: dict[str, list[dict]] = {}
    for round_no in range(args.repeat):
        for name in args.only or list(CONTENDERS):
            r = measure(name, corpus_dir, workdir / "out", args.workers)
            runs.setdefault(name, []).append(r)
            print(f"  round {round_no + 1}: {name} {r['seconds']:.1f} s", flush=True)
    rows = [min(rs, key=lambda r: r["seconds"]) | {"all": [r["seconds"] for r in rs]} for rs in runs.values()]
    base = next((r for r in rows if r["name"] == "pyarrow"), None)
    print(f"\n{'contender':<9} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'x pyarrow':>9} {'CPU s':>7} "
          f"{'MB/CPU-s':>9} {'x pyarrow':>9} {'peak tree RSS':>14} {'max proc RSS':>13} {'output MB':>10}")
    for r in rows:
        ratio = f"{(base['seconds'] / r['seconds']):.2f}" if base else "-"  # throughput ratios
        cpu_ratio = f"{(base['cpu_seconds'] / r['cpu_seconds']):.2f}" if base else "-"
        print(f"{r['name']:<9} {r['seconds']:>8.1f} {docs / r['seconds']:>9.0f} {mb / r['seconds']:>7.1f} {ratio:>9} "
              f"{r['cpu_seconds']:>7.1f} {mb / r['cpu_seconds']:>9.1f} {cpu_ratio:>9} "
              f"{r['peak_tree_rss'] / 2**20:>10.0f} MiB {r['max_process_rss'] / 2**20:>9.0f} MiB "
              f"{r['output_bytes'] / 1e6:>10.0f}   rounds: {', '.join(f'{x:.1f}' for x in r['all'])} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the machine "
          f"slows every contender; CPU seconds are less sensitive to it than wall seconds)")
    ours = next((r["result"] for r in rows if r["name"] == "ours"), None)
    if ours:
        print(f"\nours: read {ours['docs_read']} = written {ours['docs_written']} + duplicates {ours['duplicates']} "
              f"+ quarantined {ours['quarantined']} {ours['quarantine_reasons']}; its own timer "
              f"{ours['seconds']:.1f} s (the subprocess total adds interpreter start-up)")


if __name__ == "__main__":
    main()
