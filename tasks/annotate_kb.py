"""Offline annotators: ``kb-align`` (distant supervision from a knowledge base) and ``import`` (the
reference's annotation files).

``kb-align`` works the way T-REx was built: given (entity, relation, value) triplets, find which KB
entities a document names (a token index over every entity name and alias, so a KB of 100k+ entities
costs one dictionary lookup per document token), then place each of their facts before a mention of the
value after the entity is introduced (:func:`tasks.align.place_facts`, sentence scope: the document's
subject anywhere after its introduction, other entities within the sentences that name them).

``import`` reads ``{"examples": [{"text", "annotated_text", "model_id", "prompt_id", ...}]}`` files in the
legacy ``dblookup`` markup and maps every call onto the exact source text (:func:`tasks.realign.realign`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import markup
from schemas.errors import UserInputError
from schemas.shards import content_hash
from tasks.align import Fact, place_facts
from tasks.realign import realign
from schemas.documents import Annotation, Document

KB_COLUMNS = ("entity", "relation", "value")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# ---- knowledge base ---------------------------------------------------------------------------


def _unescape_reference(s: str) -> str:
    return s.replace("\\'", "'").replace('\\"', '"')


def _read_json_kb(path: Path) -> list[tuple]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"knowledge base {path}: not readable JSON ({exc}); give a Parquet, JSON or JSONL KB")
    if not isinstance(data, dict) or not isinstance(data.get("triplets"), list):
        raise UserInputError(f'knowledge base {path}: JSON must be {{"triplets": [[entity, relation, value], ...]}}')
    # the reference's JSON databases keep Python-style quote escapes (St George\'s)
    return [tuple(_unescape_reference(x) if isinstance(x, str) else x for x in t) if isinstance(t, list) else t
            for t in data["triplets"]]


def _read_jsonl_kb(path: Path) -> list:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserInputError(f"knowledge base {path} line {n}: not JSON ({exc}); fix or remove the line")
    return rows


def _rows_of(table: pa.Table, source: str) -> list[dict]:
    missing = [c for c in KB_COLUMNS if c not in table.column_names]
    if missing:
        raise UserInputError(
            f"knowledge base {source}: missing column(s) {', '.join(missing)}; it needs entity, relation, value")
    return table.select(list(KB_COLUMNS)).to_pylist()


def load_kb(kb) -> tuple[list[tuple[str, str, str]], int]:
    """Triplets from a Parquet file, a reference JSON DB (``{"triplets": [[e, r, v], ...]}``), a JSONL file
    (objects with entity/relation/value, or [e, r, v] lists), a pyarrow Table, or a list of such rows.

    Returns the distinct triplets (fields stripped) and how many rows were unusable (a null, empty or
    non-string field); a file that cannot be read is a UserInputError.
    """
    source = "table"
    if isinstance(kb, (str, Path)):
        path, source = Path(kb), str(kb)
        if not path.is_file():
            raise UserInputError(f"knowledge base {kb}: no such file; pass a Parquet, JSON or JSONL KB")
        suffix = path.name.lower()
        if suffix.endswith(".parquet"):
            try:
                rows = _rows_of(pq.read_table(path), source)
            except (OSError, pa.ArrowInvalid) as exc:
                raise UserInputError(f"knowledge base {kb}: not readable Parquet ({exc})")
        elif suffix.endswith(".jsonl"):
            rows = _read_jsonl_kb(path)
        elif suffix.endswith(".json"):
            rows = _read_json_kb(path)
        else:
            raise UserInputError(f"knowledge base {kb}: unknown format; use .parquet, .json or .jsonl")
    elif isinstance(kb, pa.Table):
        rows = _rows_of(kb, source)
    else:
        rows = list(kb)
    triplets, bad = {}, 0
    for row in rows:
        if isinstance(row, dict):
            fields = tuple(row.get(c) for c in KB_COLUMNS)
        else:
            fields = tuple(row)[:3] if isinstance(row, (list, tuple)) else ()
        if len(fields) != 3 or not all(isinstance(x, str) and x.strip() for x in fields):
            bad += 1
            continue
        triplets[tuple(x.strip() for x in fields)] = None
    return list(triplets), bad


def load_aliases(aliases) -> list[tuple[str, str]]:
    """(alias, entity) pairs from a dict alias -> entity, a list of pairs, or a Parquet file with
    columns alias, entity (the synthetic corpus's ``ground_truth/aliases.parquet``)."""
    if aliases is None:
        return []
    if isinstance(aliases, dict):
        return sorted(aliases.items())
    if isinstance(aliases, (str, Path)):
        path = Path(aliases)
        if not path.is_file():
            raise UserInputError(f"aliases {aliases}: no such file; pass a Parquet file with columns alias, entity")
        table = pq.read_table(path)
        if not {"alias", "entity"} <= set(table.column_names):
            raise UserInputError(f"aliases {aliases}: needs columns alias, entity")
        return sorted({(r["alias"], r["entity"]) for r in table.select(["alias", "entity"]).to_pylist()
                       if r["alias"] and r["entity"]})
    return sorted({(a, e) for a, e in aliases})


class NameIndex:
    """Every entity name and alias, indexed by its first token, for leftmost-longest matching in text."""

    def __init__(self, names):
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for name in names:
            tokens = tuple(_TOKEN_RE.findall(name))
            if tokens:
                self.by_first.setdefault(tokens[0], []).append((tokens, name))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))  # longest first

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Leftmost-longest, non-overlapping name matches as (start, end, name); names match token by token."""
        tokens = [(m.group(0), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]
        words = [t[0] for t in tokens]
        out, i = [], 0
        while i < len(tokens):
            for name_tokens, name in self.by_first.get(words[i], ()):
                n = len(name_tokens)
                if tuple(words[i:i + n]) == name_tokens:
                    out.append((tokens[i][1], tokens[i + n - 1][2], name))
                    i += n
                    break
            else:
                i += 1
        return out


# ---- kb-align ---------------------------------------------------------------------------------


class KBAlignAnnotator:
    """Distant supervision: the KB's facts about the entities a document names, placed on their mentions."""

    name = "kb-align"
    prompt_id = None

    def __init__(self, kb_path_or_table, aliases=None, ratio: float = 0.9):
        triplets, self.kb_rows_skipped = load_kb(kb_path_or_table)
        if not triplets:
            label = kb_path_or_table if isinstance(kb_path_or_table, (str, Path)) else "table"
            raise UserInputError(f"knowledge base {label}: no usable (entity, relation, value) rows")
        alias_pairs = load_aliases(aliases)
        self.ratio = ratio
        self.facts: dict[str, list[tuple[str, str]]] = {}
        for e, r, v in triplets:
            self.facts.setdefault(e, []).append((r, v))
        self.alias_of: dict[str, set[str]] = {}
        for alias, entity in alias_pairs:
            if entity in self.facts and alias != entity:
                self.alias_of.setdefault(alias, set()).add(entity)
        self.index = NameIndex(set(self.facts) | set(self.alias_of))
        digest = hashlib.sha1()
        for t in sorted(triplets):
            digest.update("\x1f".join(t).encode() + b"\x1e")
        for a in alias_pairs:
            digest.update(("alias\x1f" + "\x1f".join(a)).encode() + b"\x1e")
        self.version = f"kb-align-v1+{digest.hexdigest()[:12]}"
        self.unplaced = Counter()  # why facts of named entities were not placed, over all documents

    def annotate_text(self, text: str) -> markup.Annotated:
        """The text with a call before the value mention of each fact of the KB entities it names."""
        matches = self.index.find(text)
        named = {name for _, _, name in matches if name in self.facts}
        # a short alias ("Mills", "May") refers back to an entity already named in full in this document,
        # and only when it points to one such entity
        aliases = {}
        for _, _, name in matches:
            entities = self.alias_of.get(name, set()) & named
            if len(entities) == 1:
                aliases[name] = next(iter(entities))
        if not named:
            return markup.Annotated(text)
        # the subject is the entity first named in full (documents introduce their subject by name)
        subject = next((name for _, _, name in matches if name in self.facts), None)
        facts = [Fact(entity=e, relation=r, value=v) for e in sorted(named) for r, v in self.facts[e]]
        ann, unplaced = place_facts(text, facts, aliases, ratio=self.ratio, scope="sentence", subject=subject)
        self.unplaced.update(reason for _, reason in unplaced)
        return ann

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        out = []
        for doc in docs:
            try:
                ann = self.annotate_text(doc.text)
            except Exception as exc:  # one bad document must not stop the batch; it is reported, not lost
                out.append(Annotation(doc_id=doc.doc_id, error=f"{type(exc).__name__}: {exc}"))
                continue
            out.append(Annotation(doc_id=doc.doc_id, annotated_text=markup.render(ann)))
        return out


