"""The diffusion-guided language modeling flows (DGLM, issue 16): training, evaluation, and the demo that chains them.

    document shards (or a synthetic corpus with reviews) -> tokenizer -> LM pretraining || reference LM
    -> plans (examples, MiniLM embeddings) -> plan fine-tune || class-conditional fine-tune -> plan prior
    -> attribute classifiers -> evaluation table (neutral prefixes, every system, bootstrap intervals) -> report

Outputs under ``workdir``: ``tokenizer/``, ``lm/``, ``reference_lm/``, ``plans/``, ``plan_lm/``, ``class_lm/``, ``prior/``,
``classifiers/``, ``training-report.json``, ``evaluation/report.json`` and ``evaluation/table.md``. Every stage reuses
finished work and resumes interrupted training. ``lmlm guided generate --workdir W "prefix" --attribute k=v`` reads
them back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_links, publish_table
from flows.stages import (
    attribute_classifiers_task,
    evaluate_guided_task,
    guided_finetune_process,
    guided_tokenizer_task,
    plan_data_task,
    plan_prior_task,
    pretrain_process,
    pretrain_variant,
    soft_prompt_lm_task,
)
from schemas.guided_configs import GuidedFlowConfig
from schemas.reports import GuidedEvaluationReport, GuidedTrainingReport, SoftPromptLMReport
from tasks.diffusion_texts import document_shards
from tasks.guided import folder

STAGES = ("lm", "plans", "plan_lm", "class_lm", "prior", "classifiers")


def flow_device(config: GuidedFlowConfig):
    import torch

    from models.device import resolve_device

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    get_run_logger().info("models on %s%s", device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return device


def _pretrain_pair(config: GuidedFlowConfig, shards: list[str], tokenizer: str) -> tuple[dict, dict]:
    """The plain LM and the reference LM (another seed), at once in two processes or one after the other here."""
    configs = {name: getattr(config, name).model_copy(update={"tokenizer": tokenizer, "holdout_fraction": config.holdout_fraction})
               for name in ("lm", "reference_lm")}
    if config.parallel:
        futures = {name: pretrain_process.submit(cfg.model_dump_json(), shards, folder(config.workdir, name), "standard",
                                                 config.threads_per_process) for name, cfg in configs.items()}
        return futures["lm"].result(), futures["reference_lm"].result()
    import torch

    threads = config.threads or torch.get_num_threads()  # unset: every thread torch would use, not one
    return tuple(pretrain_variant(cfg, shards, folder(config.workdir, name), "standard", threads)
                 for name, cfg in configs.items())


def _finetunes(config: GuidedFlowConfig, kinds: list[str], device) -> dict[str, SoftPromptLMReport]:
    """The plan fine-tune and the class-conditional one, at once in two processes or one after the other here."""
    if config.parallel and len(kinds) > 1:
        cfg_json = config.model_dump_json()
        futures = {k: guided_finetune_process.submit(cfg_json, k, config.threads_per_process) for k in kinds}
        return {k: SoftPromptLMReport(**f.result()) for k, f in futures.items()}
    return {k: soft_prompt_lm_task(k, config, device=device, log=get_run_logger().info) for k in kinds}


def _merged_report(path: str, fresh: dict) -> dict:
    """This run's report over the workdir's earlier one: stages this run did not train (``lmlm guided train --stage``,
    or STAR-LDM's training of the shared stages it lacked) keep their earlier entries and seconds."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return fresh
    merged = {**earlier, **{k: v for k, v in fresh.items() if v is not None}}
    merged["stage_seconds"] = {**earlier.get("stage_seconds", {}), **fresh.get("stage_seconds", {})}
    return merged


@flow(name="guided-training", task_runner=ThreadPoolTaskRunner(max_workers=2))
def guided_training(config: GuidedFlowConfig = GuidedFlowConfig(), stages: list[str] | None = None) -> dict:
    """Train every DGLM stage (or the named ``stages``: lm, plans, plan_lm, class_lm, prior, classifiers), reusing
    finished ones; writes ``training-report.json``."""
    logger = get_run_logger()
    device = flow_device(config)
    wanted = list(stages or STAGES)
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    shards = document_shards(config)
    tokenizer = guided_tokenizer_task(shards, config.holdout_fraction, config.vocab_size, folder(config.workdir, "tokenizer"))
    report = GuidedTrainingReport(workdir=os.path.abspath(config.workdir), shards=shards, tokenizer=tokenizer)
    seconds = report.stage_seconds
    if "lm" in wanted:
        t0 = time.perf_counter()
        report.lm, report.reference_lm = _pretrain_pair(config, shards, tokenizer)
        seconds["lm"] = round(time.perf_counter() - t0, 1)
    if "plans" in wanted:
        t0 = time.perf_counter()
        report.plans = plan_data_task(shards, config.attributes, config.data, tokenizer, folder(config.workdir, "plans"),
                                      holdout_fraction=config.holdout_fraction, log=logger.info)
        seconds["plans"] = round(time.perf_counter() - t0, 1)
    kinds = [k for k in ("plan", "class") if f"{k}_lm" in wanted]
    if kinds:
        t0 = time.perf_counter()
        done = _finetunes(config, kinds, device)
        report.plan_lm, report.class_lm = done.get("plan"), done.get("class")
        seconds["finetunes"] = round(time.perf_counter() - t0, 1)
    if "prior" in wanted:
        t0 = time.perf_counter()
        report.prior = plan_prior_task(config, device=device, log=logger.info)
        seconds["prior"] = round(time.perf_counter() - t0, 1)
    if "classifiers" in wanted:
        t0 = time.perf_counter()
        report.classifiers = attribute_classifiers_task(config, log=logger.info)
        seconds["classifiers"] = round(time.perf_counter() - t0, 1)
    path = os.path.join(config.workdir, "training-report.json")
    fresh = json.loads(report.model_dump_json(exclude={"plan_lm": {"history"}, "class_lm": {"history"},
                                                       "prior": {"history"}}))
    Path(path).write_text(json.dumps(_merged_report(path, fresh), indent=1))
    publish_links({"workdir": config.workdir, "report": path}, key="guided-training-outputs")
    return {**report.model_dump(mode="json"), "report": path}


def _cell(interval) -> str:
    return "–" if interval is None else f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def markdown_table(rows: list[dict]) -> str:
    """The evaluation rows as a markdown table (the CLI prints it too); intervals are bootstrap 95% over prefixes."""
    head = ["attribute", "system", "setting", "attribute rate (tf-idf judge)", "lexicon rate (VADER)",
            "perplexity (reference LM)", "dist-1", "dist-2", "dist-3", "plan p(target)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["attribute"], r["system"], r["setting"], _cell(r["attribute_rate"]), _cell(r.get("lexicon_rate")),
            f"{r['perplexity']['value']:.2f} [{r['perplexity']['low']:.2f}, {r['perplexity']['high']:.2f}]",
            f"{r['dist_1']['value']:.3f}", f"{r['dist_2']['value']:.3f}", _cell(r["dist_3"]),
            "–" if r.get("plan_rate") is None else f"{r['plan_rate']:.3f}"]) + " |")
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    """The sanity checks and the goals, one line each."""
    lines = []
    nll = report["sanity"]["nll"]
    lines.append("held-out NLL per continuation token: " + ", ".join(f"{k} {v:.3f}" for k, v in nll.items()))
    cos = report["sanity"].get("cosine")
    if cos:
        lines.append(f"MiniLM cosine of DGLM text to its own plan {cos['own_plan']:.3f} vs a shuffled plan "
                     f"{cos['shuffled_plan']:.3f} (own closer for {cos['own_closer_share']:.0%} of {cos['texts']})")
    for name, g in report["goals"].items():
        within = "" if g.get("real_text_rate") is None else (
            f" ({g['dominated_within_real_text']} of those not above real text's {g['real_text_rate']:.3f} under the "
            "same judge)")
        lines.append(f"{name}: DGLM dominates logit boosting at {g['boost_points_dominated']} boost points{within}; best "
                     f"DGLM rate {g['best_dglm_rate']} = {g['share_of_class_conditional']} of the class-conditional "
                     f"model's {g['class_conditional_rate']}")
    return lines


