"""Fine-tuning the small annotator on seed shards, and measuring it on held-out seed documents.

``finetune_annotator`` reads annotated seed shards, holds out a fraction of documents (by doc_id
hash, so the split does not depend on shard order), trains (``models.annotator_finetune.finetune``), saves a
Hugging Face checkpoint, and scores the held-out documents: triplet precision/recall/F1 against the
seed annotations and the share of outputs whose stripped text equals the source. A checkpoint whose
recorded signature (seed shard contents + config) matches is reused instead of retrained.
"""

from __future__ import annotations

import os
import time

from schemas import markup
from schemas.configs import AnnotatorFinetuneConfig
from schemas.errors import UserInputError
from schemas.reports import FinetuneReport, QualityGateReport
from tasks.evaluate_annotation import score_levels, score_triplets, scored_calls
from tasks.finetune_seed import checkpoint_meta, read_seed, seed_signature, split_seed, up_to_date_report

# from-scratch shapes of the annotator: small enough to fine-tune and annotate the demo corpus on 2 CPU cores
ANNOTATOR_SHAPES = {
    # (d_model, layers, heads, MLP width)
    "annotator-tiny": (64, 2, 2, 176),
    "annotator-small": (128, 4, 4, 344),
}


def build_base(cfg: AnnotatorFinetuneConfig, texts: list[str], out_dir: str):
    """(model, tokenizer) to fine-tune: a from-scratch shape with a tokenizer trained on ``texts``, or a
    pretrained hub/local model (wrapped with LoRA when ``cfg.lora_r``)."""
    import torch

    from models.lmlm import MODEL_SHAPES, build_model
    from models.tokenizer import load_tokenizer, train_tokenizer

    scratch = cfg.base in ANNOTATOR_SHAPES or cfg.base in MODEL_SHAPES
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif scratch:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.base)
    torch.manual_seed(cfg.seed)
    if cfg.base in ANNOTATOR_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        d, layers, heads, ff = ANNOTATOR_SHAPES[cfg.base]
        eos = tokenizer.eos_token_id
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=ff, max_position_embeddings=4 * cfg.max_source_tokens,
            tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    else:
        model = build_model(cfg.base, len(tokenizer), context_length=4 * cfg.max_source_tokens if scratch else None,
                            eos_token_id=tokenizer.eos_token_id)
    if cfg.lora_r:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserInputError("finetune.lora_r is set: install peft (pip install peft) or unset lora_r for full "
                                 "fine-tuning") from None
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, task_type="CAUSAL_LM",
                          target_modules="all-linear",
                          modules_to_save=["embed_tokens", "lm_head"] if not scratch else None)
        model = get_peft_model(model, lora)
    return model, tokenizer


def evaluate_on(model, tokenizer, docs: list[tuple[str, markup.Annotated]], opts=None) -> dict:
    """Triplet/span P/R/F1 of the model's annotations against ``docs``' annotations, the source-preserved
    rate (stripped output == source), calls dropped as malformed, and decoding throughput."""
    from models.annotator_decode import DecodeStats, annotate_texts

    stats = DecodeStats()
    out = annotate_texts(model, tokenizer, [a.text for _, a in docs], opts, stats)
    predicted, expected, preserved = [], [], 0
    for (doc_id, gold), got in zip(docs, out):
        preserved += markup.strip(markup.render(got.annotated)) == gold.text
        predicted += scored_calls(doc_id, got.annotated)
        expected += scored_calls(doc_id, gold)
    quality = {**score_triplets(predicted, expected), **score_levels(predicted, expected)}
    quality.update(documents=len(docs), source_preserved_rate=preserved / max(len(docs), 1),
                   calls_malformed=stats.calls_malformed, calls_aborted=stats.calls_aborted,
                   docs_per_s=len(docs) / max(stats.seconds, 1e-9),
                   source_tokens_per_s=stats.source_tokens / max(stats.seconds, 1e-9))
    return quality


