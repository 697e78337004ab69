"""Fine-tuning the encoder annotator (``small_annotator.finetune.kind: encoder``) on seed shards.

Same contract as the generative kind (``tasks.finetune.finetune_annotator`` dispatches here): the seed's
documents are split by doc_id hash, the model is trained within the epoch and time budget, saved to
``out_dir/model`` with a signature of its inputs (an up-to-date checkpoint is reused), and scored on the
held-out documents: exact triplet P/R/F1 (as the synthetic gold is scored), the same case- and
whitespace-normalized at three levels (triplets, (entity, value) pairs, values), and the share of outputs
that strip back to the source.
"""

from __future__ import annotations

import os
import time

from schemas import markup
from schemas.configs import AnnotatorFinetuneConfig
from schemas.reports import FinetuneReport
from tasks.evaluate_annotation import score_levels, score_triplets, scored_calls
from tasks.finetune_seed import read_seed, seed_signature, split_seed, up_to_date_report


def evaluate_encoder(model, tokenizer, names, docs: list[tuple[str, markup.Annotated]], opts=None) -> dict:
    """Held-out quality of the encoder annotator against ``docs``' annotations (see module docstring),
    with its annotation throughput."""
    from models.span_annotator_decode import AnnotateStats, annotate_texts

    stats = AnnotateStats()
    out = annotate_texts(model, tokenizer, names, [a.text for _, a in docs], opts, stats)
    predicted, expected, preserved = [], [], 0
    for (doc_id, gold), got in zip(docs, out):
        preserved += markup.strip(markup.render(got)) == gold.text
        predicted += scored_calls(doc_id, got)
        expected += scored_calls(doc_id, gold)
    return {**score_triplets(predicted, expected), **score_levels(predicted, expected), "documents": len(docs),
            "source_preserved_rate": preserved / max(len(docs), 1),
            "docs_per_s": len(docs) / max(stats.seconds, 1e-9),
            "source_tokens_per_s": stats.source_tokens / max(stats.seconds, 1e-9)}


def finetune_encoder_annotator(annotated_shards: list[str], cfg: AnnotatorFinetuneConfig, out_dir: str,
                               log=print) -> FinetuneReport:
    """Fine-tune the encoder annotator on the seed shards into ``out_dir/model`` and score the held-out split."""
    import torch

    from models.span_annotator import (
        SpanAnnotatorConfig,
        build_span_annotator,
        count_parameters,
        load_span_annotator,
        save_span_annotator,
        write_meta,
    )
    from models.span_annotator_finetune import train_span_annotator
    from models.span_examples import build_examples

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    enc = cfg.encoder
    checkpoint = os.path.join(out_dir, "model")
    signature = seed_signature(annotated_shards, cfg)
    base = enc.base or "all-MiniLM-L6-v2"
    version = f"encoder:{os.path.basename(base.rstrip('/'))}+{signature[:12]}"
    reused = up_to_date_report(checkpoint, signature, version, log)
    if reused is not None:
        return reused
    train, holdout = split_seed(read_seed(annotated_shards), cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, names = build_span_annotator(
        enc.base, [pc.call.relation for _, a in train for pc in a.calls],
        SpanAnnotatorConfig(window=enc.window, decoder_layers=enc.decoder_layers, relation_grad=enc.relation_grad))
    examples = build_examples(tokenizer, [a for _, a in train], model.cfg)
    n_calls = sum(len(a.calls) for _, a in train)
    n_used = sum(len(e.calls) for e in examples)
    log(f"fine-tune encoder annotator ({base}): {count_parameters(model):,} parameters, {len(train)} documents "
        f"({len(examples)} windows, {n_used} of {n_calls} calls with their value in the text), {len(holdout)} held out")
    result = train_span_annotator(model, examples, epochs=enc.epochs, batch_tokens=enc.batch_tokens, lr=enc.lr,
                                  head_lr=enc.head_lr, warmup_steps=enc.warmup_steps, weight_decay=enc.weight_decay,
                                  seed=cfg.seed, stop_after_s=cfg.time_budget_s, frozen_layers=enc.frozen_layers,
                                  clock=time.perf_counter if enc.budget_clock == "wall" else
                                  lambda: time.process_time() / torch.get_num_threads(),
                                  weights={"relation": enc.relation_weight, "name": enc.name_weight},
                                  name_rows=names.name_rows(tokenizer, model.cfg.max_relation_tokens), log=log)
    log(f"fine-tune: {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f} s wall, "
        f"{result.budget_seconds:.0f} s on the budget's clock ({enc.budget_clock})")
    meta = {"signature": signature, "version": version}
    save_span_annotator(model, tokenizer, names, checkpoint, meta)  # float32, before scoring casts it to bf16
    t0 = time.perf_counter()
    quality = evaluate_encoder(model, tokenizer, names, holdout) if holdout else {}
    log(f"fine-tune: held-out seed F1 {quality.get('f1', float('nan')):.3f} (normalized: triplets "
        f"{quality.get('triplet_f1', float('nan')):.3f}, entity+value {quality.get('entity_value_f1', float('nan')):.3f}, "
        f"values {quality.get('value_f1', float('nan')):.3f}), source preserved "
        f"{quality.get('source_preserved_rate', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)")
    losses = [h["loss"] for h in result.history]
    report = FinetuneReport(
        checkpoint=os.path.abspath(checkpoint), version=version, base=base, parameters=count_parameters(model),
        train_docs=len(train), holdout_docs=len(holdout), train_examples=len(examples), steps=result.steps,
        epochs=round(result.epochs, 3), train_seconds=round(result.seconds, 1),
        final_train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        holdout_quality=quality, history=result.history)
    _, _, _, saved = load_span_annotator(checkpoint, "cpu")  # what was written loads back
    write_meta(checkpoint, {**saved, "report": report.model_dump()})
    return report
