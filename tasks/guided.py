"""Diffusion-guided language modeling (DGLM, issue 16), training stages and generation as plain functions.

    document shards -> BPE tokenizer -> plain LM pretraining (tasks.pretrain; and a reference LM, another seed)
    -> plans (tasks.guided_data: examples, MiniLM embeddings, plan space)
    -> plan fine-tune: the pretrained LM + a soft-prompt generator on noised plans       <workdir>/plan_lm
    -> class-conditional reference: the pretrained LM + one control vector per attribute  <workdir>/class_lm
    -> plan prior: prefix embedding -> plan, v-prediction diffusion with EMA               <workdir>/prior
    -> attribute classifiers: a logistic regression per attribute on clean plans           <workdir>/classifiers

Every training folder is written atomically with its trainer state (``models.train.fit``): a finished one is
reused, an interrupted one resumes exactly. Generation: the prior samples a plan for the prefix (steered by the
classifiers' gradients when attributes are asked for), the plan is put back on the sphere, re-noised to
``inference_alpha2`` and spliced into the LM as a soft prompt. ``python -m tasks.guided finetune --kind plan|class
--config FILE`` runs one fine-tune in a process of its own (the flow trains the two at once that way).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from models.device import resolve_device
from models.plan_lm import (
    ClassPrompt,
    PlanPromptGenerator,
    PlanSpace,
    mean_nll,
    token_frequencies,
    token_rms,
    noise_levels,
    noise_plan,
    sample_continuations,
    training_batch,
)
from models.plan_prior import LinearAttribute, PlanDenoiser, PlanDiffusion, PlanGuidance
from models.diffusion import EMA
from models.train import (
    autocast,
    autocast_dtype,
    fit,
    latest_checkpoint,
    load_lm_folder,
    load_module,
    load_trainer_state,
    quiet_progress,
    save_lm_folder,
    save_module,
    save_trainer_state,
    write_folder_atomic,
)
from schemas.errors import UserInputError, report_to_launcher
from schemas.guided_configs import AttributeConfig, ClassifierConfig, GuidedFlowConfig, GuidedSamplingConfig
from schemas.reports import AttributeClassifierReport, PlanPriorReport, SoftPromptLMReport
from tasks.diffusion import step_generators
from tasks.guided_data import (PlanData, class_labels, drop_labels, dropped_prefixes, length_grouped_batch,
                               load_plan_data, load_plan_space)

logger = logging.getLogger(f"lmlm.{__name__}")

FOLDERS = {"tokenizer": "tokenizer", "lm": "lm", "reference_lm": "reference_lm", "plans": "plans", "plan": "plan_lm",
           "class": "class_lm", "prior": "prior", "classifiers": "classifiers", "evaluation": "evaluation"}


def folder(workdir: str, what: str) -> str:
    return os.path.join(workdir, FOLDERS[what])


# ----------------------------------------------------------------------------- tokenizer and base LM


def train_guided_tokenizer(shards: list[str], holdout_fraction: float, vocab_size: int, out_dir: str) -> str:
    """The byte-level BPE of every LM here, trained once on the training documents' text (reused after)."""
    from models.tokenizer import train_tokenizer
    from tasks.pretrain import split_texts

    if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        texts = (t for shard in shards for t in split_texts(shard, "text", holdout_fraction)[0])
        train_tokenizer(texts, vocab_size, out_dir)
    return out_dir


def base_lm_checkpoint(workdir: str) -> str:
    path = latest_checkpoint(folder(workdir, "lm"))
    if path is None:
        raise UserInputError(f"{folder(workdir, 'lm')}: no pretrained LM; run `lmlm guided train` (stage lm) first")
    return path


# ----------------------------------------------------------------------------- soft-prompt LMs


class SoftPromptLM(nn.Module):
    """A causal LM and the module that makes its soft prompt (plan generator or class prompt)."""

    def __init__(self, lm, prompt: nn.Module):
        super().__init__()
        self.lm, self.prompt = lm, prompt


def _prompt_module(kind: str, meta: dict, lm) -> nn.Module:
    d_lm = lm.config.hidden_size
    if kind == "plan":
        c = meta["plan_lm"]
        return PlanPromptGenerator(meta["plan_dim"], c["soft_tokens"], c["width"], c["layers"], c["heads"], d_lm,
                                   token_rms(lm))
    return ClassPrompt([len(v) for v in meta["classes"].values()], d_lm)


