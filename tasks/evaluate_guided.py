"""The DGLM comparison (issue 16), as plain functions over a trained workdir.

    per attribute: judges (tf-idf on the judge documents; VADER for sentiment) -> held-out neutral prefixes, a target
    each -> S continuations per prefix from every system:
        uncontrolled LM (the pretrained LM)             DGLM at each guidance scale (prior -> plan -> plan LM)
        attribute-word logit boosting at each delta     class-conditional LM (control vector; not plug-and-play)
    -> attribute rate (judges), perplexity of the continuation given the prefix under the reference LM, dist-1/2/3,
       each with a bootstrap 95% interval over prefixes -> the goals (dominance over boosting, share of the
       class-conditional rate)
    sanity: held-out NLL with the true / a shuffled / no plan (and the bare LM, and over inference alpha^2);
            MiniLM cosine of generated text to its own plan vs a shuffled one; whether the pretrained LM keeps each
            attribute after a document's first sentence (real text vs its samples: what any steering needs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from models.device import resolve_device
from models.plan_lm import noise_plan, token_nll, training_batch
from models.train import autocast, autocast_dtype, latest_checkpoint, quiet_progress
from schemas import progress
from schemas.guided_configs import AttributeConfig, GuidedFlowConfig
from schemas.reports import GuidedEvaluationReport, GuidedRow
from tasks.diffusion import SENTENCE_BOUNDARY
from tasks.evaluate_diffusion import TextClassifier, load_reference_lm
from tasks.guided import (
    GuidedLM,
    SoftPromptLM,
    base_lm_checkpoint,
    folder,
    load_guided,
    load_soft_prompt_lm,
    sample_plans,
    write_continuations,
)
from tasks.guided_data import PlanData, load_plan_data, read_documents
from tasks.guided_metrics import (
    LexiconSentiment,
    attribute_words,
    bootstrap,
    conditional_nll,
    dominance,
    neutral_prefixes,
    prefix_stats,
    word_token_ids,
)

logger = logging.getLogger(f"lmlm.{__name__}")
SENTIMENT_VALUES = {"positive", "negative"}


def load_base_lm(workdir: str, device: torch.device) -> SoftPromptLM:
    """The pretrained LM (no soft prompt): the uncontrolled system and the one logit boosting steers."""
    from transformers import AutoModelForCausalLM

    with quiet_progress():
        lm = AutoModelForCausalLM.from_pretrained(base_lm_checkpoint(workdir))
    return SoftPromptLM(lm, nn.Identity()).to(device).eval()


@torch.no_grad()
def sanity_checks(g: GuidedLM, base: SoftPromptLM, data: PlanData, n: int, alpha2s: list[float], seed: int,
                  batch_size: int = 64) -> dict:
    """Mean NLL per continuation token of held-out examples: true plan, shuffled plan, no plan (pure noise at
    alpha^2 = 0), the bare pretrained LM, and the true plan at each inference alpha^2."""
    rows = data.rows("holdout")[:n]
    prefixes, conts = data.column("prefix_ids"), data.column("continuation_ids")
    x = data.space.standardize(torch.from_numpy(data.continuation[rows]))
    perm = torch.roll(torch.arange(len(rows)), 1)  # every plan another example's
    k = g.plan_lm.prompt.soft_tokens
    a_inf = 0.95
    settings = {"true plan": (x, a_inf), "shuffled plan": (x[perm], a_inf), "no plan (alpha^2 = 0)": (x, 0.0),
                **{f"true plan, alpha^2 = {a:g}": (x, a) for a in alpha2s}}
    sums = {name: 0.0 for name in [*settings, "pretrained LM, no soft prompt"]}
    count = 0
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        P, C = [prefixes[r] for r in part], [conts[r] for r in part]
        batch = {key: v.to(g.device) for key, v in training_batch(P, C, k, g.eos, train_prefix=False).items()}
        with autocast(g.device, g.amp):
            for name, (plans, a2) in settings.items():
                gen = torch.Generator(g.device).manual_seed(seed + i)  # the same noise for every setting
                alpha2 = torch.full((len(part),), a2, device=g.device)
                soft = g.plan_lm.prompt(noise_plan(plans[i:i + len(part)].to(g.device), alpha2, generator=gen), alpha2)
                nll, keep = token_nll(g.plan_lm.lm, batch, soft)
                sums[name] += float((nll * keep).sum())
            bare = {key: v.to(g.device) for key, v in training_batch(P, C, 0, g.eos, train_prefix=False).items()}
            nll, keep = token_nll(base.lm, bare, None)
            sums["pretrained LM, no soft prompt"] += float((nll * keep).sum())
        count += int(keep.sum())
    return {"examples": len(rows), "tokens": count, "nll": {k: round(v / max(count, 1), 4) for k, v in sums.items()}}


def plan_cosine(texts: list[str], plans: torch.Tensor, space, n: int) -> dict:
    """MiniLM cosine of generated continuations to their own plan and to another continuation's plan."""
    from models.embed import embed

    texts, plans = texts[:n], plans[:n]
    e = torch.from_numpy(embed(texts))
    p = space.embedding(plans.float())
    own = (e * p).sum(-1)
    shuffled = (e * p.roll(1, dims=0)).sum(-1)
    return {"texts": len(texts), "own_plan": round(float(own.mean()), 4), "shuffled_plan": round(float(shuffled.mean()), 4),
            "own_closer_share": round(float((own > shuffled).float().mean()), 4)}


