"""The evaluation report: `reports/report.md` and `reports/report.html` from what
`evaluate_models` returns (the metrics dict and the per-example prediction rows).

Both hold the metric table (one column per model), the best and worst examples of the adapter
(by per-example rougeL, then exact match, ties by id) with the prompt, the reference and every
model's output; with a retain set, its scores (each model against the base's own answers) and
the retain answers the adapter changed most. The HTML adds bar charts drawn as inline SVG and
loads nothing: no script, no stylesheet or font from elsewhere, so it opens from disk with no
server and no network. The output depends only on the input (no timestamps), so an unchanged
evaluation rewrites the same bytes and DVC sees no change.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorapipe.config import EXAMPLES, RETAIN, VAL_EXAMPLES
from lorapipe.io import write_texts

SCORE_KEYS = ("exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum")
LOSS_KEYS = ("val_loss", "val_perplexity")
# metrics[RETAIN] ("retain"): {"examples", model: {"rougeL", "identical"}}, not a model
RETAIN_KEYS = ("retain_rougeL", "retain_identical")
LABELS = {
    "exact_match": "exact match",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "val_loss": "val loss",
    "val_perplexity": "val perplexity",
    "retain_rougeL": "retain ROUGE-L",
    "retain_identical": "retain identical",
}
FIRST_MODELS = ("base", "adapter")  # column order; any other model follows, by name
EXAMPLES_SHOWN = 5  # best and worst examples listed, each
CHANGED_SHOWN = 5  # retain answers the adapter changed most
MODEL_COLORS = {"base": "#9aa0a6", "adapter": "#1a73e8"}
OTHER_COLORS = ("#e37400", "#188038", "#a142f4", "#d93025")
TITLE = "Evaluation report"


def models_of(metrics: Mapping[str, Any]) -> list[str]:
    """The model names in `metrics` (the keys whose value is a dict): base, adapter, then others."""
    names = [k for k, v in metrics.items() if isinstance(v, Mapping) and k != RETAIN]
    return [m for m in FIRST_MODELS if m in names] + sorted(
        m for m in names if m not in FIRST_MODELS
    )


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """`(metric, {model: value or None})` for each known metric that any model has, in order."""
    models = models_of(metrics)
    retain = metrics.get(RETAIN, {})
    rows = []
    for key in (*SCORE_KEYS, *LOSS_KEYS, *RETAIN_KEYS):
        if key in RETAIN_KEYS:
            name = key.removeprefix("retain_")
            values = {m: retain.get(m, {}).get(name) for m in models}
        else:
            values = {m: metrics[m].get(key) for m in models}
        if any(v is not None for v in values.values()):
            rows.append((key, values))
    return rows


def fmt(value: float | None) -> str:
    """A metric value as shown in the report: 4 decimals, or an en dash when missing."""
    return "\u2013" if value is None else f"{value:.4f}"


def _delta(values: Mapping[str, float | None]) -> str:
    base, adapter = values.get("base"), values.get("adapter")
    if base is None or adapter is None:
        return "\u2013"
    return f"{adapter - base:+.4f}"


def focus_model(predictions: Sequence[Mapping[str, Any]]) -> str | None:
    """The model whose examples are ranked: `adapter` when scored, else the last scored one."""
    if not predictions:
        return None
    scored = list(predictions[0].get("scores", {}))
    if not scored:
        return None
    return "adapter" if "adapter" in scored else scored[-1]


def best_and_worst(
    predictions: Sequence[Mapping[str, Any]], model: str, n: int = EXAMPLES_SHOWN
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The `n` best and `n` worst rows for `model`: by its per-example rougeL, then exact
    match, ties broken by id (so the choice is deterministic)."""

    def key(row: Mapping[str, Any]) -> tuple[float, float]:
        s = row["scores"][model]
        return float(s.get("rougeL", 0.0)), float(s.get("exact_match", 0.0))

    best = sorted(predictions, key=lambda r: (-key(r)[0], -key(r)[1], str(r["id"])))[:n]
    worst = sorted(predictions, key=lambda r: (*key(r), str(r["id"])))[:n]
    return best, worst


def most_changed(
    rows: Sequence[Mapping[str, Any]], model: str, n: int = CHANGED_SHOWN
) -> list[Mapping[str, Any]]:
    """The `n` rows whose answer by `model` is furthest from the base's: lowest ROUGE-L, ties
    by id (deterministic); rows where the answer stayed identical are never shown."""
    changed = [r for r in rows if model in r["scores"] and not r["scores"][model]["identical"]]
    return sorted(changed, key=lambda r: (r["scores"][model]["rougeL"], str(r["id"])))[:n]


