"""Time per generated token with live lookups vs without, and vs re-running generation per lookup.

Same model, same prompts, same run. The model is a ~14M-parameter GPT-2 (d 384, 7 layers, 4k
BPE vocabulary) trained here for a few minutes on the synthetic biography corpus, whose text is
dense with lookup calls, so it writes calls itself at the corpus's rate (cached under
bench/out/generate/; --steps 0 times a random-init model, which rarely writes a call). The
lookup database is the corpus's knowledge base.

Rows, each at batch 1 (prompts one at a time) and batch 8:
  - no lookups: the same generation loop with no index (a <|db_return|> is an ordinary token);
  - lookups, KV cache kept (models.generate.generate) with the exact, trie and fuzzy indexes;
  - lookups, regenerate per lookup (the reference's approach: stop, append, re-run from scratch).
Time per token counts every new token, looked-up values included. Each configuration runs
--repeats times, interleaved; the median and the minimum are reported.

    .venv/bin/python bench/generate.py [--steps 300] [--new-tokens 128] [--repeats 3] [--fuzzy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "out" / "generate"


def corpus():
    """(annotated texts, source texts, kb path) of the synthetic corpus (generated once)."""
    import pyarrow.parquet as pq

    from schemas.configs import SyntheticCorpusConfig
    from tasks.synthetic import generate_corpus

    gt = OUT / "synthetic" / "ground_truth"
    if not (gt / "annotated.parquet").exists():
        generate_corpus(SyntheticCorpusConfig(n_people=400, seed=0), str(OUT / "synthetic"))
    table = pq.read_table(gt / "annotated.parquet")
    return table.column("annotated_text").to_pylist(), table.column("text").to_pylist(), gt / "kb.parquet"


def trained_model(annotated: list[str], texts: list[str], steps: int, seed: int = 0):
    """(model, tokenizer, params, training seconds): trained on the annotated corpus, cached on disk."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from models.lmlm import count_parameters
    from models.tokenizer import load_tokenizer, train_tokenizer

    folder = OUT / f"model-steps{steps}-seed{seed}"
    if (folder / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(str(folder)), None, 0.0
    tok = train_tokenizer(texts, vocab_size=4096)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_positions=512, n_embd=384, n_layer=7, n_head=6, n_inner=1536,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    t0 = time.perf_counter()
    if steps:
        # packed 128-token blocks of the annotated corpus; the loss skips values and <|db_end|>
        from models.lmlm import loss_mask
        from models.tokenizer import lookup_token_ids

        special = lookup_token_ids(tok)
        ids = [i for doc in tok(annotated, add_special_tokens=False)["input_ids"] for i in (*doc, tok.eos_token_id)]
        blocks = torch.tensor(ids[:len(ids) // 128 * 128]).view(-1, 128)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(steps):
            x = blocks[torch.randint(0, len(blocks), (8,), generator=gen)]
            labels = x.masked_fill(~loss_mask(x, special).bool(), -100)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"    step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, count_parameters(model), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of 8 x 128 tokens (0: random init)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fuzzy", action="store_true", help="also time the fuzzy (entity-first) index")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.generate import generate, generate_regenerate_per_lookup
    from models.lmlm import count_parameters
    from lookup import ExactIndex, FuzzyIndex, KeyTrie, LookupDatabase

    annotated, texts, kb = corpus()
    print(f"corpus: {len(texts)} synthetic documents; training (or loading) the model:", flush=True)
    model, tok, _, train_s = trained_model(annotated, texts, args.steps)
    print(f"model: GPT-2, {count_parameters(model) / 1e6:.1f}M parameters, vocabulary {len(tok)}, "
          f"{args.steps} training steps{f' ({train_s:.0f} s)' if train_s else ' (cached)'}; "
          f"torch threads {torch.get_num_threads()}")
    db = LookupDatabase.load(str(kb))
    indexes = {"exact": ExactIndex(db), "trie": KeyTrie(db, tok)}
    if args.fuzzy:
        from models.embed import embed

        indexes["fuzzy"] = FuzzyIndex(db, embed)
        indexes["fuzzy"].lookup("x", "y")
    # prompts: the first words of biographies, up to where the first call would start
    prompts = [t.split("(")[0].strip() + " (born" for t in texts if "(" in t[:60]][: args.prompts * 2]
    prompts = prompts[: args.prompts]

    def run(kind: str, batch: int) -> tuple[float, int, int]:
        """(seconds, new tokens, lookups) for all prompts in batches of ``batch``."""
        fn = generate_regenerate_per_lookup if kind == "regenerate" else generate
        index = None if kind == "none" else indexes["exact" if kind == "regenerate" else kind]
        tokens = calls = 0
        t = time.perf_counter()
        for i in range(0, len(prompts), batch):
            for r in fn(model, tok, prompts[i:i + batch], index, max_new_tokens=args.new_tokens):
                tokens += r.n_tokens
                calls += len(r.lookups)
        return time.perf_counter() - t, tokens, calls

    kinds = ["none", *indexes, "regenerate"]
    for batch in (1, 8):
        run("exact", batch)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in kinds}
        counts = {}
        for _ in range(args.repeats):
            for k in kinds:
                seconds, tokens, calls = run(k, batch)
                times[k].append(seconds / tokens)
                counts[k] = (tokens, calls)
        base, base_min = statistics.median(times["none"]), min(times["none"])
        print(f"\nbatch {batch} ({len(prompts)} prompts, up to {args.new_tokens} new tokens each, {args.repeats} runs;"
              " min is the least-disturbed run on a shared machine):")
        print(f"  {'loop':40s} {'ms/token median':>15s} {'x none':>7s} {'ms/token min':>13s} {'x none':>7s}"
              f" {'tokens':>7s} {'lookups':>8s}")
        label = {"none": "no lookups", "exact": "lookups, KV cache kept (exact)", "trie": "lookups, KV cache kept (trie)",
                 "fuzzy": "lookups, KV cache kept (fuzzy)", "regenerate": "lookups, regenerate per lookup (exact)"}
        for k in kinds:
            med, low = statistics.median(times[k]), min(times[k])
            print(f"  {label[k]:40s} {med * 1e3:15.3f} {med / base:7.2f} {low * 1e3:13.3f} {low / base_min:7.2f}"
                  f" {counts[k][0]:7d} {counts[k][1]:8d}")
        print(f"  regenerate per lookup / KV cache kept (exact): {statistics.median(times['regenerate']) / statistics.median(times['exact']):.2f}x"
              f" median, {min(times['regenerate']) / min(times['exact']):.2f}x min")
    [sample] = generate(model, tok, prompts[:1], indexes["exact"], max_new_tokens=60)
    print(f"\nsample: {prompts[0]!r} ->\n  {sample.text!r}")


if __name__ == "__main__":
    main()
