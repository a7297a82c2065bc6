"""The grammar of a generated future, as a per-step mask over the vocabulary.

After the arm token a twin may only write well-formed visits (a gap, then codes each
followed by one of its own value bins, no code twice in a visit), times that increase
and stay within the horizon, and exactly one outcome followed by <eos>, all within the
token budget. `FutureGrammar.allowed()` is the set of tokens that keep the sequence
completable; sampling only from it makes every generated sequence well-formed.
Refinement adds `Constraints` learned from a failed quality check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tokenizer import EventTokenizer


@dataclass(frozen=True)
class Constraints:
    """Extra bans for regeneration: tokens never allowed, and value tokens banned at a code's first future value."""

    banned: frozenset[int] = frozenset()
    first_value_banned: frozenset[int] = frozenset()
    allow_censoring: bool = False

    def merge(self, other: "Constraints") -> "Constraints":
        """These constraints plus the other's bans (censoring stays as set here)."""
        return Constraints(self.banned | other.banned, self.first_value_banned | other.first_value_banned,
                           self.allow_censoring)


@dataclass
class FutureGrammar:
    """State machine over the tokens after the arm token."""

    tok: EventTokenizer
    max_new: int
    constraints: Constraints = field(default_factory=Constraints)
    phase: str = "after_arm"  # after_gap, after_gap0, after_code, after_item, after_outcome, done
    t: float = 0.0
    n: int = 0
    code: str | None = None
    visit_codes: set = field(default_factory=set)
    seen_codes: set = field(default_factory=set)

    def __post_init__(self) -> None:
        tok = self.tok
        V = tok.vocab_size
        self._gap_days = np.array([tok.gap_days(i) for i in range(len(tok.gap_ids))])
        self._code_mask = np.zeros(V, dtype=bool)
        self._code_mask[list(tok.code_ids.values())] = True
        if self.constraints.banned:
            self._code_mask[list(self.constraints.banned)] = False
        self._outcome = [tok.outcome_ids["event"]] + ([tok.outcome_ids["censored"]]
                                                       if self.constraints.allow_censoring else [])
        if self.max_new < 3:
            raise ValueError(f"max_new must leave room for an outcome (>= 3 tokens), got {self.max_new}")

    @property
    def remaining(self) -> int:
        """Tokens still allowed."""
        return self.max_new - self.n

    def allowed(self) -> np.ndarray:
        """Boolean mask (V,) of the tokens that keep the sequence well-formed and completable."""
        tok, V = self.tok, self.tok.vocab_size
        m = np.zeros(V, dtype=bool)
        r = self.remaining
        if self.phase == "done":
            m[tok.pad_id] = True
            return m
        if self.phase == "after_outcome":
            m[tok.eos_id] = True
            return m
        if self.phase == "after_code":
            ids = tok.value_ids[self.code]
            m[ids] = True
            banned = self.constraints.banned | (self.constraints.first_value_banned
                                                if self.code not in self.seen_codes else frozenset())
            if banned:
                m[list(banned)] = False
                if not m.any():  # every bin banned: the least bad is still a value
                    m[ids] = True
            return m
        if self.phase == "after_gap0":
            m[self._outcome] = True
            return m
        if self.phase == "after_gap":
            if r >= 4:
                m |= self._code_mask
            m[self._outcome] = True
            return m
        # after_arm / after_item: end of follow-up, another visit, or an outcome on this day
        m[tok.outcome_ids["end"]] = True
        if r >= 3:  # gap, outcome, <eos> fit (a visit after the gap only when after_gap has room for it)
            fits = np.nonzero((self._gap_days[1:] + self.t) <= self.tok.spec.horizon_days)[0] + 1
            m[[tok.gap_ids[i] for i in fits]] = True
            m[tok.gap_ids[0]] = True  # an outcome on the same day, even the index day (as the tokenizer writes)
        if self.phase == "after_item" and r >= 4:
            m |= self._code_mask
            m[[tok.code_ids[c] for c in self.visit_codes]] = False
        if self.constraints.banned:
            m[list(self.constraints.banned)] = False
            m[tok.outcome_ids["end"]] = True  # never leave a sequence without a way to finish
        return m

    def advance(self, token: int) -> None:
        """Consume one token; raises ValueError when it is not allowed here."""
        if not self.allowed()[token]:
            raise ValueError(f"token {self.tok.tokens[token]!r} is not allowed after {self.phase}")
        self.n += 1
        fam, payload = self.tok.kind[token]
        if self.phase == "done":
            return
        if token == self.tok.eos_id:
            self.phase = "done"
        elif fam == "outcome":
            self.phase = "after_outcome"
        elif fam == "gap":
            self.t += self._gap_days[payload]
            self.visit_codes = set()
            self.phase = "after_gap0" if payload == 0 else "after_gap"
        elif fam == "code":
            self.visit_codes.add(payload)
            if payload in self.tok.value_ids:
                self.code, self.phase = payload, "after_code"
            else:
                self.seen_codes.add(payload)
                self.phase = "after_item"
        elif fam == "value":
            self.seen_codes.add(self.code)
            self.phase = "after_item"


def is_well_formed(tok: EventTokenizer, future: list[int], max_new: int) -> tuple[bool, str]:
    """Replay a generated future through the grammar: (ok, reason)."""
    g = FutureGrammar(tok, max_new=max_new, constraints=Constraints(allow_censoring=True))
    for i, t in enumerate(future):
        if t == tok.pad_id and g.phase == "done":
            continue
        try:
            g.advance(t)
        except ValueError as exc:
            return False, f"token {i}: {exc}"
    if g.phase != "done":
        return False, "sequence does not end with an outcome and <eos>"
    return True, ""
