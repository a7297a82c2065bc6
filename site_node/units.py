"""Canonical units and physiological ranges for the lab codes the models use.

Values in a known unit are converted to the canonical one; an unknown unit for a known
code, or a value outside the physiological range, is rejected (never silently kept).
Codes outside the table keep their value and unit as given.
"""

from __future__ import annotations

import numpy as np


class UnitError(ValueError):
    """A value cannot be converted to the canonical unit, or is out of range."""


# code -> (canonical unit, {unit: factor or (factor, offset)}, (low, high))
CANONICAL: dict[str, tuple[str, dict[str, tuple[float, float]], tuple[float, float]]] = {
    "13457-7": ("mg/dL", {"mg/dL": (1, 0), "mmol/L": (38.67, 0)}, (5, 600)),  # LDL (calculated)
    "18262-6": ("mg/dL", {"mg/dL": (1, 0), "mmol/L": (38.67, 0)}, (5, 600)),  # LDL (direct)
    "2093-3": ("mg/dL", {"mg/dL": (1, 0), "mmol/L": (38.67, 0)}, (30, 1000)),  # total cholesterol
    "4548-4": ("%", {"%": (1, 0), "mmol/mol": (0.0915, 2.15)}, (3, 20)),  # HbA1c
    "33914-3": ("mL/min/1.73m2", {"mL/min/1.73m2": (1, 0), "mL/min/{1.73_m2}": (1, 0)}, (1, 200)),  # eGFR
    "1988-5": ("mg/L", {"mg/L": (1, 0), "mg/dL": (10, 0)}, (0, 600)),  # CRP
    "8480-6": ("mm[Hg]", {"mm[Hg]": (1, 0), "mmHg": (1, 0)}, (40, 300)),  # systolic BP
    "8462-4": ("mm[Hg]", {"mm[Hg]": (1, 0), "mmHg": (1, 0)}, (20, 200)),  # diastolic BP
    "2339-0": ("mg/dL", {"mg/dL": (1, 0), "mmol/L": (18.016, 0)}, (10, 2000)),  # glucose
    "2345-7": ("mg/dL", {"mg/dL": (1, 0), "mmol/L": (18.016, 0)}, (10, 2000)),  # glucose (serum)
    "38483-4": ("mg/dL", {"mg/dL": (1, 0), "umol/L": (1 / 88.42, 0), "µmol/L": (1 / 88.42, 0)}, (0.05, 30)),  # creatinine
    "8310-5": ("Cel", {"Cel": (1, 0), "[degF]": (5 / 9, -32 * 5 / 9)}, (25, 45)),  # body temperature
    "29463-7": ("kg", {"kg": (1, 0), "[lb_av]": (0.45359237, 0), "g": (0.001, 0)}, (0.3, 400)),  # body weight
    "8302-2": ("cm", {"cm": (1, 0), "m": (100, 0), "[in_i]": (2.54, 0)}, (20, 260)),  # body height
    "39156-5": ("kg/m2", {"kg/m2": (1, 0)}, (8, 90)),  # BMI
}


def convert(code: str, unit: str | None, values: np.ndarray) -> tuple[np.ndarray, str, np.ndarray]:
    """Values of a known code in the canonical unit, and which of them are in range.

    Raises UnitError when the unit cannot be converted. The one conversion rule used for
    single values (`normalize`) and for whole columns (CSV and OMOP ingest).
    """
    canonical, factors, (low, high) = CANONICAL[code]
    if unit not in factors:
        raise UnitError(f"unit {unit!r} of {code} is not convertible to {canonical}")
    factor, offset = factors[unit]
    converted = np.round(np.asarray(values, dtype=float) * factor + offset, 4)
    return converted, canonical, (converted >= low) & (converted <= high)


def range_error(code: str) -> str:
    """The message for a value outside the physiological range of a known code."""
    canonical, _, (low, high) = CANONICAL[code]
    return f"{code} value outside the physiological range {low}-{high} {canonical}"


def normalize(code: str, value: float | None, unit: str | None) -> tuple[float | None, str | None]:
    """(value, unit) in the canonical unit for known codes; raises UnitError when impossible."""
    if code not in CANONICAL or value is None:
        return value, unit
    converted, canonical, in_range = convert(code, unit, np.array([value]))
    if not in_range[0]:
        raise UnitError(range_error(code))
    return float(converted[0]), canonical