def visible(text: str) -> str:
    """`text` with control characters (other than newline and tab) and lone surrogates
    written as `\\xNN` / `\\uNNNN`, so the raw bytes of an untrained model's output show as
    text and keep the report valid UTF-8 and valid HTML."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _summary(metrics: Mapping[str, Any], model: str | None) -> list[str]:
    lines = [f"{metrics.get(EXAMPLES, 0)} test examples, generated by each model."]
    if VAL_EXAMPLES in metrics:
        lines.append(
            f"Validation loss: mean completion-only cross-entropy per token (prompt masked, as "
            f"in training) on {metrics[VAL_EXAMPLES]} validation examples; perplexity is "
            f"its exponential."
        )
    if model is not None:
        lines.append(
            f"Best and worst examples: by the {model}'s per-example ROUGE-L, then exact match "
            f"(ties by id)."
        )
    if RETAIN in metrics:
        lines.append(
            f"Retain: {metrics[RETAIN][EXAMPLES]} general instructions (data/retain, the eval "
            "part) answered greedily; each model's answers scored against the base model's own "
            "(ROUGE-L, and the share identical), so the base scores 1 by construction and a drop "
            "is what fine-tuning changed."
        )
    return lines


# --- Markdown ---------------------------------------------------------------------------------


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_block(label: str, text: str) -> list[str]:
    body = visible(text)
    fence = _fence(body)
    return [f"**{label}**", "", f"{fence}text", body, fence, ""]


def _md_scores(row: Mapping[str, Any], model: str) -> str:
    s = row["scores"].get(model, {})
    return f"ROUGE-L {fmt(s.get('rougeL'))}, exact match {fmt(s.get('exact_match'))}"


def _md_examples(
    title: str, rows: Iterable[Mapping[str, Any]], models: list[str], focus: str
) -> list[str]:
    out = [f"## {title}", ""]
    for k, row in enumerate(rows, start=1):
        out += [f"### {k}. `{row['id']}` ({focus}: {_md_scores(row, focus)})", ""]
        out += _md_block("Prompt", str(row["prompt"]))
        out += _md_block("Reference", str(row["reference"]))
        for m in models:
            if m in row:
                out += _md_block(f"{m} ({_md_scores(row, m)})", str(row[m]))
    return out


def _md_retain(rows: Sequence[Mapping[str, Any]], focus: str) -> list[str]:
    changed = most_changed(rows, focus)
    out = [f"## Retain answers the {focus} changed most", ""]
    for k, row in enumerate(changed, start=1):
        s = row["scores"][focus]
        out += [f"### {k}. `{row['id']}` ({focus}: retain ROUGE-L {fmt(s['rougeL'])})", ""]
        out += _md_block("Instruction", str(row["instruction"]))
        out += _md_block("base", str(row["base"]))
        out += _md_block(focus, str(row[focus]))
    return out if changed else [*out, "None: every answer stayed identical.", ""]


def render_markdown(
    metrics: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    retain_rows: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Markdown report: metric table (a row per metric, a column per model), then the
    best and worst examples of the adapter, then the retain answers it changed most."""
    models = models_of(metrics)
    focus = focus_model(predictions)
    with_delta = "base" in models and "adapter" in models
    out = [f"# {TITLE}", "", *_summary(metrics, focus), ""]
    out += ["## Metrics", ""]
    header = ["metric", *models] + (["adapter \u2212 base"] if with_delta else [])
    out.append("| " + " | ".join(header) + " |")
    out.append("| --- |" + " ---: |" * (len(header) - 1))
    for key, values in metric_rows(metrics):
        cells = [LABELS[key], *(fmt(values[m]) for m in models)]
        if with_delta:
            cells.append(_delta(values))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if focus is not None:
        example_models = [m for m in models if m in predictions[0]] or [focus]
        best, worst = best_and_worst(predictions, focus)
        out += _md_examples(f"Best {len(best)} examples", best, example_models, focus)
        out += _md_examples(f"Worst {len(worst)} examples", worst, example_models, focus)
        if retain_rows:
            out += _md_retain(retain_rows, focus)
    return "\n".join(out).rstrip("\n") + "\n"


