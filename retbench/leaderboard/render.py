"""Rendering a built board as GitHub markdown, HTML and CSV (pure functions of the board)."""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import jinja2
import numpy as np
from markupsafe import Markup
from tabulate import tabulate

from retbench import resampling as rs
from retbench import stats
from retbench.leaderboard.board import MEAN, UNITS, Board, best_value


@dataclass
class Shown:
    """A cell broken into the parts the three renderers lay out differently."""

    value: str
    bold: bool = False
    underline: bool = False
    delta: str = ""
    stars: str = ""
    ci: str = ""


def shown_cell(board: Board, model: str, column: str) -> Shown | None:
    """Formatted parts of one cell (None where the model has no value)."""
    c = board.cell(model, column)
    if c is None or not np.isfinite(c.mean):
        return None
    best = best_value(board, column)
    ref = board.reference_of.get(column)
    best_base = best_value(board, column, board.baselines) if board.baselines else None
    out = Shown(_f3(c.mean), bold=best is not None and round(c.mean, 3) == best,
                underline=model in board.baselines and best_base is not None and round(c.mean, 3) == best_base)
    if c.low is not None and c.high is not None:
        out.ci = f"[{_f3(c.low)}, {_f3(c.high)}]"
    comp = board.comparisons.get((model, column))
    if comp is not None and ref is not None:
        out.delta = f"({_f3(comp.delta, sign=True)})"
        out.stars = stats.stars(comp.p_adjusted)
    return out


def _f3(x: float, sign: bool = False) -> str:
    """Three decimals, never "-0.000"."""
    value = round(float(x), 3) + 0.0
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def column_label(board: Board, column: str) -> tuple[str, str]:
    if column == MEAN:
        return "mean", f"over {_tasks(len(board.tasks))}"
    k = board.k_of.get(column)
    return column, board.metric_of[column] + (f", k={k}" if k is not None else "")


def _tasks(n: int) -> str:
    return f"{n} task" + ("s" if n != 1 else "")


def _markdown_cell(s: Shown | None) -> str:
    if s is None:
        return "–"
    value = s.value
    if s.underline:
        value = f"<u>{value}</u>"
    if s.bold:
        value = f"**{value}**"
    text = value
    if s.delta:
        text += f" {s.delta}"
    if s.stars:
        text += "<sup>" + s.stars.replace("*", "\\*") + "</sup>"
    if s.ci:
        text += f"<br>{s.ci}"
    return text


def _model_label(board: Board, model: str) -> str:
    return f"`{model}`" + (" (baseline)" if model in board.baselines else "")


def render_table(board: Board) -> str:
    """The GitHub-markdown table: models × tasks + mean."""
    header = ["model"] + ["{}<br>{}".format(*column_label(board, c)) for c in board.columns]
    rows = [[_model_label(board, m)] + [_markdown_cell(shown_cell(board, m, c)) for c in board.columns]
            for m in board.models]
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def _metric_phrase(board: Board) -> str:
    listed = ", ".join(f"`{n}`" for n in sorted(set(board.metric_of.values())))
    return f"each task's primary metric ({listed})" if board.requested_metric is None else listed


def _runs_phrase(board: Board) -> str:
    per_task = {t: max(c.n_runs for (m, tt), c in board.cells.items() if tt == t) for t in board.tasks}
    counts = sorted(per_task.values())
    usual = max(set(counts), key=lambda n: (counts.count(n), n))
    text = f"{usual} runs per cell" if usual != 1 else "1 run per cell"
    others = sorted({n for n in counts if n != usual})
    for n in others:
        text += f"; {n} for " + ", ".join(t for t in board.tasks if per_task[t] == n)
    if any(k is not None for k in board.k_of.values()):
        text += (", at the k shown in the column header (the largest k run on the task; the curves figure shows "
                 "every k)")
    return text


FINETUNE_RUNS = ("its runs (seeds) each train the network again: a seed re-initialises the head and re-draws data order, "
                 "augmentations and (without a given val split) the validation carve, all scored on one test set; with "
                 "one seed the interval holds only the test patients' sampling error")

RUNS_MEANING = {
    "linear_probe": "its runs (seeds) differ only in the validation carve that picks C, so they share one test set "
                    "and are not replicates of it",
    "linear_probe.retfound": "its runs (seeds) differ only in the validation carve that picks C, so they share one "
                             "test set and are not replicates of it",
    "few_shot": "its runs (seeds) draw different support sets and are real replicates of support-set sampling, all "
                "scored on one test set",
    "zero_shot": "nothing is fitted: one run",
    "linear_probe.flair": "its runs are FLAIR's folds, each with its own test set",
    "linear_probe.flair_grouped": "its runs are folds, each with its own test set",
    "vqa.probe": "its runs (seeds) differ only in the validation carve that picks C, so they share one test set "
                 "and are not replicates of it",
    "vqa.zero_shot": "nothing is fitted: one run",
    "finetune": FINETUNE_RUNS,
    "finetune.head": FINETUNE_RUNS,
    "finetune.lora": FINETUNE_RUNS,
}


