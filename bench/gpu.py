"""GPU throughput of the training and annotation code, measured on one accelerator in one run.

Two steps, because a GPU machine often has PyTorch and transformers but not the pipeline's other
dependencies (Prefect, DuckDB, Faker):

    .venv/bin/python bench/gpu.py prepare --data .gpu --annotator out/demo/annotator/model   # here
    python bench/gpu.py run --data .gpu --out results/                                      # on the GPU

``prepare`` writes the inputs into ``--data``: annotated synthetic texts (the pretraining corpus), the
BPE tokenizer trained on them, held-out source texts for the annotator, and a copy of the annotator.
``run`` needs torch, transformers, tokenizers, pyarrow and pydantic, and measures:

  pretrain   LMLM pretraining through ``models.pretrain.train`` (the flow's loop: packing, loss mask,
             AdamW, cosine schedule, bf16 autocast), gpt2-124m and llama2-176m shapes at 1,024 tokens:
             steady tokens/s (warm-up steps excluded), MFU by the 6N rule against the card's bf16
             dense peak, peak memory; eager and torch.compile.
  annotate   ``bench/annotate.py`` on the device (chunked vs step-by-step, batched vs one at a time).
  diffusion  training steps/s of the autoencoder (resampler + reconstruction + decoder, on cached
             encoder features) and of the denoiser (loss + AdamW + EMA), demo and reference widths;
             DDIM-50 / DDPM-250 sampling samples/s; frozen MiniLM-shaped encoder texts/s.
  guided     the DGLM training stages (issue 16) on random tokens and plans: the plan fine-tune (LM + soft-prompt
             generator on spliced [prefix][k soft][continuation] batches, noised plans) at the demo's tiny shape and
             gpt2-124m, the plan prior (v-MSE + AdamW + EMA), and generation: plans/s of guided DDPM-50 sampling
             (gradient through the prior) and continuation tokens/s with the KV cache.
  star       STAR-LDM (issue 17): joint training steps/s (NLL + v-loss) at the tiny shape and gpt2-124m, and a
             15-step thought with the prefix cached and uncached against writing 8 tokens; with a trained demo model
             (``prepare --star-workdir out/guided-demo``), the evaluation's own ``thought_cost`` on it at batch 1
             and 16 and 5 / 8 / 15 steps.

Each part's figures go to ``--out/gpu.json`` as they are measured; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = "corpus.parquet"  # annotated synthetic documents (column annotated_text)
ANNOTATE_TEXTS = "annotate_texts.json"  # held-out source texts for the annotator bench
STAR_WORKDIR = "star_workdir"  # a trained STAR-LDM (star/, tokenizer/, plans/ without the plan arrays)


# ----------------------------------------------------------------------------- prepare (here)


def prepare(args) -> None:
    from models.tokenizer import train_tokenizer
    from schemas.configs import SyntheticCorpusConfig
    from tasks.shardio import read_table
    from tasks.synthetic import generate_corpus

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    work = data / "synthetic"
    if not (work / "ground_truth" / "annotated.parquet").exists():
        generate_corpus(SyntheticCorpusConfig(n_people=args.people, seed=7), str(work))
    table = read_table(str(work / "ground_truth" / "annotated.parquet"), ["doc_id", "text", "annotated_text"])
    import pyarrow.parquet as pq

    pq.write_table(table, data / CORPUS)
    train_tokenizer(table.column("text").to_pylist(), args.vocab_size, str(data / "tokenizer"))
    held = data / "heldout"
    if not (held / "ground_truth" / "annotated.parquet").exists():
        generate_corpus(SyntheticCorpusConfig(n_people=args.annotate_docs, n_organisation_docs=4, n_city_docs=2,
                                              n_no_fact_docs=2, seed=12345), str(held))
    texts = read_table(str(held / "ground_truth" / "annotated.parquet"), ["text"]).column("text").to_pylist()
    (data / ANNOTATE_TEXTS).write_text(json.dumps(texts))
    if args.annotator:
        shutil.copytree(args.annotator, data / "annotator", dirs_exist_ok=True)
    if args.star_workdir:  # the trained model, its tokenizer, plan space and held-out prefixes; not its optimiser
        src, dst = Path(args.star_workdir), data / STAR_WORKDIR
        shutil.copytree(src / "star", dst / "star", dirs_exist_ok=True, ignore=shutil.ignore_patterns("trainer_state.pt"))
        shutil.copytree(src / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)
        (dst / "plans").mkdir(parents=True, exist_ok=True)
        for name in ("plan_space.safetensors", "examples.parquet"):
            shutil.copy2(src / "plans" / name, dst / "plans" / name)
    shutil.rmtree(work), shutil.rmtree(held)
    size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    print(f"prepared {data}: {table.num_rows} annotated documents, tokenizer, {len(texts)} held-out texts"
          f"{', annotator' if args.annotator else ''}; {size / 2**20:.1f} MiB")


# ----------------------------------------------------------------------------- run (on the GPU)


def record(results: dict, out: Path, key: str, value) -> None:
    results[key] = value
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    print(f"[{key}] {json.dumps(value)}", flush=True)


def bench_pretrain(data: Path, device, shape: str, batch: int, steps: int, compile_: bool, warm: int) -> dict:
    """Steady tokens/s of the pretraining loop: the wall time between the log line at step ``warm`` and the last."""
    import pyarrow.parquet as pq
    import torch

    from models.lmlm import build_model, flop_parameters
    from models.tokenizer import load_tokenizer, lookup_token_ids
    from models.pretrain import PackedBlocks, model_flops_utilization, peak_flops, train
    from models.train import DistributedRuntime
    from schemas.configs import PretrainConfig

    tok = load_tokenizer(str(data / "tokenizer"))
    texts = pq.read_table(data / CORPUS, columns=["annotated_text"]).column("annotated_text").to_pylist()
    blocks = PackedBlocks([str(data / CORPUS)], lambda _: texts, tok, 1024, special_ids=lookup_token_ids(tok))
    torch.manual_seed(0)
    # GPT-2's and LLaMA-2's own vocabularies (50,257 / 32,000) give the reference parameter counts;
    # the token ids come from the small corpus tokenizer, which does not change the work per token.
    vocab = 50_257 if shape.startswith("gpt2") else 32_000
    model = build_model(shape, vocab, eos_token_id=tok.eos_token_id).to(device)
    cfg = PretrainConfig(model=shape, batch_size=batch, token_budget=10**12, lr=6e-4, min_lr=6e-5, warmup_steps=10,
                         bf16=True, compile=compile_, log_every=5, eval_every=10**9, checkpoint_every=10**9)
    marks: list[tuple[float, int]] = []

    def log(msg: str) -> None:
        m = re.match(r"step (\d+)/", msg)
        if m:
            marks.append((time.perf_counter(), int(m.group(1))))
        print("   ", msg, flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = train(model, tok, blocks, cfg, f"/tmp/gpu-pretrain-{shape}-{compile_}", runtime=DistributedRuntime(0, 1, device),
                   stop_after=steps, log=log)
    (ta, sa), (tb, sb) = next(m for m in marks if m[1] >= warm), marks[-1]
    tokens_per_s = (sb - sa) * batch * 1024 / (tb - ta)
    n = flop_parameters(model)
    peak = peak_flops(device)
    return {
        "shape": shape, "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "flop_parameters": n, "batch": f"{batch} x 1024", "compile": compile_, "steps_timed": sb - sa,
        "tokens_per_s": round(tokens_per_s), "mfu_6n": round(model_flops_utilization(n, tokens_per_s, peak), 4) if peak else None,
        "peak_flops": peak, "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(result.history[-1]["loss"], 3), "wall_s_incl_warmup_and_compile": round(time.perf_counter() - t0, 1),
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def _rate(fn, warm: int, iters: int, device) -> float:
    """Calls of ``fn`` per second, after ``warm`` untimed calls."""
    for _ in range(warm):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return iters / (time.perf_counter() - t0)


def bench_autoencoder(device, batch: int, iters: int) -> dict:
    import torch

    from schemas.diffusion_configs import AutoencoderConfig
    from tasks.diffusion import _autoencoder_model

    cfg = AutoencoderConfig()
    vocab, max_tokens, max_length, pool = 8_000, 32, 64, 8_192
    model = _autoencoder_model(cfg, 384, vocab, max_length, None).to(device)
    feats = torch.randn(pool, max_tokens, 384, device=device, dtype=torch.bfloat16)
    mask = torch.ones(pool, max_tokens, dtype=torch.bool, device=device)
    mask[:, 24:] = torch.rand(pool, 1, device=device) < 0.5
    targets = torch.randint(1, vocab, (pool, max_length), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        idx = torch.randint(0, pool, (batch,), device=device)
        with _autocast(device):
            latents = model.encode(feats[idx].float(), mask[idx])
            latents = latents + cfg.latent_noise * torch.randn_like(latents)
            loss = model.reconstruction_loss(latents, None, targets[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_s = _rate(step, 5, iters, device)
    return {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "steps_per_s": round(steps_s, 1),
            "texts_per_s": round(steps_s * batch)}


def bench_diffusion(device, width: int, layers: int, heads: int, batch: int, iters: int, n_samples: int) -> dict:
    import torch

    from models.diffusion import EMA
    from schemas.diffusion_configs import DiffusionConfig
    from tasks.diffusion import _diffusion_model

    cfg = DiffusionConfig(width=width, layers=layers, heads=heads)
    model = _diffusion_model(cfg, (32, 64), 11).to(device)
    ema = EMA(model, cfg.ema_decay)
    x = torch.randn(8_192, 32, 64, device=device)
    y = torch.randint(0, 11, (8_192,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n = [0]

    def step():
        idx = torch.randint(0, len(x), (batch,), device=device)
        with _autocast(device):
            loss = model.loss(x[idx], y[idx], self_condition_p=cfg.self_condition_p, class_dropout=cfg.class_dropout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, n[0])
        n[0] += 1

    steps_s = _rate(step, 5, iters, device)
    sampling = {}
    model.eval()
    labels = torch.randint(0, 11, (n_samples,), device=device)
    for sampler, k in (("ddim", 50), ("ddpm", 250)):
        def draw():
            with _autocast(device):
                model.sample((n_samples, 32, 64), labels, steps=k, sampler=sampler, guidance_scale=2.0)
        sampling[f"{sampler}{k}_samples_per_s"] = round(n_samples * _rate(draw, 1, 2, device), 1)
    return {"width": width, "layers": layers, "parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
            "steps_per_s": round(steps_s, 1), "latents_per_s": round(steps_s * batch), **sampling}


def bench_guided_finetune(device, shape: str, batch: int, iters: int, soft_tokens: int = 8) -> dict:
    """Steps/s of the plan fine-tune: tasks.guided's batch (48-token prefixes, k soft, 32-token continuations)."""
    import torch

    from models.lmlm import build_model
    from models.plan_lm import PlanPromptGenerator, mean_nll, noise_levels, noise_plan, token_rms, training_batch
    from models.train import adamw

    torch.manual_seed(0)
    vocab = 50_257 if shape.startswith("gpt2") else 4_096
    lm = build_model(shape, vocab, context_length=128, eos_token_id=0).to(device)
    gen = PlanPromptGenerator(384, soft_tokens, 256, 2, 4, lm.config.hidden_size, token_rms(lm)).to(device)
    model = torch.nn.ModuleDict({"lm": lm, "gen": gen})
    opt = adamw(model, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.99))
    prefixes = torch.randint(1, vocab, (batch, 48)).tolist()
    conts = torch.randint(1, vocab, (batch, 32)).tolist()
    b = {k: v.to(device) for k, v in training_batch(prefixes, conts, soft_tokens, 0).items()}
    plans = torch.randn(batch, 384, device=device)

    def step():
        a2 = noise_levels(batch, device=device)
        with _autocast(device):
            loss = mean_nll(lm, b, gen(noise_plan(plans, a2), a2))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_s = _rate(step, 3, iters, device)
    return {"shape": shape, "lm_parameters": sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values()),
            "generator_parameters": sum(p.numel() for p in gen.parameters()), "batch": batch,
            "steps_per_s": round(steps_s, 2), "examples_per_s": round(steps_s * batch)}


