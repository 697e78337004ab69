"""The results page: the latest evaluation reports (LMLM, latent diffusion, small annotator) rendered into one
Markdown and one HTML page with their tables, each with its protocol beside it, and the plots (loss curves, the
guidance trade-off, minimal pairs per phenomenon).

Inputs are the folders the flows write (or their report files): an LMLM workdir (``<workdir>/lmlm/evaluation-
report.json``), a latent-diffusion workdir (``report.json``), a corpus-run workdir with the small-annotator
stages (``report.json``). A missing one becomes a line saying so, never an error: the page shows what exists.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from schemas.reports import ResultsPage


# ----------------------------------------------------------------------------- a tiny document model


@dataclass
class _Page:
    """Blocks rendered both to Markdown and to HTML: ("h", level, text), ("p", text), ("table", head, rows),
    ("img", file, caption). Text is Markdown-light: **bold** and `code` only."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", head, rows))

    def img(self, file: str, caption: str) -> None:
        self.blocks.append(("img", file, caption))

    def markdown(self, image_url=lambda f: f) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("\n".join(["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1]),
                                      *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b[2])]))
            else:
                out.append(f"![{b[2]}]({image_url(b[1])})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:
            import re

            text = html.escape(text)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                body.append(f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}">'
                            f"<figcaption>{inline(b[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
                 "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:46em}"
                 "code{background:#f4f4f4}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ----------------------------------------------------------------------------- inputs


def _load(path: str | None, *candidates: str) -> tuple[dict | None, str | None]:
    """(report, its file) of the first candidate file under ``path`` (or ``path`` itself) that exists."""
    if not path:
        return None, None
    for name in ("", *candidates):
        file = os.path.join(path, name) if name else path
        if os.path.isfile(file):
            try:
                return json.loads(Path(file).read_text()), file
            except json.JSONDecodeError:
                return None, file
    return None, None


def format_estimate(x, std=None, digits: int = 3, missing: str = "–") -> str:
    """A figure as the tables print it: "0.722 ± 0.010" with a standard deviation, "0.722" without one."""
    if x is None:
        return missing
    text = f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)
    return text if std is None else f"{text} ± {std:.{digits}f}"



def _copy(src: str | None, out_dir: str, name: str) -> str | None:
    if src and os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
        return name
    return None


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _save(plt, fig, page: _Page, out_dir: str, name: str, caption: str) -> str:
    """Write the figure as ``name`` next to the page and show it there; returns the name."""
    fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
    plt.close(fig)
    page.img(name, caption)
    return name


# ----------------------------------------------------------------------------- sections


