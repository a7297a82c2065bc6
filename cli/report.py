"""The demo's HTML report: self-contained, with inline SVG plots (matplotlib)."""

from __future__ import annotations

import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GROUP_NAMES = ("low risk", "medium risk", "high risk")
COLORS = ("#2a9d8f", "#e9c46a", "#e76f51")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def rounds_plot(rounds: list[dict]) -> str:
    """Training loss and validation C-index per federated round."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    r = [x["round"] for x in rounds]
    a.plot(r, [x["train_loss"] for x in rounds], "o-", color="#264653")
    a.set(title="DP training loss (mean over sites)", xlabel="round", ylabel="loss")
    b.plot(r, [x["val_c_index"] for x in rounds], "o-", color="#e76f51")
    b.set(title="Federated validation C-index", xlabel="round", ylabel="C-index", ylim=(0.4, 1.0))
    for ax in (a, b):
        ax.set_xticks(r)
        ax.grid(alpha=0.3)
    return _svg(fig)


def epsilon_plot(sites: list[dict]) -> str:
    """Spent epsilon against each site's budget."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = [s["name"] for s in sites]
    x = np.arange(len(names))
    ax.bar(x, [s["epsilon_budget"] for s in sites], color="#d9d9d9", label="budget")
    ax.bar(x, [s["epsilon_spent"] for s in sites], width=0.5, color="#264653", label="spent")
    ax.set_xticks(x, names)
    ax.set(ylabel="epsilon", title="Privacy spent per site (Opacus RDP accountant)")
    ax.legend()
    return _svg(fig)


def km_plot(curves: list[dict], horizon: float) -> str:
    """Observed Kaplan-Meier (solid) against mean predicted survival (dashed) per risk group."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for g, c in enumerate(curves):
        color = COLORS[g % len(COLORS)]
        ax.step(c["km_time"], c["km_survival"], where="post", color=color,
                label=f"{c['label']} observed (n={c['n']})")
        ax.plot(c["pred_time"], c["pred_survival"], "--", color=color, label=f"{c['label']} predicted")
    ax.set(xlabel="days since enrolment", ylabel="event-free survival", xlim=(0, horizon), ylim=(0, 1.02),
           title="Held-out patients by predicted risk group")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return _svg(fig)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def write_report(path: Path, summary: dict, *, km_curves: list[dict], horizon: float) -> None:
    """Write the self-contained HTML report for a demo run."""
    ev = summary["evaluation"]
    local = ev["local_only"]
    site_rows = [[s["name"], s["patients"], s["epsilon_budget"], s["epsilon_spent"], s["delta"],
                  local.get(s["name"], float("nan"))] for s in summary["sites"]]
    mean_local = float(np.nanmean(list(local.values()))) if local else float("nan")
    eval_rows = [["federated, DP (this run)", ev["federated_dp"]], ["centralized, non-private (pooled data)",
                 ev["centralized"]], ["local only, non-private (mean over sites)", mean_local]]
    body = f"""
<h1>EvoClone demo: a private twin outcome model trained across {len(summary['sites'])} hospitals</h1>
<p>Each hospital kept its patients. Flower coordinated {len(summary['rounds'])} rounds of
DP-SGD (Opacus) on the fusion outcome predictor; only model updates left a site. Held-out
evaluation uses {ev.get('test_patients', 'n/a')} patients never used in training.</p>
<h2>What came out</h2>
{_table(["model", "held-out C-index"], eval_rows)}
<h2>What it cost in privacy</h2>
{_table(["site", "patients", "epsilon budget", "epsilon spent", "delta", "local-only C-index"], site_rows)}
{epsilon_plot(summary['sites'])}
<h2>Training</h2>
{_table(["round", "train loss", "validation C-index"], [[r['round'], r['train_loss'], r['val_c_index']] for r in summary['rounds']])}
{rounds_plot(summary['rounds'])}
<h2>Calibration by risk group</h2>
{km_plot(km_curves, horizon)}
<p class="meta">Model: <code>{html.escape(summary['model']['path'])}</code>, sha256
<code>{html.escape(summary['model']['sha256'])}</code>. Wall time {summary['wall_seconds']:.1f} s.</p>
"""
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}.meta{color:#666;font-size:90%}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>EvoClone demo report</title>"
                    f"<style>{style}</style></head><body>{body}</body></html>\n")
