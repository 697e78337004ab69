"""STAR-LDM's evaluation (issue 17), as plain functions over a trained workdir.

    control      per attribute, DGLM's neutral held-out prefixes and judges (``tasks.evaluate_guided.AttributeBench``):
                 uncontrolled LM, STAR-LDM at each guidance scale, logit boosting, and DGLM's rows when the workdir has
                 a trained DGLM, all on the same prefixes and targets
    open-ended   held-out (prefix, real continuation) examples: the plain LM (the pretrained LM of the same size and
                 data), STAR-LDM thinking once, thinking off (null plan), the step ablation and think-every-sentence;
                 perplexity under the reference LM, MAUVE against the real continuations on the reference LM's
                 features (never the plan encoder's), distinct-n and diversity; mean ± std over draws; an LLM judge's
                 pairwise coherence win rate when a judge endpoint is configured
    cost         the time of a thought with the cached prefix (and without) against writing 8 tokens
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from models.device import resolve_device
from models.kv_cache import cpu_bf16_attention
from models.plan_lm import sample_continuations
from models.star import PrefixState, clear_step_graphs, step_graphs, think
from models.train import autocast, latest_checkpoint
from schemas.star_configs import StarFlowConfig
from tasks.evaluate_diffusion import (
    distinct_n,
    diversity,
    load_reference_lm,
    mauve_score,
)
from tasks.evaluate_guided import (
    attribute_bench,
    boost_mask,
    load_base_lm,
    measured_goals,
)
from tasks.guided import load_guided, sample_plans, write_continuations
from tasks.guided_data import load_plan_data, read_documents
from tasks.guided_metrics import conditional_nll
from tasks.reference_lm import lm_features
from tasks.star import (
    Star,
    folder,
    load_star_workdir,
    star_continuations,
    star_guidance,
    think_plans,
    write_after_thought,
)

logger = logging.getLogger(f"lmlm.{__name__}")


def _has_dglm(workdir: str) -> bool:
    import os

    return all(os.path.isfile(os.path.join(folder(workdir, f), "config.json")) for f in ("plan", "prior")) and \
        os.path.isdir(folder(workdir, "classifiers"))


def control_table(config: StarFlowConfig, s: Star, base, ref, data, docs: list, device, log=logger.info) -> dict:
    """Rows per attribute on DGLM's neutral prefixes: uncontrolled, STAR-LDM per guidance scale, logit boosting, and
    DGLM per guidance scale when trained; and the goals (dominance over boosting) for each guided system."""
    ev, sev, sampling = config.evaluation, config.star_evaluation, config.star_sampling
    g = load_guided(config.workdir, device, config.bf16) if sev.compare_dglm and _has_dglm(config.workdir) else None
    rows, goals, judges, neutrality = [], {}, {}, {}
    for attribute in config.attributes:
        name = attribute.name
        if ev.attributes is not None and name not in ev.attributes:
            continue
        classifier = s.attributes.get(name)
        if classifier is None:
            log(f"{name}: no STAR classifier; skipped")
            continue
        targets = attribute.targets or classifier.classes
        _, judges[name], bench, neutrality[name] = attribute_bench(attribute, config, data, docs, s.tokenizer, ref,
                                                                   targets, log)
        if bench is None:
            continue
        t0 = time.perf_counter()
        ids = write_continuations(base, bench.ids_rep, None, config.sampling, eos=s.eos, amp=s.amp, seed=ev.seed)
        bench.score("uncontrolled LM", "pretrained LM, top-p sampling", None, ids, time.perf_counter() - t0)
        for scale in sev.guidance_scales:
            t0 = time.perf_counter()
            guidance = star_guidance(s, {name: bench.targets_rep}, {name: scale}) if scale else None
            plans = []
            ids = star_continuations(s, bench.ids_rep, sampling, guidance, seed=ev.seed, plans_out=plans)
            target = torch.tensor([classifier.index(t) for t in bench.targets_rep])
            with torch.no_grad():  # the classifier's p(target) of the clean thought (λ of α² = 1 - 1e-4)
                x = torch.cat(plans).to(s.device)
                lam = torch.full((len(x),), 9.2, device=s.device)
                p = torch.softmax(classifier(x, lam), -1).gather(1, target[:, None].to(s.device)).mean()
            bench.score("STAR-LDM", f"guidance scale {scale:g}", scale, ids, time.perf_counter() - t0, round(float(p), 4))
        mask = boost_mask(bench, data, targets, base.lm.get_output_embeddings().weight.shape[0], ev.boost_words)
        for delta in ev.boost_deltas:
            t0 = time.perf_counter()
            ids = write_continuations(base, bench.ids_rep, None, config.sampling, eos=s.eos, amp=s.amp, seed=ev.seed,
                                      logit_bias=delta * mask)
            bench.score("logit boost", f"delta {delta:g}, {ev.boost_words} words per value", delta, ids,
                        time.perf_counter() - t0)
        if g is not None and name in g.attributes:
            from models.embed import embed

            cond = torch.from_numpy(embed([p.text for p in bench.prefixes])).repeat_interleave(bench.samples, dim=0)
            dglm_target = torch.tensor([g.attributes[name].index(t) for t in bench.targets_rep])
            for scale in ev.guidance_scales:
                t0 = time.perf_counter()
                terms = [(g.attributes[name], dglm_target, scale)] if scale else []
                plans, plan_p = sample_plans(g, cond, terms, config.sampling, seed=ev.seed)
                ids = write_continuations(g.plan_lm, bench.ids_rep, plans, config.sampling, eos=g.eos, amp=g.amp,
                                          seed=ev.seed)
                bench.score("DGLM", f"guidance scale {scale:g}", scale, ids, time.perf_counter() - t0,
                            None if plan_p is None else round(plan_p[0], 4))
        rows += bench.rows
        goals[name] = {"STAR-LDM": measured_goals(bench.rows, "STAR-LDM")}
        if g is not None:
            goals[name]["DGLM"] = measured_goals(bench.rows, "DGLM")
            goals[name]["STAR-LDM vs DGLM"] = star_vs_dglm(bench.rows)
        log(f"{name}: goals {goals[name]}")
    return {"rows": [r.model_dump(mode="json") for r in rows], "goals": goals, "judges": judges,
            "prefix_neutrality": neutrality, "dglm_compared": g is not None}


def star_vs_dglm(rows, tolerance: float = 0.05) -> dict:
    """Does STAR-LDM reach at least DGLM's attribute rate at equal perplexity? For each DGLM point, the best STAR-LDM
    rate at a perplexity at most ``tolerance`` above it."""
    star = [(r.perplexity.value, r.attribute_rate.value) for r in rows if r.system == "STAR-LDM"]
    checks = []
    for ppl, rate in ((r.perplexity.value, r.attribute_rate.value) for r in rows if r.system == "DGLM"):
        best = max((sr for sp, sr in star if sp <= ppl * (1 + tolerance)), default=None)
        checks.append({"dglm_perplexity": ppl, "dglm_rate": rate, "star_rate": best,
                       "at_least": best is not None and best >= rate})
    return {"points": checks, "met": f"{sum(c['at_least'] for c in checks)}/{len(checks)}"}


def _summary(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4),
            "draws": [round(float(v), 4) for v in values]}


def margin_over_draws(a: list[float], b: list[float]) -> dict:
    """Mean of ``a`` minus mean of ``b`` over independent draws, its standard error, and whether it is clear: more than
    two standard errors, with at least two draws of each (one draw cannot tell a lead from the draw's noise)."""
    margin = float(np.mean(a) - np.mean(b))
    if min(len(a), len(b)) < 2:
        return {"margin": round(margin, 4), "standard_error": None, "clear": False}
    se = float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    return {"margin": round(margin, 4), "standard_error": round(se, 4), "clear": margin > 2 * se}


def open_ended(config: StarFlowConfig, s: Star, base, ref, data, log=logger.info) -> dict:
    """Every open-ended system on the same held-out prefixes, ``draws`` sampling seeds each: perplexity under the
    reference LM, MAUVE against the real continuations (reference-LM features), distinct-n, diversity."""
    sev, sampling = config.star_evaluation, config.star_sampling
    rows = data.rows("holdout")[:sev.open_prefixes]
    prefix_ids, prefix_text, real = ([column[r] for r in rows] for column in (
        data.column("prefix_ids"), data.column("prefix_text"), data.column("continuation_text")))
    featurize = lambda texts: lm_features(texts, ref)  # noqa: E731
    real_features = featurize(real)
    systems = {"plain LM": lambda seed: write_continuations(base, prefix_ids, None, config.sampling, eos=s.eos, amp=s.amp,
                                                            seed=seed),
               "STAR-LDM, think once": lambda seed: star_continuations(s, prefix_ids, sampling, seed=seed),
               "STAR-LDM, thinking off (null plan)": lambda seed: star_continuations(
                   s, prefix_ids, sampling.model_copy(update={"think": "off"}), seed=seed)}
    for steps in sev.step_ablation:
        if steps != sampling.steps:
            systems[f"STAR-LDM, think once, {steps} steps"] = (
                lambda seed, steps=steps: star_continuations(s, prefix_ids, sampling, seed=seed, steps=steps))
    systems["STAR-LDM, think every sentence"] = lambda seed: star_continuations(
        s, prefix_ids, sampling.model_copy(update={"think": "every-sentence"}), seed=seed)
    main = list(systems)[:3]
    out, texts_first = {}, {}
    for system, write in systems.items():
        figures = {"perplexity": [], "mauve": [], "dist_1": [], "dist_2": [], "dist_3": [], "diversity": [], "seconds": []}
        draws = sev.draws if system in main else sev.ablation_draws
        for draw in range(draws):
            t0 = time.perf_counter()
            ids = write(sev.seed + draw)
            seconds = time.perf_counter() - t0
            conts = [s.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
            texts_first.setdefault(system, conts)
            nll, tok = conditional_nll(ref, prefix_text, conts)
            figures["perplexity"].append(float(np.exp(nll.sum() / max(tok.sum(), 1))))
            figures["mauve"].append(mauve_score(conts, real, seed=sev.seed + draw, reference_features=real_features,
                                                featurize=featurize, kmeans_seeds=sev.mauve_kmeans_seeds))
            for n in (1, 2, 3):
                figures[f"dist_{n}"].append(distinct_n(conts, n))
            figures["diversity"].append(diversity(conts))
            figures["seconds"].append(seconds)
        out[system] = {k: _summary(v) for k, v in figures.items()}
        log(f"open-ended | {system}: perplexity {out[system]['perplexity']['mean']:.2f} ± "
            f"{out[system]['perplexity']['std']:.2f}, MAUVE {out[system]['mauve']['mean']:.3f} ± "
            f"{out[system]['mauve']['std']:.3f}, diversity {out[system]['diversity']['mean']:.3f}")
    on, off = out["STAR-LDM, think once"], out["STAR-LDM, thinking off (null plan)"]
    mauve = margin_over_draws(on["mauve"]["draws"], off["mauve"]["draws"])
    goal = {"thinking_beats_off_on_mauve": mauve["clear"], "mauve_margin": mauve,
            "perplexity_no_worse": on["perplexity"]["mean"] <= off["perplexity"]["mean"] * 1.05}
    goal["met"] = goal["thinking_beats_off_on_mauve"] and goal["perplexity_no_worse"]
    examples = [{"prefix": prefix_text[i], "real": real[i], **{k: v[i] for k, v in texts_first.items()}} for i in range(3)]
    return {"prefixes": len(rows), "draws": sev.draws, "ablation_draws": sev.ablation_draws, "systems": out, "goal": goal, "examples": examples,
            "mauve_features": f"{ref.path}: last hidden state, mean over tokens (the reference LM, never the plan "
                              "encoder)", "texts": texts_first, "prefix_text": prefix_text}


@torch.no_grad()
def thought_cost(config: StarFlowConfig, s: Star, data, repeats: int = 3) -> dict:
    """Median seconds of a thought (``sampling.steps`` denoising steps) with the cached prefix and with the full
    [prefix][soft] pass at every step (the reference), of one cached denoising step, of writing 8 tokens after
    the prefix, and of thinking then writing 8 tokens as generation does (the writing reusing the thought's encoding
    of the prefix), at batch ``cost_batch``; the ratios the issue asks for. What a thought adds to generation is
    the last minus writing alone."""
    sev, sampling = config.star_evaluation, config.star_sampling
    rows = data.rows("holdout")[:sev.cost_batch]
    column = data.column("prefix_ids")
    prefixes = [column[r] for r in rows]

    def sync() -> None:  # on a GPU, kernels still queued belong to the call that queued them
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def thought(cached: bool, steps: int, graphs: bool | None = None):
        def run():
            with autocast(s.device, s.amp), cpu_bf16_attention(s.model):
                state = PrefixState(s.model, prefixes, s.eos)
                return think(s.model, state, steps=steps, sampler=sampling.sampler, cfg_scale=sampling.cfg_scale,
                             logsnr_shift=sampling.logsnr_shift, generator=torch.Generator(s.device).manual_seed(0),
                             cached=cached, graphs=graphs)
        return run

    def write(n: int):
        def run():
            with autocast(s.device, s.amp):
                sample_continuations(s.model.lm, prefixes, None, max_new_tokens=n, pad_id=s.eos,
                                     generator=torch.Generator(s.device).manual_seed(0))
        return run

    def think_then_write(n: int):  # generation's own path: the writing reuses the thought's encoding of the prefix
        def run():
            gen = torch.Generator(s.device).manual_seed(0)
            plans, state = think_plans(s, prefixes, sampling, generator=gen)
            write_after_thought(s, prefixes, plans, sampling, n, gen, state)
        return run

    cached, uncached = timed(thought(True, sampling.steps)), timed(thought(False, sampling.steps))
    one_step = timed(thought(True, 1))
    tokens8, token1, both = timed(write(8)), timed(write(1)), timed(think_then_write(8))
    added = max(both - tokens8, 0.0)
    gpu = {}
    if s.device.type == "cuda":  # the default replays each step from a CUDA graph: its first capture, eager, agreement
        clear_step_graphs(s.model)
        sync()
        t0 = time.perf_counter()
        graphed = thought(True, sampling.steps)()
        sync()
        graphs = step_graphs(s.model)
        gpu = {"graph_captured": bool(graphs) and graphs[0].graph is not None,
               "capture_error": graphs[0].error if graphs else None,
               "first_thought_with_capture_s": round(time.perf_counter() - t0, 4),
               "thought_eager_s": round(timed(thought(True, sampling.steps, graphs=False)), 4),
               "graph_vs_eager_max_abs_diff": float((graphed - thought(True, sampling.steps, graphs=False)()).abs().max())}
        gpu["eager_over_8_tokens"] = round(gpu["thought_eager_s"] / tokens8, 3)
    return {"batch": len(prefixes), "steps": sampling.steps, "soft_tokens": s.model.soft_tokens, **gpu,
            "thought_cached_s": round(cached, 4), "thought_uncached_s": round(uncached, 4),
            "one_step_cached_s": round(one_step, 4), "write_8_tokens_s": round(tokens8, 4),
            "write_1_token_s": round(token1, 4), "think_then_write_8_tokens_s": round(both, 4),
            "thought_over_8_tokens": round(cached / tokens8, 3), "step_over_8_tokens": round(one_step / tokens8, 3),
            "added_by_thought_over_8_tokens": round(added / tokens8, 3),
            "uncached_over_cached": round(uncached / cached, 3),
            "thought_in_tokens": round(cached / max((tokens8 - token1) / 7, 1e-9), 1)}


def evaluate_star(config: StarFlowConfig, shards: list[str], *, device: str | torch.device = "auto",
                  log=logger.info) -> dict:
    """The control table, the open-ended comparison (with the LLM judge when configured) and the thought's cost."""
    t_start = time.perf_counter()
    device = resolve_device(device)
    s = load_star_workdir(config.workdir, device, config.bf16)
    base = load_base_lm(config.workdir, device)
    ref = load_reference_lm(latest_checkpoint(folder(config.workdir, "reference_lm")) or folder(config.workdir, "reference_lm"),
                            device)
    data = load_plan_data(folder(config.workdir, "plans"))
    docs = [d for d in read_documents(shards, config.attributes, config.holdout_fraction, config.data.judge_fraction)
            if d.role == "holdout"]
    report = {"cost": thought_cost(config, s, data)}
    log(f"thought cost: {report['cost']}")
    report["control"] = control_table(config, s, base, ref, data, docs, device, log)
    opened = open_ended(config, s, base, ref, data, log)
    texts, prefix_text = opened.pop("texts"), opened.pop("prefix_text")
    report["open_ended"] = opened
    report["judge"] = judge_win_rate(config, prefix_text, texts, log)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def judge_win_rate(config: StarFlowConfig, prefixes: list[str], texts: dict[str, list[str]], log=logger.info) -> dict:
    """The judge's pairwise coherence win rate of STAR-LDM (think once) over the plain LM, or why it was skipped."""
    judge = config.star_evaluation.judge
    if judge is None:
        note = "skipped: no judge endpoint configured (star_evaluation.judge)"
        log(f"LLM judge: {note}")
        return {"skipped": note}
    from tasks.pairwise_judge import pairwise_win_rate

    n = config.star_evaluation.judge_pairs
    result = pairwise_win_rate(judge, prefixes[:n], texts["STAR-LDM, think once"][:n], texts["plain LM"][:n],
                               cache_dir=folder(config.workdir, "star_evaluation") + "/judge-cache",
                               seed=config.star_evaluation.seed)
    log(f"LLM judge: STAR-LDM wins {result['win_rate']} of {result['pairs']} pairs against the plain LM")
    return {"a": "STAR-LDM, think once", "b": "plain LM", **result}
