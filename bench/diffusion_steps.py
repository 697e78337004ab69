"""What longer training buys the latent diffusion model: class accuracy and MAUVE against training length.

The CPU demo trains its denoiser 1,200 steps at batch 64 (LD4LG trains 250k). This trains the same
denoiser (``tasks.diffusion.train_diffusion``, the flow's code) on the demo's latents for several
schedules and scores the samples of each, in three steps; the middle one is where a GPU is:

    .venv/bin/python bench/diffusion_steps.py prepare --workdir out/diffusion-demo --data .gpu-ld4lg   # here
    python bench/diffusion_steps.py train --data .gpu-ld4lg --out results                             # GPU (or here)
    .venv/bin/python bench/diffusion_steps.py score --workdir out/diffusion-demo --samples results     # here

prepare  the latents of the demo's training texts under its trained autoencoder, with their classes and
         the demo's diffusion config (``latents.pt``).
train    per ``--runs`` entry ``STEPSxBATCH[,key=value...]`` (keys: width, layers, lr, class_dropout, e.g.
         ``2400x64,lr=2e-3``): trains the denoiser, then draws
         ``--per-class`` DDIM-50 latents per class at each CFG weight of ``--guidance`` (w=0 is
         unconditional); writes ``samples-<run>.pt`` and ``runs.json`` (steps/s, seconds) as it goes.
         Needs only torch, numpy, pyarrow and pydantic.
score    decodes the samples with the demo's autoencoder and prints MAUVE against the held-out text and
         the class accuracy of the flow's judge, per run and guidance weight.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENTS = "latents.pt"


def demo_config(workdir: str):
    from schemas.diffusion_configs import LatentDiffusionFlowConfig

    report = Path(workdir, "report.json")
    if not report.is_file():
        sys.exit(f"{report}: missing; run `make demo-diffusion` (or `lmlm diffusion train --workdir {workdir}`) first")
    return LatentDiffusionFlowConfig(**json.loads(report.read_text())["config"])


def demo_texts(config):
    """(training, held-out) TextSplits of the demo, split as the flow splits them, and the encoder."""
    from tasks.diffusion_texts import split_texts
    from tasks.diffusion import build_encoder

    encoder = build_encoder(config.autoencoder)
    train, holdout, _ = split_texts(config, encoder)
    return train, holdout, encoder


def prepare(args) -> None:
    import torch

    from tasks.diffusion import encoder_features, load_autoencoder

    config = demo_config(args.workdir)
    train, _, encoder = demo_texts(config)
    ae = load_autoencoder(str(Path(args.workdir, "autoencoder")), "cpu")
    latents = ae.encode(*encoder_features(encoder, train.texts, config.max_tokens))
    Path(args.data).mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents.half(), "labels": train.labels, "diffusion": config.diffusion.model_dump(mode="json")},
               Path(args.data, LATENTS))
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} -> {Path(args.data, LATENTS)}")


def train(args) -> None:
    import torch

    from schemas.diffusion_configs import DiffusionConfig, SamplingConfig
    from models.device import resolve_device
    from tasks.diffusion import train_diffusion

    blob = torch.load(Path(args.data, LATENTS), weights_only=False)
    latents, labels, base = blob["latents"].float(), blob["labels"], blob["diffusion"]
    device = resolve_device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in args.runs:
        size, *pairs = spec.split(",")
        steps, batch = (int(x) for x in size.split("x"))
        extra = {k: float(v) for k, v in (p.split("=") for p in pairs)}
        model_keys = {k: int(v) if k in ("width", "layers") else v for k, v in extra.items() if k != "lr"}
        train_cfg = {**base["train"], "steps": steps, "batch_size": batch, "checkpoint_every": steps,
                     "log_every": max(100, steps // 10), **({"lr": extra["lr"]} if "lr" in extra else {})}
        cfg = DiffusionConfig(**{**base, **model_keys, "train": train_cfg})
        tag = spec.replace(",", "_").replace("=", "")
        with tempfile.TemporaryDirectory() as tmp:  # checkpoints are not kept: only the samples come back
            dm, report = train_diffusion(latents, labels, cfg, tmp, amp=amp, device=device)
        shape_lk = tuple(latents.shape[1:])
        samples, t0 = {}, time.perf_counter()
        for w in args.guidance:
            sampling = SamplingConfig(guidance_scale=max(w, 1.0))  # w=0: the unconditional model, no label
            samples[w] = torch.cat([dm.sample_latents(args.per_class, c if w > 0 else None, sampling, shape_lk, seed=25 + i)
                                    for i, c in enumerate(dm.classes)]).half()
        sample_s = time.perf_counter() - t0
        torch.save({"classes": dm.classes, "per_class": args.per_class, "samples": samples}, out / f"samples-{tag}.pt")
        runs.append({"run": tag, "steps": steps, "batch": batch, "lr": cfg.train.lr, "width": cfg.width, "layers": cfg.layers,
                     "parameters": report["parameters"], "train_seconds": report["train_seconds"],
                     "steps_per_s": round(steps / report["train_seconds"], 1), "sample_seconds": round(sample_s, 1),
                     "final_loss": report["history"][-1]["loss"], "device": name})
        (out / "runs.json").write_text(json.dumps(runs, indent=2))
        print(json.dumps(runs[-1]), flush=True)


def score(args) -> None:
    import torch

    from models.embed import embed
    from tasks.diffusion import load_autoencoder
    from tasks.evaluate_diffusion import TextClassifier, mauve_score

    config = demo_config(args.workdir)
    train_split, holdout, _ = demo_texts(config)
    ae = load_autoencoder(str(Path(args.workdir, "autoencoder")), "cpu")
    judge = TextClassifier(ae.normalize(train_split.texts), train_split.labels)
    refs = ae.normalize(holdout.texts)
    ref_features = embed(refs)
    runs = json.loads(Path(args.samples, "runs.json").read_text())
    print("| run (steps x batch, settings) | parameters | device | steps/s | train s | w | MAUVE | class accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        blob = torch.load(Path(args.samples, f"samples-{run['run']}.pt"), weights_only=False)
        targets = [c for c in blob["classes"] for _ in range(blob["per_class"])]
        for w, z in blob["samples"].items():
            texts = ae.decode(z.float())
            row = (run["run"], f"{run['parameters']:,}", run["device"], run["steps_per_s"], run["train_seconds"], w,
                   f"{mauve_score(texts, refs, reference_features=ref_features):.3f}",
                   f"{judge.accuracy(texts, targets):.3f}")
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--workdir", default="out/diffusion-demo")
    a.add_argument("--data", default=".gpu-ld4lg")
    a.set_defaults(func=prepare)
    t = sub.add_parser("train")
    t.add_argument("--data", default=".gpu-ld4lg")
    t.add_argument("--out", default="diffusion-steps")
    t.add_argument("--runs", nargs="+", default=["1200x64", "6000x256"], help="STEPSxBATCH[,width=W,layers=N,lr=X,class_dropout=P] per run")
    t.add_argument("--guidance", nargs="+", type=float, default=[0.0, 2.0, 3.0, 5.0])
    t.add_argument("--per-class", type=int, default=40)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=train)
    s = sub.add_parser("score")
    s.add_argument("--workdir", default="out/diffusion-demo")
    s.add_argument("--samples", default="diffusion-steps")
    s.set_defaults(func=score)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
