"""The ``lmlm`` command line: run the pipeline, ingest, and work with the warehouse."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from flows.cli_config import load_config_file, validated, with_overrides  # noqa: E402
from flows.diffusion_cli import add_diffusion_commands  # noqa: E402
from flows.guided_cli import add_guided_commands  # noqa: E402
from flows.star_cli import add_star_commands  # noqa: E402
from flows.lmlm_cli import add_lmlm_commands  # noqa: E402
from flows.warehouse_cli import add_warehouse_commands  # noqa: E402
from schemas.errors import UserInputError as UserError  # noqa: E402


def synthetic_config_for_docs(n_docs: int, seed: int = 0):
    """A synthetic corpus of about ``n_docs`` documents: 80% biographies, the rest organisations, cities, no-fact."""
    from schemas.configs import SyntheticCorpusConfig

    people = max(1, round(n_docs * 0.8))
    orgs, cities = round(n_docs * 0.1), round(n_docs * 0.05)
    return SyntheticCorpusConfig(n_people=people, n_organisation_docs=orgs, n_city_docs=cities,
                                 n_no_fact_docs=max(0, n_docs - people - orgs - cities), seed=seed)


def corpus_config(args, pipeline: bool = False):
    """The corpus flow's config from ``--config`` and the flags (``pipeline``: with the small-annotator stages),
    validated and preflighted: a mistake ends here, before any work or output."""
    from flows.preflight import check_corpus_run, require
    from schemas.configs import CorpusFlowConfig

    data = with_overrides(load_config_file(args.config, CorpusFlowConfig), {
        "workdir": args.workdir or None, "corpus": args.corpus or None,
        "synthetic": synthetic_config_for_docs(args.docs, args.seed).model_dump() if args.docs else None,
        "validation.enabled": False if args.no_validate else None})
    if pipeline:
        small = data.get("small_annotator") if isinstance(data.get("small_annotator"), dict) else {}
        data["small_annotator"] = small
        small["enabled"] = True
        if args.finetune_budget_s:
            finetune = small.setdefault("finetune", {})
            if isinstance(finetune, dict):
                finetune.setdefault("time_budget_s", args.finetune_budget_s)
        if args.seed_docs:
            small["seed_docs"] = args.seed_docs
        if getattr(args, "below_min_f1", None):
            small["below_min_f1"] = args.below_min_f1.replace("-", "_")
    config = validated(CorpusFlowConfig, data, source=args.config)
    require(check_corpus_run(config))
    return config


def cmd_run(args, pipeline: bool = False) -> None:
    config = corpus_config(args, pipeline)
    from flows.corpus import BELOW_QUALITY_GATE, corpus_processing  # Prefect loads only for a config that passed
    state = corpus_processing(config, return_state=True)
    if state.is_failed() and state.name == BELOW_QUALITY_GATE:
        raise UserError(state.message)
    report = state.result()
    wh, ing = report["warehouse_load"], report["ingest"]
    print()
    print(f"documents: {ing['docs_written']} written, {ing['duplicates']} duplicates, {ing['quarantined']} quarantined")
    print(f"shards:    {report['shards']['documents']}")
    print(f"           {report['shards']['annotated']}")
    if report.get("finetune"):
        ft, bulk = report["finetune"], report.get("bulk_annotation")
        q = ft.get("holdout_quality") or {}
        levels = (f" ((entity, value) {q['entity_value_f1']:.3f}, values {q['value_f1']:.3f})"
                  if "entity_value_f1" in q else "")
        print(f"annotator: {ft['checkpoint']} ({ft['parameters']:,} parameters, {ft['train_seconds']:.0f} s), held-out "
              f"seed F1 {q.get('f1', float('nan')):.3f}{levels}")
        if report.get("quality_gate"):
            print(f"gate:      {report['quality_gate']['decision']}")
        if bulk:
            g = bulk.get("quality_vs_gold") or {}
            speed = (f"{bulk['docs_per_s']:.2f} documents/s" if bulk.get("shards_processed") and bulk.get("docs_per_s")
                     else "every shard annotated earlier")
            print(f"bulk:      {bulk['docs']} documents, {bulk['calls']} calls, {speed}"
                  + (f", F1 vs gold {g['f1']:.3f} on {g['documents']} unseen documents" if g.get("documents") else ""))
    print(f"warehouse: {report['warehouse']} ({wh['facts']} facts, {wh['triplets']} triplets)")
    print(f"report:    {os.path.join(report['workdir'], 'report.json')}")
    cli = os.path.join(os.path.dirname(sys.executable), "duckdb")
    cli = os.path.relpath(cli) if os.path.exists(cli) else "duckdb"
    print(f"try:       {cli} {report['warehouse']} -c \"select count(*) from facts\"")


def cmd_seed(args) -> None:
    from flows.preflight import check_seed_flow, require
    from schemas.configs import SeedFlowConfig

    data = load_config_file(args.config, SeedFlowConfig)
    if args.shards:
        data["document_shards"] = args.shards
    if args.workdir:
        data["workdir"] = args.workdir
    seed = data.setdefault("seed", {})
    if args.docs:
        seed["sample_docs"] = args.docs
    annotator = seed.setdefault("annotator", {})
    for key, value in (("backend", args.annotator), ("kb", args.kb), ("import_path", args.import_path)):
        if value:
            annotator[key] = value
    endpoint = annotator.setdefault("endpoint", {})
    for key, value in (("base_url", args.base_url), ("model", args.model)):
        if value:
            endpoint[key] = value
    config = validated(SeedFlowConfig, data, "seed config", "give --shards or document_shards in --config",
                       source=args.config)
    require(check_seed_flow(config))
    from flows.seed import seed_annotation

    report = seed_annotation(config)
    print(f"seed: {report['docs']} documents, {report['annotated']} annotated, {report['failed']} failed "
          f"(retried on the next run), {report['rejected']} rejected, {report['calls']} calls")
    print(f"shards:    {report['annotated_shard']}")
    print(f"warehouse: {report['warehouse']}")


def cmd_generate_corpus(args) -> None:
    from tasks.synthetic import generate_corpus

    result = generate_corpus(synthetic_config_for_docs(args.docs, args.seed), args.out)
    print(f"{len(result.corpus_files)} corpus file(s) and ground truth under {args.out}")


def cmd_ingest(args) -> None:
    import uuid

    from flows.runners import process_pool
    from schemas.configs import IngestConfig
    from tasks.ingest import ingest_corpus

    report = ingest_corpus(
        IngestConfig(inputs=args.inputs, output=args.out, shard_docs=args.shard_docs, workers=args.workers),
        run_id=str(uuid.uuid4()), runner=process_pool(args.workers),
    )
    print(json.dumps(report.model_dump(exclude={"document_shards", "quarantine_shards"}), indent=2))


def cmd_serve(args) -> None:
    from flows.serve import ServeConfig, serve

    data = load_config_file(args.config, ServeConfig)
    if args.workdir:
        data["workdir"] = args.workdir
    if args.corpus_cron is not None:
        data.setdefault("schedules", {"corpus-processing": None})["corpus-processing"] = args.corpus_cron or None
    if args.llm_slots:
        data["llm_slots"] = args.llm_slots
    config = validated(ServeConfig, data, "serve config")
    serve(config)


def _need_prefect_server() -> str:
    """The API URL of a Prefect server that answers; else one clear error."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("set PREFECT_API_URL to the server `lmlm serve` registered with "
                        "(e.g. http://127.0.0.1:4200/api)")
    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        raise UserError(f"no Prefect server answers at PREFECT_API_URL={url} ({unhealthy}); start it or fix the URL")
    return url


