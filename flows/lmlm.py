"""The LMLM flows: pretrain the LMLM and its standard baseline from annotated shards, evaluate both side
by side, and the CPU demo that chains corpus -> pretraining -> evaluation (their CLI commands are in
flows/lmlm_cli.py, which loads this module only when a command runs).

Outputs, under ``<workdir>/lmlm`` unless ``out_dir`` says otherwise::

    lmlm/<variant>/                    tasks.pretrain's folder: checkpoints, tokenizer, report.json, train.log
    lmlm/loss_curves.png               both variants' training and holdout loss against tokens
    lmlm/pretrain-report.json
    lmlm/evaluation-report.json        every figure of both variants, and the generated bios with their facts
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_links, publish_png, publish_table
from flows.report import results_report
from flows.stages import pretrain_process, pretrain_variant
from schemas.configs import ResultsPageConfig
from schemas.errors import UserInputError
from schemas.lmlm_configs import LMLMEvaluationConfig, LMLMFlowConfig
from tasks.shardio import list_files


# ----------------------------------------------------------------------------- inputs


def workdir_report(workdir: str) -> dict:
    """The report.json `lmlm run` wrote in ``workdir`` ({} when there is none)."""
    path = os.path.join(workdir, "report.json")
    if not os.path.isfile(path):
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc}); rerun `lmlm run --workdir {workdir}`") from None


def annotated_shards(config: LMLMFlowConfig) -> list[str]:
    """The annotated shards to train on: the config's, else the ones the workdir's corpus run wrote."""
    locations = list(config.annotated_shards)
    if not locations:
        folder = workdir_report(config.workdir).get("shards", {}).get("annotated")
        if not folder:
            raise UserInputError(f"workdir {config.workdir}: no report.json naming annotated shards; run "
                                 f"`lmlm run --workdir {config.workdir}` first, or pass annotated_shards")
        locations = [folder]
    shards = sorted({p for loc in locations for p in list_files(loc, (".parquet",))})
    if not shards:
        raise UserInputError(f"no annotated .parquet shards under {', '.join(locations)}; run `lmlm run` first "
                             "or fix annotated_shards")
    return shards


def out_dir_of(config: LMLMFlowConfig) -> str:
    return config.out_dir or os.path.join(config.workdir, "lmlm")


def warehouse_of(config: LMLMFlowConfig) -> str | None:
    path = workdir_report(config.workdir).get("warehouse") or os.path.join(config.workdir, "warehouse.duckdb")
    return path if os.path.isfile(path) else None


def ground_truth_of(config: LMLMFlowConfig) -> str | None:
    if config.evaluation.ground_truth:
        return config.evaluation.ground_truth
    path = os.path.join(config.workdir, "synthetic", "ground_truth")
    return path if os.path.isdir(path) else None


# ----------------------------------------------------------------------------- rows and seeds


@dataclass(frozen=True)
class Row:
    """One column of the comparison: a variant trained on the annotated shards of one corpus run (its database)."""

    name: str  # "lmlm" (the oracle database), "standard", "lmlm-pipeline"
    variant: str  # what tasks.pretrain trains: "lmlm" or "standard"
    workdir: str  # the corpus run: annotated shards, warehouse, ground truth
    out: str  # the pretraining folder of its variants
    seeds: tuple[int, ...]  # its training seeds


ROW_LABELS = {"lmlm": "LMLM, oracle database", "lmlm-pipeline": "LMLM, pipeline database", "standard": "standard"}


def pipeline_workdir(config: LMLMFlowConfig) -> str | None:
    db = config.pipeline_database
    return None if db is None else db.workdir or os.path.join(config.workdir, "pipeline")


def rows_of(config: LMLMFlowConfig) -> list[Row]:
    """The variants on the workdir's database, and an LMLM on the pipeline's database when configured (the
    standard model is not trained twice: its call-free text is the same corpus whoever annotated it)."""
    out, seeds = out_dir_of(config), tuple(seeds_of(config))
    rows = [Row(v, v, config.workdir, out, seeds) for v in dict.fromkeys(config.variants)]
    db = config.pipeline_database
    if db is not None and "lmlm" in config.variants:
        rows.append(Row("lmlm-pipeline", "lmlm", pipeline_workdir(config), os.path.join(out, "pipeline"),
                        seeds[:db.seeds or len(seeds)]))
    return rows


def seeds_of(config: LMLMFlowConfig) -> list[int]:
    return [config.pretrain.seed + k for k in range(config.seeds)]


def model_dir(row: Row, seed: int, config: LMLMFlowConfig) -> str:
    """<out>/<variant> for the first seed (the single-seed layout), <out>/seed-<s>/<variant> for the others."""
    first = seed == config.pretrain.seed
    return os.path.join(row.out, row.variant) if first else os.path.join(row.out, f"seed-{seed}", row.variant)


def shards_of(row: Row, config: LMLMFlowConfig) -> list[str]:
    if row.workdir == config.workdir:
        return annotated_shards(config)
    return annotated_shards(config.model_copy(update={"workdir": row.workdir, "annotated_shards": []}))


# ----------------------------------------------------------------------------- pretraining


@flow(name="lmlm-pretraining", task_runner=ThreadPoolTaskRunner(max_workers=2))
def lmlm_pretraining(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """Pretrain the LMLM and the standard baseline (same shape, tokenizer and token budget) on the annotated
    shards of a corpus run, for every seed (and an LMLM on the pipeline's database when configured); publishes
    the first seed's loss curves in one plot."""
    from models.pretrain import plot_loss_curves

    logger = get_run_logger()
    rows, seeds = rows_of(config), seeds_of(config)
    shards = {r.name: shards_of(r, config) for r in rows}
    out = out_dir_of(config)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    budget = f"{config.pretrain.max_steps} steps" if config.pretrain.max_steps else f"{config.pretrain.token_budget:,} tokens"
    logger.info("pretraining %s, seed(s) %s: %s, %s each", ", ".join(r.name for r in rows),
                ", ".join(map(str, seeds)), config.pretrain.model, budget)
    jobs = [(r, s) for s in seeds for r in rows if s in r.seeds]
    if config.parallel and len(jobs) > 1:  # two processes at a time (the flow's task runner)
        futures = [pretrain_process.submit(config.pretrain.model_copy(update={"seed": s}).model_dump_json(),
                                           shards[r.name], model_dir(r, s, config), r.variant,
                                           config.threads_per_process) for r, s in jobs]
        done = [f.result() for f in futures]
    else:
        done = [pretrain_variant(config.pretrain.model_copy(update={"seed": s}), shards[r.name], model_dir(r, s, config),
                                 r.variant, config.threads_per_process) for r, s in jobs]
    runs = {s: {} for s in seeds}
    for (r, s), report in zip(jobs, done):
        runs[s][r.name] = report
    wall = time.perf_counter() - t0
    first = runs[seeds[0]]
    curve = plot_loss_curves({ROW_LABELS.get(v, v): r["history"] for v, r in first.items()},
                             os.path.join(out, "loss_curves.png"), title=f"LMLM vs standard, {config.pretrain.model}")
    publish_png(Path(curve).read_bytes(), key="lmlm-loss-curves", description="Training and holdout loss per variant")
    table = [{"variant": v, "seed": s, "parameters": r["parameters"], "tokens": r["tokens"], "steps": r["steps"],
              "train_seconds": round(r["train_seconds"], 1), "tokens_per_s": round(r["tokens_per_s"]),
              "final_train_loss": r["final_train_loss"] and round(r["final_train_loss"], 4),
              "holdout_normalized_perplexity": r["holdout_normalized_perplexity"]
              and round(r["holdout_normalized_perplexity"], 3)} for s, by in runs.items() for v, r in by.items()]
    publish_table(table, key="lmlm-pretraining", description="Every variant and seed: same parameters and token budget")
    strip_history = lambda r: {k: x for k, x in r.items() if k != "history"}  # noqa: E731
    report = {"out_dir": os.path.abspath(out), "shards": shards[rows[0].name], "wall_seconds": wall, "loss_curves": curve,
              "seeds": seeds, "variants": {v: strip_history(r) for v, r in first.items()},
              "runs": {str(s): {v: strip_history(r) for v, r in by.items()} for s, by in runs.items()}}
    Path(out, "pretrain-report.json").write_text(json.dumps(report, indent=2, default=str))
    publish_links({f"{v} seed {s}": os.path.dirname(r["checkpoint"]) for s, by in runs.items() for v, r in by.items()}
                  | {"report": os.path.join(out, "pretrain-report.json")}, key="lmlm-pretraining-outputs")
    logger.info("pretraining done in %.0f s: %s", wall, "; ".join(
        f"{r['variant']} seed {r['seed']} holdout normalized ppl {r['holdout_normalized_perplexity']}" for r in table))
    return report


# ----------------------------------------------------------------------------- evaluation


def checkpoints_of(config: LMLMFlowConfig) -> dict[int, dict[str, str]]:
    """seed -> row -> checkpoint (``evaluation.checkpoints`` overrides the first seed's)."""
    from models.train import latest_checkpoint

    found: dict[int, dict[str, str]] = {}
    for seed in seeds_of(config):
        for row in (r for r in rows_of(config) if seed in r.seeds):
            folder = model_dir(row, seed, config)
            given = config.evaluation.checkpoints.get(row.name) if seed == config.pretrain.seed else None
            path = given or latest_checkpoint(folder)
            if not path:
                raise UserInputError(f"no {row.name} checkpoint under {folder}; run `lmlm lmlm pretrain` first (with "
                                     "the same --seeds) or set evaluation.checkpoints")
            found.setdefault(seed, {})[row.name] = path
    return found


@flow(name="lmlm-evaluation")
def lmlm_evaluation(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """Evaluate every variant side by side, for every seed: normalized perplexity (database and own lookups),
    FActScore of bios as the paper scores it (visible text only) with lookup quality beside it, cloze probes, edits
    and unlearning for every model, minimal pairs, and an LLM judge when configured; mean and standard deviation
    over the seeds."""
    import torch

    from flows.stages import evaluate_variant_task
    from tasks.evaluate_lmlm import cloze_probes, comparison_rows
    from tasks.ground_truth import load_ground_truth, sample_people
    from tasks.minimal_pairs import seen_in
    from tasks.pretrain import holdout_texts, is_holdout, split_texts

    logger = get_run_logger()
    ev: LMLMEvaluationConfig = config.evaluation
    torch.set_num_threads(config.threads_per_process)
    checkpoints = checkpoints_of(config)
    rows = rows_of(config)
    fraction = config.pretrain.holdout_fraction
    sources = {}
    for row in rows:
        shards = shards_of(row, config)
        held = holdout_texts(shards, "annotated_text", fraction, ev.perplexity_docs)
        if not held:
            raise UserInputError(f"no held-out documents (pretrain.holdout_fraction {fraction}); raise it to score perplexity")
        warehouse = warehouse_of(config.model_copy(update={"workdir": row.workdir}))
        lookup = (ev.lookup_db if row.workdir == config.workdir else None) or warehouse
        if lookup is None:
            raise UserInputError(f"workdir {row.workdir}: no warehouse.duckdb; set evaluation.lookup_db to a lookup "
                                 "database (lmlm warehouse export-lookup-db)")
        sources[row.name] = {"shards": shards, "held": held, "warehouse": warehouse, "lookup": lookup}
    gt_dir = ground_truth_of(config)
    gt = load_ground_truth(gt_dir) if gt_dir else None
    people = probes = edit_probes = []
    seen = None
    if gt is None:
        logger.warning("no synthetic ground truth: bios, cloze probes, edits and minimal pairs are skipped")
    else:
        for row in rows:  # every row answers about the same people: the same corpus
            other = ground_truth_of(config.model_copy(update={"workdir": row.workdir}))
            if other and other != gt_dir and load_ground_truth(other).people != gt.people:
                raise UserInputError(f"{row.workdir}: its synthetic corpus is not {config.workdir}'s; build the pipeline "
                                     "database from the same corpus (same synthetic config)")
        exclude = (lambda doc: False) if ev.include_holdout_people else (lambda doc: is_holdout(doc, fraction))
        pool = sample_people(gt, len(gt.people), ev.seed, exclude)
        people = pool[:ev.bio_people]
        probes = cloze_probes(gt, pool, ev.cloze_probes, ev.seed)
        edit_probes = cloze_probes(gt, pool, ev.edit_facts, ev.seed + 1)
        if ev.minimal_pairs:  # pairs are held out of every row's training text
            seen = seen_in([t for src in sources.values() for shard in src["shards"]
                            for t in split_texts(shard, "text", fraction)[0]])
    runs: dict[int, dict[str, dict]] = {}
    for seed, by_row in checkpoints.items():
        for row in (r for r in rows if r.name in by_row):
            src = sources[row.name]
            runs.setdefault(seed, {})[row.name] = evaluate_variant_task(
                row.variant, by_row[row.name], holdout_annotated=src["held"], lookup_source=src["lookup"],
                lookup_mode=ev.lookup_mode, gt=gt, people=people, probes=probes, edit_probes=edit_probes,
                warehouse_path=src["warehouse"], cfg=ev, seen=seen)
    comparison = comparison_rows(runs)
    out = out_dir_of(config)
    os.makedirs(out, exist_ok=True)
    first = runs[min(runs)]
    report = {"workdir": os.path.abspath(config.workdir), "checkpoints": checkpoints,
              "rows": {r.name: {"label": _label(r, config), "variant": r.variant, "seeds": list(r.seeds),
                                "workdir": os.path.abspath(r.workdir), "lookup_source": sources[r.name]["lookup"]}
                       for r in rows},
              "lookup_source": sources[rows[0].name]["lookup"], "lookup_mode": ev.lookup_mode, "ground_truth": gt_dir,
              "seeds": sorted(runs), "comparison": comparison, "variants": first,
              "runs": {str(s): by for s, by in runs.items()}}
    path = os.path.join(out, "evaluation-report.json")
    Path(path).write_text(json.dumps(report, indent=2, default=str))
    publish_table(comparison, key="lmlm-comparison", description="LMLM vs standard baseline, side by side "
                  "(mean and std over seeds)")
    _publish_samples(first)
    publish_links({"report": path}, key="lmlm-evaluation-outputs")
    page = results_report(ResultsPageConfig(lmlm=config.workdir, annotator=pipeline_workdir(config) or
                                            ResultsPageConfig().annotator, out_dir=os.path.join(out, "results")))
    return {**report, "report": path, "results_page": page["markdown_path"]}


def _label(row: Row, config: LMLMFlowConfig) -> str:
    """The row's name in tables; a row trained on fewer seeds than the others says how many."""
    label = ROW_LABELS.get(row.name, row.name)
    n = len(row.seeds)
    return label if n == config.seeds else f"{label} ({n} seed{'s' * (n > 1)})"


def _publish_samples(reports: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = ["# Sample bios (visible text, as scored)", ""]
    for variant, r in reports.items():
        for sample in r.get("bio_samples", [])[:3]:
            ok = sum(f["supported"] for f in sample["facts"])
            lines += [f"**{ROW_LABELS.get(variant, variant)}**, {sample['entity']} ({ok}/{len(sample['facts'])} facts "
                      f"supported, {len(sample.get('lookups', []))} lookups)", "",
                      f"> {sample['prompt']}{sample['text_without_calls']}", ""]
    create_markdown_artifact("\n".join(lines), key="lmlm-bio-samples", description="Generated bios and their facts")


# ----------------------------------------------------------------------------- demo


@flow(name="lmlm-demo")
def lmlm_demo(config: LMLMFlowConfig = LMLMFlowConfig()) -> dict:
    """The whole LMLM job on this machine: the corpus run (when the workdir has none; every document annotated
    from the ground-truth KB: the oracle database), with ``pipeline_database`` the same corpus through the
    pipeline's own annotators (seed annotator + corrector, small-annotator fine-tune, bulk annotation), then
    pretraining of every variant and seed, and their evaluation."""
    from flows.corpus import corpus_processing
    from schemas.configs import CorpusFlowConfig

    if not workdir_report(config.workdir) and not config.annotated_shards:
        corpus_processing(CorpusFlowConfig(workdir=config.workdir))
    if config.pipeline_database is not None and not workdir_report(pipeline_workdir(config)):
        corpus_processing(CorpusFlowConfig(workdir=pipeline_workdir(config),
                                           small_annotator=config.pipeline_database.small_annotator))
    pretraining = lmlm_pretraining(config)
    evaluation = lmlm_evaluation(config)
    return {"pretraining": pretraining, "evaluation": evaluation}