def _units_phrase(board: Board) -> str:
    units = sorted({c.interval.unit for c in board.cells.values() if c.interval is not None})
    by_unit = {u: sorted({t for (m, t), c in board.cells.items() if c.interval is not None and c.interval.unit == u})
               for u in units}
    parts = []
    if "patient" in by_unit:
        parts.append(f"patients ({', '.join(by_unit['patient'])}: both eyes and every image of a person move together)")
    if "image" in by_unit:
        parts.append(f"images where no patient id exists ({', '.join(by_unit['image'])})")
    return " and ".join(parts)


def _ci_phrase(board: Board) -> str:
    methods = {c.ci_method for (m, t), c in board.cells.items() if t != MEAN}
    parts = []
    if "bootstrap" in methods:
        runs = RUNS_MEANING.get(board.protocol, "its runs are resampled with the test units")
        parts.append(f"percentile bootstrap ({board.resamples} resamples, a fixed seed per task) over test "
                     f"{_units_phrase(board)}, each replicate also resampling the runs with replacement and averaging "
                     f"them ({board.protocol}: {runs}); point and interval come from the same stored predictions")
    if "stored" in methods:
        parts.append("for results without stored class predictions (retrieval, VQA), the interval stored with the "
                     f"result, {_stored_phrase(board)}")
    return "; ".join(parts) or "none"


def _stored_phrase(board: Board) -> str:
    """What the stored intervals resampled, per task, from the results' ``ci_method`` (:func:`resampling.ci_over`)."""
    methods = {(task, cell.stored_method) for (_, task), cell in board.cells.items() if cell.ci_method == "stored"}
    if not all(rs.ci_over(method) != method for _, method in methods):  # not all read back: say them whole
        return "as its `ci_method` records it (" + ", ".join(f"{t}: {m or 'not recorded'}" for t, m in sorted(methods)) + ")"
    by_task: dict[str, set[str]] = {}
    for task, method in methods:
        by_task.setdefault(task, set()).add(rs.ci_over(method))
    units = ", ".join(f"{task}: {' / '.join(sorted(phrases))}" for task, phrases in sorted(by_task.items()))
    gallery = (", each replicate scoring the drawn units' queries against the fixed gallery"
               if board.protocol.startswith("retrieval") else "")
    return f"a percentile bootstrap over test units ({units}){gallery}"


def footnotes(board: Board) -> list[str]:
    """The paragraphs under the table: what the cells are, the marks, the test, correction and n."""
    mean_ci = ("its CI is the percentile interval of the mean of the tasks' bootstrap replicates (tasks resampled "
               "independently; with one task it is that task's interval)"
               if any(c.ci_method == "bootstrap" for (m, t), c in board.cells.items() if t == MEAN)
               else "no CI (some task has no bootstrap replicates)")
    notes = [
        f"Each cell: mean of {_metric_phrase(board)} over the runs ({_runs_phrase(board)}); 95% CI in brackets: "
        f"{_ci_phrase(board)}. Mean column: unweighted mean over the {_tasks(len(board.tasks))}, for models with every "
        f"task; {mean_ci}."
    ]
    directions = {board.higher[t] for t in board.tasks}
    direction = ("higher is better for every metric shown" if directions == {True} else
                 "lower is better for every metric shown" if directions == {False} else "direction per metric")
    marks = f"**Bold**: best in the column ({direction}; ties at the shown precision all bold)."
    if board.baselines:
        marks += (" <u>Underlined</u>: best baseline in the column (baseline" + ("s" if len(board.baselines) > 1 else "")
                  + ": " + ", ".join(f"`{b}`" for b in board.baselines) + ").")
    notes.append(marks)
    notes.append(_significance_note(board))
    notes.append("Generated by `retbench leaderboard` from the result store; task versions: "
                 + ", ".join(f"{t} v{v}" for t, v in board.versions) + ".")
    return notes


def _n_phrase(ns: Sequence[int], unit: str) -> str:
    values = sorted(set(ns))
    return f"n = {'–'.join(map(str, [values[0], values[-1]])) if len(values) > 1 else values[0]} {unit}"


