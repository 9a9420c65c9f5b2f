"""What people look at after scoring: OTB-style success / precision plots, a markdown report, a console table.

Input everywhere is the scores: a list of ``metrics.VideoScore`` (per-video rows, overall rows or both) or a
scores table (``metrics.scores_table`` / ``scores.parquet``). Methods without an overall row are averaged here
with ``metrics.summarise``. Plots are drawn with matplotlib's object API on the Agg canvas (no display, no
pyplot global state) into memory, then written atomically through ``storage``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rolo_batch import console, metrics, storage
from rolo_batch.errors import InputError
from rolo_batch.metrics import VideoScore

SUCCESS_PNG = "success.png"
PRECISION_PNG = "precision.png"
REPORT_MD = "report.md"
SUCCESS_TITLE = "Success plots of OPE"
PRECISION_TITLE = "Precision plots of OPE"
SUMMARY_COLUMNS = ("method", "videos", "frames", "success AUC", "precision@20", "norm. precision", "fps")
VIDEO_COLUMNS = ("video", "method", "frames", "success AUC", "precision@20", "norm. precision", "fps")
_LINE_STYLES = ("-", "--", "-.", ":")

Scores = Sequence[VideoScore] | pa.Table


@dataclass(frozen=True)
class ReportFiles:
    """URIs of what ``write_report`` wrote."""

    markdown: str
    success_png: str
    precision_png: str


def report_files(out_uri: str) -> ReportFiles:
    """Where ``write_report`` writes its files under ``out_uri``."""
    return ReportFiles(markdown=storage.join(out_uri, REPORT_MD), success_png=storage.join(out_uri, SUCCESS_PNG),
                       precision_png=storage.join(out_uri, PRECISION_PNG))


@dataclass(frozen=True)
class _Split:
    per_video: list[VideoScore]
    overall: list[VideoScore]
    protocol: metrics.Protocol


def _split(scores: Scores) -> _Split:
    """Per-video and overall rows; overall rows computed for methods that lack one."""
    rows = metrics.scores_from_table(scores) if isinstance(scores, pa.Table) else list(scores)
    if not rows:
        raise InputError("no scores to report")
    protocol = metrics.common_protocol(rows)
    per_video = [r for r in rows if not r.is_overall]
    overall = [r for r in rows if r.is_overall]
    have = {r.method for r in overall}
    missing = [r for r in per_video if r.method not in have]
    overall += metrics.summarise(missing) if missing else []
    return _Split(per_video, overall, protocol)


def _ranked(overall: list[VideoScore], key: Callable[[VideoScore], float]) -> list[VideoScore]:
    """Best first by ``key``; NaN scores last; ties by method name."""
    def order(score: VideoScore) -> tuple:
        value = key(score)
        return (math.isnan(value), -value if not math.isnan(value) else 0.0, score.method)
    return sorted(overall, key=order)


def legend_order(scores: Scores, plot: str) -> list[str]:
    """Methods in the order the legend of ``plot`` (``success`` or ``precision``) lists them: best first by
    success AUC or by precision at 20 px."""
    keys = {"success": lambda s: s.success_auc, "precision": lambda s: s.precision_20px}
    if plot not in keys:
        raise InputError(f"unknown plot {plot!r}; choose success or precision")
    return [s.method for s in _ranked(_split(scores).overall, keys[plot])]


# --- plots -----------------------------------------------------------------------------------------------

def _plot_png(curves: list[tuple[str, np.ndarray, np.ndarray, int]], title: str, xlabel: str, ylabel: str,
              legend_loc: str, xlim: tuple[float, float], dpi: int) -> bytes:
    """One OTB-style plot as PNG bytes. ``curves`` are (label, x (T,), y (T,), style) drawn and listed in the
    legend in the order given; ``style`` picks the colour and line style (the same method, the same look)."""
    figure = Figure(figsize=(6.0, 4.8), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, x, y, style in curves:
        axes.plot(x, y, linestyle=_LINE_STYLES[(style // 10) % len(_LINE_STYLES)], linewidth=2,
                  color=f"C{style % 10}", label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=xlim, ylim=(0.0, 1.01))
    axes.grid(True, linestyle=":", linewidth=0.8)
    if curves:
        axes.legend(loc=legend_loc, fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _styles(overall: list[VideoScore]) -> dict[str, int]:
    """Method -> style index, by method name, so a method looks the same in both plots."""
    return {method: index for index, method in enumerate(sorted({s.method for s in overall}))}


def success_plot_png(scores: Scores, dpi: int = 100) -> bytes:
    """The success plot of OPE (success rate vs IoU threshold), one curve per method, legend ordered by and
    labelled with the success AUC, e.g. ``rolo [0.612]``; PNG bytes."""
    split = _split(scores)
    x = np.asarray(split.protocol.iou_thresholds)
    styles = _styles(split.overall)
    curves = [(f"{s.method} [{s.success_auc:.3f}]", x, s.success_curve, styles[s.method])
              for s in _ranked(split.overall, lambda s: s.success_auc)]
    return _plot_png(curves, SUCCESS_TITLE, "Overlap threshold", "Success rate", "lower left", (0.0, 1.0), dpi)


def precision_plot_png(scores: Scores, dpi: int = 100) -> bytes:
    """The precision plot of OPE (precision vs centre-error threshold in pixels), one curve per method,
    legend ordered by and labelled with the precision at 20 px; PNG bytes."""
    split = _split(scores)
    x = np.asarray(split.protocol.error_thresholds_px)
    styles = _styles(split.overall)
    curves = [(f"{s.method} [{s.precision_20px:.3f}]", x, s.precision_curve, styles[s.method])
              for s in _ranked(split.overall, lambda s: s.precision_20px)]
    return _plot_png(curves, PRECISION_TITLE, "Location error threshold (pixels)", "Precision", "lower right",
                     (float(x[0]), float(x[-1])), dpi)


# --- tables ----------------------------------------------------------------------------------------------

def _row(score: VideoScore) -> dict:
    return {"video": score.video, "method": score.method, "videos": score.videos, "frames": score.frames,
            "success AUC": score.success_auc, "precision@20": score.precision_20px,
            "norm. precision": score.norm_precision, "fps": score.fps}


def summary_rows(scores: Scores) -> list[dict]:
    """One dict per method (keys ``SUMMARY_COLUMNS``), best success AUC first."""
    ranked = _ranked(_split(scores).overall, lambda s: s.success_auc)
    return [{k: _row(s)[k] for k in SUMMARY_COLUMNS} for s in ranked]


def video_rows(scores: Scores) -> list[dict]:
    """One dict per (video, method) (keys ``VIDEO_COLUMNS``), sorted by video then method."""
    rows = sorted(_split(scores).per_video, key=lambda s: (s.video, s.method))
    return [{k: _row(s)[k] for k in VIDEO_COLUMNS} for s in rows]


def summary_text(scores: Scores) -> str:
    """The per-method summary as an aligned plain-text table, for printing."""
    split = _split(scores)
    return f"protocol {split.protocol.tag}\n" + console.format_table(summary_rows(scores), SUMMARY_COLUMNS)


def report_markdown(scores: Scores, title: str = "Tracking report", success_png: str = SUCCESS_PNG,
                    precision_png: str = PRECISION_PNG) -> str:
    """``report.md``: protocol and conventions, per-method summary, the two plots (relative paths), and the
    per-video table."""
    split = _split(scores)
    conventions = "\n".join(f"- {line}" for line in metrics.conventions_text(split.protocol).splitlines())
    return "\n".join([
        f"# {title}", "",
        f"Scoring protocol: `{split.protocol.tag}`, one-pass evaluation (OPE). Conventions:", "",
        conventions, "",
        "## Summary (averaged over videos)", "",
        console.format_markdown_table(summary_rows(scores), SUMMARY_COLUMNS), "",
        "## Plots", "",
        f"![{SUCCESS_TITLE}]({success_png})", "",
        f"![{PRECISION_TITLE}]({precision_png})", "",
        "## Per video", "",
        console.format_markdown_table(video_rows(scores), VIDEO_COLUMNS), "",
    ])


def write_report(scores: Scores, out_uri: str, title: str = "Tracking report", dpi: int = 100) -> ReportFiles:
    """Write ``success.png``, ``precision.png`` and ``report.md`` under ``out_uri`` (local or ``s3://``),
    each atomically; the markdown is written last and embeds the plots by relative path."""
    split = _split(scores)
    rows = split.per_video + split.overall
    files = report_files(out_uri)
    storage.write_bytes(files.success_png, success_plot_png(rows, dpi))
    storage.write_bytes(files.precision_png, precision_plot_png(rows, dpi))
    storage.write_text(files.markdown, report_markdown(rows, title))
    return files
