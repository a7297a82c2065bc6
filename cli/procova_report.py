"""HTML reports for PROCOVA analyses and sample-size calculations (self-contained, like the trial report)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from lifelines import KaplanMeierFitter

from .report import COLORS, _table
from .trial_report import Z95, ENDPOINTS, _bounds, METRICS, _ci, _clean, _decimals, _est_ci, _finite, _forest, _inline, _label, _level, _model_notes, _notes, _num, _p, _p_says, _page, _pct, _wilson, _words


def _calibration(endpoint: str, arm, score, y, time, event, horizon) -> list[dict]:
    """Control-arm patients grouped by score quantile: mean predicted against observed."""
    tte = endpoint == "time_to_event"
    if (tte and (time is None or event is None or not _finite(horizon))) or (not tte and y is None):
        return []
    ctrl = np.asarray(arm, dtype=float) == 0
    data = {"score": np.asarray(score, dtype=float)[ctrl]}
    if tte:
        data |= {"time": np.asarray(time, dtype=float)[ctrl], "event": np.asarray(event, dtype=float)[ctrl]}
    else:
        data["y"] = np.asarray(y, dtype=float)[ctrl]
    d = _clean(data, tuple(data))
    n = len(d["score"])
    if not n:
        return []
    # deciles, but never groups under ~10 patients: a smaller group's observed value is mostly noise
    order = np.argsort(d["score"], kind="stable")
    out = []
    for idx in np.array_split(order, min(10, max(1, n // 10))):
        g = {k: v[idx] for k, v in d.items()}
        if endpoint == "time_to_event":
            km = KaplanMeierFitter().fit(g["time"], g["event"])
            obs = 1 - float(km.survival_function_at_times(float(horizon)).iloc[0])
            ci = km.confidence_interval_survival_function_.loc[:float(horizon)].iloc[-1]
            lo, hi = 1 - float(ci.iloc[1]), 1 - float(ci.iloc[0])
        elif endpoint == "binary":
            obs = float(g["y"].mean())
            lo, hi = _wilson(float(g["y"].sum()), len(idx))
        else:
            obs = float(g["y"].mean())
            half = Z95 * float(g["y"].std(ddof=1)) / math.sqrt(len(idx)) if len(idx) > 1 else float("nan")
            lo, hi = obs - half, obs + half
        out.append({"n": len(idx), "predicted": float(g["score"].mean()), "observed": obs, "lo": lo, "hi": hi})
    return out


def _calibration_plot(groups: list[dict], endpoint: str, horizon) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.4))
    if groups:
        p = np.array([g["predicted"] for g in groups])
        o = np.array([g["observed"] for g in groups])
        err = np.array([[max(0.0, g["observed"] - g["lo"]) if _finite(g["lo"]) else 0.0 for g in groups],
                        [max(0.0, g["hi"] - g["observed"]) if _finite(g["hi"]) else 0.0 for g in groups]])
        ax.errorbar(p, o, yerr=err, fmt="o", color="#264653", capsize=3, label="control-arm groups (95% CI)")
        vals = np.concatenate([p, o])
        lo, hi = (0.0, 1.0) if endpoint != "continuous" else (float(vals.min()), float(vals.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="#999", label="perfect calibration")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no control-arm patients with a score and an outcome", ha="center", transform=ax.transAxes)
    h = _num(horizon)
    xl, yl = {"time_to_event": (f"predicted P(event by {h} days)", f"observed 1 - KM survival at {h} days"),
              "binary": ("predicted probability", "observed event rate")}.get(
        endpoint, ("mean predicted outcome", "observed mean outcome"))
    ax.set(xlabel=xl, ylabel=yl, title="Calibration of the prognostic score (control arm)")
    ax.grid(alpha=0.3)
    return _inline(fig)


def _curve_plot(curve: list[dict], x: object, label: str, y: object = None) -> str:
    """Total sample size against the score's R², with the chosen/observed point marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    pts = sorted((float(c["r2"]), float(c["n_total"])) for c in curve if _finite(c.get("r2")) and _finite(c.get("n_total")))
    if pts:
        r, n = np.array(pts).T
        ax.plot(r, n, "-", color="#264653", label="total sample size")
        if _finite(x):
            yv = float(y) if _finite(y) else float(np.interp(float(x), r, n))
            ax.plot([float(x)], [yv], "o", color=COLORS[2], ms=8, label=_label(f"{label} → n = {yv:.0f}"))
            ax.axvline(float(x), color=COLORS[2], ls=":", lw=1)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no sample-size curve given", ha="center", transform=ax.transAxes)
    ax.set(xlabel="R² of the prognostic score on the outcome", ylabel="total patients",
           title="Sample size for the target power against the score's R²")
    ax.grid(alpha=0.3)
    return _inline(fig)


