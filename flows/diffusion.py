"""The latent-diffusion flows (LD4LG): text autoencoder, latent diffusion, and the whole job with evaluation.

    document shards (or a generated synthetic corpus) -> texts -> autoencoder -> latents
    -> diffusion -> samples per class (DDIM/DDPM, classifier-free guidance; latent-classifier guidance)
    -> MAUVE, diversity, memorisation, class accuracy vs a class-conditional AR baseline -> report

Outputs under ``workdir``: ``autoencoder/``, ``diffusion/`` (safetensors checkpoints), ``samples.jsonl``,
``report.json``, ``loss_curves.png``. ``lmlm sample --checkpoint <workdir> --class X`` reads them back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import line_chart_png, publish_links, publish_png, publish_table
from flows.report import results_report
from flows.stages import (
    evaluate_generators_task,
    holdout_reconstruction_task,
    train_autoencoder_task,
    train_diffusion_task,
)
from schemas.configs import ResultsPageConfig
from schemas.diffusion_configs import LatentDiffusionFlowConfig
from tasks.diffusion import encoder_features, load_autoencoder
from tasks.diffusion_texts import TextData, prepare_texts
from tasks.results_page import format_estimate


@dataclass
class DeviceSetup:
    amp: torch.dtype | None  # autocast dtype, None: full precision
    device: torch.device  # where the models train and sample


def _device_setup(config: LatentDiffusionFlowConfig) -> DeviceSetup:
    from models.device import resolve_device
    from models.train import autocast_dtype

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    get_run_logger().info("models on %s%s", device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return DeviceSetup(autocast_dtype(config.bf16, device), device)


def run_autoencoder_stage(config: LatentDiffusionFlowConfig, data: TextData, setup: DeviceSetup) -> tuple[object, dict]:
    ae, report = train_autoencoder_task(data.train, config.autoencoder, os.path.join(config.workdir, "autoencoder"),
                                        max_tokens=config.max_tokens, features=data.features, encoder=data.encoder,
                                        amp=setup.amp, device=setup.device, log=get_run_logger().info)
    report["holdout"] = scores = holdout_reconstruction_task(ae, data.encoder, data.holdout.texts[:1000], config.max_tokens)
    get_run_logger().info("autoencoder held-out reconstruction: BLEU %.2f, exact match %.3f (%d texts)",
                          scores["bleu"], scores["exact_match"], scores["texts"])
    return ae, report


def run_diffusion_stage(config: LatentDiffusionFlowConfig, data: TextData, ae, setup: DeviceSetup) -> tuple[object, torch.Tensor, dict]:
    feats = data.features or encoder_features(data.encoder, data.train.texts, config.max_tokens, log=get_run_logger().info)
    latents = ae.encode(*feats)
    labels = data.train.labels if config.label_column else [None] * len(latents)
    dm, report = train_diffusion_task(latents, labels, config.diffusion, os.path.join(config.workdir, "diffusion"),
                                      amp=setup.amp, device=setup.device, log=get_run_logger().info)
    return dm, latents, report


def markdown_table(rows: list[dict]) -> str:
    """The evaluation rows as a markdown table (the CLI prints it too): mean ± standard deviation where the rows
    carry one (over draws of samples, or over training seeds)."""
    cols = ["generator", "setting", "mauve", "class_accuracy", "diversity", "memorised_verbatim", "memorised_train_4grams",
            "perplexity", "samples_per_s"]

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_estimate(r.get(c), r.get(f"{c}_std")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _publish(report: dict, workdir: str) -> None:
    series = {}
    if "autoencoder" in report:
        series["autoencoder (cross-entropy)"] = [(h["step"], h["loss"]) for h in report["autoencoder"]["history"]]
    if "diffusion" in report:
        series["diffusion (v MSE)"] = [(h["step"], h["loss"]) for h in report["diffusion"]["history"]]
    if any(series.values()):
        report["loss_curves_png"] = os.path.join(workdir, "loss_curves.png")
        publish_png(line_chart_png(series, "latent diffusion training", "optimizer step", "loss"), key="latent-diffusion-loss",
                    description="Autoencoder and diffusion training loss", save_to=report["loss_curves_png"])
    lines = ["# Latent diffusion (LD4LG)", ""]
    if "autoencoder" in report:
        a = report["autoencoder"]
        lines.append(f"- autoencoder: {a['parameters']:,} trainable parameters, {a['steps']} steps in {a['train_seconds']} s; "
                     f"held-out BLEU **{a['holdout']['bleu']:.2f}** against the {a['holdout'].get('bleu_reference', 'texts')}, "
                     f"exact match **{a['holdout']['exact_match']:.3f}**")
    if "diffusion" in report:
        d = report["diffusion"]
        lines.append(f"- diffusion: {d['parameters']:,} parameters, {d['steps']} steps in {d['train_seconds']} s, "
                     f"{len(d['classes'])} classes")
    if "evaluation" in report:
        e = report["evaluation"]
        lines += ["", f"Mean ± standard deviation over {e.get('spread', 'draws')}; MAUVE features: {e.get('mauve_features')}; "
                  f"samples conditioned on the held-out texts' classes (equal counts, held-out class mix).", "",
                  markdown_table(e["rows"])]
        publish_table(report["evaluation"]["rows"], key="latent-diffusion-evaluation", description="Generators compared")
    create_markdown_artifact("\n".join(lines), key="latent-diffusion", description="Latent diffusion report")
    publish_links({"workdir": workdir, "report": os.path.join(workdir, "report.json")}, key="latent-diffusion-outputs")


def _write_report(report: dict, workdir: str, name: str = "report.json") -> str:
    path = os.path.join(workdir, name)
    Path(path).write_text(json.dumps(report, indent=2, default=str))
    return path


def _stage_report(config: LatentDiffusionFlowConfig, data: TextData, stage: str, report: dict) -> dict:
    out = {"texts": data.stats, stage: report}
    _publish(out, config.workdir)
    out["report"] = _write_report(out, config.workdir, f"{stage}-report.json")
    return out


@flow(name="autoencoder-training")
def autoencoder_training(config: LatentDiffusionFlowConfig) -> dict:
    """Train the text autoencoder on the shards' texts; report held-out reconstruction BLEU and exact match."""
    setup = _device_setup(config)
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    data = prepare_texts(config, setup.device)
    return _stage_report(config, data, "autoencoder", run_autoencoder_stage(config, data, setup)[1])


