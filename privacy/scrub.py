"""Free-text scrubbing of HIPAA Safe Harbor identifiers (notes, report text, comments).

Pattern-based for structured identifiers (dates, phones, emails, SSNs, record and
licence numbers, URLs, IPs, street addresses, ZIP codes) plus the names the caller knows
belong to the patient (from the Patient resource or the extract), and capitalised words
after titles such as "Dr." or "Mrs.". Replacements are typed markers, so the text
stays readable for clinicians.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_STREET = r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Suite)"

# order matters: longer, more specific patterns first
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("[EMAIL]", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("[URL]", re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)),
    ("[IP]", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
    ("[DATE]", re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b")),
    ("[DATE]", re.compile(r"\b\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}\b")),
    ("[DATE]", re.compile(rf"\b{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", re.IGNORECASE)),
    ("[DATE]", re.compile(rf"\b\d{{1,2}}\s+{_MONTHS}\.?,?\s+\d{{4}}\b", re.IGNORECASE)),
    ("[SSN]", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("[PHONE]", re.compile(r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b")),
    ("[ADDRESS]", re.compile(rf"\b\d{{1,6}}\s+(?:[A-Z][\w'-]*\s+){{1,4}}{_STREET}\b\.?(?:\s+(?:Apt|Unit|#)\s*\w+)?")),
    ("[ID]", re.compile(r"\b(?=[A-Z0-9-]*\d)[A-Z]{1,4}-?\d{5,}[A-Z]?\b")),  # MRN12345678, S99966502, X89909962X
    ("[ID]", re.compile(r"\b\d{6,}\b")),
    ("[ZIP]", re.compile(r"\b\d{5}(?:-\d{4})?\b")),
    ("90+", re.compile(r"\b(?:9\d|1[0-4]\d)(?=[\s-]*(?:years?|yrs?)\b)", re.IGNORECASE)),  # ages over 89
    ("[NAME]", re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)?")),
)


def scrub(text: str, *, names: Iterable[str] = ()) -> str:
    """Replace identifiers in `text` with typed markers such as [NAME] or [DATE]."""
    tokens = sorted({t for n in names for t in re.split(r"[\s,]+", n or "") if len(t) >= 2}, key=len, reverse=True)
    if tokens:
        text = re.sub(r"\b(?:" + "|".join(re.escape(t) for t in tokens) + r")\b", "[NAME]", text, flags=re.IGNORECASE)
    for marker, pattern in PATTERNS:
        text = pattern.sub(marker, text)
    return text
