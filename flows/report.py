"""The results page as a flow: the newest LMLM, latent-diffusion and annotator reports rendered into one Markdown
and HTML page (``tasks/results_page.py``) and published as the Prefect artifact ``results-page``. ``lmlm report``
runs it; the evaluation flows run it at their end with their own report as the newest."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import publish_links
from flows.stages import render_results_page_task
from schemas.configs import ResultsPageConfig


@flow(name="results-report")
def results_report(config: ResultsPageConfig = ResultsPageConfig()) -> dict:
    """Render the results page from the reports under ``config``'s folders; publish it as an artifact."""
    page = render_results_page_task(lmlm=config.lmlm, diffusion=config.diffusion, annotator=config.annotator,
                                    out_dir=config.out_dir)
    create_markdown_artifact(page.markdown_inline, key="results-page",
                             description="Every evaluation figure with its protocol (lmlm report)")
    publish_links({"results.md": page.markdown_path, "results.html": page.html_path}, key="results-page-files")
    found = [k for k, v in page.sources.items() if v]
    get_run_logger().info("results page %s from the %s report(s)", page.markdown_path, ", ".join(found) or "no")
    return page.model_dump(exclude={"markdown_inline"})
