"""The encoder annotator on real data: fine-tune on the paper's GPT-4o seed (SQuAD contexts, 43 held out by doc_id
hash), then score it against GPT-4o on the held-out contexts and against the paper's 8B annotator
(Llama-3.1-8B + LoRA) on the Wikipedia texts of ``annotator_llama8b_dwiki.json`` (evaluation only: never trained on).

    .venv/bin/python bench/annotate_reference.py [--budget-s 900] [--threads 2] [--docs 830]

Needs ../shared/data/lmlm-reference/ (not part of the project). Prints, per yardstick, exact triplet P/R/F1,
(entity, value) F1 and value F1 (fields case- and whitespace-normalized, multisets per document), the same with
every entity replaced by the document's subject (the baseline the entity pointer must beat), the share of the
yardstick's values that occur in the text at all (what an extractive model can reach), the training time, the
model's size and the annotation throughput. Writes the predictions beside the result for reading disagreements.
For scale: the 8B student agrees with its GPT-4o teacher on Wikipedia at triplet F1 ~0.18, (entity, value) ~0.40,
value ~0.52.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "lmlm-reference")


def document_subject(text: str) -> str:
    """The document's title: a Wikipedia text's first line ("Ralph Earl\n\nRalph Earl (May 11, ..."), a SQuAD
    context's prefix ("Arsenal_F.C.: Arsenal began ...", underscores read as spaces)."""
    if "\n\n" in text[:200]:
        return text.split("\n\n", 1)[0].strip()
    if ": " in text[:100]:  # SQuAD writes a title's spaces as underscores
        return text.split(": ", 1)[0].replace("_", " ").strip()
    return " ".join(text.split()[:2])


def score(pairs, predicted) -> dict:
    """Scores of ``predicted`` (Annotated per document) against the gold of ``pairs`` [(doc_id, Annotated)]; the
    same with every predicted entity replaced by the document's subject; the gold values found in the text."""
    from schemas import markup
    from tasks.evaluate_annotation import normalize_field, score_levels, scored_calls

    pred, gold, subject, in_text, n_gold = [], [], [], 0, 0
    for (doc_id, g), p in zip(pairs, predicted):
        assert markup.strip(markup.render(p)) == g.text
        pred += scored_calls(doc_id, p)
        gold += scored_calls(doc_id, g)
        s = document_subject(g.text)
        subject += [(doc_id, s, pc.call.relation, pc.call.value, pc.offset) for pc in p.calls]
        low = normalize_field(g.text)
        in_text += sum(normalize_field(pc.call.value) in low for pc in g.calls)
        n_gold += len(g.calls)
    q = score_levels(pred, gold)
    base = score_levels(subject, gold)
    return {**q, "subject_entity_value_f1": base["entity_value_f1"], "subject_triplet_f1": base["triplet_f1"],
            "n_predicted": len(pred), "n_gold": len(gold), "gold_values_in_text": in_text / max(n_gold, 1),
            "documents": len(pairs)}


def disagreements(docs: list[dict], examples: int = 3) -> dict:
    """Every predicted and reference call sorted into one kind: agree; relation naming (same entity and value);
    entity choice (same value and relation, or same value only); value boundaries (overlapping values);
    facts the reference skipped (the prediction overlaps no reference value); facts the model missed (a
    reference value it did not touch; ``missed_not_in_text`` when the value is not in the text at all).
    Returns counts and a few examples of each kind."""
    from tasks.evaluate_annotation import normalize_field as norm

    kinds: dict[str, list] = {k: [] for k in ("agree", "relation naming", "entity choice", "value boundaries",
                                               "reference skipped", "missed", "missed_not_in_text")}
    for d in docs:
        text, low = d["text"], norm(d["text"])
        gold = [tuple(norm(x) for x in g[1:]) + (g,) for g in d["gold"]]
        used = set()
        for p in d["predicted"]:
            e, r, v = (norm(x) for x in p[1:])
            match = None
            for rule, kind in (((0, 1, 2), "agree"), ((0, 2), "relation naming"), ((1, 2), "entity choice"),
                               ((2,), "entity choice")):
                match = next((k for k, g in enumerate(gold) if k not in used
                              and all(g[i] == (e, r, v)[i] for i in rule)), None)
                if match is not None:
                    break
            if match is None:
                match = next((k for k, g in enumerate(gold) if k not in used and (v in g[2] or g[2] in v)), None)
                kind = "value boundaries" if match is not None else "reference skipped"
            if match is not None:
                used.add(match)
            kinds[kind].append({"predicted": p[1:], "reference": gold[match][3][1:] if match is not None else None,
                                "context": text[max(0, p[0] - 60):p[0] + 60]})
        for k, g in enumerate(gold):
            if k not in used:
                kinds["missed" if g[2] in low else "missed_not_in_text"].append({"reference": g[3][1:]})
    return {k: {"count": len(v), "examples": v[:examples]} for k, v in kinds.items()}


