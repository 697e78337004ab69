"""CLI of the STAR-LDM flows: ``lmlm star {train,evaluate,demo,generate}``. Kept apart from flows/star.py so that
building the parser imports neither Prefect nor torch."""

from __future__ import annotations

import time

from flows.cli_config import config_default, load_config_file, validated, with_overrides
from flows.guided_cli import pairs, parse_scales
from schemas.errors import UserInputError
from schemas.guided_configs import GuidedEvaluationConfig
from schemas.star_configs import THINK_MODES, StarEvaluationConfig, StarFlowConfig, StarSamplingConfig

STAGES = ("star", "star_classifiers")


def _config(args) -> StarFlowConfig:
    data = with_overrides(load_config_file(args.config, StarFlowConfig), {
        "workdir": args.workdir or None, "document_shards": getattr(args, "shards", None), "device": args.device,
        "threads": getattr(args, "threads", None),
        "evaluation.prefixes": getattr(args, "prefixes", None),
        "evaluation.samples_per_prefix": getattr(args, "samples", None),
        "star_evaluation.open_prefixes": getattr(args, "open_prefixes", None)})
    return validated(StarFlowConfig, data, "star config", source=args.config)


def _print_training(report: dict) -> None:
    r = report.get("star")
    if r:
        print(f"{'STAR-LDM':<13} {r['lm_parameters']:,} LM + {r['new_parameters']:,} generator/head parameters, "
              f"{r['steps']} steps in {r['train_seconds']:.0f} s, final loss {r['final_loss']}{' (reused)' if r['reused'] else ''}")
    for c in report.get("classifiers") or []:
        print(f"{'classifier':<13} {c['name']}: " + ("reused" if c.get("reused") else
                                                   f"{len(c['classes'])} classes, held-out accuracy {c['holdout_accuracy']}"))
    print(f"report:       {report['report']}")


def _print_evaluation(report: dict) -> None:
    from flows.guided import markdown_table
    from flows.star import open_ended_table, summary_lines

    print()
    print(markdown_table(report["control"]["rows"]))
    print()
    print(open_ended_table(report["open_ended"]))
    print()
    for line in summary_lines(report):
        print(line)
    print(f"\ntables: {report['tables']}\nreport: {report['report']}")


def cmd_star_train(args) -> None:
    from flows.star import star_training

    config = _config(args)
    stages = None if not args.stage or "all" in args.stage else list(dict.fromkeys(args.stage))
    _print_training(star_training(config, stages))
    print(f'try:          lmlm star generate --workdir {config.workdir} "We booked a table for two." '
          "--attribute topic=restaurant --scale 1")


def cmd_star_evaluate(args) -> None:
    from flows.star import star_evaluation

    _print_evaluation(star_evaluation(_config(args)))


def cmd_star_demo(args) -> None:
    from flows.star import star_demo

    t0 = time.perf_counter()
    result = star_demo(_config(args))
    _print_training(result["training"])
    _print_evaluation(result["evaluation"])
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")


def cmd_star_generate(args) -> None:
    from schemas.star_configs import StarSamplingConfig
    from tasks.star import generate

    if args.n < 1:
        raise UserInputError(f"--n {args.n}: ask for at least one continuation")
    attributes = pairs(args.attribute, "--attribute")
    scales = parse_scales(args.scale, attributes)
    sampling = validated(StarSamplingConfig, {"steps": args.steps, "inference_alpha2": args.alpha2, "think": args.think,
                                              "max_new_tokens": args.max_new_tokens},
                         "--steps/--alpha2/--think/--max-new-tokens")
    for text in generate(args.workdir, args.prefix, args.n, attributes, scales, sampling, seed=args.seed, device=args.device):
        print(f"{args.prefix}{text}")


def add_star_commands(sub) -> None:
    """``lmlm star ...`` on the parser's subcommands ``sub``."""
    st = sub.add_parser("star", help="STAR-LDM: one LM that stops, thinks by diffusion in the plan space, then writes")
    ssub = st.add_subparsers(dest="star_command", required=True)

    def common(p) -> None:
        p.add_argument("--workdir", help="checkpoints and reports (default out/star; a DGLM workdir shares its LMs and plans)")
        p.add_argument("--config", help="JSON/YAML file of StarFlowConfig fields")
        p.add_argument("--device", help="auto (default: the first CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N")
        p.add_argument("--shards", nargs="+", help="document shard files/folders; unset: a synthetic corpus with reviews")
        p.add_argument("--threads", type=int, help="torch CPU threads of the flow's process")

    t = ssub.add_parser("train", help="DGLM's shared stages when missing (tokenizer, LMs, plans) -> joint STAR-LDM "
                        "training -> noise-conditioned classifiers (finished stages are reused, interrupted ones resume)")
    common(t)
    t.add_argument("--stage", choices=["all", *STAGES], action="append", help="all (default), or a stage; repeat it for several")
    t.set_defaults(func=cmd_star_train)
    for name, helptext, func in (("evaluate", "control table beside DGLM, open-ended comparison with the plain LM, "
                                  "ablations, the thought's cost", cmd_star_evaluate),
                                 ("demo", "train, then evaluate (make demo-star)", cmd_star_demo)):
        e = ssub.add_parser(name, help=helptext)
        common(e)
        e.add_argument("--prefixes", type=int, help="neutral prefixes per attribute in the control table (default "
                       f"{config_default(GuidedEvaluationConfig, 'prefixes')})")
        e.add_argument("--samples", type=int, help="continuations per prefix in the control table (default "
                       f"{config_default(GuidedEvaluationConfig, 'samples_per_prefix')})")
        e.add_argument("--open-prefixes", type=int, help="held-out prefixes of the open-ended comparison (default "
                       f"{config_default(StarEvaluationConfig, 'open_prefixes')})")
        e.set_defaults(func=func)
    g = ssub.add_parser("generate", help="continue a prefix: think (optionally steered toward attributes), then write")
    g.add_argument("prefix", help="the text to continue")
    g.add_argument("--workdir", default="out/star", help="a trained workdir (default out/star)")
    g.add_argument("--think", choices=THINK_MODES, default="once", help="once (default): at the end of the prompt; "
                   "every-sentence: again after each sentence the model ends; off: a null plan")
    g.add_argument("--attribute", action="append", metavar="NAME=VALUE", help="steer the thought toward it (repeat to compose)")
    g.add_argument("--scale", action="append", metavar="S|NAME=S", help="guidance scale, for every attribute or one")
    g.add_argument("--n", type=int, default=5, help="continuations (default 5)")
    steps, alpha2 = config_default(StarSamplingConfig, "steps"), config_default(StarSamplingConfig, "inference_alpha2")
    g.add_argument("--steps", type=int, default=steps, help=f"denoising steps of a thought (default {steps})")
    g.add_argument("--alpha2", type=float, default=alpha2, help=f"the plan is re-noised to this alpha^2 (default {alpha2})")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.set_defaults(func=cmd_star_generate)