# --- HTML -------------------------------------------------------------------------------------


def _e(text: str) -> str:
    return html.escape(visible(text), quote=True)


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value (1 for value <= 0)."""
    if value <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(value))
    return next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= value)


def bar_chart(
    title: str,
    keys: Sequence[str],
    models: Sequence[str],
    values: Mapping[str, Mapping[str, float | None]],
    y_max: float,
) -> str:
    """An inline SVG grouped bar chart: a group per metric in `keys`, a bar per model
    (`values[metric][model]`), a y axis from 0 to `y_max`, a legend and value labels."""
    width, height = 760, 320
    left, right, top, bottom = 56, 16, 40, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    group_w = plot_w / max(1, len(keys))
    bar_w = min(36.0, group_w * 0.8 / max(1, len(models)))
    others = iter(OTHER_COLORS * len(models))
    colors = {m: MODEL_COLORS.get(m) or next(others) for m in models}
    parts = [
        f'<svg viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_e(title)}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{_e(title)}</text>',
    ]
    for t in range(5):  # gridlines and y labels at 0, 1/4 ... y_max
        v = y_max * t / 4
        y = top + plot_h - plot_h * t / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
            f'stroke="#dadce0" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#5f6368">{v:g}</text>'
        )
    for g, key in enumerate(keys):
        x0 = left + g * group_w + (group_w - bar_w * len(models)) / 2
        for i, model in enumerate(models):
            value = values[key].get(model)
            if value is None:
                continue
            h = plot_h * max(0.0, min(value, y_max)) / y_max
            x, y = x0 + i * bar_w, top + plot_h - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                f'fill="{colors[model]}"><title>{_e(model)} {_e(LABELS.get(key, key))}: '
                f"{fmt(value)}</title></rect>"
            )
            label = f"{value:.2f}" if value < 1000 else f"{value:.3g}"
            parts.append(
                f'<text x="{x + (bar_w - 2) / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" '
                f'font-size="10" fill="#202124">{label}</text>'
            )
        parts.append(
            f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{top + plot_h + 18}" '
            f'text-anchor="middle">{_e(LABELS.get(key, key))}</text>'
        )
    for i, model in enumerate(models):  # legend, top right
        x = width - right - 110 * (len(models) - i)
        parts.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{colors[model]}"/>')
        parts.append(f'<text x="{x + 16}" y="18">{_e(model)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #202124; padding: 0 1rem; }
table.metrics { border-collapse: collapse; margin: 1rem 0; }
table.metrics th, table.metrics td { border: 1px solid #dadce0; padding: .3rem .8rem; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics th[scope=row] { text-align: left; font-weight: normal; }
section.example { border: 1px solid #dadce0; border-radius: 6px; padding: .5rem 1rem;
                  margin: .8rem 0; }
section.example h3 { font-size: 1rem; margin: .3rem 0; }
.pair { display: grid; grid-template-columns: 11rem 1fr; gap: .2rem .8rem; }
.pair .label { color: #5f6368; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; background: #f8f9fa;
      padding: .2rem .4rem; }
figure { margin: 1rem 0; }
""".strip()


def _html_scores(row: Mapping[str, Any], model: str) -> str:
    s = row["scores"].get(model, {})
    return f"ROUGE-L {fmt(s.get('rougeL'))}, exact match {fmt(s.get('exact_match'))}"


def _html_examples(
    section_id: str,
    title: str,
    rows: Iterable[Mapping[str, Any]],
    models: list[str],
    focus: str,
) -> list[str]:
    out = [f'<section id="{section_id}">', f"<h2>{_e(title)}</h2>"]
    for k, row in enumerate(rows, start=1):
        out.append('<section class="example">')
        out.append(
            f"<h3>{k}. <code>{_e(str(row['id']))}</code> "
            f"({_e(focus)}: {_html_scores(row, focus)})</h3>"
        )
        out.append('<div class="pair">')
        pairs = [("prompt", "", str(row["prompt"])), ("reference", "", str(row["reference"]))]
        pairs += [(m, _html_scores(row, m), str(row[m])) for m in models if m in row]
        for label, note, text in pairs:
            small = f"<br><small>{_e(note)}</small>" if note else ""
            out.append(f'<div class="label">{_e(label)}{small}</div><pre>{_e(text)}</pre>')
        out += ["</div>", "</section>"]
    out.append("</section>")
    return out


