"""Event vocabulary and tokenizer: canonical patient records <-> token sequences.

A sequence reads left to right as the patient's story:

    <bos> meta* cov+ visit* gap arm visit* outcome <eos>
    visit   := gap (code [value])+          one visit: a time gap, then its coded events
    outcome := gap out:event | gap out:censored | out:end

Gaps are forward steps in days from the previous visit (the first from the start of the
look-back window); the arm token marks the index date, so future times restart at 0 and
are the sums of the gaps after it. `out:end` means follow-up reached the horizon without
an event. The vocabulary is built deterministically from a `VocabSpec` (versioned, hashed
into every model manifest); unknown codes, categories and metadata map to one unknown
token per family and are counted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .record import Arm, Event, PatientRecord
from .summaries import DataSummary, NumericSummary, horizon as summary_horizon, level as _level, summarize

TOKENIZER_VERSION = "1"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
UNK = {"cov": "<unk:cov>", "code": "<unk:code>", "meta": "<unk:meta>"}
ARM_TOKENS = {Arm.CONTROL: "arm:control", Arm.TREATMENT: "arm:treatment"}
OUT_EVENT, OUT_CENSORED, OUT_END = "out:event", "out:censored", "out:end"
# gap bin lower edges in days: [0,1) is "same day" (only before an outcome or the index)
GAP_EDGES: tuple[float, ...] = (0, 1, 4, 8, 15, 31, 61, 91, 136, 181, 271, 366, 546, 731)
META_KEYS = ("indication", "phase", "endpoint")


def _round_sig(x: float, digits: int = 2) -> float:
    """Round to significant digits: coarse edges reveal less about individual patients."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1))


def _edges(values: NumericSummary, bins: int) -> tuple[float, ...]:
    qs = values.quantile(np.linspace(0, 1, bins + 1)[1:-1])
    return tuple(sorted({_round_sig(float(q)) for q in qs}))


@dataclass(frozen=True)
class CodeSpec:
    """One event code: its unit, value bin edges (empty: the code carries no value) and range."""

    code: str
    unit: str = ""
    edges: tuple[float, ...] = ()
    lo: float = 0.0  # decoding bounds of the outer bins (0.5% / 99.5% quantiles, rounded)
    hi: float = 0.0
    scale: float = 1.0  # robust spread, used by the quality gate's consistency check