def procova_report(doc: dict, *, arm: np.ndarray, score: np.ndarray, y: np.ndarray | None = None,
                   time: np.ndarray | None = None, event: np.ndarray | None = None, horizon: float | None = None,
                   curve: list[dict], path: Path) -> None:
    """Write the HTML report of a prognostic covariate adjustment (`evoclone analyze procova`)."""
    endpoint, level = doc.get("endpoint", ""), _level(doc.get("alpha", 0.05))
    un, adj = doc.get("unadjusted") or {}, doc.get("adjusted") or {}
    measure = adj.get("measure") or un.get("measure", "")
    if endpoint == "time_to_event" and not _finite(horizon) and time is not None and len(time):
        horizon = float(np.nanmax(np.asarray(time, dtype=float)))
    summary = (f"Adjusted for the prognostic score, the {_words(measure)} for treatment vs control is "
               f"{_est_ci(adj, level)}, {_p_says(adj.get('p_value'))}; unadjusted it is {_est_ci(un, level)}, "
               f"{_p_says(un.get('p_value'))}.")
    if _finite(doc.get("variance_reduction")):
        summary += f" The score removes {_pct(doc['variance_reduction'])} of the variance"
        summary += (f", worth a {_pct(doc['sample_size_reduction'])} smaller trial at the same power."
                    if _finite(doc.get("sample_size_reduction")) else ".")
    prog = doc.get("prognostic") or {}
    metric = METRICS.get(prog.get("metric"), str(prog.get("metric", "")))
    groups = _calibration(endpoint, arm, score, y, time, event, horizon)
    vr = doc.get("variance_reduction")
    mark, mark_label = (vr, "observed variance reduction") if _finite(vr) else (
        (prog.get("value"), "observed R²") if prog.get("metric") == "r2" else (None, ""))

    rows = [{**un, "label": "unadjusted"}, {**adj, "label": "adjusted for the prognostic score"}]
    plots = _forest(rows, measure, level, f"{_words(measure).capitalize()}, treatment vs control")
    plots += _calibration_plot(groups, endpoint, horizon) + _curve_plot(curve, mark, mark_label)

    def col(e: dict) -> list[str]:
        dec = _decimals(*_bounds(e))
        return [_words(e.get("measure", "")), _num(e.get("estimate"), dec), _num(e.get("se"), dec),
                _ci(e.get("ci_low"), e.get("ci_high"), dec), _p(e.get("p_value")), _num(e.get("n"))]

    names = ["measure", "estimate", "standard error", f"{level}% CI", "p-value", "n"]
    side = [[nm, a, b] for nm, a, b in zip(names, col(un), col(adj))]
    if _finite(un.get("se")) and _finite(adj.get("se")) and float(un["se"]) > 0:
        side.append(["SE ratio (adjusted / unadjusted)", "", _num(float(adj["se"]) / float(un["se"]), 3)])
    arms = doc.get("arms") or {}
    extra = [[f"prognostic score {metric}", _num(prog.get("value"), 3)],
             ["variance reduction", _pct(doc.get("variance_reduction"))],
             ["sample-size reduction", _pct(doc.get("sample_size_reduction"))]]
    extra += [[f"arm {k} patients", _num(arms[k].get("n"))] for k in sorted(arms)]
    cal_rows = [[i + 1, g["n"], _num(g["predicted"], 3), _num(g["observed"], 3), _ci(g["lo"], g["hi"], 3)]
                for i, g in enumerate(groups)]
    body = ("<h2>Treatment effect</h2>" + _table(["", "unadjusted", "adjusted"], side) + plots
            + "<h2>Prognostic score</h2>" + _table(["quantity", "value"], extra)
            + "<h3>Calibration groups (control arm, by score quantile)</h3>"
            + _table(["group", "n", "mean predicted", "observed", "95% CI"], cal_rows))
    n_ctrl = int(np.sum(np.asarray(arm, dtype=float) == 0))
    score_of = {"continuous": "its predicted outcome", "binary": "its predicted probability of the event",
                "time_to_event": f"its predicted probability of the event by {_num(horizon)} days"}
    notes = [f"Endpoint: {ENDPOINTS.get(endpoint, endpoint)}; effects are treatment (arm 1) against control (arm 0).",
             "Unadjusted: the outcome on arm alone; adjusted: the outcome on arm and the prognostic score "
             "(PROCOVA). Estimates, standard errors, intervals and p-values are as the analysis reported them.",
             f"Prognostic score: for each trial patient, {score_of.get(endpoint, 'its prediction')}.",
             f"Calibration: {sum(g['n'] for g in groups)} of the {n_ctrl} control-arm patients (those with a score "
             f"and an outcome), {len(groups)} group(s) of equal size by score "
             "(deciles, fewer when under 100 patients, so each group holds ~10 or more); observed is "
             + ("1 - Kaplan-Meier survival at the horizon (Greenwood-based CI)." if endpoint == "time_to_event"
                else "the event rate (Wilson CI)." if endpoint == "binary" else "the mean outcome (normal CI)."),
             f"Rows dropped for missing values: {_num(doc.get('dropped_missing', 0))}."]
    _page(path, f"Prognostic covariate adjustment (PROCOVA): {ENDPOINTS.get(endpoint, endpoint)} endpoint", summary,
          body + _notes(notes + _model_notes(doc.get("model"))))


