"""CLI of the DGLM flows: ``lmlm guided {train,evaluate,demo,generate,fit-attribute}``. Kept apart from flows/guided.py
so that building the parser imports neither Prefect nor torch."""

from __future__ import annotations

import time

from flows.cli_config import config_default, load_config_file, validated, with_overrides
from schemas.errors import UserInputError
from schemas.guided_configs import GuidedEvaluationConfig, GuidedFlowConfig, GuidedSamplingConfig

STAGES = ("lm", "plans", "plan_lm", "class_lm", "prior", "classifiers")


def _config(args) -> GuidedFlowConfig:
    data = with_overrides(load_config_file(args.config, GuidedFlowConfig), {
        "workdir": args.workdir or None, "document_shards": getattr(args, "shards", None), "device": args.device,
        "threads": getattr(args, "threads", None),
        "evaluation.prefixes": getattr(args, "prefixes", None),
        "evaluation.samples_per_prefix": getattr(args, "samples", None)})
    return validated(GuidedFlowConfig, data, "guided config", source=args.config)


def _print_training(report: dict) -> None:
    for name in ("lm", "reference_lm"):
        r = report.get(name)
        if r:
            print(f"{name:<13} {r['parameters']:,} parameters, {r['tokens']:,} tokens in {r['train_seconds']:.0f} s, "
                  f"held-out loss {r['holdout_loss'] or float('nan'):.3f}")
    if report.get("plans"):
        p = report["plans"]
        print(f"{'plans':<13} {p['examples']} examples from {p['documents']} documents; labelled {p['labelled']}")
    for name in ("plan_lm", "class_lm", "prior"):
        r = report.get(name)
        if r:
            extra = f", k = {r['soft_tokens']}" if "soft_tokens" in r else ""
            print(f"{name:<13} {r['steps']} steps in {r['train_seconds']:.0f} s, final loss {r['final_loss']}{extra}"
                  f"{' (reused)' if r['reused'] else ''}")
    for c in report.get("classifiers") or []:
        print(f"{'classifier':<13} {c['name']}: {len(c['classes'])} classes, held-out accuracy {c['holdout_accuracy']}")
    print(f"report:       {report['report']}")


def _print_evaluation(report: dict) -> None:
    from flows.guided import markdown_table, summary_lines

    print()
    print(markdown_table(report["rows"]))
    print()
    for line in summary_lines(report):
        print(line)
    print(f"\ntable:  {report['table']}\nreport: {report['report']}")


def cmd_guided_train(args) -> None:
    from flows.guided import guided_training

    config = _config(args)
    stages = None if not args.stage or "all" in args.stage else list(dict.fromkeys(args.stage))
    _print_training(guided_training(config, stages))
    print(f'try:          lmlm guided generate --workdir {config.workdir} "We booked a table for two." '
          "--attribute sentiment=positive --scale 5")


def cmd_guided_evaluate(args) -> None:
    from flows.guided import guided_evaluation

    _print_evaluation(guided_evaluation(_config(args)))


def cmd_guided_demo(args) -> None:
    from flows.guided import guided_demo

    t0 = time.perf_counter()
    result = guided_demo(_config(args))
    _print_training(result["training"])
    _print_evaluation(result["evaluation"])
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")


def pairs(items: list[str], what: str) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a dict; one clear error line for anything else."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserInputError(f"{what} {item!r}: write NAME=VALUE, e.g. topic=hotel")
        out[name] = value
    return out


def parse_scales(items: list[str] | None, attributes: dict[str, str]) -> dict[str, float]:
    """``--scale`` arguments: a number for every attribute, or NAME=NUMBER for one."""
    scales = {}
    for item in items or []:
        if "=" in item:
            name, _, value = item.partition("=")
            scales[name] = value
        else:
            scales.update({name: item for name in attributes})
    try:
        return {k: float(v) for k, v in scales.items()}
    except ValueError:
        raise UserInputError(f"--scale {items}: give a number, or NAME=NUMBER per attribute") from None


def cmd_guided_generate(args) -> None:
    from schemas.guided_configs import GuidedSamplingConfig
    from tasks.guided import generate

    if args.n < 1:
        raise UserInputError(f"--n {args.n}: ask for at least one continuation")
    attributes = pairs(args.attribute, "--attribute")
    scales = parse_scales(args.scale, attributes)
    sampling = validated(GuidedSamplingConfig, {"steps": args.steps, "inference_alpha2": args.alpha2,
                                                "max_new_tokens": args.max_new_tokens}, "--steps/--alpha2/--max-new-tokens")
    for text in generate(args.workdir, args.prefix, args.n, attributes, scales, sampling, seed=args.seed, device=args.device):
        print(f"{args.prefix}{text}")