def bench_guided_prior(device, width: int, blocks: int, batch: int, iters: int, n_samples: int) -> dict:
    """Training steps/s of the plan prior and plans/s of guided DDPM-50 sampling and of continuation writing."""
    import torch

    from models.diffusion import EMA
    from models.lmlm import build_model
    from models.plan_lm import PlanSpace, sample_continuations
    from models.plan_prior import LinearAttribute, PlanDenoiser, PlanDiffusion, PlanGuidance

    torch.manual_seed(0)
    model = PlanDiffusion(PlanDenoiser(384, 384, width, blocks)).to(device)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(8_192, 1, 384, device=device)
    cond = torch.nn.functional.normalize(torch.randn(8_192, 384, device=device), dim=-1)
    n = [0]

    def step():
        idx = torch.randint(0, len(x), (batch,), device=device)
        with _autocast(device):
            loss = model.loss(x[idx], cond[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, n[0])
        n[0] += 1

    steps_s = _rate(step, 5, iters, device)
    space = PlanSpace(torch.zeros(384), torch.ones(384))
    attr = LinearAttribute("a", ["no", "yes"], torch.randn(2, 384), torch.zeros(2)).to(device)
    c = cond[:n_samples]

    def draw():
        guide = PlanGuidance(space, [(attr, torch.tensor(1), 5.0)], samples=32)
        with _autocast(device):
            model.sample((n_samples, 1, 384), c, steps=50, sampler="ddpm", classifier=guide, classifier_scale=1.0)

    lm = build_model("tiny", 4_096, context_length=128, eos_token_id=0).to(device).eval()

    def write():
        with _autocast(device):
            sample_continuations(lm, [[1] * 32] * n_samples, torch.randn(n_samples, 8, 256, device=device),
                                 max_new_tokens=32, pad_id=0)

    return {"width": width, "blocks": blocks, "parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
            "steps_per_s": round(steps_s, 1), "guided_ddpm50_plans_per_s": round(n_samples * _rate(draw, 1, 2, device), 1),
            "tiny_lm_continuation_tokens_per_s": round(32 * n_samples * _rate(write, 1, 2, device))}


def bench_encoder(device, batch: int, iters: int) -> dict:
    """Texts/s of a frozen all-MiniLM-L6-v2-shaped encoder (random weights: the same work per text)."""
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                                 vocab_size=30_522)).to(device).eval()
    ids = torch.randint(1000, 30_000, (batch, 32), device=device)

    def fwd():
        with torch.no_grad(), _autocast(device):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return {"batch": batch, "texts_per_s": round(batch * _rate(fwd, 3, iters, device))}