def load_soft_prompt_lm(path: str, device: str | torch.device = "auto") -> tuple[SoftPromptLM, dict]:
    """(model in eval mode on ``device``, its config.json) of a folder :func:`train_soft_prompt_lm` wrote."""
    meta, lm = load_lm_folder(path, "no soft-prompt LM here; run `lmlm guided train` first")
    model = SoftPromptLM(lm, _prompt_module(meta["kind"], meta, lm)).to(resolve_device(device))
    load_module(model.prompt, os.path.join(path, "prompt.safetensors"))
    return model.eval(), meta


def train_soft_prompt_lm(kind: str, config: GuidedFlowConfig, *, device: str | torch.device = "auto",
                         log=logger.info) -> SoftPromptLMReport:
    """Fine-tune the pretrained LM with a soft prompt between prefix and continuation: ``plan`` (the generator on
    noised plans) or ``class`` (one control vector per attribute, the class-conditional reference)."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer

    if kind not in ("plan", "class"):
        raise UserInputError(f"soft-prompt LM kind {kind!r}: use plan or class")
    out = folder(config.workdir, kind)
    budget = config.plan_lm.train if kind == "plan" else config.class_lm
    data = load_plan_data(folder(config.workdir, "plans"))
    train_rows = data.rows("train")
    classes = {a.name: sorted({v for v in data.labels(a.name) if v is not None}) for a in config.attributes}
    meta = {"kind": kind, "plan_dim": data.space.dim, "base": base_lm_checkpoint(config.workdir),
            "plan_lm": config.plan_lm.model_dump(mode="json") if kind == "plan" else None,
            "classes": classes if kind == "class" else None, "budget": budget.model_dump(mode="json"),
            "label_dropout": config.class_label_dropout if kind == "class" else None,
            "prefix_dropout": [config.plan_lm.prefix_dropout, config.plan_lm.prefix_dropout_mode]}
    groups = config.plan_lm.length_groups if kind == "plan" else 1  # the class reference: random batches (README)
    state = load_trainer_state(out)
    if state is not None and state.get("meta") != meta:
        raise UserInputError(f"{out} holds a {kind} LM trained with other settings or another base LM; use a new "
                             "workdir or delete that folder")
    device = resolve_device(device)
    amp = autocast_dtype(config.bf16, device)
    tokenizer = load_tokenizer(folder(config.workdir, "tokenizer"))
    with quiet_progress():
        lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm") if state else meta["base"])
    torch.manual_seed(config.plan_lm.seed)
    model = SoftPromptLM(lm, _prompt_module(kind, meta, lm)).to(device)
    n_lm = sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values())
    n_prompt = sum(p.numel() for p in model.prompt.parameters())
    k = model.prompt.soft_tokens
    report = dict(kind=kind, folder=out, lm_parameters=n_lm, prompt_parameters=n_prompt, soft_tokens=k)
    if state is not None:
        load_module(model.prompt, os.path.join(out, "prompt.safetensors"))
        if state["step"] >= budget.steps:
            log(f"{kind} LM: reusing finished checkpoint {out}")
            return SoftPromptLMReport(**report, steps=state["step"], train_seconds=state["train_seconds"],
                                      final_loss=_final(state["history"]), reused=True, history=state["history"])
    prefixes, conts = data.column("prefix_ids"), data.column("continuation_ids")
    pad = tokenizer.eos_token_id
    plans = data.space.standardize(torch.from_numpy(data.continuation[train_rows])).to(device)
    labels = class_labels(data, train_rows, classes).to(device) if kind == "class" else None
    unknown = torch.tensor([len(v) for v in classes.values()])
    cfg = config.plan_lm
    lengths = np.array([len(prefixes[r]) + len(conts[r]) for r in train_rows]) if groups > 1 else None

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(cfg.seed, step, device)
        idx = (length_grouped_batch(lengths, budget.batch_size, groups, cfg.seed, step) if groups > 1
               else rng.integers(0, len(train_rows), budget.batch_size))
        rows = train_rows[idx]
        batch = training_batch(dropped_prefixes([prefixes[r] for r in rows], cfg.prefix_dropout, cfg.prefix_dropout_mode,
                                                pad, rng), [conts[r] for r in rows], k, pad, cfg.train_prefix)
        batch = {key: v.to(device) for key, v in batch.items()}
        sel = torch.from_numpy(idx).to(device)
        if kind == "class":
            soft = model.prompt(drop_labels(labels[sel], unknown, config.class_label_dropout, gen))
        else:
            a2 = (noise_levels(len(idx), cfg.noise_shift, generator=gen, device=device) if cfg.noise_augmentation
                  else torch.ones(len(idx), device=device))
            soft = model.prompt(noise_plan(plans[sel], a2, generator=gen), a2)
            if cfg.bag_of_words_weight:
                table = model.lm.get_input_embeddings().weight
                frequencies = token_frequencies([conts[r] for r in rows], table.shape[0]).to(device)
                words = model.prompt.bag_of_words_nll(soft, table, frequencies)
                return mean_nll(model.lm, batch, soft) + cfg.bag_of_words_weight * words
        return mean_nll(model.lm, batch, soft)

    def save(_kind: str, trainer_state: dict) -> None:
        save_lm_folder(out, model.lm, tokenizer, {"prompt": model.prompt}, meta, trainer_state)

    what = "plan-conditioned LM" if kind == "plan" else "class-conditional LM"
    log(f"{what}: {n_lm:,} LM + {n_prompt:,} prompt parameters, k = {k}, {len(train_rows)} training examples on {device}")
    result = fit(model, batch_loss, budget, save=save, resume_state=state, amp=amp, log=log, label=f"{kind} LM",
                 lr_scales={"prompt": config.plan_lm.prompt_lr_scale if kind == "plan" else config.class_prompt_lr_scale})
    return SoftPromptLMReport(**report, steps=result["step"], train_seconds=round(result["train_seconds"], 1),
                              final_loss=_final(result["history"]), reused=False, history=result["history"])


def _final(history: list[dict]) -> float | None:
    return round(history[-1]["loss"], 4) if history else None


# ----------------------------------------------------------------------------- plan prior


def _prior_model(config_prior: dict, plan_dim: int) -> PlanDiffusion:
    torch.manual_seed(config_prior["seed"])
    return PlanDiffusion(PlanDenoiser(plan_dim, plan_dim, config_prior["width"], config_prior["blocks"]),
                         logsnr_shift=config_prior["logsnr_shift"])


def train_plan_prior(config: GuidedFlowConfig, *, device: str | torch.device = "auto", log=logger.info) -> PlanPriorReport:
    """The prefix-conditioned plan prior (EMA weights for sampling) on the training examples."""
    out = folder(config.workdir, "prior")
    data = load_plan_data(folder(config.workdir, "plans"))
    cfg = config.prior
    meta = cfg.model_dump(mode="json")
    state = load_trainer_state(out)
    if state is not None and state.get("config") != meta:
        raise UserInputError(f"{out} holds a plan prior trained with other settings; use a new workdir or delete it")
    device = resolve_device(device)
    model = _prior_model(meta, data.space.dim).to(device)
    ema = EMA(model, cfg.ema_decay)
    n_params = sum(p.numel() for p in model.parameters())
    if state is not None:
        load_module(model, os.path.join(out, "model.safetensors"))
        load_module(ema.model, os.path.join(out, "ema.safetensors"))
        if state["step"] >= cfg.train.steps:
            log(f"plan prior: reusing finished checkpoint {out}")
            return PlanPriorReport(folder=out, parameters=n_params, steps=state["step"], train_seconds=state["train_seconds"],
                                   final_loss=_final(state["history"]), reused=True, history=state["history"])
    rows = data.rows("train")
    x = data.space.standardize(torch.from_numpy(data.continuation[rows])).to(device)[:, None]
    cond = torch.from_numpy(data.prefix_embeddings(config.data.embed_batch_size)[rows]).to(device)

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(cfg.seed, step, device)
        idx = torch.from_numpy(rng.integers(0, len(rows), cfg.train.batch_size)).to(device)
        return model.loss(x[idx], cond[idx], cond_dropout=cfg.cond_dropout, generator=gen)

    def save(_kind: str, trainer_state: dict) -> None:
        def write(tmp: str) -> None:
            save_module(model, os.path.join(tmp, "model.safetensors"))
            save_module(ema.model, os.path.join(tmp, "ema.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"prior": meta, "plan_dim": data.space.dim, "step": trainer_state["step"]}, f, indent=2)
            save_trainer_state(tmp, {**trainer_state, "config": meta})
        write_folder_atomic(out, write)

    log(f"plan prior: {n_params:,} parameters, {len(rows)} (prefix, plan) pairs on {device}")
    result = fit(model, batch_loss, cfg.train, save=save, resume_state=state, amp=autocast_dtype(config.bf16, device),
                 after_step=lambda step: ema.update(model, step), log=log, label="plan prior")
    return PlanPriorReport(folder=out, parameters=n_params, steps=result["step"],
                           train_seconds=round(result["train_seconds"], 1), final_loss=_final(result["history"]),
                           reused=False, history=result["history"])


def load_plan_prior(path: str, device: str | torch.device = "auto") -> PlanDiffusion:
    """The EMA plan prior saved in ``path``."""
    meta_path = os.path.join(path, "config.json")
    if not os.path.isfile(meta_path):
        raise UserInputError(f"{path}: no plan prior here; run `lmlm guided train` first")
    meta = json.load(open(meta_path))
    model = _prior_model(meta["prior"], meta["plan_dim"]).to(resolve_device(device))
    load_module(model, os.path.join(path, "ema.safetensors"))
    return model.eval()


# ----------------------------------------------------------------------------- attribute classifiers


def fit_attribute_classifier(name: str, embeddings: np.ndarray, labels: list[str | None],
                             cfg: ClassifierConfig = ClassifierConfig()) -> LinearAttribute:
    """One logistic regression on clean unit-norm embeddings of the labelled rows (a new attribute costs this fit)."""
    from sklearn.linear_model import LogisticRegression

    keep = [i for i, y in enumerate(labels) if y is not None]
    classes = sorted({labels[i] for i in keep})
    if len(classes) < 2:
        raise UserInputError(f"attribute {name!r}: needs at least two labelled values, got {classes}")
    model = LogisticRegression(C=cfg.inverse_l2, max_iter=cfg.max_iter)
    model.fit(embeddings[keep], [labels[i] for i in keep])
    return LinearAttribute.from_sklearn(name, model)


def save_attribute(attribute: LinearAttribute, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"name": attribute.name, "classes": attribute.classes, "weight": attribute.weight.tolist(),
                   "bias": attribute.bias.tolist()}, f)
    os.replace(tmp, path)
    return path


def load_attribute(path: str) -> LinearAttribute:
    d = json.load(open(path))
    return LinearAttribute(d["name"], d["classes"], torch.tensor(d["weight"]), torch.tensor(d["bias"]))


def load_attributes(workdir: str) -> dict[str, LinearAttribute]:
    found = folder(workdir, "classifiers")
    if not os.path.isdir(found):
        return {}
    return {a.name: a for a in (load_attribute(os.path.join(found, f)) for f in sorted(os.listdir(found))
                                if f.endswith(".json"))}


def fit_and_save_attribute(workdir: str, name: str, data: PlanData, labels: list[str | None],
                           cfg: ClassifierConfig = ClassifierConfig()) -> AttributeClassifierReport:
    """Fit attribute ``name`` on the training examples' plans (``labels``: one per example, None unlabelled), score it
    on the held-out ones, save it as ``<workdir>/classifiers/<name>.json``."""
    t0 = time.perf_counter()
    train, holdout = data.rows("train"), data.rows("holdout")
    found = sum(labels[i] is not None for i in train)
    if not found:
        raise UserInputError(f"attribute {name!r}: no training example has a label; label the shards first")
    a = fit_attribute_classifier(name, data.continuation[train], [labels[i] for i in train], cfg)
    held = [i for i in holdout if labels[i] in a.classes]
    accuracy = None
    if held:
        with torch.no_grad():
            pred = a(torch.from_numpy(data.continuation[held])).argmax(-1).tolist()
        accuracy = round(float(np.mean([a.classes[p] == labels[i] for p, i in zip(pred, held)])), 4)
    path = save_attribute(a, os.path.join(folder(workdir, "classifiers"), f"{name}.json"))
    return AttributeClassifierReport(name=name, path=path, classes=a.classes, train_examples=found,
                                     holdout_examples=len(held), holdout_accuracy=accuracy,
                                     seconds=round(time.perf_counter() - t0, 2))


def train_classifiers(config: GuidedFlowConfig, log=logger.info) -> list[AttributeClassifierReport]:
    """A classifier per configured attribute from the training examples' plans, scored on the held-out ones."""
    data = load_plan_data(folder(config.workdir, "plans"))
    reports = []
    for a in config.attributes:
        reports.append(fit_and_save_attribute(config.workdir, a.name, data, data.labels(a.name), config.classifier))
        r = reports[-1]
        log(f"classifier {a.name}: {len(r.classes)} classes from {r.train_examples} plans, held-out accuracy "
            f"{r.holdout_accuracy} ({r.holdout_examples} plans)")
    return reports


