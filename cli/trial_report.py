"""HTML reports for in-silico trials, PROCOVA analyses and sample-size calculations.

Each report is one self-contained file (inline CSS and SVG, no scripts or links) that a
trial statistician can read without the JSON document it was written from.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from lifelines import KaplanMeierFitter

from .report import COLORS, _svg, _table

RATIOS = {"hazard_ratio", "risk_ratio", "odds_ratio"}
WORDS = {"hazard_ratio": "hazard ratio", "risk_ratio": "risk ratio", "odds_ratio": "odds ratio",
         "risk_difference": "risk difference", "mean_difference": "mean difference"}
ENDPOINTS = {"time_to_event": "time to event", "binary": "binary", "continuous": "continuous"}
METRICS = {"r2": "R²", "auroc": "AUROC", "c_index": "C-index"}
ARM_COLORS = {"0": COLORS[0], "1": COLORS[2]}
STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
         "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
         ".summary{font-size:115%;background:#f4f8f7;border-left:4px solid #2a9d8f;padding:.6em 1em}"
         ".meta{color:#555;font-size:90%}svg{max-width:100%;height:auto}")
Z95 = 1.959963984540054


def _finite(v: object) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _decimals(*values: object, digits: int = 3) -> int:
    # one decimal count for an estimate and its bounds, so "0.710 (0.550–0.900)" lines up
    mags = [abs(float(v)) for v in values if _finite(v) and float(v) != 0]
    if not mags:
        return digits
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(max(mags))))))


def _num(v: object, dec: int | None = None) -> str:
    """A number to 3 significant digits (or `dec` decimals); "n/a" when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if not _finite(v):
        return str(v) if not isinstance(v, (float, np.floating)) else ("∞" if v > 0 else "-∞")
    if isinstance(v, (int, np.integer)) and dec is None:
        return str(int(v))
    if dec is None:  # a lone number: no trailing zeros ("0.05", "1825")
        text = f"{float(v):.{_decimals(v)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{float(v):.{dec}f}"


def _ci(lo: object, hi: object, dec: int) -> str:
    # an en dash between negative bounds reads as a minus sign, so write "to" there
    if not _finite(lo) and not _finite(hi):
        return "n/a"
    sep = "–" if all(not _finite(b) or float(b) >= 0 for b in (lo, hi)) else " to "
    return f"{_num(lo, dec)}{sep}{_num(hi, dec)}"


def _est_ci(e: dict, level: int) -> str:
    """"0.710 (95% CI 0.550–0.900)" for an effect entry, or why it has no estimate."""
    if not _finite(e.get("estimate")):
        return "not estimable" + (f" ({e['note']})" if e.get("note") else "")
    dec = _decimals(e.get("estimate"), e.get("ci_low"), e.get("ci_high"))
    return f"{_num(e['estimate'], dec)} ({level}% CI {_ci(e.get('ci_low'), e.get('ci_high'), dec)})"


def _p(p: object) -> str:
    """A p-value: "<0.001" below a thousandth, else 3 decimals."""
    return "n/a" if not _finite(p) else "<0.001" if float(p) < 0.001 else f"{float(p):.3f}"


def _p_says(p: object) -> str:
    v = _p(p)
    return "p not reported" if v == "n/a" else f"p {v}" if v.startswith("<") else f"p = {v}"


def _pct(v: object) -> str:
    return f"{100 * float(v):.1f}%" if _finite(v) else "n/a"


def _words(measure: str) -> str:
    return WORDS.get(measure, str(measure).replace("_", " "))


def _level(alpha: object) -> int:
    return round(100 * (1 - float(alpha))) if _finite(alpha) else 95


def _inline(fig) -> str:
    # matplotlib's RDF metadata and xmlns declarations are the only URLs in its SVG; inline
    # SVG in HTML needs neither, and dropping them keeps the file free of any address
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", _svg(fig), flags=re.S)
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)


def _label(s: object) -> str:
    # a "$" in user text would switch matplotlib into mathtext
    return str(s).replace("$", r"\$")


def _page(path: Path, title: str, summary: str, body: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = html.escape(title)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title><style>{STYLE}</style>"
                    f"</head><body><h1>{t}</h1><p class='summary'>{html.escape(summary)}</p>{body}</body></html>\n",
                    encoding="utf-8")


