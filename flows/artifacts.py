"""Artifacts a person looks at rather than reads: PNG charts, tables, and links to outputs.

Charts are rendered with matplotlib (Agg, no display) and published as Prefect image artifacts whose
URL is the PNG itself as a ``data:`` URI, so the UI shows them without any file server. Training and
evaluation flows use :func:`line_chart_png` for loss curves and :func:`publish_png` to show them.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

MAX_BARS = 30  # a histogram wider than this is cut to the largest bars (the table artifact has them all)


def _render(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def bar_chart_png(counts: dict[str, int], title: str, xlabel: str = "count") -> bytes:
    """A horizontal bar chart of ``counts`` (largest first, at most MAX_BARS bars) as PNG bytes."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_BARS]
    fig, ax = _figure(7, 0.28 * max(len(items), 3) + 1)
    labels = [k for k, _ in items][::-1]
    ax.barh(labels, [v for _, v in items][::-1], color="#3b6fb6")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    return _render(fig)


def line_chart_png(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step",
                   ylabel: str = "loss") -> bytes:
    """Line chart of named (x, y) series, e.g. training and holdout loss per step, as PNG bytes."""
    fig, ax = _figure(7, 4)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="." if len(points) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _render(fig)


def publish_png(png: bytes, key: str, description: str, save_to: str | None = None) -> str:
    """Show a PNG in the Prefect UI (image artifact ``key``); also write it to ``save_to`` when given.

    Returns the data URI the artifact points at.
    """
    if save_to:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        Path(save_to).write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    create_image_artifact(image_url=uri, key=key, description=description)
    return uri


def publish_links(links: dict[str, str], key: str) -> None:
    """One markdown artifact ``key`` linking each named output location (warehouse file, shard folders,
    report); local paths become file:// URLs."""
    lines = ["| output | location |", "|---|---|"]
    for name, location in links.items():
        url = location if "://" in location else Path(os.path.abspath(location)).as_uri()
        lines.append(f"| {name} | [{location}]({url}) |")
    create_markdown_artifact("\n".join(lines), key=key, description="Where this run's outputs are")


def publish_table(rows: list[dict], key: str, description: str) -> None:
    """A table artifact; an empty table gets one row saying so, so the UI never shows a blank."""
    create_table_artifact(rows or [{"(none)": "no rows"}], key=key, description=description)