def cmd_trigger(args) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    from prefect.exceptions import ObjectNotFound

    try:
        parameters = json.loads(args.params) if args.params else None
    except ValueError as exc:
        raise UserError(f"--params is not JSON ({exc}); "
                        "give an object such as '{\"config\": {\"workdir\": \"out/x\"}}'")
    if parameters is not None and not isinstance(parameters, dict):
        raise UserError("--params must be a JSON object of parameter names, e.g. '{\"config\": {...}}'")
    _need_prefect_server()

    try:
        run = run_deployment(args.deployment, parameters=parameters, timeout=args.wait, poll_interval=2,
                             as_subflow=False)
    except ObjectNotFound:
        raise UserError(f"no deployment {args.deployment!r}: is `lmlm serve` running? (names are FLOW/DEPLOYMENT, "
                        "e.g. corpus-processing/scheduled; `prefect deployment ls` lists them)")
    ui = PREFECT_UI_URL.value()
    print(f"flow run {run.name} ({run.id}): {run.state.name if run.state else 'unknown'}")
    if ui:
        print(f"ui:       {ui}/runs/flow-run/{run.id}")
    if args.wait and run.state and run.state.is_final() and not run.state.is_completed():
        raise UserError(f"flow run {run.id} ended {run.state.name}: {run.state.message or ''}".strip())


