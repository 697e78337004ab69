"""The small annotator on real data: fine-tune on the paper's GPT-4o seed (SQuAD contexts), annotate the
Wikipedia texts the paper's 8B annotator (Llama-3.1-8B + LoRA) annotated, and score against it.

    .venv/bin/python bench/annotate_reference.py [--budget-s 900] [--base annotator-small] [--docs 830]

Needs ../shared/data/lmlm-reference/ (not part of the project). Prints triplet precision/recall/F1
against the 8B annotator's calls, the source-preserved rate, and the model's size. Any number is an
honest measurement of a from-scratch model of this size on this CPU budget, not a claim about the method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "lmlm-reference")


def main() -> None:
    from schemas import markup
    from schemas.configs import AnnotatorFinetuneConfig
    from schemas.shards import ANNOTATED_SCHEMA
    from tasks.annotate_kb import ImportedAnnotations
    from tasks.finetune import evaluate_on, finetune_annotator
    from tasks.shardio import write_table_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=REFERENCE)
    ap.add_argument("--budget-s", type=float, default=900.0, help="fine-tuning time budget")
    ap.add_argument("--base", default="annotator-small")
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
    cfg = AnnotatorFinetuneConfig(base=args.base, time_budget_s=args.budget_s, epochs=30, holdout_fraction=0.05,
                                  vocab_size=4096, max_source_tokens=256, batch_size=8)
    report = finetune_annotator([shard], cfg, os.path.join(args.out, "annotator"))
    print(f"fine-tuned {report.base}: {report.parameters:,} parameters, {report.train_docs} seed documents, "
          f"{report.steps} steps ({report.epochs:.2f} epochs) in {report.train_seconds:.0f} s")

    from models.annotator import load_annotator

    model, tok, _ = load_annotator(report.checkpoint, "cpu")
    ref = ImportedAnnotations(eval_file)
    pairs = [(d.doc_id, a) for d, a in ref.pairs()][:args.docs]
    q = evaluate_on(model, tok, pairs)
    print(f"vs the reference 8B annotator on {q['documents']} Wikipedia documents: triplet P {q['precision']:.3f} "
          f"R {q['recall']:.3f} F1 {q['f1']:.3f} ({q['n_predicted']} predicted, {q['n_gold']} reference calls); "
          f"source preserved {q['source_preserved_rate']:.3f}; {q['docs_per_s']:.2f} documents/s")
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"finetune": report.model_dump(exclude={"history"}), "vs_reference_8b": q}, f, indent=2)


if __name__ == "__main__":
    main()