@dataclass(frozen=True)
class VocabSpec:
    """Everything that defines the vocabulary; `fit` derives it from training records."""

    numeric: tuple[tuple[str, tuple[float, ...]], ...] = ()
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    codes: tuple[CodeSpec, ...] = ()
    meta: tuple[tuple[str, tuple[str, ...]], ...] = ()
    horizon_days: float = 1095.0
    history_days: float = 730.0
    max_len: int = 512
    prompt_budget: int = 192  # most tokens a prompt may use; the rest is room to generate
    version: str = TOKENIZER_VERSION

    def __post_init__(self) -> None:
        if not 0 < self.prompt_budget <= self.max_len - 3:
            raise ValueError(f"prompt_budget ({self.prompt_budget}) must leave room for an outcome within max_len "
                             f"({self.max_len}): use at most max_len - 3")

    def to_dict(self) -> dict:
        """JSON-able form (stored as the model directory's vocabulary file)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "VocabSpec":
        """Inverse of to_dict; refuses another tokenizer version."""
        if d.get("version") != TOKENIZER_VERSION:
            raise ValueError(f"vocabulary version {d.get('version')!r} is not supported (this build reads "
                             f"{TOKENIZER_VERSION!r}); retrain the model with this version")
        return cls(numeric=tuple((n, tuple(e)) for n, e in d["numeric"]),
                   categorical=tuple((n, tuple(l)) for n, l in d["categorical"]),
                   codes=tuple(CodeSpec(**{**c, "edges": tuple(c["edges"])}) for c in d["codes"]),
                   meta=tuple((k, tuple(v)) for k, v in d["meta"]),
                   horizon_days=d["horizon_days"], history_days=d["history_days"], max_len=d["max_len"],
                   prompt_budget=d["prompt_budget"], version=d["version"])


@dataclass
class Encoded:
    """A tokenized record: ids, where the prompt ends, and what did not fit the vocabulary."""

    ids: list[int]
    prompt_len: int
    unknown: Counter = field(default_factory=Counter)
    truncated_visits: int = 0


@dataclass(frozen=True)
class DecodedFuture:
    """A generated future: events after the index and the outcome."""

    events: tuple[Event, ...]
    status: str  # "event", "censored" or "end"
    time: float  # outcome (or horizon) time in days since the index


class DecodeError(ValueError):
    """A token sequence does not follow the grammar."""


class EventTokenizer:
    """Maps records to token ids and back, with a deterministic vocabulary."""

    def __init__(self, spec: VocabSpec) -> None:
        self.spec = spec
        tokens = [PAD, BOS, EOS, *UNK.values()]
        for key, values in spec.meta:
            tokens += [f"meta:{key}={v}" for v in values]
        for name, edges in spec.numeric:
            tokens += [f"cov:{name}#{i}" for i in range(len(edges) + 1)] + [f"cov:{name}#na"]
        for name, levels in spec.categorical:
            tokens += [f"cov:{name}={lvl}" for lvl in levels] + [f"cov:{name}#na"]
        tokens += list(ARM_TOKENS.values())
        tokens += [f"gap:{i}" for i in range(len(GAP_EDGES))]
        tokens += [f"code:{c.code}" for c in spec.codes]
        for c in spec.codes:
            if c.edges or c.hi > c.lo:
                tokens += [f"val:{c.code}#{i}" for i in range(len(c.edges) + 1)]
        tokens += [OUT_EVENT, OUT_CENSORED, OUT_END]
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens; covariate or code names collide")
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.codes = {c.code: c for c in spec.codes}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]
        self.gap_ids = [self.ids[f"gap:{i}"] for i in range(len(GAP_EDGES))]
        self.arm_ids = {arm: self.ids[t] for arm, t in ARM_TOKENS.items()}
        self.code_ids = {c.code: self.ids[f"code:{c.code}"] for c in spec.codes}
        self.value_ids = {c.code: [self.ids[f"val:{c.code}#{i}"] for i in range(len(c.edges) + 1)]
                          for c in spec.codes if f"val:{c.code}#0" in self.ids}
        self.outcome_ids = {s: self.ids[t] for s, t in (("event", OUT_EVENT), ("censored", OUT_CENSORED),
                                                        ("end", OUT_END))}
        self.kind = self._kinds()

    def _kinds(self) -> list[tuple[str, object]]:
        """Per token id: (family, payload) so the grammar and decoder need no string parsing."""
        kind: list[tuple[str, object]] = []
        gap_index = {t: i for i, t in enumerate(self.gap_ids)}
        code_of = {v: c for c, v in self.code_ids.items()}
        value_of = {v: (c, i) for c, ids in self.value_ids.items() for i, v in enumerate(ids)}
        outcome_of = {v: s for s, v in self.outcome_ids.items()}
        arm_of = {v: a for a, v in self.arm_ids.items()}
        for i, tok in enumerate(self.tokens):
            if i in gap_index:
                kind.append(("gap", gap_index[i]))
            elif i in code_of:
                kind.append(("code", code_of[i]))
            elif i in value_of:
                kind.append(("value", value_of[i]))
            elif i in outcome_of:
                kind.append(("outcome", outcome_of[i]))
            elif i in arm_of:
                kind.append(("arm", arm_of[i]))
            elif tok == UNK["code"]:
                kind.append(("code", None))
            else:
                kind.append(("special", tok))
        return kind

    # -- identity ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    def to_dict(self) -> dict:
        """The vocabulary document stored next to model weights."""
        return {"spec": self.spec.to_dict(), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "EventTokenizer":
        """Rebuild and check that the token list is exactly the stored one."""
        tok = cls(VocabSpec.from_dict(d["spec"]))
        if tok.tokens != d["tokens"]:
            raise ValueError("vocabulary file does not match its spec; the model directory was altered")
        return tok

    def hash(self) -> str:
        """sha256 of the vocabulary document."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, records: list[PatientRecord], *, covariates: list[str] | None = None,
            meta: dict[str, str] | None = None, horizon_days: float | None = None, min_count: int = 10,
            covariate_bins: int = 5, value_bins: int = 8, max_len: int = 512, history_days: float = 730.0,
            prompt_budget: int | None = None) -> "EventTokenizer":
        """Derive the vocabulary from training records.

        Categories and codes seen in fewer than `min_count` patients are left out (they
        become unknown tokens), and bin edges are quantiles rounded to two significant
        digits, so the vocabulary does not single out rare patients. It is not covered by
        the training epsilon.
        """
        if not records:
            raise ValueError("no records to build a vocabulary from")
        summary = summarize(records, covariates=covariates, history_days=history_days, min_count=min_count)
        return cls.from_summary(summary, meta=meta, horizon_days=horizon_days, covariate_bins=covariate_bins,
                                value_bins=value_bins, max_len=max_len, prompt_budget=prompt_budget)

    @classmethod
    def from_summary(cls, summary: DataSummary, *, meta: dict[str, str] | None = None,
                     horizon_days: float | None = None, covariate_bins: int = 5, value_bins: int = 8,
                     max_len: int = 512, prompt_budget: int | None = None) -> "EventTokenizer":
        """The vocabulary from a data summary: one site's, or the merge of every site's (see `fit`)."""
        min_count = summary.min_count
        numeric, categorical = [], []
        for col in summary.columns:
            if col.observed and col.numeric and not col.binary:
                numeric.append((col.name, _edges(col.values, covariate_bins) if col.values is not None else ()))
            else:
                categorical.append((col.name, tuple(sorted(lv for lv, n in col.levels.items() if n >= min_count))))
        codes = []
        for c in summary.codes:
            if c.carriers < min_count:
                continue
            unit = max(c.units, key=lambda u: (c.units[u], u == "")) if c.units else ""
            v = c.values
            if v is not None and v.n >= min_count:
                q = v.quantile([0.005, 0.25, 0.75, 0.995])
                scale = _round_sig(float((q[2] - q[1]) / 1.349) or v.std() or 1.0)
                codes.append(CodeSpec(c.code, unit, _edges(v, value_bins), _round_sig(float(q[0])),
                                      _round_sig(float(q[3])), scale))
            else:
                codes.append(CodeSpec(c.code, unit))
        if horizon_days is None:
            horizon_days = summary_horizon(summary, 0.75)
        history_days = summary.history_days
        meta_spec = tuple((k, (str(meta[k]),)) for k in META_KEYS if meta and meta.get(k))
        spec = VocabSpec(numeric=tuple(numeric), categorical=tuple(categorical), codes=tuple(codes),
                         meta=meta_spec, horizon_days=float(horizon_days), history_days=history_days,
                         max_len=max_len,
                         prompt_budget=prompt_budget or min(max(32, max_len * 3 // 8), max_len - 3))
        return cls(spec)

    # -- encoding ----------------------------------------------------------------------------
    def _static(self, record: PatientRecord, meta: dict[str, str] | None, unknown: Counter) -> list[int]:
        ids = [self.bos_id]
        for key, _values in self.spec.meta:
            tok = f"meta:{key}={(meta or {}).get(key)}"
            if tok not in self.ids:
                unknown["meta"] += 1
            ids.append(self.ids.get(tok, self.ids[UNK["meta"]]))
        for name, edges in self.spec.numeric:
            v = record.baseline.get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                ids.append(self.ids[f"cov:{name}#na"])
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or math.isinf(v):
                raise ValueError(f"patient {record.patient_id[:12]}: covariate {name!r} must be a finite number, "
                                 f"got {v!r}; fix the input column")
            else:
                ids.append(self.ids[f"cov:{name}#{bisect.bisect_right(edges, float(v))}"])
        for name, levels in self.spec.categorical:
            v = record.baseline.get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                ids.append(self.ids[f"cov:{name}#na"])
            elif _level(v) in levels:
                ids.append(self.ids[f"cov:{name}={_level(v)}"])
            else:
                unknown["cov"] += 1
                ids.append(self.ids[UNK["cov"]])
        return ids

    def gap_bin(self, days: float) -> int:
        """Index of the gap bin holding `days` (>= 0)."""
        return max(0, bisect.bisect_right(GAP_EDGES, days) - 1)

    def gap_days(self, index: int) -> float:
        """Representative length of a gap bin (geometric middle; the last bin: its edge x 1.25)."""
        lo = GAP_EDGES[index]
        if index + 1 < len(GAP_EDGES):
            hi = GAP_EDGES[index + 1]
            return 0.0 if lo == 0 else float(round(math.sqrt(lo * hi)))
        return float(round(lo * 1.25))

    def _visits(self, events, unknown: Counter) -> list[tuple[float, list[int]]]:
        """Group events by time into visits of (code[, value]) token ids."""
        by_time: dict[float, list[int]] = {}
        for e in sorted(events, key=lambda e: (e.time, e.code)):
            c = self.codes.get(e.code)
            toks = by_time.setdefault(e.time, [])
            if c is not None and self.code_ids[e.code] in toks:
                # a code measured twice on one visit: the grammar allows one, keep the first
                unknown["duplicate"] += 1
                continue
            if c is None:
                unknown["code"] += 1
                toks.append(self.ids[UNK["code"]])
                continue
            toks.append(self.code_ids[e.code])
            if e.code in self.value_ids:
                if e.value is None:
                    # a valued code without its value: keep the visit, drop the value
                    toks.pop()
                    unknown["value"] += 1
                    continue
                toks.append(self.value_ids[e.code][bisect.bisect_right(c.edges, e.value)])
        return sorted(by_time.items())

    def _gapped(self, visits: list[tuple[float, list[int]]], start: float) -> list[list[int]]:
        out, t = [], start
        for time, toks in visits:
            if not toks:
                continue
            out.append([self.gap_ids[self.gap_bin(time - t)], *toks])
            t = time
        return out

    def _future_gapped(self, visits: list[tuple[float, list[int]]]) -> list[list[int]]:
        """Future visits with gaps the grammar can replay.

        Future times decode as sums of representative gaps, so each gap is chosen against
        that decoded clock (errors do not accumulate), is never "same day" before a code,
        and never carries the clock past the horizon; a visit that cannot fit is dropped.
        """
        out, t, h = [], 0.0, self.spec.horizon_days
        for time, toks in visits:
            if not toks:
                continue
            b = max(1, self.gap_bin(time - t))
            while b > 1 and t + self.gap_days(b) > h:
                b -= 1
            if t + self.gap_days(b) > h:
                continue
            out.append([self.gap_ids[b], *toks])
            t += self.gap_days(b)
        return out

    def encode(self, record: PatientRecord, *, arm: Arm | None = None, meta: dict[str, str] | None = None,
               with_future: bool = True) -> Encoded:
        """Tokenize a record; `arm` overrides the record's (for counterfactual prompts).

        The prompt (everything up to and including the arm token) keeps the newest history
        that fits `prompt_budget`; a training sequence longer than `max_len` also drops its
        latest future visits. Both are counted in `truncated_visits`.
        """
        arm = record.arm if arm is None else arm
        if arm is None:
            raise ValueError(f"patient {record.patient_id[:12]} has no arm; pass the arm to simulate")
        unknown: Counter = Counter()
        static = self._static(record, meta, unknown)
        window = [e for e in record.events if -self.spec.history_days <= e.time <= 0]
        hist = self._visits(window, unknown)
        hist_blocks = self._gapped(hist, -self.spec.history_days)
        truncated = 0
        room = self.spec.prompt_budget - len(static) - 2  # gap + arm
        while hist_blocks and sum(map(len, hist_blocks)) > room:
            hist_blocks.pop(0)
            truncated += 1
        if room < 0:
            raise ValueError(f"prompt_budget {self.spec.prompt_budget} is smaller than the baseline tokens "
                             f"({len(static)}); raise max_len")
        kept = [time for time, toks in hist if toks]  # a visit whose every event was dropped has no block
        last_hist = kept[-1] if kept and hist_blocks else -self.spec.history_days
        prompt = static + [t for b in hist_blocks for t in b]
        prompt += [self.gap_ids[self.gap_bin(0 - last_hist)], self.arm_ids[Arm(arm)]]
        ids = list(prompt)
        if with_future:
            h = self.spec.horizon_days
            o = record.outcomes
            end = min(o.time_to_event, h) if o.time_to_event is not None else h
            fut_visits = [v for v in self._visits([e for e in record.events if 0 < e.time <= end], unknown) if v[1]]
            fut_blocks = self._future_gapped(fut_visits)
            truncated += len(fut_visits) - len(fut_blocks)
            room = self.spec.max_len - len(prompt) - 3
            while fut_blocks and sum(map(len, fut_blocks)) > room:
                fut_blocks.pop()
                truncated += 1
            last = _future_time(self, fut_blocks)
            ids += [t for b in fut_blocks for t in b]
            ids += self._outcome_tokens(o, last)
            ids.append(self.eos_id)
        return Encoded(ids=ids, prompt_len=len(prompt), unknown=unknown, truncated_visits=truncated)

    def _outcome_tokens(self, o, last: float) -> list[int]:
        h = self.spec.horizon_days
        if o.time_to_event is None:
            # no time-to-event endpoint: follow-up simply stops after the last visit
            return [self.gap_ids[0], self.outcome_ids["censored"]]
        if o.time_to_event >= h and not (o.event and o.time_to_event == h):
            return [self.outcome_ids["end"]]
        b = self.gap_bin(max(o.time_to_event - last, 0.0))
        while b > 0 and last + self.gap_days(b) > h:  # the grammar keeps every time within the horizon
            b -= 1
        return [self.gap_ids[b], self.outcome_ids["event" if o.event else "censored"]]

    def token_strings(self, ids: list[int]) -> list[str]:
        """Token names, for reports and evaluation."""
        return [self.tokens[i] for i in ids]

    # -- decoding ----------------------------------------------------------------------------
    def value_of(self, code: str, index: int) -> float:
        """Representative value of a value bin: its middle (outer bins: towards lo/hi)."""
        c = self.codes[code]
        edges = (c.lo, *c.edges, c.hi)
        lo, hi = edges[index], edges[index + 1]
        return float(_round_sig((lo + hi) / 2, 4))

    def decode_future(self, ids: list[int]) -> DecodedFuture:
        """Decode generated tokens (after the arm token) into events and an outcome."""
        events: list[Event] = []
        t, i, n = 0.0, 0, len(ids)
        pending_code: str | None = None
        while i < n:
            fam, payload = self.kind[ids[i]]
            if fam == "gap":
                if pending_code is not None:
                    raise DecodeError(f"token {i}: code {pending_code} has no value")
                t = t + self.gap_days(payload)
                i += 1
                fam2, p2 = self.kind[ids[i]] if i < n else ("special", EOS)
                if fam2 == "outcome" and p2 != "end":
                    return DecodedFuture(tuple(events), p2, min(t, self.spec.horizon_days))
                if fam2 != "code":
                    raise DecodeError(f"token {i}: a gap must be followed by a code or an outcome")
                continue
            if fam == "code":
                if payload is None:
                    i += 1
                    continue
                if payload in self.value_ids:
                    if i + 1 >= n or self.kind[ids[i + 1]][0] != "value" or self.kind[ids[i + 1]][1][0] != payload:
                        raise DecodeError(f"token {i + 1}: code {payload} must be followed by its value")
                    v = self.value_of(payload, self.kind[ids[i + 1]][1][1])
                    events.append(Event(time=t, code=payload, value=v, unit=self.codes[payload].unit or None))
                    i += 2
                else:
                    events.append(Event(time=t, code=payload, unit=self.codes[payload].unit or None))
                    i += 1
                continue
            if fam == "outcome" and payload == "end":
                return DecodedFuture(tuple(events), "end", self.spec.horizon_days)
            raise DecodeError(f"token {i}: unexpected {self.tokens[ids[i]]!r}")
        raise DecodeError("sequence ends without an outcome token")


def _future_time(tok: EventTokenizer, blocks: list[list[int]]) -> float:
    return sum(tok.gap_days(tok.kind[b[0]][1]) for b in blocks)


def default_horizon(records: list[PatientRecord], quantile: float = 0.75) -> float:
    """Follow-up most patients reach: a quantile of observed times (default the 75th), rounded to 30 days."""
    if not records:
        return 365.0
    return summary_horizon(summarize(records, covariates=[], min_count=1), quantile)
