"""The data of the DGLM stages, as plain functions over document shards.

    document shards -> documents with attribute labels (a column, or a key of the metadata JSON)
    -> roles by doc_id hash: holdout (never trained on: evaluation prefixes, sanity checks), judge (trains the
       evaluation's judges only), train
    -> (prefix, continuation) examples cut at random token positions (continuation: the next N tokens), a share of
       them moved to sentence starts
    -> frozen all-MiniLM-L6-v2 embeddings of every continuation (the plan)
    -> the plan space's standardisation statistics (training continuations)

``prepare_plan_data`` writes them once under ``<workdir>/plans`` (examples.parquet, continuation.npy,
plan_space.safetensors) and reuses them while the settings and the tokenizer are the same. The prefixes' embeddings
(DGLM's prior's condition, prefix.npy) are made there the first time something reads them
(:meth:`PlanData.prefix_embeddings`): STAR-LDM never does, and they were half of the stage's time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.plan_lm import PlanSpace
from schemas import progress
from schemas.errors import UserInputError
from schemas.guided_configs import AttributeConfig, PlanDataConfig
from schemas.reports import PlanDataReport
from tasks.diffusion import SENTENCE_BOUNDARY
from tasks.pretrain import is_holdout
from tasks.shardio import read_table

logger = logging.getLogger(f"lmlm.{__name__}")

ROLES = ("train", "judge", "holdout")


@dataclass
class Document:
    doc_id: str
    text: str
    labels: dict[str, str | None]
    role: str


def document_role(doc_id: str, holdout_fraction: float, judge_fraction: float) -> str:
    """holdout (the pretraining's own split, so no model saw it), judge, or train."""
    if is_holdout(doc_id, holdout_fraction):
        return "holdout"
    return "judge" if is_holdout(f"judge/{doc_id}", judge_fraction) else "train"


def read_documents(shards: list[str], attributes: list[AttributeConfig], holdout_fraction: float,
                   judge_fraction: float) -> list[Document]:
    """Every document of the shards with its labels (None where a document has none) and role."""
    docs = []
    for shard in shards:
        try:
            names = set(pq.read_schema(shard).names)
            table = read_table(shard, ["doc_id", "text"] + [c for c in ("metadata",) if c in names]
                               + sorted({a.source for a in attributes if a.source in names}))
        except (OSError, ValueError, KeyError, pa.ArrowInvalid) as exc:
            raise UserInputError(f"document shard {shard}: cannot read it ({str(exc).splitlines()[0]}); pass document "
                                 "shards with doc_id and text columns") from exc
        for row in table.to_pylist():
            meta = {}
            if row.get("metadata"):
                try:
                    meta = json.loads(row["metadata"])
                except ValueError:
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
            labels = {a.name: row[a.source] if a.source in row else meta.get(a.source) for a in attributes}
            labels = {k: None if v is None else str(v) for k, v in labels.items()}
            docs.append(Document(row["doc_id"], row["text"] or "", labels,
                                 document_role(row["doc_id"], holdout_fraction, judge_fraction)))
    if not docs:
        raise UserInputError(f"no documents in {len(shards)} shard(s); pass document shards")
    return docs


def sentence_starts(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Token indices at which a sentence of ``text`` starts (after its first): the first token past the sentence's
    closing punctuation, kept when that token does not also hold the punctuation."""
    starts, j = [], 0
    for m in SENTENCE_BOUNDARY.finditer(text):
        while j < len(offsets) and offsets[j][1] <= m.start():
            j += 1
        if j < len(offsets) and offsets[j][0] >= m.start():
            starts.append(j)
    return starts


def cut_examples(ids: list[int], rng: np.random.Generator, cfg: PlanDataConfig, eos: int,
                 starts: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """(prefix, continuation) pairs of one tokenized document: a split point s uniform over the positions that leave
    ``continuation_tokens`` after it, a prefix of uniform length in [min, max] before it (starting with end-of-text
    when it reaches the document's start, as documents follow one in pretraining). With ``sentence_start_fraction``
    f > 0 and the document's sentence starts (token indices) given, each split point moves with probability f to
    the nearest sentence start in range, so the continuation opens a sentence, as after a prompt of whole sentences."""
    C = cfg.continuation_tokens
    last = len(ids) - C
    if last < cfg.min_prefix_tokens:
        return []
    snap = [t for t in starts or [] if cfg.min_prefix_tokens <= t <= last] if cfg.sentence_start_fraction > 0 else []
    points = rng.integers(cfg.min_prefix_tokens, last + 1, size=cfg.examples_per_doc).tolist()
    if snap:
        move = rng.random(len(points)) < cfg.sentence_start_fraction
        points = [min(snap, key=lambda t: (abs(t - s), t)) if m else s for s, m in zip(points, move)]
    out = []
    for s in sorted(set(points)):
        P = int(rng.integers(cfg.min_prefix_tokens, cfg.max_prefix_tokens + 1))
        prefix = ids[s - P:s] if s > P else [eos] + ids[:s]
        out.append((prefix, ids[s:s + C]))
    return out


@dataclass
class PlanData:
    """The examples (every role) with their embeddings and the plan space."""

    table: pa.Table  # doc_id, role, prefix_ids, continuation_ids, prefix_text, continuation_text, label_<attribute>...
    continuation: np.ndarray  # (N, 384) unit-norm MiniLM embeddings: the plans
    space: PlanSpace
    folder: str

    def prefix_embeddings(self, batch_size: int = 256) -> np.ndarray:
        """(N, 384) unit-norm MiniLM embeddings of the prefixes (the prior's conditions): read from the folder, or
        made and saved there on first use (written whole, then renamed, so a concurrent reader sees all or none)."""
        path = os.path.join(self.folder, "prefix.npy")
        if not os.path.isfile(path):
            t0 = time.perf_counter()
            prefix = embed_texts(self.column("prefix_text"), batch_size, "embed prefixes")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, prefix.astype(np.float32))
            os.replace(tmp, path)
            logger.info("plans: %d prefixes embedded in %.0f s", len(prefix), time.perf_counter() - t0)
        return np.load(path)

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def rows(self, role: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.column("role")) == role)

    def labels(self, attribute: str) -> list[str | None]:
        return self.column(f"label_{attribute}")


def _marker(cfg: PlanDataConfig, attributes: list[AttributeConfig], shards: list[str], tokenizer_path: str,
            holdout_fraction: float) -> str:
    tok = hashlib.sha1(open(os.path.join(tokenizer_path, "tokenizer.json"), "rb").read()).hexdigest()
    return json.dumps({"data": cfg.model_dump(mode="json"), "attributes": [a.model_dump(mode="json") for a in attributes],
                       "shards": sorted(os.path.abspath(s) for s in shards), "tokenizer": tok,
                       "holdout_fraction": holdout_fraction}, sort_keys=True)


def prepare_plan_data(shards: list[str], attributes: list[AttributeConfig], cfg: PlanDataConfig, tokenizer_path: str,
                      out_dir: str, *, holdout_fraction: float, log=logger.info) -> PlanDataReport:
    """Examples of every document, their embeddings and the plan space, written under ``out_dir`` (reused when the
    settings, shards and tokenizer are those that wrote it); read them back with :func:`load_plan_data`."""
    from models.tokenizer import load_tokenizer

    marker = _marker(cfg, attributes, shards, tokenizer_path, holdout_fraction)
    if os.path.isfile(os.path.join(out_dir, "data.json")) and open(os.path.join(out_dir, "data.json")).read() == marker:
        log(f"plans: reusing {out_dir}")
        return plan_data_report(load_plan_data(out_dir), [a.name for a in attributes], reused=True)
    tokenizer = load_tokenizer(tokenizer_path)
    docs = read_documents(shards, attributes, holdout_fraction, cfg.judge_fraction)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    for doc, ids, offsets in zip(docs, encoded["input_ids"], encoded["offset_mapping"]):
        starts = sentence_starts(doc.text, offsets) if cfg.sentence_start_fraction > 0 else None
        for prefix, cont in cut_examples(ids, rng, cfg, tokenizer.eos_token_id, starts):
            rows.append({"doc_id": doc.doc_id, "role": doc.role, "prefix_ids": prefix, "continuation_ids": cont,
                         **{f"label_{k}": v for k, v in doc.labels.items()}})
    if cfg.max_examples is not None:
        train = [i for i, r in enumerate(rows) if r["role"] == "train"]
        if len(train) > cfg.max_examples:
            drop = set(np.asarray(train)[rng.permutation(len(train))[cfg.max_examples:]].tolist())
            rows = [r for i, r in enumerate(rows) if i not in drop]
    counts = {role: sum(r["role"] == role for r in rows) for role in ROLES}
    if counts["train"] == 0 or counts["holdout"] == 0:
        raise UserInputError(f"plans: {counts} examples from {len(docs)} documents; give longer or more documents "
                             "(each needs min_prefix_tokens + continuation_tokens tokens) or another holdout_fraction")
    for r in rows:
        r["prefix_text"] = tokenizer.decode(r["prefix_ids"], skip_special_tokens=True)
        r["continuation_text"] = tokenizer.decode(r["continuation_ids"], skip_special_tokens=True)
    log(f"plans: {len(rows)} examples from {len(docs)} documents ({counts}); embedding the continuations")
    t0 = time.perf_counter()
    continuation = embed_texts([r["continuation_text"] for r in rows], cfg.embed_batch_size, "embed continuations")
    log(f"plans: {len(rows)} continuations embedded in {time.perf_counter() - t0:.0f} s")
    train = np.asarray([r["role"] == "train" for r in rows])
    space = PlanSpace.fit(continuation[train])
    write_plan_data(out_dir, pa.Table.from_pylist(rows), continuation, space, marker)
    return plan_data_report(load_plan_data(out_dir), [a.name for a in attributes], reused=False)


def plan_data_report(data: "PlanData", attributes: list[str], reused: bool) -> PlanDataReport:
    train = data.rows("train")
    return PlanDataReport(folder=data.folder, documents=len(set(data.column("doc_id"))),
                          examples={role: len(data.rows(role)) for role in ROLES},
                          labelled={a: sum(data.labels(a)[i] is not None for i in train) for a in attributes},
                          reused=reused)


def embed_texts(texts: list[str], batch_size: int, what: str) -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 embeddings (N, 384), reporting progress."""
    from models.embed import embed

    out = []
    for i in range(0, len(texts), batch_size):
        out.append(embed(texts[i:i + batch_size], batch_size=batch_size))
        progress.update(what, min(i + batch_size, len(texts)), len(texts), "texts")
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def write_plan_data(out_dir: str, table: pa.Table, continuation: np.ndarray, space: PlanSpace, marker: str) -> None:
    from safetensors.torch import save_file

    from models.train import write_folder_atomic

    def write(tmp: str) -> None:
        pq.write_table(table, os.path.join(tmp, "examples.parquet"))
        np.save(os.path.join(tmp, "continuation.npy"), continuation.astype(np.float32))
        save_file(space.state_dict(), os.path.join(tmp, "plan_space.safetensors"))
        with open(os.path.join(tmp, "data.json"), "w") as f:
            f.write(marker)

    write_folder_atomic(out_dir, write)


def load_plan_space(folder: str) -> PlanSpace:
    from safetensors.torch import load_file

    path = os.path.join(folder, "plan_space.safetensors")
    if not os.path.isfile(path):
        raise UserInputError(f"{folder}: no plan space here; run `lmlm guided train` first")
    state = load_file(path)
    return PlanSpace(state["mean"], state["std"])


def load_plan_data(folder: str) -> PlanData:
    if not os.path.isfile(os.path.join(folder, "examples.parquet")):
        raise UserInputError(f"{folder}: no plan examples here; run `lmlm guided train` first")
    return PlanData(pq.read_table(os.path.join(folder, "examples.parquet")),
                    np.load(os.path.join(folder, "continuation.npy")), load_plan_space(folder), folder)


def class_labels(data: PlanData, rows: np.ndarray, classes: dict[str, list[str]]) -> torch.Tensor:
    """Class ids (N, A) of the examples ``rows``; an attribute's unknown label is its last id."""
    out = []
    for name, values in classes.items():
        index = {v: i for i, v in enumerate(values)}
        labels = data.labels(name)
        out.append([index.get(labels[r], len(values)) for r in rows])
    return torch.tensor(out, dtype=torch.long).T.reshape(len(rows), len(classes))


def drop_labels(labels: torch.Tensor, unknown: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class ids (B, A) with each entry replaced by its attribute's unknown id (``unknown`` (A,)) with probability
    ``p``: the class-conditional reference then also learns "attribute not given", which is what it is passed for
    every attribute but the one evaluated."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, unknown.to(labels.device).expand_as(labels), labels)


def dropped_prefixes(prefixes: list[list[int]], p: float, mode: str, eos: int, rng: np.random.Generator) -> list[list[int]]:
    """A batch's prefixes with each replaced with probability ``p``: by the document start alone (``mode`` start) or by
    the prefix a random permutation of the batch puts there (swap; about 1 in B of those is the row's own). Trained this way, the soft prompt is the
    only source of what the continuation is about in those rows, so the model learns to read it, also against a
    prefix that points elsewhere (which is what steering does)."""
    if p <= 0:
        return prefixes
    drop = rng.random(len(prefixes)) < p
    if mode == "start":
        return [[eos] if d else q for q, d in zip(prefixes, drop)]
    shift = rng.permutation(len(prefixes))
    return [prefixes[shift[i]] if d else q for i, (q, d) in enumerate(zip(prefixes, drop))]


def length_grouped_batch(lengths: np.ndarray, batch_size: int, groups: int, seed: int, step: int) -> np.ndarray:
    """Indices into ``lengths`` of training step ``step``'s batch. Every ``groups`` consecutive steps share one draw
    of ``groups * batch_size`` indices (uniform, with replacement, as random batches are), sorted by length and
    dealt out in a shuffled order: each batch holds examples of similar length and pads little, while each example
    is drawn as often as before. A function of (seed, step) alone, so a resumed run redraws the same batches."""
    group, slot = divmod(step, groups)
    rng = np.random.default_rng([seed, group, 0x1E46])  # a stream of its own beside step_generators' [seed, step]
    drawn = rng.integers(0, len(lengths), groups * batch_size)
    drawn = drawn[np.argsort(lengths[drawn], kind="stable")]
    chunk = rng.permutation(groups)[slot]
    return drawn[chunk * batch_size:(chunk + 1) * batch_size]