def bench_star(device, shape: str, batch: int, iters: int, think_steps: int = 15, soft_tokens: int = 8) -> dict:
    """STAR-LDM (issue 17): training steps/s of the joint loss (NLL + v-loss, one pass) and the cost of a thought
    (``think_steps`` denoising steps over the soft tokens) with the cached prefix, without it, and of writing 8 tokens."""
    import torch

    from models.lmlm import build_model
    from models.plan_lm import PlanPromptGenerator, sample_continuations, token_rms, training_batch
    from models.star import PrefixState, ScoreHead, StarLDM, think
    from models.train import adamw

    torch.manual_seed(0)
    vocab = 50_257 if shape.startswith("gpt2") else 4_096
    lm = build_model(shape, vocab, context_length=128, eos_token_id=0).to(device)
    d = lm.config.hidden_size
    model = StarLDM(lm, PlanPromptGenerator(384, soft_tokens, 256, 2, 4, d, token_rms(lm)),
                    ScoreHead(d, soft_tokens, 384, 256, 2, 4)).to(device)
    opt = adamw(model, lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.99))
    prefixes = torch.randint(1, vocab, (batch, 48)).tolist()
    b = {k: v.to(device) for k, v in training_batch(prefixes, torch.randint(1, vocab, (batch, 32)).tolist(), soft_tokens, 0).items()}
    plans = torch.randn(batch, 384, device=device)

    def step():
        t, eps = torch.rand(batch, device=device), torch.randn(batch, 384, device=device)
        with _autocast(device):
            nll, v_loss, _ = model.losses(b, plans, t, eps, torch.zeros(batch, dtype=torch.bool, device=device))
            loss = nll + 5 * v_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps_s = _rate(step, 3, iters, device)
    model.eval()

    def thought(cached: bool, graphs: bool | None = None):
        def run():
            with torch.no_grad(), _autocast(device):
                think(model, PrefixState(model, prefixes, 0), steps=think_steps, cached=cached, graphs=graphs)
        return run

    def write():
        with torch.no_grad(), _autocast(device):
            sample_continuations(lm, prefixes, None, max_new_tokens=8, pad_id=0)

    cached, eager, uncached, tokens8 = (1 / _rate(fn, 1, 3, device)
                                        for fn in (thought(True), thought(True, False), thought(False), write))
    return {"shape": shape, "batch": batch, "steps_per_s": round(steps_s, 2), "examples_per_s": round(steps_s * batch),
            "think_steps": think_steps, "thought_cached_s": round(cached, 4), "thought_cached_eager_s": round(eager, 4),
            "thought_uncached_s": round(uncached, 4),
            "write_8_tokens_s": round(tokens8, 4), "thought_over_8_tokens": round(cached / tokens8, 2)}


