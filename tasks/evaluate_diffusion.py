"""Evaluation of latent diffusion for language (LD4LG), as plain functions.

    autoencoder -> reconstruction BLEU / exact match of held-out texts
    every generator (diffusion with classifier-free guidance at each weight, unconditional, latent-classifier
    guided; a class-conditional AR baseline trained on the same texts) -> samples per class
    -> MAUVE against held-out text, diversity (distinct-n), memorisation, class accuracy (a tf-idf judge),
       perplexity under a reference causal LM

``evaluate_generators`` runs the whole comparison the latent-diffusion flow reports; the metrics are
separately callable (``bench/`` uses them on saved samples).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

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
    """Reconstruction BLEU (0-100) and exact-match rate of ``texts`` through the autoencoder, with examples."""
    latents = ae.encode(*features) if features is not None else ae.encode_texts(texts)
    decoded, texts = ae.decode(latents), ae.normalize(texts)
    exact = sum(d == t for d, t in zip(decoded, texts)) / max(1, len(texts))
    examples = [{"text": t, "reconstruction": d} for t, d in zip(texts[:5], decoded[:5])]
    return {"texts": len(texts), "bleu": round(corpus_bleu(decoded, texts), 2), "exact_match": round(exact, 4),
            "examples": examples}


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


def mauve_score(samples: list[str], references: list[str], seed: int = 25, *, reference_features=None) -> float:
    """MAUVE of samples against reference text, features from the offline sentence encoder
    (``reference_features``: the references' embeddings when already computed).

    MAUVE quantizes both sets together into ~n/10 k-means clusters (n the smaller set): it resolves
    distributions only with tens of points per cluster, so compare sets of hundreds of texts."""
    import mauve

    from models.embed import embed

    p = embed(references) if reference_features is None else reference_features
    q = embed(samples)
    out = mauve.compute_mauve(p_features=p, q_features=q, seed=seed, verbose=False, device_id=-1)
    return float(out.mauve)


_REFERENCE_LM_FIX = ("pass a folder holding a Hugging Face causal LM (config.json), a pretraining variant folder of "
                     "checkpoint-* folders, the workdir of `lmlm lmlm pretrain` (run `make demo-lmlm` first), or a hub name")


@dataclass
class ReferenceLM:
    """A causal LM loaded once for scoring many sample sets; ``path``: the folder (or hub name) it came from."""

    model: torch.nn.Module
    tokenizer: object
    path: str


def resolve_reference_lm(lm: str) -> str:
    """The folder (or hub name) of the causal LM that ``lm`` names: a folder holding one (config.json); a
    pretraining variant folder (its newest checkpoint); the output folder or workdir of `lmlm lmlm pretrain`
    (the standard model's newest checkpoint: the LMLM's own text carries lookup calls); else a hub name."""
    from models.train import latest_checkpoint

    folder = os.path.expanduser(lm)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    candidates = (folder, os.path.join(folder, "standard"), os.path.join(folder, "lmlm", "standard"))
    found = next((c for c in map(latest_checkpoint, candidates) if c), None)
    if found:
        return found
    if os.path.exists(folder) or os.path.isabs(folder) or folder.startswith(".") or folder.count("/") > 1:
        raise UserInputError(f"reference LM {lm!r}: no causal LM and no standard-model checkpoint there; {_REFERENCE_LM_FIX}")
    return lm


def load_reference_lm(lm: str, device: str | torch.device | None = "auto") -> ReferenceLM:
    """The causal LM that ``lm`` names (see ``resolve_reference_lm``), in eval mode, on ``device`` (auto: CUDA
    when available, else the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.train import quiet_progress

    path = resolve_reference_lm(lm)
    try:
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        what = "it" if path == lm else repr(path)
        raise UserInputError(f"reference LM {lm!r}: cannot load {what} ({str(exc).splitlines()[0]}); "
                             f"{_REFERENCE_LM_FIX}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # every text starts at position 0
    model.to(resolve_device(device)).eval()
    return ReferenceLM(model, tokenizer, path)


def perplexity(texts: list[str], lm: str | ReferenceLM, batch_size: int = 16) -> float:
    """Perplexity of ``texts`` under a causal LM (a loaded one, or anything ``load_reference_lm`` takes): exp of
    the mean loss over every token after each text's first; texts longer than the LM's context are scored on
    their first context-length tokens; nan when no text has two tokens."""
    ref = load_reference_lm(lm) if isinstance(lm, str) else lm
    model, tokenizer = ref.model, ref.tokenizer
    device = device_of(model)
    context = getattr(model.config, "max_position_embeddings", None)
    kept = [t for t in texts if t.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(kept), batch_size):
            enc = tokenizer(kept[i:i + batch_size], return_tensors="pt", padding=True, truncation=context is not None,
                            max_length=context).to(device)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)[:, 1:]
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            total, count = total + float(loss), count + int((labels != -100).sum())
    return math.exp(total / count) if count else float("nan")


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
                  reference_features=None) -> dict:
    """MAUVE vs references, diversity, memorisation, class accuracy (when targets are given), perplexity (with an LM)."""
    row = {"samples": len(samples),
           "mauve": round(mauve_score(samples, references, mauve_seed, reference_features=reference_features), 4),
           "diversity": round(diversity(samples), 4), "distinct_2": round(distinct_n(samples, 2), 4),
           **{f"memorised_{k}": v for k, v in memorisation(samples, training_texts).items()}}
    row["class_accuracy"] = (round(classifier.accuracy(samples, target_labels), 4)
                             if classifier is not None and target_labels is not None else None)
    row["perplexity"] = round(perplexity(samples, reference_lm), 2) if reference_lm else None
    return row


class DiffusionEvaluation(BaseModel):
    """Every generator scored side by side, then held-out real text as the reference row."""

    rows: list[dict]  # generator, setting, the score_samples columns, samples_per_s
    classes: list[str]
    real_text_accuracy: float | None  # the judge on held-out real text; None without classes
    ar_baseline: dict | None  # the AR baseline's training report; None when it was skipped
    examples: dict[str, list[dict]]  # generator -> a few {"class", "text"} samples
    reference_texts: int


def evaluate_generators(config: LatentDiffusionFlowConfig, train: TextSplit, holdout: TextSplit, ae: Autoencoder,
                        dm: DiffusionModel, latents: torch.Tensor, *, amp: torch.dtype | None = None,
                        device: str | torch.device = "auto", log: Callable[[str], None] = print) -> DiffusionEvaluation:
    """Samples of every generator (``config.evaluation`` must be set) scored against the held-out texts: the
    diffusion model with classifier-free guidance at each weight, unconditional and latent-classifier guided; the
    class-conditional AR baseline (minilm decoder only); and held-out real text itself. ``latents`` are those of
    ``train.texts``; the judge learns from ``train``; the reference LM and the AR baseline run on ``device``, the
    latent classifier where ``dm`` is."""
    ev, sampling = config.evaluation, config.sampling
    classes = dm.classes
    refs = ae.normalize(holdout.texts)
    training_texts = ae.normalize(train.texts)
    labelled = [(t, y) for t, y in zip(refs, holdout.labels) if y in classes]
    classifier, real_accuracy = None, None
    if classes:
        # the judge learns from the training texts (held-out documents stay unseen) and is scored on all held-out ones
        train_labelled = [(t, y) for t, y in zip(training_texts, train.labels) if y in classes]
        classifier = TextClassifier([t for t, _ in train_labelled], [y for _, y in train_labelled])
        real_accuracy = classifier.accuracy([t for t, _ in labelled], [y for _, y in labelled])
        log(f"text classifier: {real_accuracy:.3f} accuracy on held-out real text")
    from models.embed import embed

    ref_features = embed(refs)  # once, not per generator
    lm = load_reference_lm(ev.reference_lm, device) if ev.reference_lm else None  # once, not per generator
    if lm is not None:
        log(f"perplexity under {lm.path} (texts as the generators spell them: lower case for the uncased decoder)")
    score = lambda samples, targets: score_samples(  # noqa: E731
        samples, targets, references=refs, training_texts=training_texts, classifier=classifier,
        reference_lm=lm, mauve_seed=ev.mauve_seed, reference_features=ref_features)
    n, shape = ev.samples_per_class, tuple(latents.shape[1:])
    rows, examples = [], {}

    def diffusion_samples(label, how, **kw):
        t0 = time.perf_counter()
        texts, targets = [], []
        for i, c in enumerate(classes or [None]):
            conditioned = label == "cfg"  # unconditional and latent-classifier-guided samples get no class label
            z = dm.sample_latents(n if classes else n * 8, c if conditioned else None, how, shape, seed=ev.mauve_seed + i,
                                  **({} if label != "guided" else {"target": i, **kw}))
            texts += ae.decode(z)
            targets += [c] * len(z)
        return texts, targets, time.perf_counter() - t0

    steps = f"{sampling.sampler} {sampling.steps} steps"
    generators = [("diffusion", f"{steps}, CFG w={sampling.guidance_scale}", "cfg", sampling, {})]
    if classes:  # further guidance weights show the trade between fluency (MAUVE) and class accuracy
        generators += [(f"diffusion, CFG w={w:g}", f"{steps}, CFG w={w:g}", "cfg", sampling.model_copy(update={"guidance_scale": w}), {})
                       for w in dict.fromkeys(ev.extra_guidance_scales) if w != sampling.guidance_scale]
        generators.append(("diffusion, unconditional", f"{steps}, no class", "uncond", sampling, {}))
        clf = train_latent_classifier(latents, train.labels, classes, dm.model, ev.latent_classifier, amp=amp, log=log)
        generators.append(("diffusion + latent-classifier guidance", f"no class, gradient scale {ev.classifier_guidance_scale}",
                           "guided", sampling, {"classifier": clf, "classifier_scale": ev.classifier_guidance_scale}))
    for done, (name, setting, label, how, kw) in enumerate(generators, 1):
        texts, targets, seconds = diffusion_samples(label, how, **kw)
        row = {"generator": name, "setting": setting, **score(texts, targets if classes else None),
               "samples_per_s": round(len(texts) / seconds, 2)}
        rows.append(row)
        examples[name] = [{"class": y, "text": t} for t, y in list(zip(texts, targets))[::max(1, n // 2)]][:2 * max(1, len(classes))]
        scores = {k: v for k, v in row.items() if k not in ("generator", "setting")}
        log(f"{name}: {scores}")
        progress.update("evaluate generators", done, len(generators), "generators")
    ar_report = None

    if ev.ar_baseline is not None and ae.hub is None:
        ae_cfg = config.autoencoder
        ar, ar_report = train_ar_baseline(
            train, classes, ae.tokenizer, ev.ar_baseline, width=ae_cfg.width,
            layers=ae_cfg.decoder_layers + ae_cfg.reconstruction_layers, heads=ae_cfg.heads,
            max_length=ae.max_length + 1, seed=ae_cfg.seed, amp=amp, device=device, log=log)
        t0, texts, targets = time.perf_counter(), [], []
        for i, c in enumerate(classes or [None]):
            got = sample_ar(ar, ae.tokenizer, i if c else len(classes), n, seed=ev.mauve_seed + i)
            texts, targets = texts + got, targets + [c] * len(got)
        row = {"generator": "AR baseline (class-conditional)", "setting": f"{ar_report['parameters']:,} params, temperature 1",
               **score(texts, targets if classes else None), "samples_per_s": round(len(texts) / (time.perf_counter() - t0), 2)}
        rows.append(row)
        examples[row["generator"]] = [{"class": y, "text": t} for t, y in list(zip(texts, targets))[::max(1, n // 2)]][:2 * max(1, len(classes))]
    real = [t for t, _ in labelled] or refs  # normalized as the generators spell their samples, so rows compare
    rows.append({"generator": "held-out real text", "setting": "reference", "samples": len(real), "mauve": None,
                 "diversity": round(diversity(real), 4), "distinct_2": round(distinct_n(real, 2), 4),
                 **{f"memorised_{k}": v for k, v in memorisation(real, training_texts).items()},
                 "class_accuracy": None if real_accuracy is None else round(real_accuracy, 4),
                 "perplexity": None if lm is None else round(perplexity(real, lm), 2),
                 "samples_per_s": None})
    return DiffusionEvaluation(rows=rows, classes=classes, real_text_accuracy=real_accuracy, ar_baseline=ar_report,
                               examples=examples, reference_texts=len(refs))