def _significance_note(board: Board) -> str:
    corr = stats.correction_name(board.correction)
    if not board.baselines:
        missing = [b for b in board.requested_baselines if b not in board.baselines]
        why = (f"the baseline{'s' if len(missing) > 1 else ''} {', '.join(f'`{b}`' for b in missing)} "
               f"{'have' if len(missing) > 1 else 'has'} no results under `{board.protocol}`" if missing
               else "no baseline was given (`retbench leaderboard --baseline MODEL`)")
        return (f"Significance: {why}, so no deltas, underlines or stars. With a baseline, each model is compared with "
                "the best baseline of each column: per task by a paired bootstrap of the difference over the same "
                "resampled test patients and runs (DeLong's test for a binary AUROC of single runs); for the mean, by "
                f"a Wilcoxon signed-rank test over the task means; {corr}-corrected over the models compared.")
    comps = list(board.comparisons.values())
    n_compared = {col: sum(1 for c in comps if c.column == col) for col in board.columns}
    sizes = sorted(set(n_compared.values()) - {0})
    text = ("(±Δ): difference from the column's best baseline (model − baseline). "
            "<sup>\\*</sup> p < 0.01, <sup>\\*\\*</sup> p < 0.001, two-sided, "
            f"{corr}-adjusted over the {'/'.join(map(str, sizes)) or 0} model{'s' if sizes != [1] else ''} "
            "compared with the baseline in each column.")
    boot = sorted({c.column for c in comps if c.test == "bootstrap"})
    if boot:
        units = sorted({c.unit for c in comps if c.test == "bootstrap"})
        text += (" Per task: paired bootstrap of the difference, both models scored on the same resampled test "
                 f"{' / '.join(u + 's' for u in units)} and the same resampled runs (paired by seed"
                 f"{' and k' if any(k is not None for k in board.k_of.values()) else ''}; {board.resamples} resamples); "
                 "p is twice the smaller share of replicates on either side of zero, counted with +1, so it "
                 f"cannot go below {2 / (board.resamples + 1):.2g}"
                 + (" (no double star is possible per task)" if 2 / (board.resamples + 1) >= 0.001 else "") + ".")
    delong = sorted({c.column for c in comps if c.test == "delong"})
    if delong:
        text += f" Binary AUROC of single runs ({', '.join(delong)}): DeLong's test for correlated ROC curves."
    run_w = sorted({c.column for c in comps if c.test == "wilcoxon" and c.column != MEAN})
    if run_w:
        text += (f" Tasks without stored class predictions ({', '.join(run_w)}): Wilcoxon signed-rank test over runs "
                 "paired by seed (runs on one test set: this ignores test-set sampling).")
    mean_w = [c.n for c in comps if c.test == "wilcoxon" and c.column == MEAN]
    if mean_w:
        small = min(mean_w)
        text += (" Mean column: Wilcoxon signed-rank test (scipy) over the task means, "
                 f"{_n_phrase(mean_w, 'tasks')}: tasks are the independent units, the runs of one task are not; with "
                 f"{small} tasks the smallest attainable two-sided p is {stats.min_wilcoxon_p(small):.4g}"
                 + (", so no star is possible in this column" if stats.min_wilcoxon_p(small) >= 0.01 else "") + ".")
    return text


def _paired_header(board: Board) -> list[str]:
    corr = stats.correction_name(board.correction)
    return ["model", "baseline", "pairing", "n", "wins/ties/losses", "median Δ", "W", "p", f"p ({corr})", "r"]


def _paired_rows(board: Board) -> list[list[str]]:
    """One row of formatted values per paired test (plain text: each renderer marks it up)."""
    rows = []
    for r in board.paired:
        w = r.result
        rows.append([r.model, r.baseline, dict(UNITS)[r.unit], str(w.n), f"{w.wins}/{w.ties}/{w.losses}",
                     _f3(w.median_difference, sign=True), f"{w.statistic:g}", _fmt_p(w.p_value), _fmt_p(r.p_adjusted),
                     f"{w.effect_size:+.2f}"])
    return rows


def _paired_markdown(board: Board) -> list[str]:
    if not board.paired:
        return []
    corr = stats.correction_name(board.correction)
    rows = [[f"`{model}`", f"`{baseline}`", *rest] for model, baseline, *rest in _paired_rows(board)]
    header = _paired_header(board)
    return [
        "## Paired comparisons with the baselines",
        "",
        "Two-sided Wilcoxon signed-rank tests (scipy) of each model against each baseline. Δ is oriented so that positive "
        "means the model is better; W is scipy's statistic (the smaller signed-rank sum); r is the matched-pairs "
        f"rank-biserial correlation (effect size, −1 … 1, positive: the model is better); p is {corr}-adjusted over the "
        "models compared with the same baseline under the same pairing. The pairs are the task means: tasks are the "
        "independent units (with n tasks the smallest two-sided p is 2/2ⁿ). Runs are paired across tasks (task × fold) "
        "only where every run has its own test set (cross-validation folds); runs that share one test set share its "
        "sampling error and are not independent pairs.",
        "",
        tabulate(rows, headers=header, tablefmt="github", disable_numparse=True),
        "",
    ]


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _title(board: Board) -> str:
    return f"Leaderboard — `{board.protocol}`"


