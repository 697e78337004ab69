"""What the DGLM evaluation measures with, as plain functions: judges independent of the guidance classifiers,
held-out neutral prefixes, attribute words, conditional perplexity under a reference LM, distinct-n, bootstrap
intervals over prefixes, and the issue's goals.

- Judges: a tf-idf logistic regression (``tasks.evaluate_diffusion.TextClassifier``) trained on continuations of the
  *judge* documents (never seen by the guidance classifiers, which read MiniLM embeddings of the *train* documents);
  for sentiment also the VADER lexicon (``vaderSentiment``, rules and a lexicon shipped on PyPI, trained on nothing here).
- Neutral prefixes: whole-sentence windows of held-out documents (at most ``max_prefix_tokens``, followed by at least a
  continuation's worth of text) that the judge is least sure about (lowest top-class probability).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from models.kv_cache import cpu_bf16_attention
from models.train import autocast, autocast_dtype, kept_token_nll
from schemas.reports import Interval
from tasks.diffusion import SENTENCE_BOUNDARY
from tasks.evaluate_diffusion import TextClassifier, distinct_n, words

_WORD = re.compile(r"^[A-Za-z][a-z]+$")


# ----------------------------------------------------------------------------- judges


class LexiconSentiment:
    """VADER: positive when the compound score is >= 0.05, negative when <= -0.05, else neutral."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def compound(self, texts: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]

    def predict(self, texts: list[str]) -> list[str]:
        return ["positive" if c >= 0.05 else "negative" if c <= -0.05 else "neutral" for c in self.compound(texts)]


def judge_probabilities(judge: TextClassifier, texts: list[str]) -> np.ndarray:
    """(N, classes) probabilities of the tf-idf judge, columns in ``judge.model.classes_`` order."""
    return judge.model.predict_proba(judge.features.transform(texts))


# ----------------------------------------------------------------------------- neutral prefixes


@dataclass
class EvalPrefix:
    doc_id: str
    text: str  # whole sentences of the held-out document
    ids: list[int]  # the LM's tokens of text (after end-of-text when the window opens the document)
    label: str  # the document's own label
    neutrality: float  # the judge's top-class probability on the prefix (lower: more neutral)
    target: str | None = None


def sentence_windows(text: str, count_tokens, max_tokens: int, min_tokens: int, after_tokens: int) -> list[tuple[int, str]]:
    """(start offset, window) of whole sentences ending at each sentence end: the longest run that fits in
    ``max_tokens``, kept when it has ``min_tokens`` and the document goes on for ``after_tokens`` more."""
    cuts = [0] + [m.end() for m in SENTENCE_BOUNDARY.finditer(text)]
    ends = [m.start() for m in SENTENCE_BOUNDARY.finditer(text)]
    out = []
    for j, end in enumerate(ends):  # the last sentence never ends a window: nothing follows it
        if count_tokens(text[end:]) < after_tokens:
            break
        for i in range(j + 1):
            window = text[cuts[i]:end]
            n = count_tokens(window)
            if n <= max_tokens:
                if n >= min_tokens:
                    out.append((cuts[i], window))
                break
    return out


def neutral_prefixes(docs: list, attribute: str, targets: list[str], judge: TextClassifier, tokenizer, *, n: int,
                     per_doc: int, max_tokens: int, continuation_tokens: int, min_tokens: int = 6) -> list[EvalPrefix]:
    """The ``n`` most neutral prefixes of held-out documents labelled with one of ``targets`` (at most ``per_doc`` per
    document), each given a target in turn (round robin, so every target gets as many prefixes)."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    candidates = []
    for doc in docs:
        label = doc.labels.get(attribute)
        if label not in targets:
            continue
        for start, window in sentence_windows(doc.text, count, max_tokens, min_tokens, continuation_tokens):
            candidates.append((doc.doc_id, window, label, start == 0))
    if not candidates:
        return []
    top = judge_probabilities(judge, [c[1] for c in candidates]).max(axis=1)
    chosen, per = [], Counter()
    for i in np.argsort(top, kind="stable"):
        doc_id, window, label, opens = candidates[i]
        if per[doc_id] < per_doc:
            per[doc_id] += 1
            ids = tokenizer(window, add_special_tokens=False)["input_ids"]
            chosen.append(EvalPrefix(doc_id, window, [tokenizer.eos_token_id] * opens + ids, label, float(top[i])))
        if len(chosen) == n:
            break
    for i, p in enumerate(chosen):
        p.target = targets[i % len(targets)]
    return chosen


# ----------------------------------------------------------------------------- attribute words (logit boosting)


def attribute_words(texts: list[str], labels: list[str | None], value: str, k: int, min_count: int = 5) -> list[str]:
    """The ``k`` words most typical of ``value`` by smoothed log-odds against the other labelled texts."""
    inside, outside = Counter(), Counter()
    for t, y in zip(texts, labels):
        if y is None:
            continue
        (inside if y == value else outside).update(w.lower() for w in words(t) if _WORD.match(w))
    n_in, n_out, vocab = sum(inside.values()), sum(outside.values()), len(inside | outside)
    score = {w: math.log((c + 1) / (n_in + vocab)) - math.log((outside[w] + 1) / (n_out + vocab))
             for w, c in inside.items() if c >= min_count}
    return sorted(score, key=lambda w: (-score[w], w))[:k]


def word_token_ids(tokenizer, words_: list[str]) -> list[int]:
    """First token of each word as it starts a word inside text (" word", " Word")."""
    ids = set()
    for w in words_:
        for form in (f" {w}", f" {w.capitalize()}"):
            got = tokenizer(form, add_special_tokens=False)["input_ids"]
            if got:
                ids.add(got[0])
    return sorted(ids)


# ----------------------------------------------------------------------------- perplexity under the reference LM


@torch.no_grad()
@torch.no_grad()
def conditional_nll(ref, prefixes: list[str], continuations: list[str], batch_size: int = 64,
                    bf16: str | bool = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) of each continuation given its prefix under a ``tasks.evaluate_diffusion.ReferenceLM``
    (the continuation's tokens are those after the prefix's own tokens in the joined text). ``bf16`` "auto": the
    forward pass under bfloat16 autocast where the device has it natively (2.2x faster for 2,000 continuations of
    the 4.2M reference LM on 2 cores; their perplexity 2.47249 against float32's 2.47251), the NLL in float32. The
    output layer and its softmax run at the continuation's tokens only, not at the prefix's or the padding."""
    model, tok = ref.model, ref.tokenizer
    device = next(model.parameters()).device
    amp = autocast_dtype(bf16, device)
    sums, counts = np.zeros(len(prefixes)), np.zeros(len(prefixes), dtype=np.int64)
    for i in range(0, len(prefixes), batch_size):
        pre = tok(prefixes[i:i + batch_size], add_special_tokens=False)["input_ids"]
        full = tok([p + c for p, c in zip(prefixes[i:i + batch_size], continuations[i:i + batch_size])],
                   add_special_tokens=False)["input_ids"]
        T = max(len(f) for f in full)
        ids = torch.full((len(full), T), tok.pad_token_id, dtype=torch.long)
        target = torch.zeros((len(full), T), dtype=torch.bool)
        for r, (p, f) in enumerate(zip(pre, full)):
            ids[r, :len(f)] = torch.tensor(f)
            target[r, max(len(p), 1):len(f)] = True
        ids, target = ids.to(device), target.to(device)
        keep = target[:, 1:]
        nll = torch.zeros(keep.shape, device=device)
        with autocast(device, amp), cpu_bf16_attention(model):
            nll[keep] = kept_token_nll(model, model.base_model(input_ids=ids).last_hidden_state, ids, keep)
        sums[i:i + len(full)] = nll.sum(1).double().cpu().numpy()
        counts[i:i + len(full)] = keep.sum(1).cpu().numpy()
    return sums, counts


