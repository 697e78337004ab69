"""The encoder annotator as a bulk annotator backend (``tasks.bulk`` picks it for an encoder checkpoint).

Implements :class:`tasks.annotate.Annotator`: ``annotate(docs)`` returns canonical markup whose calls strip back
to the source by construction (values and entities are spans of the source), so ``annotate_shard`` writes its
annotated and triplet shards, completion markers and reports exactly as for the other backends.
"""

from __future__ import annotations

from schemas import markup
from schemas.configs import BulkAnnotationConfig
from schemas.documents import Annotation, Document


class EncoderAnnotator:
    """A fine-tuned encoder annotator in this process; ``stats`` sums the work of every ``annotate`` call."""

    name = "lmlm-encoder-annotator"
    prompt_id = None

    def __init__(self, checkpoint: str, cfg: BulkAnnotationConfig):
        import torch

        from models.span_annotator import load_span_annotator
        from models.span_annotator_decode import DECODER_REVISION, AnnotateOptions, AnnotateStats

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.tokenizer, self.names, meta = load_span_annotator(checkpoint, cfg.device)
        self.options = AnnotateOptions.from_config(cfg)
        # what a shard's completion marker is keyed by: other decoding settings write other calls
        default = AnnotateOptions()
        changed = {k: getattr(self.options, k) for k in ("continue_bias", "subject_margin", "relation")
                   if getattr(self.options, k) != getattr(default, k)}
        self.version = (meta["version"] + f";decoder={DECODER_REVISION}"
                        + "".join(f";{k}={v}" for k, v in changed.items()))
        self.stats = AnnotateStats()

    def annotate(self, docs: list[Document]) -> list[Annotation]:
        from models.span_annotator_decode import annotate_texts

        got = annotate_texts(self.model, self.tokenizer, self.names, [d.text for d in docs], self.options, self.stats)
        return [Annotation(doc_id=d.doc_id, annotated_text=markup.render(a)) for d, a in zip(docs, got)]