def bench_star_demo(device, workdir: Path, batches=(1, 16), steps=(5, 8, 15)) -> dict:
    """``lmlm star evaluate``'s ``thought_cost`` on a trained model: thoughts with the cached and uncached prefix
    against writing 8 tokens, at each batch and step count."""
    import pyarrow.parquet as pq

    from schemas.star_configs import StarFlowConfig
    from tasks.evaluate_star import thought_cost
    from tasks.guided_data import PlanData
    from tasks.star import load_star_workdir

    s = load_star_workdir(str(workdir), device)
    # the held-out prefixes are all thought_cost reads; the plan arrays stay behind
    data = PlanData(pq.read_table(workdir / "plans" / "examples.parquet"), None, s.space, str(workdir / "plans"))
    out = {}
    for batch in batches:
        for n in steps:
            config = StarFlowConfig(workdir=str(workdir), star_evaluation={"cost_batch": batch},
                                    star_sampling={"steps": n})
            out[f"batch{batch}_steps{n}"] = thought_cost(config, s, data, repeats=7)
            print(f"star_demo batch {batch}, {n} steps: {out[f'batch{batch}_steps{n}']}", flush=True)
    return out


def run(args) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results: dict = {}
    record(results, out, "device", {"name": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                                    "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported() if cuda else None})
    # --smoke: the same code paths at toy sizes, to check the script on a CPU before spending GPU time
    gpt, llama = ("micro", "micro") if args.smoke else ("gpt2-124m", "llama2-176m")
    torch.backends.cuda.matmul.allow_tf32 = True
    deadline = time.perf_counter() + args.budget_s
    parts = args.only.split(",")

    def attempt(key: str, fn) -> None:
        if not any(key.startswith(prefix) for prefix in parts):
            return
        if time.perf_counter() > deadline:
            record(results, out, key, {"skipped": "time budget spent"})
            return
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # one part failing must not lose the others' figures
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        value["seconds"] = round(time.perf_counter() - t0, 1)
        record(results, out, key, value)
        if cuda:
            torch.cuda.empty_cache()

    toy = args.smoke  # steps, batches and iterations cut so that a CPU gets through in seconds
    attempt(f"pretrain_{gpt}_eager", lambda: bench_pretrain(data, device, gpt, 2 if toy else 16, 12 if toy else 40, False,
                                                            5 if toy else 15))
    if not toy:
        attempt(f"pretrain_{gpt}_compiled", lambda: bench_pretrain(data, device, gpt, 16, 60, True, 30))
        attempt(f"pretrain_{gpt}_compiled_batch64", lambda: bench_pretrain(data, device, gpt, 64, 40, True, 20))
        attempt(f"pretrain_{llama}_eager", lambda: bench_pretrain(data, device, llama, 16, 40, False, 15))
    attempt("encoder_minilm_shape", lambda: bench_encoder(device, 8 if toy else 512, 2 if toy else 30))
    attempt("autoencoder_demo", lambda: bench_autoencoder(device, 32, 2 if toy else 100))
    attempt("autoencoder_batch256", lambda: bench_autoencoder(device, 8 if toy else 256, 2 if toy else 50))
    attempt("diffusion_demo", lambda: bench_diffusion(device, 128, 6, 4, 64, 2 if toy else 100, 4 if toy else 256))
    attempt("diffusion_reference_width",
            lambda: bench_diffusion(device, 96 if toy else 768, 2 if toy else 12, 4 if toy else 12, 8 if toy else 256,
                                    2 if toy else 30, 4 if toy else 256))

    attempt("guided_finetune_tiny", lambda: bench_guided_finetune(device, "micro" if toy else "tiny", 4 if toy else 64,
                                                                   2 if toy else 50))
    if not toy:
        attempt("guided_finetune_gpt2-124m", lambda: bench_guided_finetune(device, "gpt2-124m", 64, 30))
    attempt("guided_prior_demo", lambda: bench_guided_prior(device, 64 if toy else 512, 2 if toy else 4, 16 if toy else 256,
                                                            2 if toy else 100, 4 if toy else 1024))

    attempt("star_tiny", lambda: bench_star(device, "micro" if toy else "tiny", 4 if toy else 64, 2 if toy else 50,
                                            3 if toy else 15))
    if not toy:
        attempt("star_gpt2-124m", lambda: bench_star(device, "gpt2-124m", 64, 30))
    if (data / STAR_WORKDIR / "star").is_dir():
        attempt("star_demo", lambda: bench_star_demo(device, data / STAR_WORKDIR, steps=(2, 5) if toy else (5, 8, 15)))

    def annotate() -> dict:
        cmd = [sys.executable, str(ROOT / "bench" / "annotate.py"), "--checkpoint", str(data / "annotator"),
               "--texts", str(data / ANNOTATE_TEXTS), "--docs", "8" if toy else "128", "--step-docs", "2" if toy else "6",
               "--batch-size", "64", "--device", args.device, "--threads", "4"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-800:]}
        return {"lines": [line for line in proc.stdout.splitlines() if line.strip()][-10:]}

    if (data / "annotator").is_dir():
        attempt("annotate", annotate)

    print("\n" + "=" * 100)
    print(f"device: {results['device']}")
    for key, value in results.items():
        if key == "device":
            continue
        if isinstance(value, dict) and "lines" not in value:
            print(f"{key:30s} " + ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, list)))
    for line in results.get("annotate", {}).get("lines", []):
        print("  annotate:", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the inputs (run where the pipeline is installed)")
    p.add_argument("--data", default=".gpu")
    p.add_argument("--people", type=int, default=3000, help="synthetic biographies in the pretraining corpus")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--annotate-docs", type=int, default=200)
    p.add_argument("--annotator", help="folder of a fine-tuned annotator to time on the GPU")
    p.add_argument("--star-workdir", help="a workdir with a trained STAR-LDM (make demo-star) to time its thoughts")
    r = sub.add_parser("run", help="measure on the GPU")
    r.add_argument("--data", default=".gpu")
    r.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"))
    r.add_argument("--only", default="pretrain,encoder,autoencoder,diffusion,guided,star,annotate",
                   help="comma-separated prefixes of the figures' names (e.g. pretrain_gpt2-124m_compiled,annotate)")
    r.add_argument("--budget-s", type=float, default=420, help="parts not started by then are skipped")
    r.add_argument("--device", default="cuda")
    r.add_argument("--smoke", action="store_true", help="toy sizes: check the script (e.g. on a CPU) before a GPU run")
    args = parser.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
