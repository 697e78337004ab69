"""Annotation throughput of the small annotator, same model, same documents, same run.

Prints source tokens/s of:
  1. chunked constrained annotation vs step-by-step constrained decoding (one document at a time; goal >= 5x),
  2. batched chunked annotation vs one document at a time (goal >= 4x),
  3. step-by-step constrained vs unconstrained greedy decoding (per generated token; overhead goal <= 1.3x),
and what the best figure implies for the reference's bulk annotation (6.1M documents).

    .venv/bin/python bench/annotate.py --checkpoint out/demo/annotator/model [--docs 48] [--threads 2]

The checkpoint is a fine-tuned annotator (``lmlm pipeline`` or ``lmlm annotator finetune`` writes one).
Documents are held-out synthetic biographies (a corpus generated with another seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.annotator import load_annotator  # noqa: E402
from models.annotator_decode import (  # noqa: E402
    DecodeOptions,
    DecodeStats,
    annotate_texts,
    generate_unconstrained,
)
from schemas import markup  # noqa: E402

REFERENCE_DOCS = 6_100_000  # the paper's bulk annotation: ~2 days on 64 A6000 GPUs


def bench_texts(n: int, out: str) -> list[str]:
    from schemas.configs import SyntheticCorpusConfig
    from tasks.shardio import read_table
    from tasks.synthetic import generate_corpus

    gt = os.path.join(out, "ground_truth", "annotated.parquet")
    if not os.path.exists(gt):
        generate_corpus(SyntheticCorpusConfig(n_people=max(n, 40), n_organisation_docs=4, n_city_docs=2,
                                              n_no_fact_docs=2, seed=12345), out)
    texts = read_table(gt, ["text"]).column("text").to_pylist()
    return texts[:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="out/demo/annotator/model")
    ap.add_argument("--docs", type=int, default=48, help="documents for the batched/chunked runs")
    ap.add_argument("--step-docs", type=int, default=6, help="documents for the slow step-by-step runs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/annotate")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the card is named in the output)")
    ap.add_argument("--texts", help="a JSON list of source texts to annotate instead of a generated synthetic corpus")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"bench/annotate.py: no annotator at {args.checkpoint}; run `lmlm pipeline` (or `lmlm annotator "
                 "finetune`) first, or pass --checkpoint")
    model, tok, meta = load_annotator(args.checkpoint, args.device)
    params = sum(p.numel() for p in model.parameters())
    if args.texts:
        with open(args.texts) as f:
            texts = json.load(f)[:args.docs]
    else:
        texts = bench_texts(args.docs, os.path.join(args.out, "synthetic"))
    device = torch.device(args.device)
    where = f"{args.device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    few = texts[:args.step_docs]
    print(f"annotator {meta.get('version', args.checkpoint)}: {params:,} parameters; {len(texts)} documents "
          f"({len(few)} for step-by-step runs); torch threads {args.threads}; device {where}")

    def rate(opts: DecodeOptions, docs: list[str]) -> tuple[float, DecodeStats, list]:
        stats = DecodeStats()
        out, secs = timed(lambda: annotate_texts(model, tok, docs, opts, stats))
        assert all(markup.strip(markup.render(d.annotated)) == t for d, t in zip(out, docs))
        return stats.source_tokens / secs, stats, out

    annotate_texts(model, tok, few[:1], DecodeOptions())  # warm-up (allocator, kernels)
    step = DecodeOptions(chunk_tokens=1, draft_tokens=0, batch_size=1)
    chunk1 = DecodeOptions(batch_size=1)
    batched = DecodeOptions(batch_size=args.batch_size)
    r_step, s_step, o_step = rate(step, few)
    r_chunk_few, s_chunk_few, o_chunk = rate(chunk1, few)
    same = [a.annotated for a in o_step] == [b.annotated for b in o_chunk]
    r_chunk, s_chunk, _ = rate(chunk1, texts)
    r_batch, s_batch, _ = rate(batched, texts)

    # per generated token: constrained step by step vs free greedy decoding of the same documents
    free_stats, free_tokens = DecodeStats(), 0
    _, free_s = timed(lambda: [generate_unconstrained(model, tok, t, 2 * len(tok(t)["input_ids"]) + 64, free_stats)
                               for t in few])
    free_tok_s = free_stats.forward_passes / free_s
    step_tok_s = (s_step.source_tokens + s_step.call_tokens) / s_step.seconds

    print()
    print(f"{'mode':44s} {'source tok/s':>12s} {'forward passes/doc':>19s}")
    print(f"{'step-by-step constrained, 1 doc at a time':44s} {r_step:12,.0f} {s_step.forward_passes / len(few):19.1f}")
    print(f"{'chunked constrained, 1 doc at a time':44s} {r_chunk_few:12,.0f} {s_chunk_few.forward_passes / len(few):19.1f}")
    print(f"{'chunked constrained, 1 doc at a time (all)':44s} {r_chunk:12,.0f} {s_chunk.forward_passes / len(texts):19.1f}")
    print(f"{f'chunked constrained, batches of {args.batch_size}':44s} {r_batch:12,.0f} {s_batch.forward_passes / len(texts):19.1f}")
    print()
    print(f"chunked vs step-by-step (same {len(few)} docs):   {r_chunk_few / r_step:6.1f}x  (goal >= 5x; "
          f"identical output: {same})")
    print(f"batched vs one at a time (same {len(texts)} docs): {r_batch / r_chunk:6.1f}x  (goal >= 4x)")
    print(f"step-by-step constrained vs unconstrained:  {free_tok_s / step_tok_s:6.2f}x time per generated token "
          f"(goal <= 1.3x; {step_tok_s:,.0f} vs {free_tok_s:,.0f} tokens/s)")
    docs_s = len(texts) / s_batch.seconds
    print()
    print(f"best: {docs_s:.1f} documents/s ({r_batch:,.0f} source tokens/s, {s_batch.call_tokens / len(texts):.0f} call "
          f"tokens/doc) on {where} with a {params / 1e6:.1f}M-parameter model")
    print(f"the reference's 6.1M documents would take {REFERENCE_DOCS / docs_s / 3600:,.0f} h on one such device at this rate "
          f"(the paper: ~2 days on 64 A6000 GPUs with an 8B model through vLLM)")


if __name__ == "__main__":
    main()
