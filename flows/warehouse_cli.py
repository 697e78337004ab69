"""``lmlm warehouse {stats,sql,export-lookup-db,import-reference-db,edit,alias}``: the DuckDB warehouse from
the command line (the same file the stock ``duckdb`` CLI opens)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from flows.cli_config import DEFAULT_DB
from schemas.errors import UserInputError as UserError


def _print_rows(columns, rows, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=2))
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns)
        for r in rows:
            table.add_row(*("" if v is None else str(v) for v in r))
        Console().print(table)


def _need_db(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"no warehouse at {path}: run `make demo` or `lmlm run`, or pass --db PATH")
    return path


def cmd_wh_stats(args) -> None:
    from warehouse import db

    con = db.connect(_need_db(args.db), read_only=True)
    try:
        print(json.dumps(db.stats(con), indent=2, default=str))
    finally:
        con.close()


def cmd_wh_sql(args) -> None:
    from warehouse import db

    columns, rows = db.run_sql(_need_db(args.db), args.query, args.param or None, write=args.write)
    _print_rows(columns, rows, args.format)


def cmd_wh_export(args) -> None:
    from warehouse import db, lookup_db

    con = db.connect(_need_db(args.db), read_only=True)
    try:
        print(json.dumps(lookup_db.export_lookup_db(con, args.json, args.parquet), indent=2, default=str))
    finally:
        con.close()


def cmd_wh_import(args) -> None:
    import uuid

    from warehouse import db, lookup_db

    if not os.path.exists(args.file):
        raise UserError(f"no such file: {args.file}")
    con = db.connect(args.db)
    try:
        print(json.dumps(lookup_db.import_reference_db(con, args.file, run_id=str(uuid.uuid4())), indent=2, default=str))
    finally:
        con.close()


def cmd_wh_edit(args) -> None:
    from warehouse import db, edits

    if (args.value is None) == (not args.delete):
        raise UserError("give exactly one of --value V (set the fact) or --delete (remove it)")
    con = db.connect(_need_db(args.db))
    try:
        audit_id = edits.edit_fact(con, args.entity, args.relation, None if args.delete else args.value,
                                   reason=args.reason, user=args.user or os.environ.get("USER"))
    finally:
        con.close()
    print(f"edit recorded (audit id {audit_id})")


def cmd_wh_alias(args) -> None:
    from warehouse import db, edits

    con = db.connect(_need_db(args.db))
    try:
        audit_id = edits.set_alias(con, args.kind, args.alias, args.canonical, reason=args.reason,
                                   user=args.user or os.environ.get("USER"))
    finally:
        con.close()
    print(f"{args.kind} alias {args.alias!r} -> {args.canonical!r} recorded as reviewed (audit id {audit_id})")


def add_warehouse_commands(sub) -> None:
    w = sub.add_parser("warehouse", help="inspect and edit the DuckDB warehouse")
    wsub = w.add_subparsers(dest="wcommand", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=DEFAULT_DB, help=f"warehouse file (default {DEFAULT_DB}, or $LMLM_WAREHOUSE)")
    s = wsub.add_parser("stats", parents=[common], help="row counts, relations, runs")
    s.set_defaults(func=cmd_wh_stats)
    q = wsub.add_parser("sql", parents=[common], help="run SQL (read-only unless --write); bind values with ? and --param")
    q.add_argument("query")
    q.add_argument("--param", action="append", help="a value bound to the next ? placeholder (repeatable)")
    q.add_argument("--write", action="store_true", help="open the warehouse for writing")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(func=cmd_wh_sql)
    e = wsub.add_parser("export-lookup-db", parents=[common], help="lookup database: reference JSON and/or Parquet")
    e.add_argument("--json", help="path of the reference-format JSON")
    e.add_argument("--parquet", help="path of the Parquet form")
    e.set_defaults(func=cmd_wh_export)
    im = wsub.add_parser("import-reference-db", parents=[common], help="import a reference-format JSON database")
    im.add_argument("file")
    im.set_defaults(func=cmd_wh_import)
    ed = wsub.add_parser("edit", parents=[common], help="set or delete a fact (audit-logged)")
    ed.add_argument("--entity", required=True)
    ed.add_argument("--relation", required=True)
    ed.add_argument("--value")
    ed.add_argument("--delete", action="store_true")
    ed.add_argument("--reason", required=True)
    ed.add_argument("--user")
    ed.set_defaults(func=cmd_wh_edit)
    al = wsub.add_parser("alias", parents=[common], help="review an alias mapping (wins over corrector proposals)")
    al.add_argument("--kind", choices=["relation", "entity"], required=True)
    al.add_argument("--alias", required=True, help="the name as annotators wrote it")
    al.add_argument("--canonical", required=True, help="the name it means (the alias itself rejects a proposal)")
    al.add_argument("--reason", required=True)
    al.add_argument("--user")
    al.set_defaults(func=cmd_wh_alias)