def print_scores(title: str, q: dict) -> None:
    print(f"{title} ({q['documents']} documents, {q['n_predicted']} predicted calls, {q['n_gold']} reference calls; "
          f"{q['gold_values_in_text']:.0%} of the reference values occur in the text)")
    print(f"  triplets        P {q['triplet_precision']:.3f} R {q['triplet_recall']:.3f} F1 {q['triplet_f1']:.3f}")
    print(f"  (entity, value) P {q['entity_value_precision']:.3f} R {q['entity_value_recall']:.3f} "
          f"F1 {q['entity_value_f1']:.3f}   (entity := document subject: F1 {q['subject_entity_value_f1']:.3f})")
    print(f"  values          P {q['value_precision']:.3f} R {q['value_recall']:.3f} F1 {q['value_f1']:.3f}")


def main() -> None:
    from models.span_annotator import load_span_annotator
    from models.span_annotator_decode import AnnotateOptions, AnnotateStats, annotate_texts
    from schemas import markup
    from schemas.configs import AnnotatorFinetuneConfig, EncoderFinetuneConfig
    from schemas.shards import ANNOTATED_SCHEMA
    from tasks.annotate_kb import ImportedAnnotations
    from tasks.finetune import finetune_annotator
    from tasks.finetune_seed import is_holdout
    from tasks.shardio import write_table_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=REFERENCE)
    ap.add_argument("--budget-s", type=float, default=900.0, help="fine-tuning time budget (the goal: <= 15 minutes)")
    ap.add_argument("--epochs", type=float, default=EncoderFinetuneConfig().epochs)
    ap.add_argument("--window", type=int, default=EncoderFinetuneConfig().window)
    ap.add_argument("--lr", type=float, default=EncoderFinetuneConfig().lr)
    ap.add_argument("--head-lr", type=float, default=EncoderFinetuneConfig().head_lr)
    ap.add_argument("--batch-tokens", type=int, default=EncoderFinetuneConfig().batch_tokens)
    ap.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the budget counts process CPU seconds per thread (fair on a machine shared with other jobs)")
    ap.add_argument("--frozen-layers", type=int, default=EncoderFinetuneConfig().frozen_layers)
    ap.add_argument("--relation-grad", type=float, default=EncoderFinetuneConfig().relation_grad,
                    help="share of the relation decoder's loss gradient that trains the encoder")
    ap.add_argument("--name-weight", type=float, default=EncoderFinetuneConfig().name_weight,
                    help="weight of the relation-name scorer's loss")
    ap.add_argument("--relation-weight", type=float, default=EncoderFinetuneConfig().relation_weight,
                    help="weight of the relation-name decoder's loss")
    ap.add_argument("--relation", choices=["seed", "generate"], default=None,
                    help="relation names from the scorer over the seed's names or the decoder (default: the decoder's, seed)")
    ap.add_argument("--value-bias", type=float, default=0.0, help="added to the log-probability of a value start")
    ap.add_argument("--continue-bias", type=float, default=None,
                    help="added to the log-probability of a value going on (default: the decoder's)")
    ap.add_argument("--subject-margin", type=float, default=None,
                    help="entity := the title line unless the pointer prefers another span by more than this "
                         "(default: the decoder's, inf); a negative value: the pointer alone")
    ap.add_argument("--docs", type=int, default=830, help="Wikipedia documents to annotate and score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/annotate-reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_file = os.path.join(args.reference, "seed_gpt4o_squad_train.json")
    eval_file = os.path.join(args.reference, "annotator_llama8b_dwiki.json")
    if not (os.path.exists(seed_file) and os.path.exists(eval_file)):
        sys.exit(f"bench/annotate_reference.py: reference data not found under {args.reference}")

    seed = ImportedAnnotations(seed_file)
    rows = [{"doc_id": d.doc_id, "text": d.text, "annotated_text": markup.render(a), "n_calls": len(a.calls),
             "text_version": 0, "annotator": seed.name, "annotator_version": seed.version, "prompt_id": seed.prompt_id,
             "category": None, "url": None, "run_id": "reference"} for d, a in seed.pairs()]
    shard = write_table_atomic(pa.Table.from_pylist(rows, schema=ANNOTATED_SCHEMA),
                               os.path.join(args.out, "seed", "annotated", "seed-gpt4o.parquet"))
    cfg = AnnotatorFinetuneConfig(kind="encoder", holdout_fraction=0.05, time_budget_s=args.budget_s,
                                  threads=args.threads, encoder=EncoderFinetuneConfig(
                                      epochs=args.epochs, window=args.window, lr=args.lr, head_lr=args.head_lr,
                                      batch_tokens=args.batch_tokens, budget_clock=args.budget_clock,
                                      frozen_layers=args.frozen_layers, relation_grad=args.relation_grad,
                                      name_weight=args.name_weight, relation_weight=args.relation_weight))
    load, cpu0 = os.getloadavg(), time.process_time()
    report = finetune_annotator([shard], cfg, os.path.join(args.out, "annotator"))
    cpu_s = (time.process_time() - cpu0) / args.threads
    size_mb = sum(os.path.getsize(os.path.join(report.checkpoint, f)) for f in os.listdir(report.checkpoint)) / 1e6
    print(f"fine-tuned {report.base}: {report.parameters:,} parameters ({size_mb:.0f} MB on disk), "
          f"{report.train_docs} seed documents, {report.steps} steps ({report.epochs:.2f} epochs) in "
          f"{report.train_seconds:.0f} s wall ({cpu_s:.0f} CPU s per thread incl. scoring the held-out split)"
          f"{' (reused)' if report.reused else ''}; load average before "
          f"{load[0]:.1f}, after {os.getloadavg()[0]:.1f}")

    model, tok, names, _ = load_span_annotator(report.checkpoint, "cpu")
    opts = AnnotateOptions(value_bias=args.value_bias)
    if args.continue_bias is not None:
        opts.continue_bias = args.continue_bias
    if args.relation is not None:
        opts.relation = args.relation
    if args.subject_margin is not None:
        opts.subject_margin = None if args.subject_margin < 0 else args.subject_margin
    held = [(d.doc_id, a) for d, a in seed.pairs() if is_holdout(d.doc_id, cfg.holdout_fraction, cfg.seed)]
    results, dumps, examples = {}, {}, {}
    ref = ImportedAnnotations(eval_file)
    wiki = [(d.doc_id, a) for d, a in ref.pairs()][:args.docs]
    for key, title, pairs in (("vs_gpt4o_heldout_squad", "vs GPT-4o on the held-out SQuAD contexts", held),
                              ("vs_llama8b_wikipedia", "vs the 8B annotator on the Wikipedia texts", wiki)):
        stats = AnnotateStats()
        t0 = time.perf_counter()
        got = annotate_texts(model, tok, names, [a.text for _, a in pairs], opts, stats)
        secs = time.perf_counter() - t0
        q = score(pairs, got)
        q.update(seconds=round(secs, 1), docs_per_s=len(pairs) / secs, source_tokens_per_s=stats.source_tokens / secs)
        print_scores(title, q)
        print(f"  annotated at {q['docs_per_s']:.1f} documents/s, {q['source_tokens_per_s']:,.0f} word pieces/s "
              f"({args.threads} threads, load average {os.getloadavg()[0]:.1f})")
        dumps[key] = [{"doc_id": doc_id, "text": g.text, "subject": document_subject(g.text),
                       "gold": [[pc.offset, pc.call.entity, pc.call.relation, pc.call.value] for pc in g.calls],
                       "predicted": [[pc.offset, pc.call.entity, pc.call.relation, pc.call.value] for pc in p.calls]}
                      for (doc_id, g), p in zip(pairs, got)]
        kinds = disagreements(dumps[key])
        q["disagreements"] = {k: v["count"] for k, v in kinds.items()}
        print("  calls by kind: " + ", ".join(f"{k} {v['count']}" for k, v in kinds.items()))
        results[key], examples[key] = q, kinds
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"finetune": report.model_dump(exclude={"history"}), "args": vars(args), **results}, f, indent=2)
    with open(os.path.join(args.out, "predictions.json"), "w") as f:
        json.dump(dumps, f, ensure_ascii=False)
    with open(os.path.join(args.out, "disagreements.json"), "w") as f:
        json.dump(examples, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