def _lmlm_section(page: _Page, report: dict, file: str, out_dir: str) -> list[str]:
    images = []
    rows, labels = report["comparison"], {k: r["label"] for k, r in report.get("rows", {}).items()}
    columns = list(report["variants"])
    seeds = report.get("seeds", [0])
    first = report["variants"][columns[0]]
    bios = first.get("bios", {})
    page.h(2, "LMLM vs standard model")
    page.p(f"From `{file}`. {len(seeds)} training seed(s) ({', '.join(map(str, seeds))}): figures are the **mean ± "
           "standard deviation over the seeds** (with one seed, the minimal pairs' ± is over their draws and the "
           "others have none; the last column says which).")
    page.table(["metric", *(labels.get(c, c) for c in columns), "±"],
               [[r["metric"], *(format_estimate(r.get(c), r.get(f"{c}_std")) for c in columns),
                 f"{r['spread']} ({r['n']})" if r.get("spread") else ""] for r in rows])
    mp = first.get("minimal_pairs", {})
    edits = first.get("edits", {})
    notes = [
        f"**FActScore** (the LMLM paper's protocol): {bios.get('responses', '?')} bios per model (\"Tell me a bio of X. "
        "X is\", greedy, people whose biography was trained on); every lookup call is removed before facts are "
        "extracted, so only the visible text is scored, by the same judge for every model (each sentence matched "
        "against the corpus's sentence templates, checked against the ground truth). The mean is over all bios: "
        f"a bio stating no fact scores 0. Length penalty x exp(1 - {bios.get('gamma', 10):g}/n) below "
        f"{bios.get('gamma', 10):g} facts.",
        "**Lookup precision**: share of the calls a model wrote in its bios whose key fetched a true fact about the "
        "subject. **Copied correctly**: share of the calls that fetched a value after which the visible text states "
        "that value.",
        f"**Edits**: {edits.get('facts', '?')} facts set to another value of their relation, then deleted, in a copy "
        "of the warehouse, with no retraining; the same cloze probes run for every model, over the facts it produced "
        "before. A model that reads no database cannot be edited without retraining: its row is what it produced. "
        f"Latency: {edits.get('latency_probes', '?')} facts edited one at a time, warehouse write -> lookup database "
        "refresh -> the next generation of that fact's probe.",
        f"**Minimal pairs**: {mp.get('pairs_per_draw', '?')} pairs per draw x {mp.get('draws', '?')} draws (subject-"
        "verb agreement, pronoun-antecedent agreement, punctuation, common knowledge), built from templates over the "
        "corpus vocabulary with names no document uses, none found in the training text; a pair counts when the "
        "model gives the good sentence the higher log-probability (plain text, no lookups).",
    ]
    for key, r in report.get("rows", {}).items():
        notes.append(f"**{r['label']}**: trained on and looking up in `{r['workdir']}`" + (
            " (every document annotated from the ground-truth KB by the KB aligner: an oracle database)."
            if key == "lmlm" else "." if key != "lmlm-pipeline" else
            " (the pipeline's own annotators; see the annotator section)."))
    for n in notes:
        page.p(n)
    loss = _copy(os.path.join(os.path.dirname(file), "loss_curves.png"), out_dir, "lmlm-loss-curves.png")
    if loss:
        page.img(loss, "LMLM and standard model: training and holdout loss (first seed)")
        images.append(loss)
    if mp.get("by_phenomenon"):
        plt, fig, ax = _figure(7, 3.6)
        phenomena = list(mp["by_phenomenon"])
        width = 0.8 / len(columns)
        for i, c in enumerate(columns):
            by = report["variants"][c].get("minimal_pairs", {}).get("by_phenomenon", {})
            means = [by.get(p, {}).get("mean", 0) for p in phenomena]
            stds = [by.get(p, {}).get("std", 0) for p in phenomena]
            ax.bar([k + i * width for k in range(len(phenomena))], means, width, yerr=stds, capsize=3,
                   label=labels.get(c, c))
        ax.set_xticks([k + width * (len(columns) - 1) / 2 for k in range(len(phenomena))],
                      [p.replace("_", " ").replace("agreement", "agr.") for p in phenomena], fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel("pairs where the good sentence wins")
        ax.legend(fontsize=8)
        images.append(_save(plt, fig, page, out_dir, "lmlm-minimal-pairs.png",
                            "Minimal pairs per phenomenon, plain text, first seed (± over draws); dashed: chance"))
    return images


def _diffusion_section(page: _Page, report: dict, file: str, out_dir: str) -> list[str]:
    images = []
    ev = report.get("evaluation")
    page.h(2, "Latent diffusion (LD4LG)")
    a = report.get("autoencoder", {})
    hold = a.get("holdout", {})
    page.p(f"From `{file}`. Autoencoder: held-out reconstruction BLEU **{format_estimate(hold.get('bleu'), digits=2)}** "
           f"against the {hold.get('bleu_reference', 'held-out texts')} (exact match {format_estimate(hold.get('exact_match'))}; "
           f"against the texts as the encoder's vocabulary spells them: {format_estimate(hold.get('bleu_vocabulary'), digits=2)}).")
    if not ev:
        page.p("No evaluation in this report.")
        return images
    cols = [("generator", "generator"), ("setting", "setting"), ("mauve", "MAUVE"), ("class_accuracy", "class accuracy"),
            ("diversity", "diversity"), ("memorised_train_4grams", "memorised 4-grams"), ("perplexity", "perplexity")]
    page.table([c[1] for c in cols], [[format_estimate(r.get(k), r.get(f"{k}_std")) if k not in ("generator", "setting")
                                       else str(r.get(k)) for k, _ in cols] for r in ev["rows"]])
    mix = ev.get("class_mix", {})
    page.p(f"Mean ± standard deviation over {ev.get('spread', 'draws')}. Each draw takes {ev.get('samples_per_draw')} "
           f"of the {ev.get('reference_texts')} held-out texts (seeded) and every generator samples one text per drawn "
           "text, of that text's class: equal counts and the held-out class mix "
           f"({', '.join(f'{k} {v}' for k, v in mix.items())}). MAUVE features: {ev.get('mauve_features')}. Class "
           "accuracy: a tf-idf logistic-regression judge trained on the training texts; unconditional rows are "
           "scored against the drawn classes (chance). Perplexity under the reference LM, on lower-cased text.")
    guided = [r for r in ev["rows"] if r["generator"].startswith("diffusion") and "CFG w=" in r.get("setting", "")]
    if guided and all(r.get("class_accuracy") is not None for r in guided):
        plt, fig, ax = _figure(6.5, 4)
        for r in ev["rows"]:
            if r.get("mauve") is None or r.get("class_accuracy") is None:
                continue
            marker = "o" if r in guided else "s"
            ax.errorbar(r["class_accuracy"], r["mauve"], xerr=r.get("class_accuracy_std") or 0,
                        yerr=r.get("mauve_std") or 0, fmt=marker, capsize=3)
            label = r["setting"].split(", ")[-1] if r in guided else r["generator"]
            ax.annotate(label, (r["class_accuracy"], r["mauve"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("class accuracy")
        ax.set_ylabel("MAUVE")
        ax.set_title("guidance trade-off: fluency (MAUVE) vs class")
        ax.grid(alpha=0.3)
        images.append(_save(plt, fig, page, out_dir, "diffusion-guidance.png",
                            "Classifier-free guidance trades MAUVE for class accuracy (± over draws)"))
    loss = _copy(report.get("loss_curves_png"), out_dir, "diffusion-loss-curves.png")
    if loss:
        page.img(loss, "Autoencoder and diffusion training loss")
        images.append(loss)
    return images


def _annotator_section(page: _Page, report: dict, file: str, out_dir: str) -> list[str]:
    page.h(2, "Annotators")
    seed, ft, bulk = report.get("seed_annotation") or {}, report.get("finetune") or {}, report.get("bulk_annotation") or {}
    rows = []
    q = seed.get("quality_vs_gold") or {}
    if q:
        rows.append(["seed annotator vs gold (triplets)", format_estimate(q.get("precision")), format_estimate(q.get("recall")),
                     format_estimate(q.get("f1")), f"{seed.get('annotated', '?')} seed documents"])
    h = ft.get("holdout_quality") or {}
    if h:
        rows.append([f"small annotator ({ft.get('base')}, {format_estimate(ft.get('parameters'))} parameters) on held-out seed",
                     format_estimate(h.get("precision")), format_estimate(h.get("recall")), format_estimate(h.get("f1")),
                     f"{h.get('documents')} documents; {ft.get('steps')} steps, {ft.get('epochs')} epochs, "
                     f"{ft.get('train_seconds')} s"])
    b = bulk.get("quality_vs_gold") or {}
    if b:
        rows.append(["small annotator, bulk, vs gold", format_estimate(b.get("precision")), format_estimate(b.get("recall")),
                     format_estimate(b.get("f1")), f"{b.get('documents', '?')} documents not in the seed; {bulk.get('calls')} "
                     f"calls over {bulk.get('docs')} documents, {format_estimate(bulk.get('docs_per_s'), digits=2)} documents/s"])
    page.p(f"From `{file}`: the corpus run that built the pipeline database (seed annotator + corrector on a sample, "
           "the small annotator fine-tuned on it, bulk annotation of every document).")
    page.table(["annotator", "precision", "recall", "F1", "on"], rows or [["(no annotator figures in this report)", "", "", "", ""]])
    wh = report.get("warehouse_load") or {}
    if wh:
        page.p(f"Warehouse: {format_estimate(wh.get('facts'))} facts from {format_estimate(wh.get('triplets'))} triplets.")
    curve = _copy(ft.get("curve_png"), out_dir, "annotator-training-curve.png")
    if curve:
        page.img(curve, "Small annotator: fine-tuning loss")
        return [curve]
    return []


def render_results_page(*, lmlm: str | None, diffusion: str | None, annotator: str | None, out_dir: str) -> ResultsPage:
    """Write ``results.md`` and ``results.html`` (and their PNGs) to ``out_dir`` from the reports found under the
    given folders; ``markdown_inline`` is the same page with the images embedded (for a Prefect artifact)."""
    os.makedirs(out_dir, exist_ok=True)
    page = _Page()
    page.h(1, "lmlm-pipeline: results")
    page.p(f"Rendered {time.strftime('%Y-%m-%d %H:%M')} by `lmlm report` from the newest evaluation reports. Every "
           "figure is measured; its protocol is next to its table.")
    sources: dict[str, str | None] = {}
    images: list[str] = []
    lm_report, lm_file = _load(lmlm, os.path.join("lmlm", "evaluation-report.json"), "evaluation-report.json")
    an_report, an_file = _load(annotator, "report.json")
    sources["lmlm"], sources["annotator"] = lm_file, an_file
    if lm_report:
        images += _lmlm_section(page, lm_report, lm_file, out_dir)
    else:
        page.h(2, "LMLM vs standard model")
        page.p(f"No LMLM evaluation report under `{lmlm}` (run `make demo-lmlm` or `lmlm lmlm evaluate`).")
    dm_report, dm_file = _load(diffusion, "report.json")
    sources["diffusion"] = dm_file
    if dm_report:
        images += _diffusion_section(page, dm_report, dm_file, out_dir)
    else:
        page.h(2, "Latent diffusion (LD4LG)")
        page.p(f"No latent-diffusion report under `{diffusion}` (run `make demo-diffusion`).")
    if an_report and (an_report.get("finetune") or an_report.get("bulk_annotation")):
        images += _annotator_section(page, an_report, an_file, out_dir)
    else:
        page.h(2, "Annotators")
        page.p(f"No small-annotator figures under `{annotator}` (run `lmlm pipeline`).")
    md_path, html_path = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.html")
    Path(md_path).write_text(page.markdown())
    Path(html_path).write_text(page.html("lmlm-pipeline: results"))

    def inline(name: str) -> str:
        return "data:image/png;base64," + base64.b64encode(Path(out_dir, name).read_bytes()).decode("ascii")

    return ResultsPage(markdown_path=os.path.abspath(md_path), html_path=os.path.abspath(html_path),
                       images=[os.path.abspath(os.path.join(out_dir, i)) for i in images], sources=sources,
                       markdown_inline=page.markdown(image_url=inline))
