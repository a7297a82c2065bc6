"""Seeded multi-site cohort simulator with a known ground truth.

The cohort imitates a cardiovascular outcomes trial of an LDL-lowering drug: each
hospital's extract carries real-looking identifiers (MRN, name, birth date, ZIP, phone)
so anonymization has work to do, and hospitals differ in case mix, baseline risk and
visit frequency (non-IID). A latent progression factor drives both the hazard and the
slopes of the lab trajectories before enrolment, so the visit history carries signal
that baseline values alone do not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

HAZARD_RATIO = 0.7
LDL_SHIFT_MG_DL = -40.0
RESPONSE_RISK_RATIO = 1.5
RESPONSE_DAY = 168  # week 24
FOLLOW_UP_DAYS = 1095  # protocol follow-up: three years
HISTORY_DAYS = 730  # look-back window before enrolment
WEIBULL_SHAPE = 1.2
TIME_BASE = date(2019, 1, 1)
ENROLMENT_SPAN_DAYS = 4 * 365
STUDY_END = date(2025, 6, 30)
DROPOUT_MEAN_DAYS = 8 * 365.0
LAB_MEASURED_P = 0.85

# code -> plausible measured range; trajectories are clipped to it like a lab would report
LAB_BOUNDS: dict[str, tuple[float, float]] = {
    "13457-7": (15.0, 400.0), "4548-4": (4.0, 15.0), "33914-3": (5.0, 150.0), "1988-5": (0.1, 300.0),
    "8480-6": (80.0, 240.0),
}
# code -> (unit, per-measurement noise sd)
LABS: dict[str, tuple[str, float]] = {
    "13457-7": ("mg/dL", 8.0),  # LDL cholesterol
    "4548-4": ("%", 0.15),  # HbA1c
    "33914-3": ("mL/min/1.73m2", 3.0),  # eGFR
    "1988-5": ("mg/L", 0.3),  # CRP (noise on the log scale)
    "8480-6": ("mm[Hg]", 6.0),  # systolic blood pressure
}
LAB_NAMES = {"13457-7": "ldl", "4548-4": "hba1c", "33914-3": "egfr", "1988-5": "crp", "8480-6": "sbp"}

# log-hazard coefficients of the true model (per unit of the covariate)
COEFFICIENTS: dict[str, float] = {
    "age_per_year_over_65": 0.035,
    "male": 0.30,
    "bmi_per_unit_over_28": 0.03,
    "genotype_risk_alleles": 0.30,
    "diabetes": 0.40,
    "hypertension": 0.25,
    "ckd": 0.45,
    "prior_mi": 0.60,
    "ldl_per_mg_dl_over_130": 0.006,
    "log_crp": 0.25,
    "egfr_per_unit_under_80": 0.012,
    "latent_progression": 0.70,
}

_FIRST = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David",
          "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas",
          "Sarah", "Carlos", "Maria", "Wei", "Mei", "Ahmed", "Fatima", "Olga", "Ivan", "Aiko", "Kenji"]
_LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
         "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
         "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Clark", "Chen",
         "Nakamura", "Kowalski", "Okafor", "Novak", "Haddad"]


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's population and practice differ from the others."""

    name: str
    age_mean: float
    diabetes_p: float
    ckd_p: float
    risk_multiplier: float  # multiplies the baseline hazard
    visit_gap_days: float  # mean days between visits
    zip3: str
    area_code: str


@dataclass
class Cohort:
    """A simulated cohort: one raw extract per site plus the ground truth."""

    patients: dict[str, pd.DataFrame]
    events: dict[str, pd.DataFrame]
    truth: dict = field(default_factory=dict)