@flow(name="diffusion-training")
def diffusion_training(config: LatentDiffusionFlowConfig) -> dict:
    """Train the latent diffusion model on the latents of a trained autoencoder in the workdir."""
    setup = _device_setup(config)
    ae = load_autoencoder(os.path.join(config.workdir, "autoencoder"), setup.device)
    data = prepare_texts(config, setup.device)
    return _stage_report(config, data, "diffusion", run_diffusion_stage(config, data, ae, setup)[2])


def seed_config(config: LatentDiffusionFlowConfig, k: int) -> LatentDiffusionFlowConfig:
    """The config of the k-th training seed: both seeds moved by k, in workdir/seed-<autoencoder seed> (k > 0)."""
    if k == 0:
        return config
    ae, dm = config.autoencoder, config.diffusion
    return config.model_copy(update={
        "workdir": os.path.join(config.workdir, f"seed-{ae.seed + k}"),
        "autoencoder": ae.model_copy(update={"seed": ae.seed + k}), "diffusion": dm.model_copy(update={"seed": dm.seed + k})})


def _train_and_evaluate(config: LatentDiffusionFlowConfig, data: TextData, setup: DeviceSetup) -> dict:
    """One training seed: autoencoder, diffusion and (when configured) the evaluation, in ``config.workdir``."""
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    report: dict = {}
    stage = time.perf_counter()
    ae, report["autoencoder"] = run_autoencoder_stage(config, data, setup)
    report["autoencoder"]["stage_seconds"] = round(time.perf_counter() - stage, 1)
    stage = time.perf_counter()
    dm, latents, report["diffusion"] = run_diffusion_stage(config, data, ae, setup)
    report["diffusion"]["stage_seconds"] = round(time.perf_counter() - stage, 1)
    if config.evaluation is not None:
        stage = time.perf_counter()
        evaluation = evaluate_generators_task(config, data.train, data.holdout, ae, dm, latents, amp=setup.amp,
                                              device=setup.device, log=get_run_logger().info)
        report["evaluation"] = evaluation.model_dump()
        report["evaluation"]["spread"] = f"draws ({evaluation.draws}) of {evaluation.samples_per_draw} samples"
        report["evaluation"]["stage_seconds"] = round(time.perf_counter() - stage, 1)
    return report


@flow(name="latent-diffusion")
def latent_diffusion(config: LatentDiffusionFlowConfig) -> dict:
    """The whole job: autoencoder, diffusion, samples, evaluation table, report; with ``seeds`` > 1 once per training
    seed on the same texts, the table then the mean and standard deviation over the seeds."""
    from tasks.evaluate_diffusion import combine_seeds

    setup = _device_setup(config)
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_texts(config, setup.device)
    report = {"texts": data.stats, "config": config.model_dump(mode="json")}
    per_seed = []
    for k in range(config.seeds):
        one = seed_config(config, k)
        per_seed.append(_train_and_evaluate(one, data, setup))
        per_seed[-1]["workdir"] = os.path.abspath(one.workdir)
        if config.seeds > 1:  # each seed's own report at once (the first seed's workdir gets the combined one at the end)
            _write_report({"texts": data.stats, **per_seed[-1]}, one.workdir, "report.json" if k else "seed-report.json")
    report.update(per_seed[0])
    if config.seeds > 1:
        report["seeds"] = [{"workdir": r["workdir"], "autoencoder_bleu": r["autoencoder"]["holdout"]["bleu"],
                            "rows": r.get("evaluation", {}).get("rows")} for r in per_seed]
        report["autoencoder"]["holdout"]["bleu_seeds"] = [r["autoencoder"]["holdout"]["bleu"] for r in per_seed]
        if config.evaluation is not None:
            report["evaluation"]["rows"] = combine_seeds([r["evaluation"]["rows"] for r in per_seed])
            report["evaluation"]["spread"] = f"seeds ({config.seeds}); each seed's figure is its mean over draws"
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    _publish(report, config.workdir)
    report["workdir"] = os.path.abspath(config.workdir)
    report["report"] = _write_report(report, config.workdir)
    if config.evaluation is not None:
        page = results_report(ResultsPageConfig(diffusion=config.workdir, out_dir=os.path.join(config.workdir, "results")))
        report["results_page"] = page["markdown_path"]
    return report