@flow(name="guided-evaluation")
def guided_evaluation(config: GuidedFlowConfig = GuidedFlowConfig()) -> dict:
    """The comparison table of a trained workdir: held-out neutral prefixes, every system, bootstrap intervals,
    the sanity checks; writes ``evaluation/report.json`` and ``evaluation/table.md``."""
    from prefect.artifacts import create_markdown_artifact

    device = flow_device(config)
    if config.evaluation is None:
        return {}
    shards = document_shards(config)
    result: GuidedEvaluationReport = evaluate_guided_task(config, shards, device=device, log=get_run_logger().info)
    out = folder(config.workdir, "evaluation")
    os.makedirs(out, exist_ok=True)
    report = result.model_dump(mode="json")
    table = markdown_table(report["rows"])
    Path(out, "table.md").write_text(table + "\n\n" + "\n".join(f"- {line}" for line in summary_lines(report)) + "\n")
    Path(out, "report.json").write_text(json.dumps(report, indent=1))
    publish_table([{k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in r.items()}
                   for r in report["rows"]], key="guided-evaluation", description="DGLM vs baselines")
    create_markdown_artifact(table, key="guided-evaluation-table", description="DGLM comparison table")
    return {**report, "table": os.path.join(out, "table.md"), "report": os.path.join(out, "report.json")}


@flow(name="guided-demo")
def guided_demo(config: GuidedFlowConfig = GuidedFlowConfig()) -> dict:
    """The whole DGLM job on this machine: every training stage, then the evaluation table."""
    training = guided_training(config)
    evaluation = guided_evaluation(config) if config.evaluation is not None else {}
    return {"training": training, "evaluation": evaluation}