def attribute_persistence(base: SoftPromptLM, docs: list, attribute: str, targets: list[str], judge: TextClassifier,
                          tokenizer, sampling, *, eos: int, amp, n: int, seed: int = 0) -> dict:
    """Does the pretrained LM keep a document's attribute? Prefix: the first sentence of up to ``n`` held-out
    documents labelled with one of ``targets`` (a biography's names the occupation); the judge's rate of the
    document's own label on the real next ``max_new_tokens`` tokens and on the LM's sampled ones. A plan or a label
    can only steer what the LM can write: an LM near chance here cannot be steered by a short fine-tune."""
    prefixes, real, labels = [], [], []
    for doc in docs:
        label = doc.labels.get(attribute)
        parts = SENTENCE_BOUNDARY.split(doc.text, maxsplit=1)
        if label not in targets or len(parts) < 2:
            continue
        after = tokenizer(" " + parts[1], add_special_tokens=False)["input_ids"][:sampling.max_new_tokens]
        prefixes.append([eos] + tokenizer(parts[0], add_special_tokens=False)["input_ids"])
        real.append(tokenizer.decode(after, skip_special_tokens=True))
        labels.append(label)
        if len(labels) == n:
            break
    if not labels:
        return {"documents": 0}
    ids = write_continuations(base, prefixes, None, sampling, eos=eos, amp=amp, seed=seed)
    sampled = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    rate = lambda texts: round(float(np.mean([p == y for p, y in zip(judge.predict(texts), labels)])), 4)  # noqa: E731
    return {"documents": len(labels), "real_text": rate(real), "pretrained_lm": rate(sampled),
            "chance": round(1 / len(targets), 4)}


def _judges(attribute: AttributeConfig, data: PlanData, lexicon: LexiconSentiment | None) -> tuple[TextClassifier, dict]:
    texts, labels = data.column("continuation_text"), data.labels(attribute.name)
    judge_rows = [i for i in data.rows("judge") if labels[i] is not None]
    judge = TextClassifier([texts[i] for i in judge_rows], [labels[i] for i in judge_rows], seed=0)
    held = [i for i in data.rows("holdout") if labels[i] is not None]
    report = {"tfidf_train_continuations": len(judge_rows), "holdout_continuations": len(held),
              "tfidf_accuracy": round(judge.accuracy([texts[i] for i in held], [labels[i] for i in held]), 4)}
    if lexicon is not None:
        pol = [i for i in held if labels[i] in SENTIMENT_VALUES]
        pred = lexicon.predict([texts[i] for i in pol])
        report["lexicon_accuracy"] = round(float(np.mean([p == labels[i] for p, i in zip(pred, pol)])), 4)
    return judge, report