# ----------------------------------------------------------------------------- per-prefix figures and the bootstrap


@dataclass
class PrefixStats:
    """One system's figures per prefix (P prefixes, S continuations each)."""

    hits: np.ndarray  # (P,) fraction of the prefix's continuations the judge gives its target
    lexicon_hits: np.ndarray | None  # (P,) the same by the lexicon judge (sentiment)
    nll: np.ndarray  # (P,) summed NLL of the prefix's continuations
    tokens: np.ndarray  # (P,)
    dist: dict[int, np.ndarray]  # n -> (P,) distinct-n over the prefix's continuations


def prefix_stats(continuations: list[str], hits: list[bool], lexicon_hits: list[bool] | None, nll: np.ndarray,
                 tokens: np.ndarray, per_prefix: int) -> PrefixStats:
    P = len(continuations) // per_prefix
    grid = lambda a: np.asarray(a, dtype=float).reshape(P, per_prefix)  # noqa: E731
    groups = [continuations[i * per_prefix:(i + 1) * per_prefix] for i in range(P)]
    return PrefixStats(grid(hits).mean(1), None if lexicon_hits is None else grid(lexicon_hits).mean(1),
                       grid(nll).sum(1), grid(tokens).sum(1),
                       {n: np.array([distinct_n(g, n) for g in groups]) for n in (1, 2, 3)})


def bootstrap(stats: PrefixStats, resamples: int, seed: int = 0) -> dict[str, Interval]:
    """Each figure with its 95% percentile interval over ``resamples`` resamplings of the prefixes."""
    rng = np.random.default_rng(seed)
    P = len(stats.hits)
    draws = rng.integers(0, P, size=(resamples, P))
    figures = {"attribute_rate": lambda ix: stats.hits[ix].mean(),
               "perplexity": lambda ix: math.exp(stats.nll[ix].sum() / max(stats.tokens[ix].sum(), 1)),
               **{f"dist_{n}": (lambda ix, n=n: stats.dist[n][ix].mean()) for n in (1, 2, 3)}}
    if stats.lexicon_hits is not None:
        figures["lexicon_rate"] = lambda ix: stats.lexicon_hits[ix].mean()
    out = {}
    everything = np.arange(P)
    for name, f in figures.items():
        values = np.array([f(ix) for ix in draws])
        out[name] = Interval(value=round(float(f(everything)), 4), low=round(float(np.percentile(values, 2.5)), 4),
                             high=round(float(np.percentile(values, 97.5)), 4))
    return out


# ----------------------------------------------------------------------------- the goals


def dominance(dglm: list[tuple[float, float]], boost: list[tuple[float, float]], tolerance: float = 0.05) -> list[dict]:
    """For each logit-boost point (perplexity, rate): the DGLM point with the highest rate among those whose perplexity
    is at most (1 + tolerance) times the boost point's, and whether it has a higher rate."""
    out = []
    for ppl_b, rate_b in boost:
        eligible = [(r, p) for p, r in dglm if p <= (1 + tolerance) * ppl_b]
        best = max(eligible) if eligible else None
        out.append({"boost_perplexity": ppl_b, "boost_rate": rate_b,
                    "dglm_rate": None if best is None else best[0], "dglm_perplexity": None if best is None else best[1],
                    "dominated": best is not None and best[0] > rate_b})
    return out
