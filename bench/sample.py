"""Sampling speed and quality of a trained latent diffusion model: DDPM 250 steps vs DDIM 50 steps.

    .venv/bin/python bench/sample.py [--checkpoint out/diffusion-demo] [--per-class 30] [--threads N]

Both samplers run in the same process on the same model, classes and seeds; prints samples/s (denoising
and decoding) and MAUVE against the held-out text of the run (re-read from the run's shards). Needs a
finished `lmlm diffusion train` workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from schemas.diffusion_configs import LatentDiffusionFlowConfig, SamplingConfig
    from tasks.diffusion import extract_texts, load_autoencoder, load_diffusion
    from tasks.evaluate_diffusion import mauve_score
    from tasks.shardio import list_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="out/diffusion-demo", help="workdir of `lmlm diffusion train`")
    parser.add_argument("--per-class", type=int, default=30, help="samples per class and sampler")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.checkpoint, "report.json")) as f:
        config = LatentDiffusionFlowConfig(**json.load(f)["config"])
    ae = load_autoencoder(os.path.join(args.checkpoint, "autoencoder"))
    dm, shape = load_diffusion(os.path.join(args.checkpoint, "diffusion"))
    shards = (sorted({p for loc in config.document_shards for p in list_files(loc, (".parquet",))})
              or list_files(os.path.join(args.checkpoint, "corpus", "shards", "documents"), (".parquet",)))
    from models.autoencoder import MiniLMEncoder

    tokenizer = MiniLMEncoder.tokenizer_only()
    count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    _, holdout, _ = extract_texts(shards, count_tokens=count, max_tokens=config.max_tokens, pack=config.pack_sentences,
                                  label_column=config.label_column, holdout_fraction=config.holdout_fraction)
    references = ae.normalize(holdout.texts)
    from models.embed import embed

    reference_features = embed(references)
    classes = dm.classes or [None]
    print(f"checkpoint {args.checkpoint}: {len(classes)} classes x {args.per_class} samples, CFG w={args.guidance}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':<14}{'samples':>8}{'seconds':>9}{'samples/s':>11}{'MAUVE':>8}")
    for sampler, steps in (("ddpm", 250), ("ddim", 50)):
        sampling = SamplingConfig(sampler=sampler, steps=steps, guidance_scale=args.guidance)
        t0, texts = time.perf_counter(), []
        for i, c in enumerate(classes):
            texts += ae.decode(dm.sample_latents(args.per_class, c, sampling, shape, seed=i))
        seconds = time.perf_counter() - t0
        print(f"{sampler + ' ' + str(steps):<14}{len(texts):>8}{seconds:>9.1f}{len(texts) / seconds:>11.2f}"
              f"{mauve_score(texts, references, reference_features=reference_features):>8.3f}")


if __name__ == "__main__":
    main()