def summary_line(board: Board) -> str:
    base = (", baseline" + ("s " if len(board.baselines) > 1 else " ") + ", ".join(f"`{b}`" for b in board.baselines)
            if board.baselines else "")
    models, tasks = len(board.models), len(board.tasks)
    return f"{models} model{'s' if models != 1 else ''} × {tasks} task{'s' if tasks != 1 else ''}{base}."


def render_markdown(board: Board) -> str:
    """The complete markdown document for one protocol."""
    lines = [f"# {_title(board)}", "", summary_line(board), "", render_table(board), ""]
    for note in footnotes(board):
        lines += [note, ""]
    lines += _paired_markdown(board)
    if board.figures:
        lines += ["## Figures", ""]
        for caption, rel in board.figures:
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    lines.append(f"Also as [CSV]({board.protocol}.csv) and a [standalone HTML page]({board.protocol}.html).")
    lines.append("")
    return "\n".join(lines)


_ALLOWED_TAGS = ("u", "sup", "br")


def markdown_inline_to_html(text: str) -> str:
    """Convert the markdown subset used in footnotes to HTML: `code`, **bold**, escaped stars, <u>, <sup>, <br>."""
    out = html.escape(text, quote=False)
    for tag in _ALLOWED_TAGS:
        out = out.replace(f"&lt;{tag}&gt;", f"<{tag}>").replace(f"&lt;/{tag}&gt;", f"</{tag}>")
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return out.replace("\\*", "*")


@cache
def _html_template() -> jinja2.Template:
    """``templates/leaderboard.html``: every value it prints is escaped as :func:`html.escape` does, unless Markup."""

    def escaped(value: object) -> Markup:
        return value if isinstance(value, Markup) else Markup(html.escape(str(value)))

    env = jinja2.Environment(loader=jinja2.PackageLoader("retbench.leaderboard", "templates"), autoescape=True,
                             finalize=escaped, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("leaderboard.html")


def render_html(board: Board) -> str:
    """A standalone HTML page with the same table, notes, paired tests and figures."""
    return _html_template().render(
        protocol=board.protocol, heading=Markup(markdown_inline_to_html(_title(board))),
        summary=Markup(markdown_inline_to_html(summary_line(board))),
        columns=[column_label(board, c) for c in board.columns],
        rows=[{"model": m, "baseline": m in board.baselines, "cells": [shown_cell(board, m, c) for c in board.columns]}
              for m in board.models],
        notes=[Markup(markdown_inline_to_html(n)) for n in footnotes(board)],
        correction=stats.correction_name(board.correction), paired_header=_paired_header(board),
        paired=_paired_rows(board), figures=board.figures,
    )


CSV_COLUMNS = ["protocol", "model", "is_baseline", "task", "metric", "k", "mean", "ci_low", "ci_high", "se", "n_runs",
               "ci_method", "best", "best_baseline", "reference", "delta", "test", "n_pairs", "p_value", "p_adjusted",
               "stars"]


def _num(x: float | None) -> str:
    return "" if x is None or not np.isfinite(x) else format(float(x), ".10g")


def render_csv(board: Board) -> str:
    """One row per (model, column): the numbers behind the table, unformatted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in board.models:
        for column in board.columns:
            c = board.cell(m, column)
            if c is None:
                continue
            s = shown_cell(board, m, column)
            comp = board.comparisons.get((m, column))
            writer.writerow([
                board.protocol, m, int(m in board.baselines), column,
                board.metric_of.get(column, "mean of the task metrics"), "" if c.k is None else c.k,
                _num(c.mean), _num(c.low), _num(c.high), _num(c.se), c.n_runs, c.ci_method,
                int(bool(s and s.bold)), int(bool(s and s.underline)), comp.reference if comp else "",
                _num(comp.delta) if comp else "", comp.test if comp else "", comp.n if comp and comp.test else "",
                _num(comp.p_value) if comp else "", _num(comp.p_adjusted) if comp else "",
                stats.stars(comp.p_adjusted) if comp else "",
            ])
    return buf.getvalue()
