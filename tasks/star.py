"""STAR-LDM (issue 17), training and generation as plain functions over a DGLM-shaped workdir.

    DGLM's stages (tasks.guided): tokenizer, pretrained LM, reference LM, plan examples          <workdir>/...
    -> joint training: DGLM's plan LM and its generator (star.init) + score head, NLL + w·v-loss  <workdir>/star
    -> noise-conditioned attribute classifiers on z_t, one per attribute                        <workdir>/star_classifiers
    generation: encode the prefix once (KV cache) -> think: denoising steps over the k soft tokens
    (steered by the classifiers' gradients when attributes are asked for) -> the plan on the sphere, re-noised
    to inference_alpha2 -> write; ``every-sentence`` thinks again after each sentence the model ends.

Every training folder is written atomically with its trainer state (``models.train.fit``): a finished one is
reused, an interrupted one resumes exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.device import resolve_device
from models.diffusion import EMA
from models.kv_cache import cpu_bf16_attention
from models.plan_lm import (
    PlanPromptGenerator,
    PlanSpace,
    noise_plan,
    sample_continuations,
    token_frequencies,
    token_rms,
    training_batch,
)
from models.star import (
    NoisyAttribute,
    NoisyGuidance,
    PrefixState,
    ScoreHead,
    StarLDM,
    think,
)
from models.train import (
    autocast,
    autocast_dtype,
    fit,
    load_lm_folder,
    load_module,
    load_trainer_state,
    quiet_progress,
    save_lm_folder,
)
from schemas.errors import UserInputError
from schemas.star_configs import StarFlowConfig, StarSamplingConfig
from tasks.diffusion import step_generators
from tasks.guided import attribute_terms, base_lm_checkpoint
from tasks.guided import folder as guided_folder
from tasks.guided_data import dropped_prefixes, load_plan_data, load_plan_space

logger = logging.getLogger(f"lmlm.{__name__}")

STAR_FOLDERS = {"star": "star", "star_classifiers": "star_classifiers", "star_evaluation": "star_evaluation"}


def folder(workdir: str, what: str) -> str:
    if what in STAR_FOLDERS:
        return os.path.join(workdir, STAR_FOLDERS[what])
    return guided_folder(workdir, what)


def _final(history: list[dict]) -> float | None:
    return round(history[-1]["loss"], 4) if history else None


# ----------------------------------------------------------------------------- the joint model


def _build(meta: dict, lm) -> StarLDM:
    c, d_lm = meta["star"], lm.config.hidden_size
    torch.manual_seed(c["seed"])
    prompt = PlanPromptGenerator(meta["plan_dim"], c["soft_tokens"], c["width"], c["layers"], c["heads"], d_lm, token_rms(lm))
    head = ScoreHead(d_lm, c["soft_tokens"], meta["plan_dim"], c["head_width"], c["head_layers"], c["heads"])
    return StarLDM(lm, prompt, head)


GENERATOR_SHAPE = ("soft_tokens", "width", "layers", "heads")


def _finished_plan_lm(config: StarFlowConfig) -> dict | None:
    """The config.json of DGLM's plan LM (the start of ``star.init: plan_lm``) when its fine-tune has finished."""
    path = os.path.join(folder(config.workdir, "plan"), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    return meta if meta.get("step", 0) >= config.plan_lm.train.steps else None


def plan_lm_done(config: StarFlowConfig) -> bool:
    """Whether DGLM's plan LM (the start of ``star.init: plan_lm``) has finished its fine-tune."""
    return _finished_plan_lm(config) is not None


def starting_point(config: StarFlowConfig) -> tuple[str, str | None]:
    """(the LM the joint training starts from, the folder whose ``prompt.safetensors`` starts the soft-prompt generator,
    or None for a new one) as ``star.init`` says; a plan LM of another generator shape is one error line."""
    if config.star.init == "lm":
        return base_lm_checkpoint(config.workdir), None
    plan, meta = folder(config.workdir, "plan"), _finished_plan_lm(config)
    if meta is None:
        raise UserInputError(f"{plan}: no finished DGLM plan LM to start STAR-LDM from (star.init: plan_lm); run "
                             "`lmlm guided train --stage plan_lm` or set star.init: lm")
    theirs = meta["plan_lm"]
    for key in GENERATOR_SHAPE:
        if theirs[key] != getattr(config.star, key):
            raise UserInputError(f"star.{key} is {getattr(config.star, key)} but DGLM's plan LM in {plan} has {theirs[key]}: "
                                 f"star.init: plan_lm needs DGLM's generator shape (set star.{key}: {theirs[key]}, or star.init: lm)")
    return os.path.join(plan, "lm"), plan


def train_star(config: StarFlowConfig, *, device: str | torch.device = "auto", log=logger.info) -> dict:
    """The joint fine-tune from the pretrained LM (or DGLM's plan LM and its generator, ``star.init``): next-token
    NLL + w · sigmoid-weighted v-MSE at one noise level per example. Returns a report dict (parameters, steps,
    seconds, final losses)."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer

    out, cfg = folder(config.workdir, "star"), config.star
    data = load_plan_data(folder(config.workdir, "plans"))
    base, generator = starting_point(config)
    meta = {"plan_dim": data.space.dim, "base": base, "star": cfg.model_dump(mode="json")}
    state = load_trainer_state(out)
    if state is not None and state.get("meta") != meta:
        raise UserInputError(f"{out} holds a STAR-LDM model trained with other settings or another base LM; use a new "
                             "workdir or delete that folder")
    device = resolve_device(device)
    tokenizer = load_tokenizer(folder(config.workdir, "tokenizer"))
    with quiet_progress():
        lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm") if state else meta["base"])
    model = _build(meta, lm).to(device)
    n_lm = sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values())
    n_new = sum(p.numel() for m in (model.prompt, model.head) for p in m.parameters())
    report = {"folder": out, "lm_parameters": n_lm, "new_parameters": n_new, "soft_tokens": cfg.soft_tokens}
    if state is None and generator is not None:  # a fresh start from DGLM's generator; a resume loads its own below
        load_module(model.prompt, os.path.join(generator, "prompt.safetensors"))
    if state is not None:  # the folder's weights are the ones sampled from: the EMA's, when there is one
        load_module(model.prompt, os.path.join(out, "prompt.safetensors"))
        load_module(model.head, os.path.join(out, "head.safetensors"))
        if state["step"] >= cfg.train.steps:
            log(f"STAR-LDM: reusing finished checkpoint {out}")
            return {**report, "steps": state["step"], "train_seconds": state["train_seconds"],
                    "final_loss": _final(state["history"]), "reused": True, "history": state["history"]}
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    if state is not None and ema is not None:  # resuming: the EMA goes on from the saved one, training from its own
        load_module(model, os.path.join(out, "training.safetensors"))
    rows = data.rows("train")
    prefixes, conts = data.column("prefix_ids"), data.column("continuation_ids")
    plans = data.space.standardize(torch.from_numpy(data.continuation[rows])).to(device)
    pad, k = tokenizer.eos_token_id, cfg.soft_tokens
    parts = {"nll": [], "v": []}

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(cfg.seed, step, device)
        idx = rng.integers(0, len(rows), cfg.train.batch_size)
        own = [prefixes[r] for r in rows[idx]]
        used = dropped_prefixes(own, cfg.prefix_dropout, "swap", pad, rng)
        batch = training_batch(used, [conts[r] for r in rows[idx]], k, pad, train_prefix=False)
        batch = {key: v.to(device) for key, v in batch.items()}
        x = plans[torch.from_numpy(idx).to(device)]
        t = torch.rand(len(idx), generator=gen, device=device)
        eps = torch.randn(x.shape, generator=gen, device=device)
        null = torch.rand(len(idx), generator=gen, device=device) < cfg.null_share
        consistent = torch.tensor([u is o or u == o for u, o in zip(used, own)], device=device)
        extra = [(torch.rand(len(idx), generator=gen, device=device), torch.randn(x.shape, generator=gen, device=device),
                  torch.rand(len(idx), generator=gen, device=device) < cfg.null_share) for _ in range(cfg.extra_noise_draws)]
        nll, v_loss, soft = model.losses(batch, x, t, eps, null, consistent, extra, noise_shift=cfg.noise_shift)
        parts["nll"].append(float(nll.detach()))
        parts["v"].append(float(v_loss.detach()))
        loss = nll + cfg.diffusion_weight * v_loss
        if cfg.bag_of_words_weight:
            table = model.lm.get_input_embeddings().weight
            freq = token_frequencies([conts[r] for r in rows[idx]], table.shape[0]).to(device)
            loss = loss + cfg.bag_of_words_weight * model.prompt.bag_of_words_nll(soft, table, freq)
        return loss

    def save(kind: str, trainer_state: dict) -> None:
        # sampled from: the EMA's weights; a checkpoint to resume from also keeps the training weights
        use = model if ema is None else ema.model
        extra = {"training": model} if ema is not None and kind != "final" else {}
        save_lm_folder(out, use.lm, tokenizer, {"prompt": use.prompt, "head": use.head, **extra}, meta, trainer_state)

    def log_parts(message: str) -> None:
        if parts["nll"]:
            message += f"; NLL {np.mean(parts['nll']):.3f}, v-loss {np.mean(parts['v']):.3f}"
            parts["nll"].clear(), parts["v"].clear()
        log(message)

    log(f"STAR-LDM: {n_lm:,} LM + {n_new:,} generator/head parameters, k = {k}, {len(rows)} training examples on {device}")
    result = fit(model, batch_loss, cfg.train, save=save, resume_state=state, amp=autocast_dtype(config.bf16, device),
                 log=log_parts, label="STAR-LDM", lr_scales={"prompt": cfg.prompt_lr_scale, "head": cfg.prompt_lr_scale},
                 after_step=None if ema is None else lambda step: ema.update(model, step))
    return {**report, "steps": result["step"], "train_seconds": round(result["train_seconds"], 1),
            "final_loss": _final(result["history"]), "reused": False, "history": result["history"]}


def load_star(path: str, device: str | torch.device = "auto") -> StarLDM:
    meta, lm = load_lm_folder(path, "no STAR-LDM model here; run `lmlm star train` first")
    model = _build(meta, lm).to(resolve_device(device))
    load_module(model.prompt, os.path.join(path, "prompt.safetensors"))
    load_module(model.head, os.path.join(path, "head.safetensors"))
    return model.eval()


# ----------------------------------------------------------------------------- noise-conditioned classifiers


def train_noisy_classifiers(config: StarFlowConfig, *, device: str | torch.device = "auto", log=logger.info) -> list[dict]:
    """One noise-conditioned classifier per configured attribute on the training examples' noised plans (the
    sampling schedule's noise levels), scored on the held-out plans at α² = 1 and 0.5; saved under star_classifiers/."""
    from models.diffusion import logsnr_cosine

    data = load_plan_data(folder(config.workdir, "plans"))
    cfg, device = config.star_classifier, resolve_device(device)
    out = folder(config.workdir, "star_classifiers")
    shift = config.star_sampling.logsnr_shift
    reports = []
    for attribute in config.attributes:
        labels = data.labels(attribute.name)
        train = [i for i in data.rows("train") if labels[i] is not None]
        classes = sorted({labels[i] for i in train})
        if len(classes) < 2:
            raise UserInputError(f"attribute {attribute.name!r}: needs at least two labelled values, got {classes}")
        path = os.path.join(out, f"{attribute.name}.safetensors")
        meta = {"name": attribute.name, "classes": classes, "plan_dim": data.space.dim, "width": cfg.width,
                "blocks": cfg.blocks, "train": cfg.train.model_dump(mode="json"), "shift": shift, "seed": cfg.seed}
        if os.path.isfile(path) and _same_meta(path, meta):
            log(f"STAR classifier {attribute.name}: reusing {path}")
            reports.append({"name": attribute.name, "path": path, "reused": True})
            continue
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = NoisyAttribute(attribute.name, classes, data.space.dim, cfg.width, cfg.blocks).to(device)
        x = data.space.standardize(torch.from_numpy(data.continuation[train])).to(device)
        y = torch.tensor([classes.index(labels[i]) for i in train], device=device)

        def batch_loss(step: int) -> torch.Tensor:
            rng, gen = step_generators(cfg.seed, step, device)
            idx = torch.from_numpy(rng.integers(0, len(train), cfg.train.batch_size)).to(device)
            logsnr = logsnr_cosine(torch.rand(len(idx), generator=gen, device=device), shift=shift)
            z = noise_plan(x[idx], torch.sigmoid(logsnr), generator=gen)
            return torch.nn.functional.cross_entropy(model(z, logsnr), y[idx])

        fit(model, batch_loss, cfg.train, save=lambda *_: None, log=lambda m: None, label=f"classifier {attribute.name}")
        model.eval()
        held = [i for i in data.rows("holdout") if labels[i] in classes]
        accuracy = {}
        if held:
            xh = data.space.standardize(torch.from_numpy(data.continuation[held])).to(device)
            yh = torch.tensor([classes.index(labels[i]) for i in held], device=device)
            gen = torch.Generator(device).manual_seed(0)
            with torch.no_grad():
                for a2 in (1.0, 0.5):
                    logsnr = torch.full((len(held),), float(np.log(a2 / max(1 - a2, 1e-6))), device=device)
                    pred = model(noise_plan(xh, a2, generator=gen), logsnr).argmax(-1)
                    accuracy[f"alpha2={a2:g}"] = round(float((pred == yh).float().mean()), 4)
        os.makedirs(out, exist_ok=True)
        from safetensors.torch import save_model

        save_model(model, path + ".tmp", metadata={"meta": json.dumps(meta)})
        os.replace(path + ".tmp", path)
        reports.append({"name": attribute.name, "path": path, "classes": classes, "train_plans": len(train),
                        "holdout_accuracy": accuracy, "seconds": round(time.perf_counter() - t0, 1), "reused": False})
        log(f"STAR classifier {attribute.name}: {len(classes)} classes from {len(train)} plans, held-out accuracy "
            f"{accuracy} ({time.perf_counter() - t0:.0f} s)")
    return reports


def _same_meta(path: str, meta: dict) -> bool:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "null")) == meta