# ---- import -----------------------------------------------------------------------------------


def _one_name(values: list[str | None], default: str) -> str:
    names = sorted({v for v in values if v})
    return "+".join(names) if names else default


class ImportedAnnotations:
    """A reference-format annotation file (``{"examples": [{"text", "annotated_text", "model_id",
    "prompt_id", ...}]}``, legacy ``dblookup`` markup) as Documents and canonical Annotations.

    Every call is mapped onto the exact source text (:func:`tasks.realign.realign`), so
    ``strip(annotated_text) == document.text`` for every document; ``counts`` sums what realignment kept,
    moved and dropped. doc_id is ``sha1:<content hash>`` of the (escaped) text, as ingestion names a
    document without an id (the files' ``original_dataset_ids`` are not unique per text). Examples
    without a text, and repeated texts, are listed in ``rejected`` as (example index, reason).
    Implements the annotator protocol: ``annotate(docs)`` answers from the file by doc_id.
    """

    def __init__(self, json_path: str | Path, legacy: bool | None = None):
        path = Path(json_path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserInputError(f"annotation file {json_path}: no such file")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"annotation file {json_path}: not readable JSON ({exc})")
        examples = data.get("examples") if isinstance(data, dict) else None
        if not isinstance(examples, list):
            raise UserInputError(f'annotation file {json_path}: expected {{"examples": [{{"text", "annotated_text", ...}}]}}')
        self.path = str(path)
        self.counts: Counter = Counter()
        self.rejected: list[tuple[int, str]] = []
        self.documents: list[Document] = []
        self.annotations: dict[str, Annotation] = {}
        good = [e for e in examples if isinstance(e, dict)]
        self.name = "import:" + _one_name([e.get("model_id") for e in good], "unknown")
        prompt = _one_name([e.get("prompt_id") for e in good], "")
        self.prompt_id = prompt or None
        self.version = f"import-v1+{content_hash(path.read_bytes().decode('utf-8', 'replace'))[:12]}"
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or not ex["text"].strip():
                self.rejected.append((i, "no text"))
                continue
            if not isinstance(ex.get("annotated_text"), str):
                self.rejected.append((i, "no annotated_text"))
                continue
            text = markup.escape(ex["text"])
            doc_id = "sha1:" + content_hash(text)
            if doc_id in self.annotations:
                self.rejected.append((i, f"repeated text of {doc_id}"))
                continue
            is_legacy = legacy if legacy is not None else "[dblookup(" in ex["annotated_text"]
            ann, counts = realign(text, ex["annotated_text"], legacy=is_legacy)
            self.counts.update(counts)
            self.documents.append(Document(doc_id=doc_id, text=text))
            self.annotations[doc_id] = Annotation(doc_id=doc_id, annotated_text=markup.render(ann))

    def pairs(self) -> list[tuple[Document, markup.Annotated]]:
        """(document, parsed annotation) for every imported document, ready for the corrector."""
        return [(d, markup.parse(self.annotations[d.doc_id].annotated_text)) for d in self.documents]

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        return [self.annotations.get(d.doc_id) or Annotation(doc_id=d.doc_id, error=f"not in {self.path}")
                for d in docs]