def fit_new_attribute(workdir: str, attribute: AttributeConfig, shards: list[str],
                      cfg: ClassifierConfig = ClassifierConfig(), log=logger.info) -> AttributeClassifierReport:
    """A new attribute in one logistic-regression fit: labels read from the shards (a column, or a metadata key) for
    the training examples whose plans are already embedded; nothing else is trained."""
    from tasks.guided_data import read_documents

    data = load_plan_data(folder(workdir, "plans"))
    by_doc = {d.doc_id: d.labels[attribute.name] for d in read_documents(shards, [attribute], 0.5, 0.5)}
    report = fit_and_save_attribute(workdir, attribute.name, data, [by_doc.get(d) for d in data.column("doc_id")], cfg)
    log(f"attribute {attribute.name}: classes {report.classes}, {report.train_examples} training plans, held-out "
        f"accuracy {report.holdout_accuracy}")
    return report


# ----------------------------------------------------------------------------- generation


@dataclass
class GuidedLM:
    """Everything generation needs, loaded once."""

    plan_lm: SoftPromptLM
    space: PlanSpace
    prior: PlanDiffusion
    attributes: dict[str, LinearAttribute]
    tokenizer: object
    device: torch.device
    amp: torch.dtype | None

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id


def load_guided(workdir: str, device: str | torch.device = "auto", bf16: str | bool = "auto") -> GuidedLM:
    from models.tokenizer import load_tokenizer

    device = resolve_device(device)
    plan_lm, _ = load_soft_prompt_lm(folder(workdir, "plan"), device)
    return GuidedLM(plan_lm, load_plan_space(folder(workdir, "plans")), load_plan_prior(folder(workdir, "prior"), device),
                    load_attributes(workdir), load_tokenizer(folder(workdir, "tokenizer")), device,
                    autocast_dtype(bf16, device))