def site_profiles(sites: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Three hand-made contrasting hospitals, then random ones for larger federations."""
    fixed = [
        SiteProfile("site-1", 60.0, 0.18, 0.08, 0.75, 60.0, "021", "617"),
        SiteProfile("site-2", 66.0, 0.30, 0.15, 1.00, 90.0, "606", "312"),
        SiteProfile("site-3", 71.0, 0.42, 0.25, 1.35, 130.0, "981", "206"),
    ]
    out = fixed[:sites]
    for i in range(len(out), sites):
        out.append(SiteProfile(
            f"site-{i + 1}", float(rng.uniform(58, 73)), float(rng.uniform(0.15, 0.45)),
            float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.7, 1.4)), float(rng.uniform(45, 150)),
            f"{rng.integers(100, 999):03d}", f"{rng.integers(201, 989):03d}"))
    return out


def simulate_cohort(*, patients: int, sites: int, seed: int) -> Cohort:
    """Generate a deterministic multi-site cohort; the same arguments give the same bytes."""
    if patients < sites or sites < 1:
        raise ValueError(f"need at least one patient per site (patients={patients}, sites={sites})")
    root = np.random.SeedSequence(seed)
    profile_rng, id_rng, *site_seeds = (np.random.default_rng(s) for s in root.spawn(2 + sites))
    profiles = site_profiles(sites, profile_rng)
    sizes = [patients // sites + (1 if i < patients % sites else 0) for i in range(sites)]
    mrns = id_rng.choice(10**8, size=patients, replace=False)
    cohort = Cohort(patients={}, events={})
    truth_patients: list[dict] = []
    site_truth: list[dict] = []
    start = 0
    for profile, n, rng in zip(profiles, sizes, site_seeds):
        mrn = np.array([f"MRN{m:08d}" for m in mrns[start:start + n]])
        start += n
        pat, ev, latent, lp = _simulate_site(profile, n, mrn, rng)
        cohort.patients[profile.name] = pat
        cohort.events[profile.name] = ev
        site_truth.append({**asdict(profile), "patients": n, "events_observed": int(pat["event"].sum()),
                           "treated": int(pat["arm"].sum()), "timeline_events": len(ev)})
        truth_patients.extend({"mrn": m, "site": profile.name, "latent_progression": round(float(u), 6),
                               "log_hazard_without_arm": round(float(x), 6)}
                              for m, u, x in zip(mrn, latent, lp))
    cohort.truth = {
        "seed": seed,
        "patients": patients,
        "effects": {"hazard_ratio": HAZARD_RATIO, "ldl_shift_mg_dl": LDL_SHIFT_MG_DL,
                    "response_risk_ratio": RESPONSE_RISK_RATIO, "response_day": RESPONSE_DAY},
        "hazard_model": {"family": "weibull_proportional_hazards", "shape": WEIBULL_SHAPE,
                         "coefficients": COEFFICIENTS, "follow_up_days": FOLLOW_UP_DAYS},
        "sites": site_truth,
        "patient_truth": truth_patients,
    }
    return cohort


def _simulate_site(p: SiteProfile, n: int, mrn: np.ndarray, rng: np.random.Generator):
    age = np.clip(rng.normal(p.age_mean, 9.0, n), 30, 95)
    male = rng.random(n) < 0.55
    bmi = np.clip(rng.normal(28.5, 4.5, n), 17, 55)
    alleles = rng.binomial(2, 0.25, n)
    diabetes = rng.random(n) < p.diabetes_p
    hypertension = rng.random(n) < np.clip(0.35 + 0.01 * (age - 60), 0.1, 0.9)
    ckd = rng.random(n) < p.ckd_p
    prior_mi = rng.random(n) < 0.15
    arm = rng.permutation(np.arange(n) % 2)  # 1:1 randomisation within site
    latent = rng.normal(0.0, 1.0, n)

    base = {
        "13457-7": np.clip(rng.normal(130, 30, n), 40, 300),
        "4548-4": np.clip(rng.normal(5.6 + 1.3 * diabetes, 0.5, n), 4.0, 14.0),
        "33914-3": np.clip(rng.normal(88 - 0.6 * (age - 60) - 28 * ckd, 10, n), 8, 130),
        "1988-5": np.exp(rng.normal(0.6 + 0.3 * latent, 0.7, n)),
        "8480-6": np.clip(rng.normal(126 + 14 * hypertension, 11, n), 85, 220),
    }
    # yearly drift before and after enrolment, driven by the latent progression factor
    slope = {
        "13457-7": np.zeros(n),
        "4548-4": 0.12 * latent,
        "33914-3": -1.5 - 2.5 * latent,
        "1988-5": 0.25 * latent,  # on the log scale
        "8480-6": 2.0 * latent,
    }
    genotype = np.array(["CC", "TC", "TT"])[alleles]
    lp = (COEFFICIENTS["age_per_year_over_65"] * (age - 65) + COEFFICIENTS["male"] * male
          + COEFFICIENTS["bmi_per_unit_over_28"] * (bmi - 28) + COEFFICIENTS["genotype_risk_alleles"] * alleles
          + COEFFICIENTS["diabetes"] * diabetes + COEFFICIENTS["hypertension"] * hypertension
          + COEFFICIENTS["ckd"] * ckd + COEFFICIENTS["prior_mi"] * prior_mi
          + COEFFICIENTS["ldl_per_mg_dl_over_130"] * (base["13457-7"] - 130)
          + COEFFICIENTS["log_crp"] * np.log(base["1988-5"])
          + COEFFICIENTS["egfr_per_unit_under_80"] * (80 - base["33914-3"])
          + COEFFICIENTS["latent_progression"] * latent)
    scale = 3600.0 * p.risk_multiplier ** (-1 / WEIBULL_SHAPE)
    t_event = scale * (-np.log(rng.random(n)) / np.exp(lp + np.log(HAZARD_RATIO) * arm)) ** (1 / WEIBULL_SHAPE)
    enrol_offset = rng.integers(0, ENROLMENT_SPAN_DAYS, n)
    admin = np.minimum(FOLLOW_UP_DAYS, (STUDY_END - TIME_BASE).days - enrol_offset)
    censor = np.minimum(admin, rng.exponential(DROPOUT_MEAN_DAYS, n))
    event = t_event <= censor
    follow = np.maximum(np.round(np.minimum(t_event, censor)), 1.0)

    p0 = np.clip(1 / (1 + np.exp(-(-1.2 + 0.5 * (base["4548-4"] - 6.0) - 0.4 * latent))), 0.02, 0.6)
    response = (rng.random(n) < p0 * np.where(arm == 1, RESPONSE_RISK_RATIO, 1.0)).astype(float)
    ldl_wk24 = np.round(base["13457-7"] + LDL_SHIFT_MG_DL * arm + rng.normal(0, 12, n), 1)
    reached = follow >= RESPONSE_DAY
    response[~reached] = np.nan
    ldl_wk24[~reached] = np.nan

    enrol = np.array([TIME_BASE + timedelta(days=int(d)) for d in enrol_offset])
    birth = np.array([e - timedelta(days=int(a * 365.25) + int(r)) for e, a, r in
                      zip(enrol, age, rng.integers(0, 365, n))])
    names = [f"{_FIRST[i]} {_LAST[j]}" for i, j in zip(rng.integers(0, len(_FIRST), n),
                                                          rng.integers(0, len(_LAST), n))]
    patients = pd.DataFrame({
        "mrn": mrn,
        "name": names,
        "birth_date": [b.isoformat() for b in birth],
        "sex": np.where(male, "M", "F"),
        "zip": [f"{p.zip3}{z:02d}" for z in rng.integers(0, 100, n)],
        "phone": [f"{p.area_code}-555-{x:04d}" for x in rng.integers(0, 10000, n)],
        "enrollment_date": [e.isoformat() for e in enrol],
        "arm": arm,
        "bmi": np.round(bmi, 1),
        "genotype": genotype,
        "diabetes": diabetes.astype(int),
        "hypertension": hypertension.astype(int),
        "ckd": ckd.astype(int),
        "prior_mi": prior_mi.astype(int),
        "followup_end_date": [(e + timedelta(days=int(f))).isoformat() for e, f in zip(enrol, follow)],
        "event": event.astype(int),
        "response_wk24": pd.Series(response).astype("Int64"),
        "ldl_wk24": ldl_wk24,
    })
    events = _timeline(p, mrn, enrol, follow, arm, base, slope, rng)
    return patients, events, latent, lp


def _timeline(p: SiteProfile, mrn, enrol, follow, arm, base, slope, rng) -> pd.DataFrame:
    """Visits from two years before enrolment to the end of follow-up, vectorized."""
    n = len(mrn)
    span = HISTORY_DAYS + FOLLOW_UP_DAYS
    k = int(np.ceil(span / (p.visit_gap_days * 0.4))) + 2
    gaps = rng.gamma(4.0, p.visit_gap_days / 4.0, (n, k))
    t = -HISTORY_DAYS + rng.uniform(0, p.visit_gap_days, (n, 1)) + np.cumsum(gaps, axis=1) - gaps[:, :1]
    t = np.round(t)
    t[np.abs(t) < 7] = np.nan  # the enrolment visit replaces visits in its week
    keep = ~np.isnan(t) & (t <= follow[:, None])
    t = np.where(keep, t, np.nan)
    t = np.concatenate([np.zeros((n, 1)), t], axis=1)  # every patient has an enrolment visit
    rows = []
    for code, (unit, noise) in LABS.items():
        measured = ~np.isnan(t) & ((rng.random(t.shape) < LAB_MEASURED_P) | (t == 0))
        years = t / 365.0
        if code == "1988-5":
            value = np.exp(np.log(base[code])[:, None] + slope[code][:, None] * years
                           + rng.normal(0, noise, t.shape))
        else:
            value = base[code][:, None] + slope[code][:, None] * years + rng.normal(0, noise, t.shape)
        if code == "13457-7":  # the drug lowers LDL within a few weeks of starting
            on_drug = np.clip(t, 0, None)
            value = value + LDL_SHIFT_MG_DL * arm[:, None] * (1 - np.exp(-on_drug / 14.0))
        value = np.where(t == 0, base[code][:, None], value)  # baseline is the enrolment value
        ii, jj = np.nonzero(measured)
        rows.append(pd.DataFrame({"i": ii, "t": t[ii, jj], "code": code,
                                  "value": np.round(np.clip(value[ii, jj], *LAB_BOUNDS[code]), 2), "unit": unit}))
    ev = pd.concat(rows, ignore_index=True).sort_values(["i", "t", "code"], kind="stable")
    enrol_ord = np.array([e.toordinal() for e in enrol])
    ords = enrol_ord[ev["i"].to_numpy()] + ev["t"].to_numpy().astype(int)
    return pd.DataFrame({
        "mrn": mrn[ev["i"].to_numpy()],
        "date": [date.fromordinal(int(o)).isoformat() for o in ords],
        "code": ev["code"].to_numpy(),
        "value": ev["value"].to_numpy(),
        "unit": ev["unit"].to_numpy(),
    })


def write_cohort(cohort: Cohort, out: Path) -> dict[str, Path]:
    """Write `<out>/<site>/patients.csv`, `<out>/<site>/events.csv` and `<out>/ground_truth.json`."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for site, pat in cohort.patients.items():
        d = out / site
        d.mkdir(parents=True, exist_ok=True)
        pat.to_csv(d / "patients.csv", index=False, float_format="%.6g")
        cohort.events[site].to_csv(d / "events.csv", index=False, float_format="%.6g")
        written[site] = d
    (out / "ground_truth.json").write_text(json.dumps(cohort.truth, indent=1) + "\n")
    return written


def cohort_records(cohort: Cohort, *, key: bytes = b"evoclone-simulator") -> list:
    """The cohort as canonical records, for model benchmarks and tests that skip ingest.

    Ids are keyed hashes of the MRNs and times are days since enrolment; names, phones,
    ZIP codes and dates are left out, as ingest would do.
    """
    import hashlib
    import hmac

    from .record import Arm, Event, Outcomes, PatientRecord

    out = []
    for site, pat in cohort.patients.items():
        ev = cohort.events[site]
        enrol = pd.to_datetime(pat["enrollment_date"]).to_numpy()
        by_mrn = dict(zip(pat["mrn"], range(len(pat))))
        rel = (pd.to_datetime(ev["date"]).to_numpy() - enrol[ev["mrn"].map(by_mrn).to_numpy()]).astype(
            "timedelta64[D]").astype(float)
        groups: dict[str, list] = {}
        for m, t, c, v, u in zip(ev["mrn"], rel, ev["code"], ev["value"], ev["unit"]):
            groups.setdefault(m, []).append(Event(time=float(t), code=c, value=float(v), unit=u))
        birth = pd.to_datetime(pat["birth_date"]).to_numpy()
        age = ((enrol - birth).astype("timedelta64[D]").astype(float) / 365.25).round(1)
        follow = (pd.to_datetime(pat["followup_end_date"]).to_numpy() - enrol).astype("timedelta64[D]").astype(float)
        for i, row in enumerate(pat.itertuples(index=False)):
            pid = hmac.new(key, row.mrn.encode(), hashlib.sha256).hexdigest()[:16]
            out.append(PatientRecord(
                patient_id=pid, site=site, baseline={
                    "age": float(age[i]), "sex": row.sex, "bmi": float(row.bmi), "genotype": row.genotype,
                    "diabetes": int(row.diabetes), "hypertension": int(row.hypertension), "ckd": int(row.ckd),
                    "prior_mi": int(row.prior_mi)},
                arm=Arm(int(row.arm)), events=tuple(groups.get(row.mrn, ())),
                outcomes=Outcomes(time_to_event=float(follow[i]), event=bool(row.event),
                                  binary=None if pd.isna(row.response_wk24) else int(row.response_wk24),
                                  continuous=None if pd.isna(row.ldl_wk24) else float(row.ldl_wk24))))
    return out