@dataclass
class AttributeBench:
    """One attribute's comparison: its neutral prefixes, each repeated ``samples`` times with a target, the judges and
    the reference LM; :meth:`score` turns one system's continuations into a row (bootstrap intervals over prefixes)."""

    name: str
    prefixes: list
    samples: int
    judge: TextClassifier
    lexicon: LexiconSentiment | None
    ref: object
    tokenizer: object
    resamples: int
    seed: int
    log: Callable[[str], None]
    rows: list[GuidedRow] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def __post_init__(self):
        S = self.samples
        self.texts_rep = [p.text for p in self.prefixes for _ in range(S)]
        self.ids_rep = [p.ids for p in self.prefixes for _ in range(S)]
        self.targets_rep = [p.target for p in self.prefixes for _ in range(S)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]

    def score(self, system: str, setting: str, knob, ids: list[list[int]], seconds: float, plan_rate=None) -> list[str]:
        """The row of continuations ``ids`` (one per repeated prefix, in order); returns their text."""
        conts, S = self.decode(ids), self.samples
        hits = [p == t for p, t in zip(self.judge.predict(conts), self.targets_rep)]
        lex = None if self.lexicon is None else [p == t for p, t in zip(self.lexicon.predict(conts), self.targets_rep)]
        nll, tok = conditional_nll(self.ref, self.texts_rep, conts)
        figures = bootstrap(prefix_stats(conts, hits, lex, nll, tok, S), self.resamples, self.seed)
        row = GuidedRow(attribute=self.name, system=system, setting=setting, knob=knob, continuations=len(conts),
                        plan_rate=plan_rate, seconds=round(seconds, 1), **figures)
        self.rows.append(row)
        self.examples.extend({"system": system, "setting": setting, "target": self.targets_rep[i],
                              "prefix": self.texts_rep[i], "continuation": conts[i]}
                             for i in range(0, min(len(conts), 3 * S), S))
        self.log(f"{self.name} | {system} {setting}: rate {row.attribute_rate.value:.3f} "
                 f"[{row.attribute_rate.low:.3f}, {row.attribute_rate.high:.3f}], ppl {row.perplexity.value:.2f}, "
                 f"dist-3 {row.dist_3.value:.3f} ({seconds:.0f} s)")
        return conts


def attribute_bench(attribute: AttributeConfig, config: GuidedFlowConfig, data: PlanData, docs: list, tokenizer, ref,
                    targets: list[str], log=logger.info) -> tuple[TextClassifier, dict, AttributeBench | None, dict]:
    """(the tf-idf judge; the judges' report; the bench of ``attribute``'s neutral held-out prefixes, or None when there
    is none; the prefixes' neutrality), as every system of the DGLM and STAR-LDM tables is scored."""
    ev, name = config.evaluation, attribute.name
    lexicon = LexiconSentiment() if set(targets) <= SENTIMENT_VALUES else None
    judge, judges = _judges(attribute, data, lexicon)
    log(f"{name}: judges {judges}")
    prefixes = neutral_prefixes(docs, name, targets, judge, tokenizer, n=ev.prefixes, per_doc=ev.prefixes_per_doc,
                                max_tokens=ev.max_prefix_tokens, continuation_tokens=config.sampling.max_new_tokens)
    if not prefixes:
        log(f"{name}: no held-out prefix labelled with {targets}; skipped")
        return judge, judges, None, {}
    neutrality = {"mean_top_probability": round(float(np.mean([p.neutrality for p in prefixes])), 4),
                  "max_top_probability": round(float(max(p.neutrality for p in prefixes)), 4),
                  "own_label_equals_target": round(float(np.mean([p.label == p.target for p in prefixes])), 4)}
    if lexicon is not None:
        neutrality["lexicon_mean_compound"] = round(float(np.mean(lexicon.compound([p.text for p in prefixes]))), 4)
    log(f"{name}: {len(prefixes)} neutral prefixes x {ev.samples_per_prefix} continuations; neutrality {neutrality}")
    bench = AttributeBench(name, prefixes, ev.samples_per_prefix, judge, lexicon, ref, tokenizer, ev.bootstrap, ev.seed, log)
    return judge, judges, bench, neutrality


