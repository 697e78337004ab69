"""CLI of the latent-diffusion flows: ``lmlm diffusion train`` and ``lmlm sample``. Kept apart from
flows/diffusion.py so that building the parser imports neither Prefect nor torch."""

from __future__ import annotations

from flows.cli_config import load_config_file, validated, with_overrides
from schemas.diffusion_configs import LatentDiffusionFlowConfig
from schemas.errors import UserInputError


def _config_from_args(args) -> LatentDiffusionFlowConfig:
    data = with_overrides(load_config_file(args.config, LatentDiffusionFlowConfig), {
        "workdir": args.workdir or None, "document_shards": args.shards, "threads": args.threads or None, "device": args.device,
        "autoencoder.train.steps": args.ae_steps, "diffusion.train.steps": args.diffusion_steps,
        "evaluation.reference_lm": args.reference_lm, "seeds": args.seeds, "evaluation.draws": args.draws})
    if args.no_eval:
        data["evaluation"] = None
    config = validated(LatentDiffusionFlowConfig, data, 'latent-diffusion config')
    if config.evaluation is not None and config.evaluation.reference_lm:
        from tasks.reference_lm import resolve_reference_lm

        resolve_reference_lm(config.evaluation.reference_lm)  # a wrong folder fails now, not after training
    return config


def cmd_diffusion_train(args) -> None:
    from flows.diffusion import autoencoder_training, diffusion_training, latent_diffusion, markdown_table

    config = _config_from_args(args)
    flows = {"all": latent_diffusion, "autoencoder": autoencoder_training, "diffusion": diffusion_training}
    report = flows[args.stage](config)
    print()
    if "autoencoder" in report:
        a = report["autoencoder"]
        print(f"autoencoder: held-out BLEU {a['holdout']['bleu']:.2f} against the {a['holdout'].get('bleu_reference', 'texts')}, "
              f"exact match {a['holdout']['exact_match']:.3f} ({a['steps']} steps, {a['train_seconds']} s)")
    if "diffusion" in report:
        d = report["diffusion"]
        print(f"diffusion:   {d['steps']} steps, {d['train_seconds']} s, classes: {', '.join(d['classes']) or '(none)'}")
    if "evaluation" in report:
        e = report["evaluation"]
        print(f"\nmean ± std over {e.get('spread')}; MAUVE features: {e.get('mauve_features')}")
        print(markdown_table(e["rows"]))
    print(f"\nreport:      {report['report']}")
    if args.stage == "all":
        print(f"try:         lmlm sample --checkpoint {config.workdir} --class <class> --n 10")


def cmd_sample(args) -> None:
    from schemas.diffusion_configs import SamplingConfig
    from tasks.diffusion import sample_texts

    if args.n < 1:
        raise UserInputError(f"--n {args.n}: ask for at least one sample")
    sampling = SamplingConfig(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)
    for text in sample_texts(args.checkpoint, args.n, args.class_name, sampling, seed=args.seed, device=args.device):
        print(text)


def add_diffusion_commands(sub) -> None:
    """`lmlm diffusion train ...` and `lmlm sample ...` on the parser's subcommands ``sub``."""
    d = sub.add_parser("diffusion", help="latent diffusion for language: train the autoencoder and the diffusion model")
    dsub = d.add_subparsers(dest="diffusion_command", required=True)
    t = dsub.add_parser("train", help="autoencoder -> diffusion -> samples -> evaluation (synthetic corpus unless --shards)")
    t.add_argument("--workdir", help="checkpoints and report go here (default out/diffusion)")
    t.add_argument("--shards", nargs="+", help="document shard files/folders; unset: a synthetic corpus is generated")
    t.add_argument("--config", help="JSON/YAML file of LatentDiffusionFlowConfig fields")
    t.add_argument("--stage", choices=["all", "autoencoder", "diffusion"], default="all",
                   help="all (default), or one training stage (diffusion needs the workdir's autoencoder)")
    t.add_argument("--ae-steps", type=int, help="autoencoder optimizer steps")
    t.add_argument("--diffusion-steps", type=int, help="diffusion optimizer steps")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--device", help="auto (default: the first CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
    t.add_argument("--no-eval", action="store_true", help="skip sampling and evaluation")
    t.add_argument("--seeds", type=int, help="training seeds (the table: mean ± std over them; default 1)")
    t.add_argument("--draws", type=int, help="draws of held-out texts and samples per seed (default 3)")
    t.add_argument("--reference-lm", help="causal LM for the perplexity column: a model folder, a pretraining folder, the "
                   "workdir of `lmlm lmlm pretrain` (its standard model, e.g. out/demo-lmlm), or a hub name")
    t.set_defaults(func=cmd_diffusion_train)
    s = sub.add_parser("sample", help="print samples of a trained latent diffusion model")
    s.add_argument("--checkpoint", default="out/diffusion", help="workdir of `lmlm diffusion train` (default out/diffusion)")
    s.add_argument("--class", dest="class_name", help="class label to condition on; unset: unconditional")
    s.add_argument("--n", type=int, default=10, help="number of samples (default 10)")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--steps", type=int, default=50, help="denoising steps (default 50; the reference DDPM uses 250)")
    s.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w (default 2)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    s.set_defaults(func=cmd_sample)