def cmd_report(args) -> None:
    from flows.report import results_report
    from schemas.configs import ResultsPageConfig

    data = with_overrides(load_config_file(args.config, ResultsPageConfig), {
        "lmlm": args.lmlm, "diffusion": args.diffusion, "annotator": args.annotator, "out_dir": args.out})
    page = results_report(validated(ResultsPageConfig, data, source=args.config))
    for section, source in page["sources"].items():
        print(f"{section + ':':<11}{source or '(no report found)'}")
    print(f"page:      {page['markdown_path']}")
    print(f"           {page['html_path']}")


def cmd_mark_crashed(args) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    url = _need_prefect_server()
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(args.flow_run)
        except (ObjectNotFound, ValueError):
            raise UserError(f"no flow run {args.flow_run!r} on {url}; copy its id from the UI")
        if run.state and run.state.is_final():
            raise UserError(f"flow run {run.name} already ended {run.state.name}; nothing to do")
        client.set_flow_run_state(run.id, Crashed(message=args.reason), force=True)
    print(f"flow run {run.name} ({run.id}) marked Crashed; its deployment slot is free, trigger it again to resume")


def cmd_pipeline(args) -> None:
    """``lmlm run`` with the small-annotator stages: seed -> fine-tune -> bulk annotation -> warehouse."""
    cmd_run(args, pipeline=True)


def cmd_check(args) -> None:
    """``lmlm check``: the preflight of a run's config, alone."""
    config = corpus_config(args, pipeline=args.pipeline)
    print(f"ok: {args.config or 'the default config'} ({'pipeline' if args.pipeline else 'run'}): inputs, workdir "
          f"{config.workdir}, warehouse, annotators and endpoints checked")


def cmd_annotator_finetune(args) -> None:
    from flows.preflight import check_finetune_flow, require
    from schemas.configs import FinetuneFlowConfig

    data = load_config_file(args.config, FinetuneFlowConfig)
    data.update(workdir=args.workdir or data.get("workdir", "out"), seed_shards=args.seed_shards)
    if args.kind:
        data.setdefault("finetune", {})["kind"] = args.kind
    if args.base:
        data.setdefault("finetune", {})["base"] = args.base
    if args.budget_s:
        data.setdefault("finetune", {})["time_budget_s"] = args.budget_s
    config = validated(FinetuneFlowConfig, data, source=args.config)
    require(check_finetune_flow(config))
    from flows.annotator import annotator_finetune

    report = annotator_finetune(config)
    q = report["holdout_quality"]
    print(f"checkpoint: {report['checkpoint']} ({report['parameters']:,} parameters, version {report['version']})")
    if q:
        print(f"held-out:   triplet P {q['precision']:.3f} R {q['recall']:.3f} F1 {q['f1']:.3f}, "
              f"source preserved {q['source_preserved_rate']:.3f} on {q['documents']} documents")


def cmd_annotator_bulk(args) -> None:
    from flows.preflight import check_bulk_flow, require
    from schemas.configs import BulkFlowConfig

    data = load_config_file(args.config, BulkFlowConfig)
    data.update(workdir=args.workdir or data.get("workdir", "out"), document_shards=args.shards)
    bulk = data.setdefault("bulk", {})
    for key in ("backend", "checkpoint", "server_command"):
        if getattr(args, key, None):
            bulk[key] = getattr(args, key)
    if args.base_url:
        bulk.setdefault("endpoint", {})["base_url"] = args.base_url
    if args.no_warehouse:
        data["load_warehouse"] = False
    if args.min_f1 is not None:
        data["min_f1"] = args.min_f1
    config = validated(BulkFlowConfig, data, source=args.config)
    require(check_bulk_flow(config))
    from flows.annotator import bulk_annotation

    report = bulk_annotation(config)
    print(f"shards:    {report['shards']} ({report['shards_skipped']} finished earlier, skipped)")
    print(f"documents: {report['docs']}, {report['annotated']} annotated, {report['failed']} failed, "
          f"{report['calls']} calls, {report['docs_per_s']} documents/s")
    print(f"report:    {os.path.join(config.workdir, 'bulk-report.json')}")


