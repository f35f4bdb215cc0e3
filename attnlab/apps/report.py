"""``attnlab report RUN --out report.html``: one self-contained HTML file to share a run without a server.

The file holds plotly.js itself (no CDN, no network: it opens offline) and, for a scan or census run: the model
card, the top heads of every head statistic (and the reason for each statistic not scored), every head map, the
census scatter of the first two statistics, and the token scores' strips; for an intervention run
(``attnlab intervene --out``): the effect table with its paired-bootstrap intervals and the same as a figure.

The figures are the app's and the notebook's (``attnlab.figures``); the app stays the one interactive stack,
and this is its static single-run export.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from attnlab.errors import AttnlabError

REPORT_JSON = "report.json"  # attnlab.interventions.evaluate.REPORT_JSON (not imported: it pulls in torch)
MAX_TOKEN_FIGURES = 8  # token-score strips included (a run of many prompts has one per prompt)
TOP_K = 5


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else _e(v)

    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Figures:
    """Figures as ``<div>``s that draw themselves with the page's one inline copy of plotly.js."""

    def __init__(self):
        self.n = 0

    def div(self, fig: go.Figure) -> str:
        self.n += 1
        return fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"figure-{self.n}", config={"displaylogo": False}
        )


def _model_card(info: dict) -> str:
    m, ds = info.get("model", {}) or {}, info.get("dataset", {}) or {}
    rows = [
        ("model", m.get("name")),
        ("architecture", m.get("architecture")),
        ("layers x heads", f"{m.get('n_layers')} x {m.get('n_heads')}"),
        ("KV heads", m.get("n_kv_heads")),
        ("dataset", f"{ds.get('name')} ({ds.get('n_prompts', '?')} prompts)" if ds else None),
        ("probes", ", ".join(p.get("name", "?") for p in info.get("probes", []) or [])),
        ("created", info.get("created")),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows if v not in (None, ""))
    return f"<table class='card'>{body}</table>"


def _scan_sections(directory: Path, figs: _Figures) -> tuple[str, list[str]]:
    from attnlab import figures
    from attnlab.census import Census, census_json
    from attnlab.heads.runs import Run

    run = Run.open(directory)
    info = run.info
    title = f"{directory.name}: {info.get('model', {}).get('name', '?')}"
    parts = [f"<h2>Model</h2>{_model_card(info)}"]
    heads = {n: run[n] for n in run.names("head_scores")}
    not_scored = dict(info.get("not_scored", {}) or {})
    census = Census.load(directory) if census_json(directory) is not None else None
    if census is not None:
        not_scored.update(census.not_scored)
    rows = []
    for name, s in heads.items():
        top = ", ".join(f"{r.label} {r.score:.3g}" for r in s.top(TOP_K).itertuples())
        rows.append({"statistic": name, "probe": s.probe, "higher is": s.higher_is, f"top {TOP_K} heads": top})
    rows += [
        {"statistic": n, "probe": "", "higher is": "", f"top {TOP_K} heads": f"not scored: {r}"}
        for n, r in not_scored.items()
        if n not in heads
    ]
    parts.append(
        f"<h2>Top heads per statistic</h2>{_table(rows, ['statistic', 'probe', 'higher is', f'top {TOP_K} heads'])}"
    )
    if census is not None and len(census.statistics) >= 2:
        x, y = census.statistics[:2]
        parts.append(f"<h2>Census</h2>{figs.div(census.plot(x, y, title=f'{y} vs {x} — every head'))}")
    if heads:
        parts.append("<h2>Head maps</h2>" + "".join(figs.div(figures.head_map(s)) for s in heads.values()))
    tokens = run.names("token_scores")
    if tokens:
        shown = tokens[:MAX_TOKEN_FIGURES]
        more = f" (the first {len(shown)} of {len(tokens)})" if len(tokens) > len(shown) else ""
        parts.append(f"<h2>Token scores{_e(more)}</h2>" + "".join(figs.div(figures.token_strip(run[n])) for n in shown))
    return title, parts