def cmd_guided_fit_attribute(args) -> None:
    from schemas.guided_configs import AttributeConfig
    from tasks.diffusion_texts import document_shards
    from tasks.guided import fit_new_attribute

    config = _config(args)
    r = fit_new_attribute(config.workdir, AttributeConfig(name=args.name, column=args.column), document_shards(config),
                          config.classifier, log=lambda _: None)
    print(f"attribute {r.name}: classes {', '.join(r.classes)}; {r.train_examples} training plans, held-out accuracy "
          f"{r.holdout_accuracy} ({r.seconds} s); saved {r.path}")
    print(f'try: lmlm guided generate --workdir {config.workdir} "..." --attribute {r.name}={r.classes[-1]} --scale 5')


def add_guided_commands(sub) -> None:
    """``lmlm guided ...`` on the parser's subcommands ``sub``."""
    gd = sub.add_parser("guided", help="diffusion-guided language modeling (DGLM): plan-conditioned LM, plan prior, "
                        "plug-and-play attribute control")
    gsub = gd.add_subparsers(dest="guided_command", required=True)

    def common(p, shards: bool = True) -> None:
        p.add_argument("--workdir", help="checkpoints and reports (default out/guided)")
        p.add_argument("--config", help="JSON/YAML file of GuidedFlowConfig fields")
        p.add_argument("--device", help="auto (default: the first CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
        if shards:
            p.add_argument("--shards", nargs="+", help="document shard files/folders; unset: a synthetic corpus with reviews")
            p.add_argument("--threads", type=int, help="torch CPU threads of the flow's process")

    t = gsub.add_parser("train", help="tokenizer -> LM (and reference LM) -> plans -> plan and class-conditional "
                        "fine-tunes -> prior -> classifiers (finished stages are reused, interrupted ones resume)")
    common(t)
    t.add_argument("--stage", choices=["all", *STAGES], action="append", help="all (default), or a stage; repeat it "
                   "for several (each needs the earlier stages' outputs)")
    t.set_defaults(func=cmd_guided_train)
    e = gsub.add_parser("evaluate", help="the comparison table on held-out neutral prefixes, with bootstrap intervals")
    common(e)
    e.add_argument("--prefixes", type=int, help="neutral prefixes per attribute (default "
                   f"{config_default(GuidedEvaluationConfig, 'prefixes')})")
    e.add_argument("--samples", type=int, help="continuations per prefix (default "
                   f"{config_default(GuidedEvaluationConfig, 'samples_per_prefix')})")
    e.set_defaults(func=cmd_guided_evaluate)
    d = gsub.add_parser("demo", help="train every stage, then evaluate (make demo-guided)")
    common(d)
    d.add_argument("--prefixes", type=int, help=argparse_suppress())
    d.add_argument("--samples", type=int, help=argparse_suppress())
    d.set_defaults(func=cmd_guided_demo)
    g = gsub.add_parser("generate", help="continue a prefix, steered toward attributes by the plan")
    g.add_argument("prefix", help="the text to continue")
    g.add_argument("--workdir", default="out/guided", help="a trained workdir (default out/guided)")
    g.add_argument("--attribute", action="append", metavar="NAME=VALUE", help="steer toward it (repeat to compose)")
    g.add_argument("--scale", action="append", metavar="S|NAME=S", help="guidance scale, for every attribute or one")
    g.add_argument("--n", type=int, default=5, help="continuations (default 5)")
    steps, alpha2 = config_default(GuidedSamplingConfig, "steps"), config_default(GuidedSamplingConfig, "inference_alpha2")
    g.add_argument("--steps", type=int, default=steps, help=f"plan denoising steps (default {steps})")
    g.add_argument("--alpha2", type=float, default=alpha2, help=f"the plan is re-noised to this alpha^2 (default {alpha2})")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.set_defaults(func=cmd_guided_generate)
    f = gsub.add_parser("fit-attribute", help="a new attribute in one logistic-regression fit (no LM training)")
    common(f)
    f.add_argument("name", help="the attribute's name on the command line")
    f.add_argument("--column", help="shard column or metadata key holding its labels (default: the name)")
    f.set_defaults(func=cmd_guided_fit_attribute)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
