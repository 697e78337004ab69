"""Annotation throughput of the small annotator, same model, same documents, same run.

An encoder annotator (``finetune.kind: encoder``, the default) is measured by :func:`bench_encoder`: bulk
annotation of the reference's Wikipedia texts (when ../shared/data/lmlm-reference/ is there, else synthetic
biographies) one document at a time, batched (length-sorted windows) in float32, bfloat16 and int8 (dynamic
quantization of the linear layers): source tokens/s, documents/s, how many calls agree with float32, and what the
best rate implies for the paper's 6.1M documents on N machines.

    .venv/bin/python bench/annotate.py --checkpoint out/demo/annotator/model [--docs 830] [--threads 2]

For a generative checkpoint it prints source tokens/s of:
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
WIKIPEDIA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "lmlm-reference", "annotator_llama8b_dwiki.json")


def bench_encoder(args) -> None:
    """Throughput of an encoder annotator checkpoint (see module docstring)."""
    import copy

    from models.span_annotator import load_span_annotator
    from models.span_annotator_decode import AnnotateOptions, AnnotateStats, annotate_texts

    model, tok, names, meta = load_span_annotator(args.checkpoint, args.device)
    params = sum(p.numel() for p in model.parameters())
    if args.texts:
        texts, source = json.load(open(args.texts)), args.texts
    elif os.path.exists(WIKIPEDIA):
        texts, source = [e["text"] for e in json.load(open(WIKIPEDIA))["examples"]], "the reference's Wikipedia texts"
    else:
        texts, source = bench_texts(args.docs or 400, os.path.join(args.out, "synthetic")), "synthetic biographies"
    texts = texts[:args.docs] if args.docs else texts
    device = torch.device(args.device)
    where = f"{args.device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu, {args.threads} threads"
    print(f"encoder annotator {meta['version']}: {params / 1e6:.1f}M parameters, window {model.cfg.window}; "
          f"{len(texts)} documents of {source}; {where}; load average {os.getloadavg()[0]:.1f}")
    fp32 = model.float()
    runs = [("float32, one document at a time", fp32, AnnotateOptions(bf16=False, batch_tokens=1), texts[:args.single_docs]),
            ("float32, batched", fp32, AnnotateOptions(bf16=False, batch_tokens=args.batch_tokens), texts)]
    if device.type == "cpu":
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
        runs.append(("int8 linear layers, batched", int8, AnnotateOptions(bf16=False, batch_tokens=args.batch_tokens), texts))
    runs.append(("bfloat16, batched", copy.deepcopy(fp32), AnnotateOptions(bf16=True, batch_tokens=args.batch_tokens), texts))
    if model.name_table.shape[0]:  # the decoder's names instead of the scorer's: one decoder run per call
        runs.append(("bfloat16, batched, decoder's names", copy.deepcopy(fp32),
                     AnnotateOptions(bf16=True, batch_tokens=args.batch_tokens, relation="generate"), texts))
    reference = None
    print(f"\n{'mode':34s} {'tokens/s':>9s} {'docs/s':>7s} {'calls/doc':>9s} {'same calls as float32':>22s} {'load':>5s}")
    best = None
    for name, m, opts, docs in runs:
        annotate_texts(m, tok, names, docs[:8], opts)  # warm-up (allocator, kernels)
        stats = AnnotateStats()
        out = annotate_texts(m, tok, names, docs, opts, stats)
        assert all(markup.strip(markup.render(a)) == t for a, t in zip(out, docs))
        calls = [set(a.calls) for a in out]
        if reference is None or len(docs) == len(texts) and len(reference) != len(texts):
            reference = calls
            same = "(reference)"
        else:
            agree = sum(len(c & r) for c, r in zip(calls, reference))
            same = f"{agree / max(sum(len(r) for r in reference[:len(calls)]), 1):.1%}"
        tok_s, doc_s = stats.source_tokens / stats.seconds, stats.documents / stats.seconds
        print(f"{name:34s} {tok_s:9,.0f} {doc_s:7.1f} {stats.calls / stats.documents:9.1f} {same:>22s} "
              f"{os.getloadavg()[0]:5.1f}")
        if len(docs) == len(texts) and (best is None or doc_s > best[1]):
            best = (name, doc_s, tok_s)
    name, doc_s, tok_s = best
    hours = REFERENCE_DOCS / doc_s / 3600
    print(f"\nbest: {name}, {tok_s:,.0f} source tokens/s, {doc_s:.1f} documents/s on {where}")
    print(f"the paper's 6.1M documents: {hours:,.0f} h on one such machine; "
          + ", ".join(f"{hours / n:,.1f} h on {n}" for n in (8, 64, 256))
          + f"; {REFERENCE_DOCS / doc_s / 172_800:,.0f} machine(s) match the paper's ~2 days on 64 GPUs")


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
    ap.add_argument("--docs", type=int, default=None, help="documents for the batched/chunked runs (default: 48; encoder: all)")
    ap.add_argument("--single-docs", type=int, default=100, help="encoder: documents for the one-at-a-time run")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="encoder: padded word pieces per batch")
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
    from models.span_annotator import is_span_annotator

    if is_span_annotator(args.checkpoint):
        return bench_encoder(args)
    args.docs = args.docs or 48
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