def corpus_run_arguments() -> argparse.ArgumentParser:
    """The corpus flow's flags, shared by ``lmlm run`` and ``lmlm pipeline``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workdir", default=None, help="output folder (default out)")
    p.add_argument("--corpus", nargs="+", help="corpus files, folders, globs or fsspec URLs")
    p.add_argument("--docs", type=int, help="size of the synthetic corpus in documents")
    p.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    p.add_argument("--config", help="JSON/YAML file of CorpusFlowConfig fields")
    p.add_argument("--no-validate", action="store_true", help="skip the Great Expectations gates")
    return p


def add_annotator_commands(sub) -> None:
    """``lmlm pipeline`` and ``lmlm annotator {finetune,bulk}``."""
    pl = sub.add_parser("pipeline", parents=[corpus_run_arguments()], help="the whole pipeline: run + fine-tune the small annotator + bulk annotation")
    pl.add_argument("--seed-docs", type=int, help="documents annotated by the seed annotator to train on (default 160)")
    pl.add_argument("--finetune-budget-s", type=float, default=240.0,
                    help="stop fine-tuning after this many seconds (default 240, the demo's share; 0: train all epochs)")
    pl.add_argument("--below-min-f1", choices=["stop", "seed-only"],
                    help="an annotator below small_annotator.min_f1: stop the run (default) or go on without bulk "
                         "annotation, loading the seed's annotations only (make demo)")
    pl.set_defaults(func=cmd_pipeline)

    an = sub.add_parser("annotator", help="fine-tune the small annotator; annotate shards in bulk with it")
    asub = an.add_subparsers(dest="acommand", required=True)
    ft = asub.add_parser("finetune", help="fine-tune on annotated seed shards")
    ft.add_argument("seed_shards", nargs="+", help="annotated seed shard files, folders or globs")
    ft.add_argument("--workdir", default=None, help="the checkpoint goes to <workdir>/annotator/model")
    ft.add_argument("--kind", choices=["encoder", "generative"], help="the small annotator's model (default encoder)")
    ft.add_argument("--base", help="generative: annotator-small (default), annotator-tiny, a models.lmlm shape, or a hub name")
    ft.add_argument("--budget-s", type=float, help="stop training after this many seconds")
    ft.add_argument("--config", help="JSON/YAML file of FinetuneFlowConfig fields")
    ft.set_defaults(func=cmd_annotator_finetune)
    bk = asub.add_parser("bulk", help="annotate document shards (resumable: finished shards are skipped)")
    bk.add_argument("shards", nargs="+", help="document shard files, folders or globs")
    bk.add_argument("--workdir", default=None, help="outputs go to <workdir>/bulk")
    bk.add_argument("--backend", choices=["transformers", "vllm", "openai"])
    bk.add_argument("--checkpoint", help="annotator folder (default <workdir>/annotator/model)")
    bk.add_argument("--base-url", help="vllm/openai: the server, e.g. http://127.0.0.1:8000/v1")
    bk.add_argument("--server-command", nargs="+", help="vllm: command that starts the server")
    bk.add_argument("--no-warehouse", action="store_true", help="do not load the warehouse")
    bk.add_argument("--min-f1", type=float, help="quality gate on the checkpoint's stored held-out (entity, value) F1 "
                                                 "(default 0.25; 0: annotate anyway)")
    bk.add_argument("--config", help="JSON/YAML file of BulkFlowConfig fields")
    bk.set_defaults(func=cmd_annotator_bulk)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlm", description="Knowledge-separated LM pipeline (Prefect + DuckDB)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", parents=[corpus_run_arguments()], help="run the corpus-processing flow (synthetic corpus unless --corpus is given)")
    r.set_defaults(func=cmd_run)

    ck = sub.add_parser("check", parents=[corpus_run_arguments()],
                        help="preflight a run's config alone: inputs, workdir, warehouse, annotators, endpoints")
    ck.add_argument("--pipeline", action="store_true", help="check it as `lmlm pipeline` runs it (small annotator on)")
    ck.add_argument("--seed-docs", type=int, help=argparse.SUPPRESS)
    ck.add_argument("--finetune-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    ck.add_argument("--below-min-f1", choices=["stop", "seed-only"], help=argparse.SUPPRESS)
    ck.set_defaults(func=cmd_check)

    sd = sub.add_parser("seed", help="seed annotation of existing document shards (sample, annotate, correct, load)")
    sd.add_argument("--shards", nargs="+", help="document shard files/folders/globs (e.g. out/x/shards/documents)")
    sd.add_argument("--workdir", help="output folder (default out)")
    sd.add_argument("--docs", type=int, help="seed sample size (stratified by category)")
    sd.add_argument("--annotator", choices=["kb-align", "openai", "gold", "import"])
    sd.add_argument("--kb", help="kb-align: knowledge base (Parquet/JSON/JSONL of entity, relation, value)")
    sd.add_argument("--import-path", help="import: a reference-format annotated JSON file")
    sd.add_argument("--base-url", help="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    sd.add_argument("--model", help="openai: model name")
    sd.add_argument("--config", help="JSON/YAML file of SeedFlowConfig fields")
    sd.set_defaults(func=cmd_seed)

    g = sub.add_parser("generate-corpus", help="write the synthetic biography corpus and its ground truth")
    g.add_argument("--out", required=True)
    g.add_argument("--docs", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate_corpus)

    i = sub.add_parser("ingest", help="corpus files -> zstd Parquet document shards")
    i.add_argument("inputs", nargs="+")
    i.add_argument("--out", required=True)
    i.add_argument("--shard-docs", type=int, default=50_000)
    i.add_argument("--workers", type=int, default=2)
    i.set_defaults(func=cmd_ingest)

    sv = sub.add_parser("serve", help="register a Prefect deployment per flow and execute their runs (needs a server)")
    sv.add_argument("--config", help="JSON/YAML file of ServeConfig fields (schedules, corpus parameters, llm_slots)")
    sv.add_argument("--workdir", help="where served runs write (default out/serve)")
    sv.add_argument("--corpus-cron", help="cron schedule of corpus processing, UTC (\"\" for on demand only)")
    sv.add_argument("--llm-slots", type=int, help="LLM endpoint calls in flight across all flow runs")
    sv.set_defaults(func=cmd_serve)

    t = sub.add_parser("trigger", help="start a run of a served deployment (as the UI's Run button does)")
    t.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. corpus-processing/scheduled or seed-annotation/on-demand")
    t.add_argument("--params", help="JSON object of parameters; unset: the deployment's defaults")
    t.add_argument("--wait", type=float, default=0, help="seconds to wait for the run to finish (0: return at once)")
    t.set_defaults(func=cmd_trigger)

    mc = sub.add_parser("mark-crashed", help="mark a run whose process died (killed worker) Crashed, freeing its slot")
    mc.add_argument("flow_run", help="flow run id (from the UI or lmlm trigger)")
    mc.add_argument("--reason", default="its process was killed; marked by lmlm mark-crashed")
    mc.set_defaults(func=cmd_mark_crashed)

    rp = sub.add_parser("report", help="render the newest evaluation reports (LMLM, diffusion, annotator) into one "
                        "Markdown/HTML results page, also a Prefect artifact")
    rp.add_argument("--lmlm", help="LMLM workdir or evaluation report (default out/demo-lmlm)")
    rp.add_argument("--diffusion", help="latent-diffusion workdir or report (default out/diffusion-demo)")
    rp.add_argument("--annotator", help="corpus-run workdir with the small-annotator stages (default out/demo)")
    rp.add_argument("--out", help="folder for results.md, results.html and the plots (default out/results)")
    rp.add_argument("--config", help="JSON/YAML file of ResultsPageConfig fields")
    rp.set_defaults(func=cmd_report)

    add_warehouse_commands(sub)
    add_annotator_commands(sub)
    add_lmlm_commands(sub)
    add_diffusion_commands(sub)
    add_guided_commands(sub)
    add_star_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.progress import cli_bars

    try:
        with cli_bars():
            args.func(args)
    except UserError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"lmlm: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