def _notes(items: list[str]) -> str:
    return "<h2>Methods and notes</h2><ul class='meta'>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _model_notes(model: dict | None) -> list[str]:
    if not model:
        return ["Model: not recorded."]
    eps = model.get("epsilon")
    out = [f"Model: {model.get('dir', 'n/a')}, weights sha256 {model.get('sha256', 'n/a')}.",
           f"Privacy: epsilon = {_num(eps)} spent training the model." if _finite(eps)
           else "Privacy: no epsilon recorded (model not trained with differential privacy, or not reported)."]
    if model.get("federated") is not None:
        sites = f" across {model['sites']} sites" if model.get("sites") is not None else ""
        out.append(f"Training: {'federated' + sites if model['federated'] else 'centralized'}.")
    return out


def _ticks(lo: float, hi: float) -> list[float]:
    cand = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]
    ticks = [t for t in cand if lo <= t <= hi]
    return ticks if len(ticks) >= 2 else sorted({float(f"{lo:.2g}"), 1.0, float(f"{hi:.2g}")})


def _forest(rows: list[dict], measure: str, level: int, title: str) -> str:
    """Forest plot: one row per estimate, CI whiskers, n and the numbers at the right."""
    ratio, ref = measure in RATIOS, 1.0 if measure in RATIOS else 0.0
    fig, ax = plt.subplots(figsize=(8, 1.1 + 0.42 * len(rows)))
    vals = [ref] + [float(r[k]) for r in rows for k in ("estimate", "ci_low", "ci_high")
                    if _finite(r.get(k)) and (not ratio or float(r[k]) > 0)]
    lo, hi = min(vals), max(vals)
    for i, r in enumerate(rows):
        est, a, b = (r.get(k) if _finite(r.get(k)) and (not ratio or float(r[k]) > 0) else None
                     for k in ("estimate", "ci_low", "ci_high"))
        if a is not None and b is not None:
            ax.plot([a, b], [i, i], color="#264653", lw=1.6)
        if est is not None:
            ax.plot([est], [i], "s", color="#264653", ms=7)
        text = _est_ci(r, level).replace(f"{level}% CI ", "")
        ax.text(1.02, i, f"n={_num(r.get('n'))}   {_label(text)}", transform=ax.get_yaxis_transform(),
                va="center", fontsize=9)
    ax.text(1.02, -0.9, f"n   estimate ({level}% CI)", transform=ax.get_yaxis_transform(), va="center",
            fontsize=9, weight="bold")
    ax.axvline(ref, color="#999", ls="--", lw=1)
    if ratio:
        ax.set_xscale("log")
        lo, hi = lo / 1.15, hi * 1.15
        ticks = _ticks(lo, hi)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    else:
        pad = 0.08 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(rows)), [_label(r["label"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -1.4)
    ax.set(xlabel=_words(measure) + (" (log scale)" if ratio else ""), title=_label(title))
    ax.grid(axis="x", alpha=0.3)
    return _inline(fig)


def _wilson(k: float, n: float) -> tuple[float, float]:
    """Wilson score 95% interval for k events out of n."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _bounds(e: dict) -> tuple:
    """(estimate, ci_low, ci_high) of an effect."""
    return e.get("estimate"), e.get("ci_low"), e.get("ci_high")


def _clean(d: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    # non-finite values cannot enter a KM fit or a mean; drop those rows for plots and tables
    arrs = {k: np.asarray(d[k], dtype=float) for k in keys}
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrs.values()])
    return {k: a[ok] for k, a in arrs.items()}


def _arm_label(doc: dict, key: str) -> str:
    return str((doc.get("arms") or {}).get(key, {}).get("label") or ("treatment" if key == "1" else
                                                                     "control" if key == "0" else f"arm {key}"))


def _km_plot(doc: dict, twins: dict, real: dict | None, horizon: float | None) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted(twins):
        color = ARM_COLORS.get(key, COLORS[1])
        for src, data, ls in (("twins", twins, "-"), ("real", real, "--")):
            d = _clean(data[key], ("time", "event")) if data and key in data else {"time": []}
            if not len(d["time"]):
                continue
            sf = KaplanMeierFitter().fit(d["time"], d["event"]).survival_function_
            ax.step(sf.index, sf.iloc[:, 0], where="post", ls=ls, color=color,
                    label=_label(f"{_arm_label(doc, key)}, {src} (n={len(d['time'])})"))
    if _finite(horizon):
        ax.set_xlim(0, float(horizon))
    ax.set(xlabel="days", ylabel="event-free survival", ylim=(0, 1.02),
           title="Kaplan-Meier: twins (solid) against real patients (dashed)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _inline(fig)


def _arm_plot(doc: dict, twins: dict, real: dict | None, binary: bool) -> str:
    """Twins against real per arm: event-rate bars with Wilson CIs (binary) or box plots (continuous)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    keys = sorted(twins)
    for i, key in enumerate(keys):
        for j, (src, data) in enumerate((("twins", twins), ("real", real))):
            y = _clean(data[key], ("y",))["y"] if data and key in data else np.array([])
            if not len(y):
                continue
            x, color, alpha = i + (j - 0.5) * 0.4, ARM_COLORS.get(key, COLORS[1]), 1.0 if j == 0 else 0.45
            if binary:
                rate, (lo, hi) = float(y.mean()), _wilson(float(y.sum()), len(y))
                ax.bar(x, rate, width=0.36, color=color, alpha=alpha, edgecolor="#264653")
                ax.errorbar(x, rate, yerr=[[rate - lo], [hi - rate]], color="#222", capsize=4)
            else:
                # fliers off: thousands of twin outliers would bloat the SVG without adding information
                b = ax.boxplot([y], positions=[x], widths=0.32, showfliers=False, patch_artist=True,
                               medianprops={"color": "#222"})
                b["boxes"][0].set(facecolor=color, alpha=alpha)
            ax.text(x, 1.0, f"{src} n={len(y)}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(keys)), [_label(_arm_label(doc, k)) for k in keys])
    ax.set_xlim(-0.7, len(keys) - 0.3)
    what = "Event rate (Wilson 95% CI)" if binary else "Outcome (box: quartiles, whiskers 1.5 IQR)"
    ax.set(ylabel="event rate" if binary else "outcome", title=f"{what} per arm: twins (solid), real (faded)\n")
    if binary:
        ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    return _inline(fig)


def _outcome_rows(endpoint: str, key: str, label: str, src: str, d: dict | None, horizon) -> list | None:
    if not d:
        return None
    if endpoint == "time_to_event":
        c = _clean(d, ("time", "event"))
        if not len(c["time"]):
            return [label, src, 0, "n/a", "n/a", "n/a"]
        km = KaplanMeierFitter().fit(c["time"], c["event"])
        med = km.median_survival_time_
        at = float(km.survival_function_at_times(float(horizon)).iloc[0]) if _finite(horizon) else float("nan")
        return [label, src, len(c["time"]), int(c["event"].sum()),
                _num(med) if _finite(med) else "not reached", _num(at, 3)]
    y = _clean(d, ("y",))["y"]
    if endpoint == "binary":
        lo, hi = _wilson(float(y.sum()), len(y))
        return [label, src, len(y), int(y.sum()), _num(y.mean(), 3) if len(y) else "n/a", _ci(lo, hi, 3)]
    sd = float(y.std(ddof=1)) if len(y) > 1 else float("nan")
    return [label, src, len(y), _num(y.mean()) if len(y) else "n/a", _num(sd), _num(np.median(y)) if len(y) else "n/a"]


def _cells(e: dict) -> list[str]:
    """Estimate and CI cells of an effect entry, with one decimal count for both."""
    dec = _decimals(*_bounds(e))
    return [_num(e.get("estimate"), dec), _ci(e.get("ci_low"), e.get("ci_high"), dec)]


def _sentence(who: str, effects: list[dict], level: int, tail: str) -> str:
    # the first effect carries the sentence; a second (the binary risk difference) is appended to it
    if not effects:
        return ""
    first, *rest = effects
    return (f"{who} a {_words(first.get('measure', ''))} of {_est_ci(first, level)}{tail}"
            + "".join(f", and a {_words(e.get('measure', ''))} of {_est_ci(e, level)}" for e in rest) + ".")


def simulate_report(doc: dict, *, twins: dict[str, dict[str, np.ndarray]],
                    real: dict[str, dict[str, np.ndarray]] | None, path: Path) -> None:
    """Write the HTML report of an in-silico trial (`evoclone trial simulate`)."""
    endpoint, level, horizon = doc.get("endpoint", ""), _level(doc.get("alpha", 0.05)), doc.get("horizon_days")
    effect, real_doc = doc.get("effect") or {}, doc.get("real") or {}
    t, c, measure = _arm_label(doc, "1"), _arm_label(doc, "0"), effect.get("measure", "")
    arms, real_arms = doc.get("arms") or {}, real_doc.get("arms") or {}
    n_tw, n_re = (sum(a.get("n") or 0 for a in d.values()) or None for d in (arms, real_arms))
    overall = [(label, n, e) for label, n, e in (
        ("Overall, twins", n_tw, effect), ("Overall, twins", n_tw, doc.get("effect_difference")),
        ("Overall, real patients", n_re, real_doc.get("effect")),
        ("Overall, real patients", n_re, real_doc.get("effect_difference"))) if e]
    summary = (_sentence("Twins predict", [e for lab, _, e in overall if lab.endswith("twins")], level,
                         f" for {t} vs {c}")
               + _sentence(" The real patients of this cohort give",
                           [e for lab, _, e in overall if not lab.endswith("twins")], level, ""))

    # one forest per measure: ratios and differences cannot share an axis
    by_measure: dict[str, list[dict]] = {}
    for label, n, e in overall:
        by_measure.setdefault(e.get("measure", measure), []).append({"n": n, **e, "label": label})
    for s in doc.get("subgroups") or []:
        by_measure.setdefault(s.get("measure") or measure, []).append(
            {**s, "label": f"{s.get('column')} = {s.get('value')}"})
    plots = "".join(_forest(rows, m, level, f"{_words(m).capitalize()}, {t} vs {c}") for m, rows in by_measure.items())
    if endpoint == "time_to_event":
        plots += _km_plot(doc, twins, real, horizon)
        head = ["arm", "source", "n", "events", "median time (days)", f"KM survival at {_num(horizon)} days"]
    else:
        plots += _arm_plot(doc, twins, real, binary=endpoint == "binary")
        head = ["arm", "source", "n"] + (["events", "event rate", "Wilson 95% CI"] if endpoint == "binary"
                                         else ["mean", "SD", "median"])
    out_rows = [r for key in sorted(twins) for src, data in (("twins", twins), ("real", real))
                for r in [_outcome_rows(endpoint, key, _arm_label(doc, key), src, (data or {}).get(key), horizon)] if r]
    eff_rows = [[label.removeprefix("Overall, "), _words(e.get("measure", ""))] + _cells(e) + [e.get("note", "")]
                for label, _, e in overall]
    sub_rows = [[f"{s.get('column')} = {s.get('value')}", _num(s.get("n")), _words(s.get("measure") or measure)]
                + _cells(s) + [s.get("note", "")] for s in doc.get("subgroups") or []]
    cols = sorted({k for src in (arms, real_arms) for a in src.values() for k in a if k != "label"},
                  key=lambda k: (("n", "events").index(k) if k in ("n", "events") else 2, k))
    arm_rows = [[_arm_label(doc, k), src] + [_num(a[k].get(col)) for col in cols]
                for k in sorted(set(arms) | set(real_arms)) for src, a in (("twins", arms), ("real", real_arms)) if k in a]

    body = ("<h2>Treatment effect</h2>" + _table(["population", "measure", "estimate", f"{level}% CI", "note"], eff_rows)
            + plots + ("<h2>Subgroups</h2>" + _table(["subgroup", "n", "measure", "estimate", f"{level}% CI", "note"],
                                                      sub_rows) if sub_rows else "")
            + ("<h2>Arms</h2>" + _table(["arm", "source"] + cols, arm_rows) if arm_rows else "")
            + "<h3>Outcomes recomputed from the outcomes behind the plots</h3>" + _table(head, out_rows))
    notes = [f"Endpoint: {ENDPOINTS.get(endpoint, endpoint)}; effects are {t} (arm 1) against {c} (arm 0).",
             f"Twins: {_num(doc.get('twins_per_patient'))} per patient under each arm for "
             f"{_num(doc.get('patients'))} patients, written by the twin {doc.get('source', 'model')}.",
             f"Confidence intervals: {level}% bootstrap intervals from {_num(doc.get('bootstrap'))} resamples "
             f"(alpha = {_num(doc.get('alpha'))}).",
             f"Rows dropped for missing values: {_num(doc.get('dropped_missing', 0))}.",
             f"Twins rejected by the quality gate: {_num(doc.get('rejected_by_quality_gate', 0))}."]
    if _finite(horizon):
        notes.append(f"Horizon: {_num(horizon)} days.")
    if real is None and not real_doc:
        notes.append("No real patients were given, so the plots show the twins only.")
    if any(not _finite(s.get("estimate")) for s in doc.get("subgroups") or []):
        notes.append("Subgroups without an estimate (see their note) are listed without a point.")
    _page(path, f"In-silico trial: {ENDPOINTS.get(endpoint, endpoint)} endpoint", summary,
          body + _notes(notes + _model_notes(doc.get("model"))))