def boost_mask(bench: AttributeBench, data: PlanData, targets: list[str], vocab_size: int, words: int) -> torch.Tensor:
    """(rows, V) 1 at the token ids of each row's target words: the ``words`` words of highest log-odds for the value
    in the training continuations (logit boosting adds delta times this)."""
    texts, labels = data.column("continuation_text"), data.labels(bench.name)
    train = data.rows("train")
    ids = {v: word_token_ids(bench.tokenizer, attribute_words([texts[i] for i in train], [labels[i] for i in train], v, words))
           for v in targets}
    mask = torch.zeros((len(bench.targets_rep), vocab_size))
    for r, t in enumerate(bench.targets_rep):
        mask[r, ids[t]] = 1.0
    return mask


def evaluate_guided(config: GuidedFlowConfig, shards: list[str], *, device: str | torch.device = "auto",
                    log=logger.info) -> GuidedEvaluationReport:
    """Every system on every attribute's neutral prefixes (``config.evaluation`` must be set), and the sanity checks."""
    from models.embed import embed

    t_start = time.perf_counter()
    ev, sampling, workdir = config.evaluation, config.sampling, config.workdir
    device = resolve_device(device)
    amp = autocast_dtype(config.bf16, device)
    g = load_guided(workdir, device, config.bf16)
    base = load_base_lm(workdir, device)
    class_lm, class_meta = load_soft_prompt_lm(folder(workdir, "class"), device)
    ref = load_reference_lm(latest_checkpoint(folder(workdir, "reference_lm")) or folder(workdir, "reference_lm"), device)
    data = load_plan_data(folder(workdir, "plans"))
    docs = [d for d in read_documents(shards, config.attributes, config.holdout_fraction, config.data.judge_fraction)
            if d.role == "holdout"]
    rows, goals, judges, neutrality, counts, examples, persistence = [], {}, {}, {}, {}, {}, {}
    cosine = None
    for attribute in config.attributes:
        name = attribute.name
        if ev.attributes is not None and name not in ev.attributes:
            continue
        classifier = g.attributes.get(name)
        targets = attribute.targets or (classifier.classes if classifier else [])
        judge, judges[name], bench, info = attribute_bench(attribute, config, data, docs, g.tokenizer, ref, targets, log)
        persistence[name] = attribute_persistence(base, docs, name, targets, judge, g.tokenizer,
                                                  sampling, eos=g.eos, amp=amp, n=ev.prefixes, seed=ev.seed)
        log(f"{name}: does the pretrained LM keep it after a document's first sentence? {persistence[name]}")
        if bench is None:
            continue
        counts[name], neutrality[name], examples[name] = len(bench.prefixes), info, bench.examples
        ids_rep, targets_rep, score = bench.ids_rep, bench.targets_rep, bench.score
        cond = torch.from_numpy(embed([p.text for p in bench.prefixes])).repeat_interleave(bench.samples, dim=0)
        mask = boost_mask(bench, data, targets, base.lm.get_output_embeddings().weight.shape[0], ev.boost_words)
        class_index = list(class_meta["classes"]).index(name)
        cc_labels = torch.tensor([[len(v) for v in class_meta["classes"].values()]] * len(targets_rep))
        cc_labels[:, class_index] = torch.tensor([class_meta["classes"][name].index(t) for t in targets_rep])

        systems = (1 + len(ev.guidance_scales) + len(ev.boost_deltas) + 1)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            progress.update(f"evaluate {name}", done, systems, "systems")

        t0 = time.perf_counter()
        ids = write_continuations(base, ids_rep, None, sampling, eos=g.eos, amp=amp, seed=ev.seed)
        score("uncontrolled LM", "pretrained LM, top-p sampling", None, ids, time.perf_counter() - t0)
        tick()
        target_ids = torch.tensor([classifier.index(t) for t in targets_rep])
        for scale in ev.guidance_scales:
            t0 = time.perf_counter()
            plans, plan_p = sample_plans(g, cond, [(classifier, target_ids, scale)] if scale else [], sampling, seed=ev.seed)
            if plan_p is None:  # unguided: how much the plans already point at the target
                plan_p = [float(classifier.log_prob(g.space.embedding(plans), target_ids).exp().mean())]
            ids = write_continuations(g.plan_lm, ids_rep, plans, sampling, eos=g.eos, amp=amp, seed=ev.seed)
            conts = score("DGLM", f"guidance scale {scale:g}", scale, ids, time.perf_counter() - t0, round(plan_p[0], 4))
            if scale == 0 and cosine is None:
                cosine = plan_cosine(conts, plans, g.space, ev.sanity_examples)
            tick()
        for delta in ev.boost_deltas:
            t0 = time.perf_counter()
            ids = write_continuations(base, ids_rep, None, sampling, eos=g.eos, amp=amp, seed=ev.seed,
                                      logit_bias=delta * mask)
            score("logit boost", f"delta {delta:g}, {ev.boost_words} words per value", delta, ids, time.perf_counter() - t0)
            tick()
        t0 = time.perf_counter()
        ids = write_continuations(class_lm, ids_rep, cc_labels, sampling, eos=g.eos, amp=amp, seed=ev.seed, kind="class")
        score("class-conditional", "control vector (fine-tuned, not plug-and-play)", None, ids, time.perf_counter() - t0)
        tick()
        rows += bench.rows
        goals[name] = measured_goals(bench.rows, real_text_rate=judges[name]["tfidf_accuracy"])
        log(f"{name}: goals {goals[name]}")
    sanity = sanity_checks(g, base, data, ev.sanity_examples, ev.alpha2_sweep, ev.seed)
    sanity["cosine"] = cosine
    sanity["attribute_persistence"] = persistence
    log(f"sanity: {sanity}")
    return GuidedEvaluationReport(rows=rows, prefixes=counts, prefix_neutrality=neutrality, judges=judges, sanity=sanity,
                                  goals=goals, examples=examples, seconds=round(time.perf_counter() - t_start, 1))


