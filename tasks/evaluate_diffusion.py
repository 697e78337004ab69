"""Evaluation of latent diffusion for language (LD4LG), as plain functions.

    autoencoder -> reconstruction BLEU / exact match of held-out texts (against the original text, lower-cased)
    every generator (diffusion with classifier-free guidance at each weight, unconditional, latent-classifier
    guided; a class-conditional AR baseline trained on the same texts) -> in each of several draws, one sample per
    drawn held-out text, of that text's class (equal counts, the held-out class mix)
    -> MAUVE against those texts on a reference causal LM's features (``tasks/reference_lm.py``), diversity
       (distinct-n), memorisation, class accuracy (a tf-idf judge), perplexity under that LM; mean ± std over draws

``evaluate_generators`` runs the whole comparison the latent-diffusion flow reports; the metrics are
separately callable (``bench/`` uses them on saved samples).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel

from models.autoencoder import CompactVocabulary, shifted_targets
from models.device import device_of, resolve_device
from models.diffusion import LatentDiffusion
from schemas.diffusion_configs import LatentDiffusionFlowConfig, TrainingBudget
from schemas import progress
from schemas.errors import UserInputError
from models.train import fit
from tasks.diffusion import Autoencoder, DiffusionModel, TextSplit, class_ids, encoder_features, step_generators
from tasks.reference_lm import ReferenceLM, lm_features, load_reference_lm, perplexity


# ----------------------------------------------------------------------------- text metrics


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word and punctuation tokens (the tokenisation of BLEU and the n-gram metrics)."""
    return _WORD.findall(text)


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (0-100) with one reference per hypothesis, brevity penalty, no smoothing."""
    from collections import Counter

    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = words(hyp), words(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def reconstruction_scores(ae: Autoencoder, texts: list[str], features=None) -> dict:
    """Reconstruction BLEU (0-100) and exact match of ``texts`` through the autoencoder, against the original
    texts: lower-cased for the uncased minilm decoder (as written for a hub backbone), nothing else removed, so a
    word the decoder's vocabulary lacks (or an accent the uncased encoder strips) counts as a miss. Exact match
    compares word sequences (spacing around punctuation aside). ``bleu_vocabulary`` is the older, kinder figure:
    against the texts as a perfect reconstruction spells them (the encoder's vocabulary and casing)."""
    latents = ae.encode(*features) if features is not None else ae.encode_texts(texts)
    decoded = ae.decode(latents)
    cased = ae.hub is not None
    references = list(texts) if cased else [t.lower() for t in texts]
    exact = sum(words(d) == words(r) for d, r in zip(decoded, references)) / max(1, len(texts))
    examples = [{"text": t, "reconstruction": d} for t, d in zip(references[:5], decoded[:5])]
    return {"texts": len(texts), "bleu": round(corpus_bleu(decoded, references), 2), "exact_match": round(exact, 4),
            "bleu_reference": "original text, as written" if cased else "original text, lower-cased (uncased decoder)",
            "bleu_vocabulary": round(corpus_bleu(decoded, ae.normalize(texts)), 2), "examples": examples}


def holdout_reconstruction(ae: Autoencoder, encoder, texts: list[str], max_tokens: int) -> dict:
    """:func:`reconstruction_scores` of held-out ``texts``, their features from the frozen ``encoder``."""
    return reconstruction_scores(ae, texts, encoder_features(encoder, texts, max_tokens, log=lambda _: None))


# ----------------------------------------------------------------------------- sample metrics


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over ``texts`` (word tokens)."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(texts: list[str]) -> float:
    """LD4LG's diversity: the product of distinct-2, -3 and -4."""
    return distinct_n(texts, 2) * distinct_n(texts, 3) * distinct_n(texts, 4)


def memorisation(samples: list[str], training_texts: list[str]) -> dict:
    """``verbatim``: fraction of samples found verbatim (case-insensitive) inside a training text;
    ``train_4grams``: fraction of the samples' 4-grams that occur in the training text."""
    corpus = "\n".join(t.lower() for t in training_texts)
    verbatim = sum(1 for s in samples if s.strip() and s.strip().lower() in corpus) / max(1, len(samples))
    seen = {tuple(w[i:i + 4]) for w in (words(t.lower()) for t in training_texts) for i in range(len(w) - 3)}
    grams = [tuple(w[i:i + 4]) for w in (words(s.lower()) for s in samples) for i in range(len(w) - 3)]
    return {"verbatim": round(verbatim, 4), "train_4grams": round(sum(g in seen for g in grams) / max(1, len(grams)), 4)}


def mauve_score(samples: list[str], references: list[str], seed: int = 25, *, reference_features=None,
                featurize: Callable[[list[str]], np.ndarray] | None = None, kmeans_seeds: int = 1) -> float:
    """MAUVE of samples against reference text, features from ``featurize`` (default: the offline sentence
    encoder; ``reference_features``: the references' features when already computed).

    MAUVE quantizes both sets together into ~n/10 k-means clusters (n the smaller set): it resolves
    distributions only with tens of points per cluster, so compare sets of hundreds of texts, of equal size. The
    clustering itself moves the score (a std of 0.02-0.03 over k-means seeds on the same 1,000 + 1,000 texts here),
    so ``kmeans_seeds`` > 1 averages that many clusterings (seeds ``seed + 1000 k``; ~0.2 s each at that size)."""
    import mauve

    if featurize is None:
        from models.embed import embed as featurize
    p = featurize(references) if reference_features is None else reference_features
    q = featurize(samples)
    with native_stderr_counted():
        return float(np.mean([mauve.compute_mauve(p_features=p, q_features=q, seed=seed + 1000 * k, verbose=False,
                                                  device_id=-1).mauve for k in range(kmeans_seeds)]))


@contextlib.contextmanager
def native_stderr_counted():
    """Hold what is written to the process's stderr (fd 2) for the block, then write each distinct line once with
    how many times it came: faiss's k-means warns from C++ on every clustering ("clustering 2000 points to 100
    centroids: please provide at least 3900 training points"), ten times per MAUVE figure when clusterings are
    averaged. Nothing is dropped: repeated lines are counted."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line, n in Counter(held.read().decode(errors="replace").splitlines()).items():
                sys.stderr.write(line + (f" (x{n})" if n > 1 else "") + "\n")


# ----------------------------------------------------------------------------- the judge and the baselines


class TextClassifier:
    """The judge of class-conditional samples: logistic regression on word tf-idf (unigrams and bigrams).

    Lexical features, because the classes of the synthetic corpus differ by their vocabularies (occupations,
    fields, employers, awards, stock phrases) over shared templates; mean-pooled MiniLM sentence embeddings
    dilute that signal (0.87 vs 0.93 on real 64-token paragraphs of the demo corpus).
    """

    def __init__(self, texts: list[str], labels: list[str], seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) < 2:
            raise UserInputError(f"class-conditional evaluation needs at least 2 classes in the labelled text, got {sorted(set(labels))}")
        self.features = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.model = LogisticRegression(max_iter=3000, C=10.0, random_state=seed).fit(self.features.fit_transform(texts), labels)

    def predict(self, texts: list[str]) -> list[str]:
        return list(self.model.predict(self.features.transform(texts))) if texts else []

    def accuracy(self, texts: list[str], labels: list[str]) -> float:
        pred = self.predict(texts)
        return sum(p == y for p, y in zip(pred, labels)) / max(1, len(labels))


def train_ar_baseline(train: TextSplit, classes: list[str], vocabulary: CompactVocabulary, budget: TrainingBudget, *,
                      width: int, layers: int, heads: int, max_length: int, seed: int = 0,
                      amp: torch.dtype | None = None, device: str | torch.device = "auto",
                      log: Callable[[str], None] = print):
    """A class-conditional causal LM (:class:`ClassConditionalLM`) trained from scratch on the training texts,
    on ``device``; texts without a class train its "no class" id. Returns (model, report)."""
    from models.autoencoder import ClassConditionalLM

    torch.manual_seed(seed)
    device = resolve_device(device)
    model = ClassConditionalLM(len(vocabulary), len(classes), width, layers, heads, max_length).to(device)
    ids = vocabulary(train.texts)["input_ids"]
    labels = class_ids(train.labels, classes)

    def batch_loss(step: int) -> torch.Tensor:
        rng, _ = step_generators(seed, step)
        idx = rng.integers(0, len(ids), budget.batch_size).tolist()
        inputs, targets = shifted_targets([ids[i] for i in idx], 0, max_length)
        inputs, targets = inputs.to(device), targets.to(device)
        keep = targets != -100  # the output layer only where a target is
        return torch.nn.functional.cross_entropy(model.logits(inputs, labels[idx].to(device), keep).float(), targets[keep])

    n_params = sum(p.numel() for p in model.parameters())
    log(f"AR baseline: {n_params:,} parameters")
    state = fit(model, batch_loss, budget, save=lambda kind, s: None, amp=amp, log=log, label="AR baseline")
    return model, {"parameters": n_params, "steps": state["step"], "train_seconds": round(state["train_seconds"], 1)}


def sample_ar(model, vocabulary: CompactVocabulary, class_id: int, n: int, *, seed: int = 0,
              temperature: float = 1.0, batch_size: int = 256) -> list[str]:
    """``n`` texts of class ``class_id`` (``len(classes)``: no class) from the AR baseline, ancestral sampling
    at ``temperature``."""
    device = device_of(model)
    gen = torch.Generator(device).manual_seed(seed)
    texts = []
    model.eval()
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        ids = model.generate(torch.full((b,), class_id, dtype=torch.long, device=device), 0, temperature=temperature,
                             generator=gen)
        texts += [t.strip() for t in vocabulary.batch_decode(ids)]
    return texts


def train_latent_classifier(latents: torch.Tensor, labels: list[str | None], classes: list[str], diffusion: LatentDiffusion,
                            budget: TrainingBudget, *, width: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
                            amp: torch.dtype | None = None, log: Callable[[str], None] = print):
    """p(class | z_t) on noisy training latents at noise levels of the diffusion schedule (labelled texts only)."""
    from models.diffusion import LatentClassifier, alpha_sigma

    device = device_of(diffusion)  # the classifier guides the diffusion model where it samples
    keep = [i for i, label in enumerate(labels) if label is not None]
    x, y = latents[keep].float().to(device), class_ids([labels[i] for i in keep], classes).to(device)
    torch.manual_seed(seed)
    clf = LatentClassifier(x.shape[2], x.shape[1], width, layers, heads, len(classes)).to(device)

    def batch_loss(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step, device)
        idx = torch.from_numpy(rng.integers(0, len(x), budget.batch_size)).to(device)
        t = torch.rand(len(idx), generator=gen, device=device)
        logsnr = diffusion.logsnr(t)
        alpha, sigma = (s[:, None, None] for s in alpha_sigma(logsnr))
        z = alpha * x[idx] + sigma * torch.randn(x[idx].shape, generator=gen, device=device)
        return torch.nn.functional.cross_entropy(clf(z, logsnr), y[idx])

    fit(clf, batch_loss, budget, save=lambda kind, s: None, amp=amp, log=log, label="latent classifier")
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


# ----------------------------------------------------------------------------- generators compared


def score_samples(samples: list[str], target_labels: list[str] | None, *, references: list[str], training_texts: list[str],
                  classifier: TextClassifier | None, reference_lm: str | ReferenceLM | None, mauve_seed: int = 25,
                  reference_features=None, featurize: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """MAUVE vs references, diversity, memorisation, class accuracy (when targets are given), perplexity (with an LM)."""
    row = {"samples": len(samples),
           "mauve": round(mauve_score(samples, references, mauve_seed, reference_features=reference_features,
                                      featurize=featurize), 4),
           "diversity": round(diversity(samples), 4), "distinct_2": round(distinct_n(samples, 2), 4),
           **{f"memorised_{k}": v for k, v in memorisation(samples, training_texts).items()}}
    row["class_accuracy"] = (round(classifier.accuracy(samples, target_labels), 4)
                             if classifier is not None and target_labels is not None else None)
    row["perplexity"] = round(perplexity(samples, reference_lm), 2) if reference_lm else None
    return row


def draw_indices(n_texts: int, n: int, draw: int, seed: int) -> list[int]:
    """Which of ``n_texts`` held-out texts one draw compares against: ``n`` of them (all when fewer), seeded."""
    order = list(range(n_texts))
    random.Random(f"diffusion-draw/{seed}/{draw}").shuffle(order)
    return sorted(order[:n])


def summarize_draws(draws: list[dict]) -> dict:
    """The mean of every numeric column over the draws (rounded), and ``<column>_std``, their standard deviation
    (None for one draw); columns that are not numbers keep the first draw's value."""
    out: dict = {}
    for key, first in draws[0].items():
        values = [d[key] for d in draws]
        if isinstance(first, (int, float)) and not isinstance(first, bool) and all(isinstance(v, (int, float)) for v in values):
            out[key] = round(statistics.fmean(values), 4)
            out[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
        else:
            out[key] = first
    return out


class DiffusionEvaluation(BaseModel):
    """Every generator scored side by side, then held-out real text as the reference row. Each figure is the mean
    over ``draws`` draws (``<column>_std``: their standard deviation); a draw compares ``samples_per_draw`` samples
    of every generator with as many held-out texts, the samples conditioned on those texts' classes (equal counts,
    the held-out class mix), with MAUVE on ``mauve_features``."""

    rows: list[dict]  # generator, setting, the score_samples columns and their _std, samples_per_s
    classes: list[str]
    real_text_accuracy: float | None  # the judge on all held-out real text; None without classes
    ar_baseline: dict | None  # the AR baseline's training report; None when it was skipped
    examples: dict[str, list[dict]]  # generator -> a few {"class", "text"} samples of the first draw
    reference_texts: int  # held-out texts to draw from
    draws: int
    samples_per_draw: int
    class_mix: dict[str, int]  # held-out texts per class (what every draw's samples follow)
    mauve_features: str  # which model's features MAUVE compares


def mauve_featurizer(ev, lm: ReferenceLM | None, device, log: Callable[[str], None]) -> tuple[Callable, str]:
    """(texts -> features, what they are) for MAUVE: a causal LM's mean hidden state (the reference LM, or the
    folder ``ev.mauve_features`` names), else all-MiniLM-L6-v2, the autoencoder's own encoder, flagged as such."""
    from models.embed import embed

    source = ev.mauve_features
    if source == "reference-lm" and lm is None:
        log("MAUVE features: no reference LM set, so all-MiniLM-L6-v2 (the autoencoder's own encoder: not independent)")
        source = "minilm"
    if source == "minilm":
        return embed, "all-MiniLM-L6-v2 sentence embeddings (the autoencoder's own frozen encoder: not independent)"
    model = lm if source == "reference-lm" else load_reference_lm(source, device)
    return (lambda texts: lm_features(texts, model)), f"{model.path}: last hidden state, mean over tokens"


def evaluate_generators(config: LatentDiffusionFlowConfig, train: TextSplit, holdout: TextSplit, ae: Autoencoder,
                        dm: DiffusionModel, latents: torch.Tensor, *, amp: torch.dtype | None = None,
                        device: str | torch.device = "auto", log: Callable[[str], None] = print) -> DiffusionEvaluation:
    """Samples of every generator (``config.evaluation`` must be set) scored against held-out texts, in
    ``evaluation.draws`` draws: the diffusion model with classifier-free guidance at each weight, unconditional and
    latent-classifier guided; the class-conditional AR baseline (minilm decoder only); and held-out real text itself.
    Each draw takes ``samples_per_draw`` held-out texts (seeded) and asks every generator for one sample per text,
    of that text's class, so counts are equal and the class mix is the held-out one. ``latents`` are those of
    ``train.texts``; the judge learns from ``train``; the reference LM and the AR baseline run on ``device``, the
    latent classifier where ``dm`` is."""
    ev, sampling = config.evaluation, config.sampling
    classes = dm.classes
    refs_all = ae.normalize(holdout.texts)  # as the generators spell their samples (lower case for minilm)
    training_texts = ae.normalize(train.texts)
    pool = [(t, y) for t, y in zip(refs_all, holdout.labels) if y in classes] if classes else [(t, None) for t in refs_all]
    classifier, real_accuracy = None, None
    if classes:
        # the judge learns from the training texts (held-out documents stay unseen) and is scored on all held-out ones
        train_labelled = [(t, y) for t, y in zip(training_texts, train.labels) if y in classes]
        classifier = TextClassifier([t for t, _ in train_labelled], [y for _, y in train_labelled])
        real_accuracy = classifier.accuracy([t for t, _ in pool], [y for _, y in pool])
        log(f"text classifier: {real_accuracy:.3f} accuracy on held-out real text")
    lm = load_reference_lm(ev.reference_lm, device) if ev.reference_lm else None  # once, not per generator
    if lm is not None:
        log(f"perplexity under {lm.path} (texts as the generators spell them: lower case for the uncased decoder)")
    featurize, features_name = mauve_featurizer(ev, lm, device, log)
    pool_features = featurize([t for t, _ in pool])  # once; each draw takes its rows
    n = min(ev.samples_per_draw, len(pool))
    draws = [draw_indices(len(pool), n, d, ev.mauve_seed) for d in range(ev.draws)]
    log(f"{ev.draws} draws of {n} held-out texts (of {len(pool)}), every generator sampling their classes; "
        f"MAUVE features: {features_name}")

    def score(texts: list[str], draw: int, targets: list[str | None] | None) -> dict:
        idx = draws[draw]
        return score_samples(texts, targets, references=[pool[i][0] for i in idx], training_texts=training_texts,
                             classifier=classifier, reference_lm=lm, mauve_seed=ev.mauve_seed + draw,
                             reference_features=pool_features[idx], featurize=featurize)

    shape = tuple(latents.shape[1:])

    def diffusion_samples(label: str, how, draw: int, **kw) -> tuple[list[str], list[str | None]]:
        wanted = [pool[i][1] for i in draws[draw]]
        if label == "uncond" or not classes:  # no class label: one batch, the targets are the draw's classes
            z = dm.sample_latents(len(wanted), None, how, shape, seed=ev.mauve_seed + 1000 * draw)
            return ae.decode(z), wanted
        texts, targets = [], []
        for i, c in enumerate(classes):
            k = wanted.count(c)
            if not k:
                continue
            z = dm.sample_latents(k, c if label == "cfg" else None, how, shape, seed=ev.mauve_seed + 1000 * draw + i,
                                  **({} if label != "guided" else {"target": i, **kw}))
            texts, targets = texts + ae.decode(z), targets + [c] * k
        return texts, targets

    steps = f"{sampling.sampler} {sampling.steps} steps"
    generators = [("diffusion", f"{steps}, CFG w={sampling.guidance_scale}", "cfg", sampling, {})]
    if classes:  # further guidance weights show the trade between fluency (MAUVE) and class accuracy
        generators += [(f"diffusion, CFG w={w:g}", f"{steps}, CFG w={w:g}", "cfg", sampling.model_copy(update={"guidance_scale": w}), {})
                       for w in dict.fromkeys(ev.extra_guidance_scales) if w != sampling.guidance_scale]
        generators.append(("diffusion, unconditional", f"{steps}, no class", "uncond", sampling, {}))
        clf = train_latent_classifier(latents, train.labels, classes, dm.model, ev.latent_classifier, amp=amp, log=log)
        generators.append(("diffusion + latent-classifier guidance", f"no class, gradient scale {ev.classifier_guidance_scale}",
                           "guided", sampling, {"classifier": clf, "classifier_scale": ev.classifier_guidance_scale}))
    sources: list[tuple[str, str, Callable[[int], tuple[list[str], list[str | None]]]]] = [
        (name, setting, lambda d, label=label, how=how, kw=kw: diffusion_samples(label, how, d, **kw))
        for name, setting, label, how, kw in generators]
    ar_report = None
    if ev.ar_baseline is not None and ae.hub is None:
        ae_cfg = config.autoencoder
        ar, ar_report = train_ar_baseline(
            train, classes, ae.tokenizer, ev.ar_baseline, width=ae_cfg.width,
            layers=ae_cfg.decoder_layers + ae_cfg.reconstruction_layers, heads=ae_cfg.heads,
            max_length=ae.max_length + 1, seed=ae_cfg.seed, amp=amp, device=device, log=log)

        def ar_samples(draw: int) -> tuple[list[str], list[str | None]]:
            wanted = [pool[i][1] for i in draws[draw]]
            texts, targets = [], []
            for i, c in enumerate(classes or [None]):
                k = wanted.count(c)
                if k:
                    got = sample_ar(ar, ae.tokenizer, i if c else len(classes), k, seed=ev.mauve_seed + 1000 * draw + i)
                    texts, targets = texts + got, targets + [c] * len(got)
            return texts, targets

        sources.append(("AR baseline (class-conditional)", f"{ar_report['parameters']:,} params, temperature 1", ar_samples))
    rows, examples = [], {}
    for done, (name, setting, sample) in enumerate(sources, 1):
        per_draw, seconds, count = [], 0.0, 0
        for d in range(ev.draws):
            t0 = time.perf_counter()
            texts, targets = sample(d)
            seconds, count = seconds + time.perf_counter() - t0, count + len(texts)
            per_draw.append(score(texts, d, targets if classes else None))
            if d == 0:
                examples[name] = [{"class": y, "text": t} for t, y in list(zip(texts, targets))[::max(1, len(texts) // 22)]][:22]
        row = {"generator": name, "setting": setting, **summarize_draws(per_draw),
               "samples_per_s": round(count / seconds, 2) if seconds else None}
        rows.append(row)
        log(f"{name}: MAUVE {row['mauve']} ± {row['mauve_std']}, class accuracy {row['class_accuracy']} ± "
            f"{row['class_accuracy_std']} ({ev.draws} draws of {n})")
        progress.update("evaluate generators", done, len(sources), "generators")
    real = []
    for d in range(ev.draws):  # the drawn held-out texts themselves: the ceiling of every column but MAUVE
        texts = [pool[i][0] for i in draws[d]]
        real.append({"samples": len(texts), "mauve": None, "diversity": round(diversity(texts), 4),
                     "distinct_2": round(distinct_n(texts, 2), 4),
                     **{f"memorised_{k}": v for k, v in memorisation(texts, training_texts).items()},
                     "class_accuracy": None if classifier is None else
                     round(classifier.accuracy(texts, [pool[i][1] for i in draws[d]]), 4),
                     "perplexity": None if lm is None else round(perplexity(texts, lm), 2)})
    rows.append({"generator": "held-out real text", "setting": "reference", **summarize_draws(real), "samples_per_s": None})
    mix: dict[str, int] = {}
    for _, y in pool:
        mix[str(y)] = mix.get(str(y), 0) + 1
    return DiffusionEvaluation(rows=rows, classes=classes, real_text_accuracy=real_accuracy, ar_baseline=ar_report,
                               examples=examples, reference_texts=len(pool), draws=ev.draws, samples_per_draw=n,
                               class_mix=dict(sorted(mix.items())), mauve_features=features_name)


def combine_seeds(rows_per_seed: list[list[dict]]) -> list[dict]:
    """The evaluation rows of several training seeds as one table: per generator, the mean over the seeds of each
    seed's figure (itself a mean over draws) and ``<column>_std``, the standard deviation over the seeds."""
    combined = []
    for row in rows_per_seed[0]:
        same = [next(r for r in rows if r["generator"] == row["generator"]) for rows in rows_per_seed]
        combined.append(summarize_draws([{k: v for k, v in r.items() if not k.endswith("_std")} for r in same]))
    return combined