def guidance_terms(g: GuidedLM, wanted: dict[str, str | list[str]], scales: dict[str, float]) -> list[tuple]:
    """(classifier, target ids, scale) per attribute asked for: ``wanted`` name -> value (or one value per row)."""
    return attribute_terms(g.attributes, wanted, scales, "classifier", "fit one with `lmlm guided fit-attribute`")


def attribute_terms(classifiers: dict, wanted: dict[str, str | list[str]], scales: dict[str, float], what: str,
                    hint: str) -> list[tuple]:
    """(classifier, target ids () or (B,), scale (default 1)) per attribute of ``wanted`` among ``classifiers`` (name
    -> a model with ``classes`` and ``index``); an unknown attribute or value is one error line."""
    terms = []
    for name, value in wanted.items():
        if name not in classifiers:
            raise UserInputError(f"attribute {name!r}: no {what}; known: {', '.join(sorted(classifiers)) or 'none'} ({hint})")
        a = classifiers[name]
        values = [value] if isinstance(value, str) else list(value)
        unknown = sorted({v for v in values if v not in a.classes})
        if unknown:
            raise UserInputError(f"attribute {name}={unknown[0]}: not a class of its classifier; use one of {', '.join(a.classes)}")
        target = torch.tensor([a.index(v) for v in values]) if len(values) > 1 else torch.tensor(a.index(values[0]))
        terms.append((a, target, float(scales.get(name, 1.0))))
    return terms