def load_noisy_classifiers(workdir: str, device: torch.device) -> dict[str, NoisyAttribute]:
    from safetensors import safe_open

    found, out = folder(workdir, "star_classifiers"), {}
    if not os.path.isdir(found):
        return out
    for name in sorted(os.listdir(found)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(found, name)
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        model = NoisyAttribute(meta["name"], meta["classes"], meta["plan_dim"], meta["width"], meta["blocks"]).to(device)
        load_module(model, path)
        out[meta["name"]] = model.eval()
    return out


# ----------------------------------------------------------------------------- generation


@dataclass
class Star:
    """Everything STAR generation needs, loaded once."""

    model: StarLDM
    space: PlanSpace
    attributes: dict[str, NoisyAttribute]
    tokenizer: object
    device: torch.device
    amp: torch.dtype | None

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id


def load_star_workdir(workdir: str, device: str | torch.device = "auto", bf16: str | bool = "auto") -> Star:
    from models.tokenizer import load_tokenizer

    device = resolve_device(device)
    return Star(load_star(folder(workdir, "star"), device), load_plan_space(folder(workdir, "plans")),
                load_noisy_classifiers(workdir, device), load_tokenizer(folder(workdir, "tokenizer")), device,
                autocast_dtype(bf16, device))


def star_guidance(s: Star, wanted: dict[str, str | list[str]], scales: dict[str, float]) -> NoisyGuidance | None:
    """The guidance loss of the attributes asked for (name -> value, or one value per row), each with its scale."""
    terms = attribute_terms(s.attributes, wanted, scales, "STAR classifier", "train them with `lmlm star train`")
    return NoisyGuidance(terms) if terms else None


def _rows(guidance: NoisyGuidance | None, rows) -> NoisyGuidance | None:
    """The guidance of some rows (a slice or a list of row numbers): per-row targets selected, shared ones kept."""
    if guidance is None:
        return None
    index = rows if isinstance(rows, slice) else torch.tensor(rows)
    return NoisyGuidance([(a, t[index] if t.dim() else t, s)
                          for a, t, s in zip(guidance.attributes, guidance.targets, guidance.scales)])


@torch.no_grad()
def think_plans(s: Star, prefixes: list[list[int]], sampling: StarSamplingConfig, guidance: NoisyGuidance | None = None,
                *, generator: torch.Generator, steps: int | None = None) -> tuple[torch.Tensor, PrefixState]:
    """(clean standardised plans (B, D), put back on the sphere, of one thought per prefix; the prefixes' encoding,
    which the writing reuses). A null plan's clean stand-in is never needed: ``think: off`` skips this."""
    with autocast(s.device, s.amp), cpu_bf16_attention(s.model):
        state = PrefixState(s.model, prefixes, s.eos)
        x = think(s.model, state, steps=steps or sampling.steps, sampler=sampling.sampler, cfg_scale=sampling.cfg_scale,
                  logsnr_shift=sampling.logsnr_shift, guidance=guidance, generator=generator)
    return s.space.project(x.float()), state


def _soft(s: Star, plans: torch.Tensor | None, n: int, alpha2: float, generator: torch.Generator) -> torch.Tensor:
    """The soft prompt of plans re-noised to ``alpha2``; None plans: the null plan (pure noise at α² = 0)."""
    if plans is None:
        a2 = torch.zeros(n, device=s.device)
        z = torch.randn((n, s.space.dim), generator=generator, device=s.device)
    else:
        a2 = torch.full((n,), alpha2, device=s.device)
        z = noise_plan(plans.to(s.device), a2, generator=generator)
    return s.model.prompt(z, a2)


def write_after_thought(s: Star, prefixes: list[list[int]], plans: torch.Tensor | None, sampling: StarSamplingConfig,
                        n_tokens: int, gen: torch.Generator, state: PrefixState | None = None) -> list[list[int]]:
    """Write after each prefix and its plan's soft prompt; ``state``: the thought's encoding of the prefixes (reused)."""
    with torch.no_grad(), autocast(s.device, s.amp):
        soft = _soft(s, plans, len(prefixes), sampling.inference_alpha2, gen)
        return sample_continuations(s.model.lm, prefixes, soft, max_new_tokens=n_tokens, pad_id=s.eos,
                                    top_p=sampling.top_p, temperature=sampling.temperature,
                                    repetition_penalty=sampling.repetition_penalty, banned=[s.eos],
                                    generator=gen, prefix_state=state).tolist()


def sentence_end(tokenizer, tokens: list[int], min_tokens: int) -> int | None:
    """Length of the shortest head of ``tokens`` (at least ``min_tokens``) that ends a sentence: its last token ends
    with . ! or ? and the next one starts with a space or a line break; None if there is none."""
    for n in range(min_tokens, len(tokens)):
        if (tokenizer.decode(tokens[n - 1:n]).rstrip().endswith((".", "!", "?"))
                and tokenizer.decode(tokens[n:n + 1]).startswith((" ", "\n"))):
            return n
    return None


def star_continuations(s: Star, prefixes: list[list[int]], sampling: StarSamplingConfig,
                       guidance: NoisyGuidance | None = None, *, seed: int = 0, steps: int | None = None,
                       plans_out: list | None = None) -> list[list[int]]:
    """``sampling.max_new_tokens`` tokens after each prefix, in batches: think (``sampling.think``), then write.
    ``every-sentence``: write up to the first sentence the model ends, think again on prefix + text so far, and so on
    (rows re-plan at their own sentence ends). ``plans_out``: receives the first thought's plans (B, D)."""
    gen = torch.Generator(s.device).manual_seed(seed)
    N, out = sampling.max_new_tokens, []
    for i in range(0, len(prefixes), sampling.batch_size):
        j = min(i + sampling.batch_size, len(prefixes))
        part, g = prefixes[i:j], _rows(guidance, slice(i, j))
        if sampling.think == "off":
            out += write_after_thought(s, part, None, sampling, N, gen)
            continue
        plans, state = think_plans(s, part, sampling, g, generator=gen, steps=steps)
        if plans_out is not None:
            plans_out.append(plans.cpu())
        if sampling.think == "once":
            out += write_after_thought(s, part, plans, sampling, N, gen, state)
            continue
        written = [[] for _ in part]
        while True:
            todo = [r for r in range(len(part)) if len(written[r]) < N]
            if not todo:
                break
            rows_prefix = [part[r] + written[r] for r in todo]
            if any(written[r] for r in todo):  # a new thought for every row still writing
                plans_now, state = think_plans(s, rows_prefix, sampling, _rows(g, todo), generator=gen, steps=steps)
            else:
                plans_now = plans[todo]  # the first pass: every row, the first thought's encoding
            budget = max(N - len(written[r]) for r in todo)
            new = write_after_thought(s, rows_prefix, plans_now, sampling, budget, gen, state)
            for r, toks in zip(todo, new):
                toks = toks[:N - len(written[r])]
                cut = sentence_end(s.tokenizer, toks, sampling.min_sentence_tokens)
                written[r] += toks if cut is None else toks[:cut]
        out += written
    return out


def generate(workdir: str, prefix: str, n: int = 5, attributes: dict[str, str] | None = None,
             scales: dict[str, float] | None = None, sampling: StarSamplingConfig | None = None, *, seed: int = 0,
             device: str = "auto") -> list[str]:
    """``n`` continuations of ``prefix`` from a trained STAR-LDM workdir, steered toward ``attributes``."""
    sampling = sampling or StarSamplingConfig()
    s = load_star_workdir(workdir, device)
    guidance = star_guidance(s, attributes or {}, scales or {})
    ids = [s.eos] + s.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tokens = star_continuations(s, [ids] * n, sampling, guidance, seed=seed)
    return [s.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