def _intervention_sections(directory: Path, figs: _Figures) -> tuple[str, list[str]]:
    try:
        report = json.loads((directory / REPORT_JSON).read_text())
    except (OSError, ValueError) as e:
        raise AttnlabError(f"{directory / REPORT_JSON} cannot be read: {e}") from None
    metrics = report.get("metrics") or []
    fit, ev = report.get("fit_split", {}) or {}, report.get("eval_split", {}) or {}
    title = f"{directory.name}: {report.get('method')} on {report.get('model')}"
    lead = (
        f"<p>{_e(report.get('method'))} on {_e(report.get('model'))}, fitted on {_e(fit.get('name'))} "
        f"(n={_e(fit.get('n'))}), measured on {_e(ev.get('name'))} (n={_e(ev.get('n'))}); intervals: "
        f"{_e((report.get('bootstrap') or {}).get('kind', 'bootstrap'))}, "
        f"level {_e((report.get('bootstrap') or {}).get('level', '?'))}.</p>"
    )
    if report.get("note"):
        lead += f"<p><b>note:</b> {_e(report['note'])}</p>"
    cols = ["metric", "baseline", "baseline_lo", "baseline_hi", "intervened", "intervened_lo", "intervened_hi"]
    cols += ["diff", "diff_lo", "diff_hi", "n"]
    parts = [f"<h2>Effect</h2>{lead}{_table(metrics, [c for c in cols if any(c in r for r in metrics)])}"]
    if metrics:
        parts.append(figs.div(_effect_figure(metrics, report)))
    params = report.get("params") or {}
    if params:
        parts.append(
            "<h2>Parameters</h2>"
            + _table([{"parameter": k, "value": v} for k, v in params.items()], ["parameter", "value"])
        )
    return title, parts


def _effect_figure(metrics: list[dict], report: dict) -> go.Figure:
    """Baseline and intervened value of each metric with their intervals."""
    fig = go.Figure()
    for arm, colour in (("baseline", "#7f8c8d"), ("intervened", "#c0392b")):
        fig.add_bar(
            name=arm,
            x=[r["metric"] for r in metrics],
            y=[r.get(arm) for r in metrics],
            marker_color=colour,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [max(0.0, r.get(f"{arm}_hi", r.get(arm)) - r.get(arm)) for r in metrics],
                "arrayminus": [max(0.0, r.get(arm) - r.get(f"{arm}_lo", r.get(arm))) for r in metrics],
            },
        )
    fig.update_layout(
        barmode="group",
        title=f"{report.get('method')} on {report.get('model')}: baseline vs intervened (with intervals)",
        height=380,
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
    )
    return fig


def build_report(run_dir: str | Path) -> str:
    """The report of a run directory as one HTML document (plotly.js inline)."""
    import plotly.offline

    d = Path(run_dir).expanduser().resolve()
    figs = _Figures()
    if (d / "run.json").is_file():
        title, parts = _scan_sections(d, figs)
    elif (d / REPORT_JSON).is_file():
        title, parts = _intervention_sections(d, figs)
    else:
        raise AttnlabError(
            f"{run_dir} is not a run: no run.json (attnlab scan / census --out) "
            "or report.json (attnlab intervene --out)"
        )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>attnlab report — {_e(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>attnlab report — {_e(title)}</h1><p class='when'>written {when} from {_e(d.name)}/ "
        f"({figs.n} figures)</p>{''.join(parts)}</body></html>"
    )


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``build_report(run_dir)`` to ``out`` (atomically) and return its path."""
    from attnlab.heads.io import write_text

    out = Path(out).expanduser()
    if out.is_dir():
        raise AttnlabError(f"--out {out} is a directory: name the HTML file to write, e.g. {out}/report.html")
    if not out.parent.is_dir():
        raise AttnlabError(f"--out {out}: the directory {out.parent} does not exist")
    write_text(out, build_report(run_dir))
    return out.resolve()


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 0 auto; padding: 16px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 90%; margin: 6px 0; }
th, td { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
table.card td:first-child { color: #666; }
.when { color: #666; font-size: 85%; }
"""

__all__ = ["build_report", "write_report"]
