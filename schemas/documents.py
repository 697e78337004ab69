"""What an annotator is given and what it answers: the contract between annotator backends and the
shard-level annotation step (``tasks.annotate.annotate_shard``)."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel


class Document(BaseModel):
    """One document of a document shard, as an annotator sees it."""

    doc_id: str
    text: str  # escaped source text, as in document shards
    category: str | None = None
    url: str | None = None


class Annotation(BaseModel):
    """An annotator's answer for one document: annotated text, or a failure with its reason."""

    doc_id: str
    annotated_text: str | None = None  # canonical markup; strip(annotated_text) == document text
    error: str | None = None
    confidences: list[float] | None = None  # per call, in order, when the backend gives them
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Annotator(Protocol):
    """Every annotator backend: a name and version recorded with its output, and ``annotate``."""

    name: str
    version: str  # changes whenever the output for the same input would
    prompt_id: str | None

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        """One Annotation per document, same order; never raises for a single bad document."""
        ...