def finetune_annotator(annotated_shards: list[str], cfg: AnnotatorFinetuneConfig, out_dir: str,
                       log=print) -> FinetuneReport:
    """Fine-tune on the seed shards into ``out_dir/model`` (reused when already trained on the same
    inputs and config) and score the held-out split; ``cfg.kind`` picks the encoder or the generative model."""
    if cfg.kind == "encoder":
        from tasks.finetune_encoder import finetune_encoder_annotator

        return finetune_encoder_annotator(annotated_shards, cfg, out_dir, log)
    import torch

    from models.annotator import build_examples, load_annotator, save_annotator
    from models.annotator_finetune import finetune
    from models.lmlm import count_parameters

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpoint = os.path.join(out_dir, "model")
    signature = seed_signature(annotated_shards, cfg)
    version = f"{cfg.base}+{signature[:12]}"
    docs = read_seed(annotated_shards)
    train, holdout = split_seed(docs, cfg)
    reused = up_to_date_report(checkpoint, signature, version, log)
    if reused is not None:
        return reused

    model, tokenizer = build_base(cfg, [a.text for _, a in train], out_dir)
    train_ex = build_examples(tokenizer, [a for _, a in train], cfg.max_source_tokens)
    held_ex = build_examples(tokenizer, [a for _, a in holdout], cfg.max_source_tokens)
    log(f"fine-tune {cfg.base}: {count_parameters(model):,} parameters, {len(train)} documents "
        f"({len(train_ex)} examples), {len(holdout)} held out")
    result = finetune(model, tokenizer, train_ex, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                      seed=cfg.seed, holdout=held_ex[:64], eval_every=max(50, round(len(train_ex) / cfg.batch_size)),
                      log=log, stop_after_s=cfg.time_budget_s, decision_loss=cfg.decision_loss)
    if cfg.lora_r:
        model = model.merge_and_unload()  # merged weights: what vLLM and AutoModelForCausalLM load directly
    losses = [h["loss"] for h in result.history if "loss" in h]
    held = [h["holdout_loss"] for h in result.history if "holdout_loss" in h]
    t0 = time.perf_counter()
    quality = evaluate_on(model, tokenizer, holdout) if holdout else {}
    log(f"fine-tune: held-out seed F1 {quality.get('f1', float('nan')):.3f}, source preserved "
        f"{quality.get('source_preserved_rate', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)")
    report = FinetuneReport(
        checkpoint=os.path.abspath(checkpoint), version=version, base=cfg.base, parameters=count_parameters(model),
        train_docs=len(train), holdout_docs=len(holdout), train_examples=len(train_ex), steps=result.steps,
        epochs=round(result.epochs, 3), train_seconds=round(result.seconds, 1),
        final_train_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        final_holdout_loss=held[-1] if held else None, holdout_quality=quality, history=result.history)
    save_annotator(model, tokenizer, checkpoint, {"signature": signature, "version": version,
                                                  "max_source_tokens": cfg.max_source_tokens,
                                                  "report": report.model_dump()})
    load_annotator(checkpoint)  # what was written loads back (AutoModelForCausalLM + tokenizer)
    return report


def stored_finetune_report(checkpoint: str) -> FinetuneReport | None:
    """The fine-tune report a checkpoint of either kind stores in its annotator.json (None: no such file or no
    report in it, e.g. a hub model or one fine-tuned elsewhere)."""
    stored = (checkpoint_meta(checkpoint) or {}).get("report")
    return FinetuneReport(**stored) if stored else None


def quality_gate(report: FinetuneReport, min_f1: float | None, below: str = "stop") -> QualityGateReport:
    """Whether the fine-tuned annotator may annotate the corpus: its held-out seed (entity, value) F1 (exact
    triplet F1 for a report without it) against ``min_f1`` (None: no gate). ``below`` ("stop" or "seed_only") is
    what the run does with a model under the bar; the decision line names the figure, the threshold and the fix."""
    q = report.holdout_quality or {}
    figure = q.get("entity_value_f1", q.get("f1"))
    measure = "held-out seed (entity, value) F1" if "entity_value_f1" in q else "held-out seed triplet F1"
    if min_f1 is None or figure is None:
        why = "no gate (small_annotator.min_f1 unset)" if min_f1 is None else "no held-out seed documents to measure"
        return QualityGateReport(measure=measure, figure=figure, threshold=min_f1, passed=True,
                                 action="bulk annotation", decision=f"quality gate: {why}; annotating the corpus")
    if figure >= min_f1:
        return QualityGateReport(measure=measure, figure=figure, threshold=min_f1, passed=True, action="bulk annotation",
                                 decision=f"quality gate passed: {measure} {figure:.3f} >= small_annotator.min_f1 "
                                          f"{min_f1:g}; annotating the corpus")
    then = ("stopping before bulk annotation, the warehouse untouched" if below == "stop" else
            "the corpus is not annotated with it, the warehouse gets the seed's annotations only")
    return QualityGateReport(
        measure=measure, figure=figure, threshold=min_f1, passed=False, action="stop" if below == "stop" else "seed only",
        decision=f"the small annotator's {measure} is {figure:.3f}, below small_annotator.min_f1 {min_f1:g} "
                 f"({report.train_docs} seed documents, {report.epochs:g} epochs in {report.train_seconds:.0f} s): "
                 f"{then}; annotate more seed documents (small_annotator.seed_docs) or train longer "
                 "(small_annotator.finetune.time_budget_s, --finetune-budget-s), or lower min_f1")
