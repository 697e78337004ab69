"""CLI of the LMLM flows: ``lmlm generate`` and ``lmlm lmlm {pretrain,evaluate,demo}``. Kept apart from
flows/lmlm.py so that building the parser does not import Prefect (every ``lmlm`` command would pay for it)."""

from __future__ import annotations

import os
import time

from flows.cli_config import DEFAULT_DB, load_config_file, validated
from schemas.errors import UserInputError
from schemas.lmlm_configs import LMLMFlowConfig


def format_comparison(rows: list[dict], variants: list[str]) -> str:
    """The side-by-side table as plain text."""
    width = max([len(r["metric"]) for r in rows] + [6])
    head = f"{'metric':<{width}}  " + "  ".join(f"{v:>10}" for v in variants)
    out = [head, "-" * len(head)]
    for r in rows:
        cells = ("" if r.get(v) is None else f"{r[v]:.3f}" if isinstance(r[v], float) else str(r[v]) for v in variants)
        out.append(f"{r['metric']:<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
    return "\n".join(out)


def _flow_config(args) -> LMLMFlowConfig:
    data = load_config_file(getattr(args, "config", None), LMLMFlowConfig)
    if args.workdir:
        data["workdir"] = args.workdir
    if getattr(args, "out_dir", None):
        data["out_dir"] = args.out_dir
    if getattr(args, "shards", None):
        data["annotated_shards"] = args.shards
    pre = data.setdefault("pretrain", {})
    for key in ("model", "token_budget", "max_steps"):
        if getattr(args, key, None) is not None:
            pre[key] = getattr(args, key)
    if getattr(args, "sequential", False):
        data["parallel"] = False
    ev = data.setdefault("evaluation", {})
    for key in ("lookup_db", "lookup_mode", "bio_people", "cloze_probes", "edit_facts"):
        if getattr(args, key, None) is not None:
            ev[key] = getattr(args, key)
    if getattr(args, "judge_base_url", None):
        ev["judge"] = {"base_url": args.judge_base_url, "model": args.judge_model,
                       "api_key_env": args.judge_key_env}
    from schemas.lmlm_configs import DEMO_PRETRAIN

    data["pretrain"] = {**DEMO_PRETRAIN, **pre}  # what is given goes on top of the demo's defaults
    return validated(LMLMFlowConfig, data)


def cmd_lmlm_pretrain(args) -> None:
    from flows.lmlm import lmlm_pretraining

    report = lmlm_pretraining(_flow_config(args))
    for v, r in report["variants"].items():
        ppl = r["holdout_normalized_perplexity"]
        print(f"{v:<9} {r['parameters']:,} parameters, {r['tokens']:,} tokens in {r['train_seconds']:.0f} s, "
              f"holdout normalized perplexity {'-' if ppl is None else f'{ppl:.3f}'}")
    print(f"checkpoints: {report['out_dir']}")
    print(f"loss curves: {report['loss_curves']}")


def _print_evaluation(report: dict) -> None:
    print()
    print(format_comparison(report["comparison"], list(report["variants"])))
    print(f"\nreport: {report['report']}")


def cmd_lmlm_evaluate(args) -> None:
    from flows.lmlm import lmlm_evaluation

    _print_evaluation(lmlm_evaluation(_flow_config(args)))


def cmd_lmlm_demo(args) -> None:
    from flows.lmlm import lmlm_demo

    t0 = time.perf_counter()
    result = lmlm_demo(_flow_config(args))
    pre = result["pretraining"]
    for v, r in pre["variants"].items():
        print(f"{v:<9} {r['parameters']:,} parameters, {r['tokens']:,} tokens, {r['train_seconds']:.0f} s training")
    print(f"pretraining wall time (both variants): {pre['wall_seconds']:.0f} s")
    _print_evaluation(result["evaluation"])
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")


def cmd_generate(args) -> None:
    from lookup import open_lookup
    from models.embed import embed
    from models.generate import cite, generate
    from models.lmlm import load_lmlm

    prompts = list(args.prompts)
    if args.file:
        try:
            prompts += [ln.rstrip("\n") for ln in open(args.file, encoding="utf-8") if ln.strip()]
        except OSError as exc:
            raise UserInputError(f"--file {args.file}: {exc.strerror}; give a text file with one prompt per line") from None
    if not prompts:
        raise UserInputError("no prompt given; pass prompts as arguments or --file with one prompt per line")
    checkpoint = args.model
    if os.path.isdir(checkpoint) and not os.path.isfile(os.path.join(checkpoint, "config.json")):
        from models.train import latest_checkpoint

        checkpoint = latest_checkpoint(checkpoint) or checkpoint  # a training folder: its newest checkpoint
    model, tokenizer = load_lmlm(checkpoint)
    source = args.lookup_db or args.db
    lookup = None if args.no_lookups else open_lookup(source, args.lookup_mode, tokenizer, embed=embed)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = (tokenizer.eos_token or "") if args.document_start else ""  # a document's opening, as in pretraining
    results = generate(model, tokenizer, [start + p for p in prompts], lookup, max_new_tokens=args.max_new_tokens,
                       show_calls=args.show_calls or args.cite, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        if i:
            print()
        if args.cite:
            print(prompt + cite(r))
        else:
            print(prompt + (r.text if args.show_calls else r.text_without_calls))


def add_lmlm_commands(sub) -> None:
    """``lmlm generate`` and ``lmlm lmlm {pretrain,evaluate,demo}``."""
    g = sub.add_parser("generate", help="generate from an LMLM checkpoint, answering its lookups from the database")
    g.add_argument("prompts", nargs="*", help="prompts (or --file)")
    g.add_argument("--model", required=True, help="checkpoint folder, or a training folder (its newest checkpoint)")
    g.add_argument("--file", help="text file with one prompt per line")
    g.add_argument("--lookup-db", help="lookup database (.parquet or .json from `lmlm warehouse export-lookup-db`)")
    g.add_argument("--db", default=DEFAULT_DB, help=f"warehouse to look up in when --lookup-db is unset (default {DEFAULT_DB})")
    g.add_argument("--lookup-mode", choices=["exact", "fuzzy", "trie"], default="exact",
                   help="exact, fuzzy (all-MiniLM-L6-v2) or trie (only keys in the database can be written)")
    g.add_argument("--no-lookups", action="store_true", help="no database (a standard model, or to see the raw model)")
    g.add_argument("--show-calls", action="store_true", help="print the lookup markup (hidden by default)")
    g.add_argument("--cite", action="store_true", help="mark looked-up values [n] and list their sources")
    g.add_argument("--max-new-tokens", type=int, default=96)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--document-start", action="store_true",
                   help="each prompt opens a document (follows an end-of-text token, as documents do in pretraining)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.set_defaults(func=cmd_generate)

    lm = sub.add_parser("lmlm", help="pretrain and evaluate the LMLM against a standard baseline")
    lsub = lm.add_subparsers(dest="lcommand", required=True)
    common = argparse_parent()
    pt = lsub.add_parser("pretrain", parents=[common], help="pretrain the LMLM and the standard baseline")
    pt.set_defaults(func=cmd_lmlm_pretrain)
    ev = lsub.add_parser("evaluate", parents=[common], help="evaluate both variants side by side")
    ev.set_defaults(func=cmd_lmlm_evaluate)
    dm = lsub.add_parser("demo", parents=[common],
                         help="corpus (when the workdir has none) -> pretrain both tiny models -> evaluate -> table")
    dm.set_defaults(func=cmd_lmlm_demo)


def argparse_parent():
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workdir", help="a workdir `lmlm run` wrote (default out/demo)")
    p.add_argument("--out-dir", help="checkpoints and reports (default <workdir>/lmlm)")
    p.add_argument("--shards", nargs="+", help="annotated shard files/folders/globs (default: the workdir's)")
    p.add_argument("--config", help="JSON/YAML file of LMLMFlowConfig fields")
    p.add_argument("--model", help="model shape or hub name (default tiny)")
    p.add_argument("--token-budget", type=int, help="training tokens per variant")
    p.add_argument("--max-steps", type=int, help="optimizer steps per variant (overrides the token budget)")
    p.add_argument("--sequential", action="store_true", help="train the variants one after the other in this process")
    p.add_argument("--lookup-db", help="lookup database for evaluation (default: the workdir's warehouse)")
    p.add_argument("--lookup-mode", choices=["exact", "fuzzy", "trie"])
    p.add_argument("--bio-people", type=int, help="bios generated per variant")
    p.add_argument("--cloze-probes", type=int, help="cloze probes per variant")
    p.add_argument("--edit-facts", type=int, help="facts edited and deleted")
    p.add_argument("--judge-base-url", help="OpenAI-compatible judge for FActScore, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    return p