def sample_plans(g: GuidedLM, prefix_embeddings: torch.Tensor, terms: list[tuple], sampling: GuidedSamplingConfig, *,
                 seed: int = 0) -> tuple[torch.Tensor, list[float] | None]:
    """Clean standardised plans (B, D) for prefix embeddings (B, D) put back on the sphere, and the classifiers' mean
    p(target) of them (None without terms); guided by ``terms`` (classifier, target ids (B,) or (), scale)."""
    out, probs = [], []
    gen = torch.Generator(g.device).manual_seed(seed)
    for i in range(0, len(prefix_embeddings), sampling.batch_size):
        cond = prefix_embeddings[i:i + sampling.batch_size].to(g.device)
        part = [(a, t[i:i + len(cond)] if t.dim() else t, s) for a, t, s in terms]
        guide = PlanGuidance(g.space, part, samples=sampling.posterior_samples, generator=gen) if part else None
        with autocast(g.device, g.amp):
            x = g.prior.sample((len(cond), 1, g.space.dim), cond, steps=sampling.steps, sampler=sampling.sampler,
                               guidance_scale=sampling.cfg_scale, generator=gen, classifier=guide,
                               classifier_scale=1.0 if guide is not None else 0.0)
        x = g.space.project(x[:, 0].float())
        if guide is not None:
            probs.append(torch.stack(guide.probabilities(x)).cpu())
        out.append(x.cpu())
    mean_p = torch.cat(probs, dim=1).mean(dim=1).tolist() if probs else None
    return torch.cat(out), mean_p


