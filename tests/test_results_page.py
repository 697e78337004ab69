"""The results page: tables with mean ± std and their protocol, the plots, and a line for every report it lacks."""

import json

from tasks.results_page import render_results_page


def _lmlm_report(folder):
    (folder / "lmlm").mkdir(parents=True)
    phenomena = {p: {"mean": 0.8, "std": 0.02} for p in ("subject_verb_agreement", "punctuation")}
    variant = {"bios": {"responses": 60, "gamma": 10.0}, "edits": {"facts": 100, "latency_probes": 10},
               "minimal_pairs": {"pairs_per_draw": 400, "draws": 5, "by_phenomenon": phenomena}}
    report = {
        "seeds": [0, 1, 2],
        "rows": {"lmlm": {"label": "LMLM, oracle database", "workdir": str(folder)},
                 "standard": {"label": "standard", "workdir": str(folder)}},
        "comparison": [{"metric": "FActScore (visible text, all bios)", "lmlm": 0.7, "lmlm_std": 0.05,
                        "standard": 0.03, "standard_std": 0.01, "spread": "seeds", "n": 3}],
        "variants": {"lmlm": variant, "standard": variant},
    }
    (folder / "lmlm" / "evaluation-report.json").write_text(json.dumps(report))


def _diffusion_report(folder):
    folder.mkdir(parents=True)
    rows = [{"generator": "diffusion", "setting": "ddim 50 steps, CFG w=2.0", "mauve": 0.74, "mauve_std": 0.03,
             "class_accuracy": 0.6, "class_accuracy_std": 0.02},
            {"generator": "diffusion, CFG w=3", "setting": "ddim 50 steps, CFG w=3", "mauve": 0.55, "mauve_std": 0.04,
             "class_accuracy": 0.76, "class_accuracy_std": 0.03},
            {"generator": "held-out real text", "setting": "reference", "mauve": None, "class_accuracy": 0.93}]
    report = {"autoencoder": {"holdout": {"bleu": 91.3, "exact_match": 0.4, "bleu_reference": "original text, lower-cased"}},
              "evaluation": {"rows": rows, "spread": "draws (3) of 440 samples", "samples_per_draw": 440,
                             "reference_texts": 767, "class_mix": {"arts": 70, "law": 60}, "mauve_features": "standard LM"}}
    (folder / "report.json").write_text(json.dumps(report))


def test_the_page_has_every_table_with_its_spread_and_protocol_and_the_plots(tmp_path):
    _lmlm_report(tmp_path / "lmlm-work")
    _diffusion_report(tmp_path / "diffusion-work")
    page = render_results_page(lmlm=str(tmp_path / "lmlm-work"), diffusion=str(tmp_path / "diffusion-work"),
                               annotator=str(tmp_path / "nothing"), out_dir=str(tmp_path / "page"))
    md = (tmp_path / "page" / "results.md").read_text()
    assert "| FActScore (visible text, all bios) | 0.700 ± 0.050 | 0.030 ± 0.010 | seeds (3) |" in md
    assert "0.740 ± 0.030" in md and "equal counts and the held-out class mix" in md and "MAUVE features: standard LM" in md
    assert "lookup call is removed before facts are extracted" in md  # the protocol sits next to the table
    assert "No small-annotator figures" in md and page.sources["annotator"] is None
    assert {p.split("/")[-1] for p in page.images} == {"lmlm-minimal-pairs.png", "diffusion-guidance.png"}
    for image in page.images:
        assert open(image, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "page" / "results.html").read_text()
    assert html.count("<table>") == 2 and "<b>FActScore</b>" in html
    assert "data:image/png;base64," in page.markdown_inline  # the artifact carries its images


def test_a_page_without_any_report_says_what_to_run(tmp_path):
    page = render_results_page(lmlm=None, diffusion=str(tmp_path), annotator=None, out_dir=str(tmp_path / "page"))
    md = open(page.markdown_path).read()
    assert "make demo-lmlm" in md and "make demo-diffusion" in md and "lmlm pipeline" in md and page.images == []


def test_lmlm_report_renders_the_page_and_publishes_it_as_an_artifact(tmp_path, prefect_harness, capsys):
    from prefect.client.orchestration import get_client

    from flows.cli import main

    _diffusion_report(tmp_path / "diffusion-work")
    assert main(["report", "--lmlm", str(tmp_path / "none"), "--diffusion", str(tmp_path / "diffusion-work"),
                 "--out", str(tmp_path / "page")]) == 0
    out = capsys.readouterr().out
    assert f"diffusion: {tmp_path / 'diffusion-work' / 'report.json'}" in out and "(no report found)" in out
    assert (tmp_path / "page" / "results.html").is_file()
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "results-page" and "0.740 ± 0.030" in (a.data or "") for a in artifact)
