"""Keyed pseudonyms and per-patient date shifts (HMAC-SHA256; the key never leaves the site)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, timedelta

MIN_KEY_BYTES = 32


class Pseudonymizer:
    """Turns identifiers into stable keyed pseudonyms and shifts dates per patient.

    The same identifier and key always give the same pseudonym; another key gives an
    unrelated one, so pseudonyms cannot be linked across sites.
    """

    def __init__(self, *, key: bytes, max_shift_days: int = 365) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"pseudonymization key must be at least {MIN_KEY_BYTES} random bytes")
        if max_shift_days < 1:
            raise ValueError("max_shift_days must be a positive number of days")
        self._key = bytes(key)
        self.max_shift_days = max_shift_days

    def _digest(self, domain: str, value: str) -> bytes:
        # the domain separates patient ids from encounter ids and shift derivation
        return hmac.new(self._key, f"{domain}\x1f{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, identifier: str, *, kind: str = "patient") -> str:
        """A 128-bit keyed pseudonym such as `P-3f9a...` for one identifier."""
        if not identifier:
            raise ValueError(f"cannot pseudonymize an empty {kind} identifier")
        return f"{kind[:1].upper()}-{self._digest(kind, identifier)[:16].hex()}"

    def date_offset(self, identifier: str) -> int:
        """The patient's date shift in days, in [-max_shift_days, max_shift_days], never 0."""
        raw = int.from_bytes(self._digest("date-shift", identifier)[:8], "big")
        offset = raw % (2 * self.max_shift_days) - self.max_shift_days
        return offset if offset < 0 else offset + 1

    def shift(self, value: date, identifier: str) -> date:
        """Shift a date by the patient's keyed offset; intervals between dates are kept."""
        return value + timedelta(days=self.date_offset(identifier))

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymizer(max_shift_days={self.max_shift_days})"


def age_at(birth: date, when: date, *, top_code: int = 90) -> int:
    """Age in whole years at `when`, with ages over 89 grouped as `top_code` (HIPAA Safe Harbor)."""
    years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    if years < 0:
        raise ValueError("birth date is after the reference date")
    return min(years, top_code)


# 3-digit ZIP areas with 20,000 people or fewer (2000 US Census, as HHS lists them for
# Safe Harbor): they must be reported as 000
SMALL_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
                        "878", "879", "884", "890", "893"})


def zip3(zip_code: str) -> str:
    """The first three digits of a US ZIP code, or 000 for sparsely populated areas (Safe Harbor)."""
    digits = "".join(ch for ch in str(zip_code) if ch.isdigit())
    if len(digits) < 3:
        raise ValueError("ZIP code has fewer than three digits")
    return "000" if digits[:3] in SMALL_ZIP3 else digits[:3]