def write_continuations(model: SoftPromptLM, prefixes: list[list[int]], soft_inputs, sampling: GuidedSamplingConfig, *,
                        eos: int, amp: torch.dtype | None, seed: int = 0, logit_bias: torch.Tensor | None = None,
                        kind: str = "plan") -> list[list[int]]:
    """``sampling.max_new_tokens`` tokens after each prefix, in batches. ``soft_inputs``: clean standardised plans
    (N, D) re-noised to ``inference_alpha2`` (kind plan), class ids (N, A) (kind class), or None (the bare LM)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for i in range(0, len(prefixes), sampling.batch_size):
        j = min(i + sampling.batch_size, len(prefixes))
        soft = None
        with torch.no_grad(), autocast(device, amp):
            if soft_inputs is not None and kind == "plan":
                a2 = torch.full((j - i,), sampling.inference_alpha2, device=device)
                soft = model.prompt(noise_plan(soft_inputs[i:j].to(device), a2, generator=gen), a2)
            elif soft_inputs is not None:
                soft = model.prompt(soft_inputs[i:j].to(device))
            bias = None if logit_bias is None else (logit_bias[i:j] if logit_bias.dim() == 2 else logit_bias)
            ids = sample_continuations(model.lm, prefixes[i:j], soft, max_new_tokens=sampling.max_new_tokens, pad_id=eos,
                                       top_p=sampling.top_p, temperature=sampling.temperature,
                                       repetition_penalty=sampling.repetition_penalty, logit_bias=bias, banned=[eos],
                                       generator=gen)
        out += ids.tolist()
    return out


def generate(workdir: str, prefix: str, n: int = 5, attributes: dict[str, str] | None = None,
             scales: dict[str, float] | None = None, sampling: GuidedSamplingConfig | None = None, *, seed: int = 0,
             device: str = "auto") -> list[str]:
    """``n`` continuations of ``prefix`` from a trained DGLM workdir, steered toward ``attributes`` (name -> value),
    each with its guidance scale (``scales``, default 1)."""
    from models.embed import embed

    sampling = sampling or GuidedSamplingConfig()
    g = load_guided(workdir, device)
    terms = guidance_terms(g, attributes or {}, scales or {})
    cond = torch.from_numpy(embed([prefix] * n))
    plans, _ = sample_plans(g, cond, terms, sampling, seed=seed)
    ids = g.tokenizer(prefix, add_special_tokens=False)["input_ids"] or [g.eos]
    tokens = write_continuations(g.plan_lm, [ids] * n, plans, sampling, eos=g.eos, amp=g.amp, seed=seed)
    return [g.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


# ----------------------------------------------------------------------------- a fine-tune in a process of its own


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.guided", description="one DGLM fine-tune in this process")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("finetune")
    f.add_argument("--kind", choices=["plan", "class"], required=True)
    f.add_argument("--config", required=True, help="JSON file of GuidedFlowConfig fields")
    f.add_argument("--device", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    try:
        config = GuidedFlowConfig(**json.load(open(args.config)))
        report = train_soft_prompt_lm(args.kind, config, device=args.device or config.device, log=logger.info)
    except UserInputError as exc:
        print(f"guided: error: {exc}", file=sys.stderr)
        report_to_launcher(str(exc))
        return 2
    with open(os.path.join(report.folder, "report.json"), "w") as f:
        f.write(report.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
