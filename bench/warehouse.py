"""Triplet load rate of the warehouse against a raw DuckDB insert of the same shards.

Writes synthetic TRIPLET_SCHEMA shards, then, best of --repeat rounds, times
  raw:     INSERT INTO t SELECT * FROM read_parquet([...]) into a plain table (no keys, no checks)
  load:    warehouse.db.load_triplets into a fresh warehouse (staged upsert by triplet_id, constraints,
           relation vocabulary, lineage)
  reload:  load_triplets of the same shards again (the idempotent no-op path)
each into its own file and ending with a checkpoint, and prints rows/s and the ratios, by wall
time and by process CPU time (steadier on a shared machine).

    .venv/bin/python bench/warehouse.py --shards 20 --rows 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from schemas.shards import SHARD_COMPRESSION, TRIPLET_SCHEMA, triplet_id  # noqa: E402
from warehouse import db  # noqa: E402

# Shaped like annotator output: ~8 calls per document, 40 relations, repeated entities and values.
SHARD_SQL = """
SELECT sha1(concat_ws(chr(31), doc_id, call_offset::VARCHAR, entity, relation, value, annotator)) AS triplet_id, *
FROM (
    SELECT
        'wiki:' || (i // 8)::VARCHAR AS doc_id,
        'Person ' || ((i // 8) % 50000)::VARCHAR AS entity,
        'relation ' || (i % 40)::VARCHAR AS relation,
        'value ' || (hash(i, $seed) % 200000)::VARCHAR AS value,
        (i % 8) * 120 AS call_offset,
        (i % 8) * 120 + 1 AS value_start,
        (i % 8) * 120 + 1 + (hash(i) % 20)::BIGINT AS value_end,
        'https://en.wikipedia.org/wiki/Doc_' || (i // 8)::VARCHAR AS source_url,
        'bench-annotator' AS annotator,
        '1' AS annotator_version,
        'p1' AS prompt_id,
        'run-bench' AS run_id,
        (hash(i) % 1000 / 1000.0)::FLOAT AS confidence
    FROM range($start, $stop) AS r(i)
)
"""


def write_shards(folder: Path, n_shards: int, rows: int, seed: int) -> list[str]:
    con = duckdb.connect()
    paths = []
    for s in range(n_shards):
        table = con.sql(SHARD_SQL, params={"seed": seed, "start": s * rows, "stop": (s + 1) * rows}).to_arrow_table()
        table = table.select(TRIPLET_SCHEMA.names).cast(TRIPLET_SCHEMA)
        path = folder / f"triplets-{s:05d}.parquet"
        pq.write_table(table, path, compression=SHARD_COMPRESSION)
        paths.append(str(path))
    first = pq.read_table(paths[0]).slice(0, 1).to_pylist()[0]
    expected = triplet_id(first["doc_id"], first["call_offset"], first["entity"], first["relation"],
                          first["value"], first["annotator"])
    assert first["triplet_id"] == expected, "bench shards must use schemas.shards.triplet_id"
    return paths


def remove(path: Path) -> None:
    for p in (path, Path(f"{path}.wal")):
        p.unlink(missing_ok=True)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def time_raw(path: Path, shards: list[str]) -> tuple[float, float]:
    remove(path)
    con = duckdb.connect()
    con.execute(f"ATTACH '{path}' AS w (STORAGE_VERSION '{db.STORAGE_VERSION}')")
    con.execute("USE w")
    con.execute("CREATE TABLE t AS SELECT * FROM read_parquet($1) LIMIT 0", [shards])
    start = clock()
    con.execute("INSERT INTO t SELECT * FROM read_parquet($1)", [shards])
    con.execute("CHECKPOINT")
    elapsed = since(start)
    con.close()
    return elapsed


def time_load(path: Path, shards: list[str]) -> tuple[tuple[float, float], tuple[float, float]]:
    remove(path)
    con = db.connect(path)
    start = clock()
    first = db.load_triplets(con, shards, "bench-load-1")
    load = since(start)
    start = clock()
    again = db.load_triplets(con, shards, "bench-load-2")
    reload = since(start)
    con.close()
    assert first["inserted"] == first["rows"] and again["unchanged"] == again["rows"]
    return load, reload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rows", type=int, default=100_000, help="triplets per shard")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best time of each method counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where shards and files go (default: a temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-warehouse-") as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        shards = write_shards(folder, args.shards, args.rows, args.seed)
        n = args.shards * args.rows
        size = sum(os.path.getsize(p) for p in shards)
        print(f"{args.shards} shards x {args.rows:,} triplets = {n:,} rows, {size / 2**20:.1f} MiB zstd Parquet; "
              f"duckdb {duckdb.__version__}, {os.cpu_count()} CPUs, best of {args.repeat}")
        raw, load, reload = [], [], []
        for _ in range(args.repeat):  # interleaved, so drift in the machine hits all methods alike
            raw.append(time_raw(folder / "raw.duckdb", shards))
            first, again = time_load(folder / "warehouse.duckdb", shards)
            load.append(first)
            reload.append(again)
        for label, times in (("raw INSERT ... SELECT * FROM read_parquet", raw),
                             ("load_triplets, fresh warehouse", load),
                             ("load_triplets, same shards again", reload)):
            wall, cpu = min(t[0] for t in times), min(t[1] for t in times)
            print(f"{label:42s} {n / wall:12,.0f} rows/s ({wall:6.2f} s wall, {cpu:6.2f} s CPU)")
        for label, times in (("load / raw", load), ("reload / raw", reload)):
            wall = min(t[0] for t in raw) / min(t[0] for t in times)
            cpu = min(t[1] for t in raw) / min(t[1] for t in times)
            print(f"ratio {label:13s} {wall:.2f} by wall time, {cpu:.2f} by CPU time")

if __name__ == "__main__":
    main()