def sample_size_report(doc: dict, *, curve: list[dict], path: Path) -> None:
    """Write the HTML report of a sample-size calculation (`evoclone analyze sample-size`)."""
    un, adj = doc.get("unadjusted") or {}, doc.get("adjusted") or {}
    summary = (f"With a prognostic score of R² = {_num(doc.get('r2'), 2)}, the trial needs "
               f"{_num(adj.get('n_total'))} patients instead of {_num(un.get('n_total'))} "
               f"({_pct(doc.get('sample_size_reduction'))} fewer) for {_pct(doc.get('power'))} power to detect "
               f"an effect of {_num(doc.get('effect'))} (SD {_num(doc.get('sd'))}) at alpha {_num(doc.get('alpha'))}.")
    keys = [("n_total", "total patients"), ("n_treatment", "treatment arm"), ("n_control", "control arm"),
            ("power", "achieved power")]
    rows = [[label, _num(un.get(k), 3 if k == "power" else None), _num(adj.get(k), 3 if k == "power" else None)]
            for k, label in keys]
    inputs = [["effect (difference in means)", _num(doc.get("effect"))], ["outcome SD", _num(doc.get("sd"))],
              ["target power", _num(doc.get("power"))], ["alpha", _num(doc.get("alpha"))],
              ["allocation ratio", _num(doc.get("ratio"))], ["R² of the prognostic score", _num(doc.get("r2"))],
              ["sample-size reduction", _pct(doc.get("sample_size_reduction"))]]
    body = ("<h2>Sample size</h2>" + _table(["", "unadjusted", "with prognostic score"], rows)
            + _curve_plot(curve, doc.get("r2"), "chosen R²", adj.get("n_total"))
            + "<h2>Inputs</h2>" + _table(["quantity", "value"], inputs))
    notes = [f"Method: {doc.get('method', 'not recorded')}.",
             "The adjusted sample size assumes the score explains the given R² of the outcome's variance in the "
             "trial population; an optimistic R² gives an underpowered trial."]
    _page(path, "Sample size with a prognostic score", summary, body + _notes(notes))