def measured_goals(rows: list[GuidedRow], system: str = "DGLM", real_text_rate: float | None = None) -> dict:
    """Dominance of ``system``'s curve over logit boosting (higher rate at a perplexity at most 5% above), and its best
    rate as a share of the class-conditional model's (None without that row). ``real_text_rate``: the judge's rate on
    held-out real continuations of the attribute; a boost point above it scores higher than real text of the
    attribute does (the judge reads the boosted words, not a fluent text), so the points at or below it are counted
    apart as well."""
    guided = [(r.perplexity.value, r.attribute_rate.value) for r in rows if r.system == system]
    boost = [(r.perplexity.value, r.attribute_rate.value) for r in rows if r.system == "logit boost"]
    cc = next((r.attribute_rate.value for r in rows if r.system == "class-conditional"), None)
    checks = dominance(guided, boost)
    best = max((rate for _, rate in guided), default=None)
    share = None if not cc or best is None else round(best / cc, 4)
    out = {"dominance": checks, "boost_points_dominated": f"{sum(c['dominated'] for c in checks)}/{len(checks)}",
           "dominates_boosting": bool(checks) and all(c["dominated"] for c in checks),
           "best_dglm_rate": best, "class_conditional_rate": cc, "share_of_class_conditional": share,
           "reaches_90pct_of_class_conditional": share is not None and share >= 0.9}
    if real_text_rate is not None:
        for c in checks:
            c["above_real_text"] = c["boost_rate"] > real_text_rate
        within = [c for c in checks if not c["above_real_text"]]
        out |= {"real_text_rate": real_text_rate,
                "dominated_within_real_text": f"{sum(c['dominated'] for c in within)}/{len(within)}"}
    return out