def _html_retain(rows: Sequence[Mapping[str, Any]], focus: str) -> list[str]:
    changed = most_changed(rows, focus)
    out = ['<section id="retain">', f"<h2>Retain answers the {_e(focus)} changed most</h2>"]
    if not changed:
        out.append("<p>None: every answer stayed identical.</p>")
    for k, row in enumerate(changed, start=1):
        score = fmt(row["scores"][focus]["rougeL"])
        out.append('<section class="example">')
        out.append(f"<h3>{k}. <code>{_e(str(row['id']))}</code> (retain ROUGE-L {score})</h3>")
        out.append('<div class="pair">')
        for label, text in (("instruction", row["instruction"]), ("base", row["base"])):
            out.append(f'<div class="label">{_e(label)}</div><pre>{_e(str(text))}</pre>')
        out.append(f'<div class="label">{_e(focus)}</div><pre>{_e(str(row[focus]))}</pre>')
        out += ["</div>", "</section>"]
    out.append("</section>")
    return out


def render_html(
    metrics: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    retain_rows: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The self-contained HTML report: metric table, SVG bar charts (scores; validation loss
    and retain scores when present), best and worst examples of the adapter, the retain
    answers it changed most. Every text from the data is HTML-escaped; nothing is loaded from
    elsewhere."""
    models = models_of(metrics)
    focus = focus_model(predictions)
    rows = metric_rows(metrics)
    with_delta = "base" in models and "adapter" in models
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{TITLE}</title>",
        f"<style>\n{STYLE}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{TITLE}</h1>",
        *(f"<p>{_e(line)}</p>" for line in _summary(metrics, focus)),
        '<section id="metrics">',
        "<h2>Metrics</h2>",
        '<table class="metrics">',
        "<thead><tr><th>metric</th>"
        + "".join(f"<th>{_e(m)}</th>" for m in models)
        + ("<th>adapter \u2212 base</th>" if with_delta else "")
        + "</tr></thead>",
        "<tbody>",
    ]
    for key, values in rows:
        cells = "".join(f"<td>{fmt(values[m])}</td>" for m in models)
        if with_delta:
            cells += f"<td>{_delta(values)}</td>"
        out.append(f'<tr><th scope="row">{_e(LABELS[key])}</th>{cells}</tr>')
    out += ["</tbody>", "</table>", "</section>", '<section id="charts">']
    by_key = dict(rows)
    scores = [k for k in SCORE_KEYS if k in by_key]
    if scores:
        out.append("<figure>")
        out.append(bar_chart("Scores on the test split", scores, models, by_key, 1.0))
        out.append("</figure>")
    if "val_loss" in by_key:
        top = max((v for v in by_key["val_loss"].values() if v is not None), default=1.0)
        out.append("<figure>")
        out.append(bar_chart("Validation loss", ["val_loss"], models, by_key, _nice_max(top)))
        out.append("</figure>")
    retained = [k for k in RETAIN_KEYS if k in by_key]
    if retained:
        title = "Retain set: answers against the base model's own"
        out += ["<figure>", bar_chart(title, retained, models, by_key, 1.0), "</figure>"]
    out.append("</section>")
    if focus is not None:
        example_models = [m for m in models if m in predictions[0]] or [focus]
        best, worst = best_and_worst(predictions, focus)
        out += _html_examples("best", f"Best {len(best)} examples", best, example_models, focus)
        out += _html_examples("worst", f"Worst {len(worst)} examples", worst, example_models, focus)
        if retain_rows:
            out += _html_retain(retain_rows, focus)
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def report_texts(
    reports_dir: Path,
    metrics: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    retain_rows: Sequence[Mapping[str, Any]] = (),
) -> dict[Path, str]:
    """`report.md` and `report.html` in `reports_dir`, by path, rendered but not written.
    `retain_rows`: the per-example rows of `lorapipe.evaluation.retain_scores`."""
    return {
        reports_dir / "report.md": render_markdown(metrics, predictions, retain_rows),
        reports_dir / "report.html": render_html(metrics, predictions, retain_rows),
    }


def write_reports(
    reports_dir: Path,
    metrics: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    retain_rows: Sequence[Mapping[str, Any]] = (),
) -> list[Path]:
    """Write `report_texts` (UTF-8, "\\n" line ends; both rendered before either is written,
    each atomically) and return their paths."""
    texts = report_texts(reports_dir, metrics, predictions, retain_rows)
    write_texts(texts)
    return list(texts)
