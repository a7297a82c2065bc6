"""The egress guard: what a site sends is a typed aggregate schema, or it is refused before anything keeps it.

Every site payload endpoint hands the raw body to `check_payload`. The body is walked first
(depth, list sizes, rows of values, identifier-like strings in any key or value), then validated
with `Model.model_validate_json(raw)` (closed, strict, bounded: `federated.payloads`), then
checked for lists as long as the cohort it reports and for the site it names. A refusal carries
a reason from a closed vocabulary and a location made only of the schema's own field names:
never the offending value, nor an unexpected field's name (either could be the identifier).
`record_rejection` audits the attempt (site, endpoint, reason, size; never the body).
"""

from __future__ import annotations

import hashlib
import json
import logging
import types
import typing
from datetime import datetime
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError
from sqlmodel import Session

from evoclone.federated.payloads import MAX_ITEMS, MIN_COUNT, SitePayload, canonical_bytes, identifier_kind

from .audit import append_event
from .errors import InvalidInput

log = logging.getLogger("evoclone.coordinator.egress")
P = TypeVar("P", bound=SitePayload)
MAX_DEPTH = 6  # payload -> list -> entry -> value is 4 levels; anything deeper is not one of our schemas
UNKNOWN = "<unexpected field>"
ROUNDING_SLACK = 5  # counts arrive rounded to tens

REASONS = {
    "not_json": "the body is not a JSON object",
    "too_deep": f"the body nests deeper than {MAX_DEPTH} levels",
    "oversized_list": f"a list holds more than {MAX_ITEMS} entries",
    "per_row_array": "a list of rows or of many plain values looks patient-level",
    "identifier": "a string looks like an identifier",
    "schema": "the body does not match the schema",
    "cohort_shaped_list": "a list as long as the reported cohort looks patient-level",
    "site_mismatch": "the payload names another site than the one its token belongs to",
    "unsigned": "the report is not signed",
    "unknown_key": "the report is signed with a key the coordinator has not registered for this site",
    "bad_signature": "the report's signature does not verify",
}
_REMEDY = {
    "schema": "send only the aggregate fields of the payload's schema (federated.payloads; see /docs)",
    "site_mismatch": "send a site's reports with that site's own token",
    "unsigned": "sign the report with the site's registered report key",
    "bad_signature": "sign the report with the site's registered report key",
    "unknown_key": "register the site's report key with PUT /api/v1/reports/key, or ask an admin to remove the old one",
}
_PHRASES = {
    "extra_forbidden": "is not a field of the schema", "missing": "is required",
    "string_pattern_mismatch": "does not match the allowed pattern", "string_too_long": "is too long",
    "string_too_short": "is too short", "too_long": "has too many entries", "too_short": "has too few entries",
    "literal_error": "is not one of the allowed values", "finite_number": "must be a finite number",
    "multiple_of": "must be a multiple of 10 (counts are rounded to tens)",
}
_WRONG_TYPE = ("_type", "_parsing")
_OUT_OF_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


class EgressRejected(InvalidInput):
    """A site payload the guard refused: `reason` is from REASONS, `where` names only schema fields."""

    def __init__(self, reason: str, where: str = "body", detail: str = "") -> None:
        self.reason, self.where = reason, where
        text = f"{where}: {REASONS[reason]}{f' ({detail})' if detail else ''}"
        super().__init__(f"payload refused: {text}; {_REMEDY.get(reason, _REMEDY['schema'])}")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models an annotation holds (in tuples, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_datetime(annotation: Any) -> bool:
    if annotation is datetime:
        return True
    return isinstance(annotation, types.UnionType | type(typing.Union[int, str])) and \
        any(_is_datetime(a) for a in typing.get_args(annotation))


def _scalar_list(annotation: Any) -> bool:
    """Whether a field is declared as a list of plain values (approved app hashes, say)."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return not _models_in(annotation)
    return any(_scalar_list(a) for a in typing.get_args(annotation))


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for sub in _models_in(f.annotation):
            names |= _field_names(sub)
    return names


def _join(path: str, label: str) -> str:
    return f"{path}.{label}" if path else label


def _walk(node: Any, model: type[BaseModel] | None, path: str, depth: int, *, is_dt: bool = False,
          scalars: bool = False) -> None:
    """Refuse deep nesting, long lists, rows of values and identifier-like strings anywhere."""
    if depth > MAX_DEPTH:
        raise EgressRejected("too_deep", path or "body")
    if isinstance(node, dict):
        for key, value in node.items():
            known = model is not None and key in model.model_fields
            where = _join(path, key) if known else path if path.endswith(UNKNOWN) else _join(path, UNKNOWN)
            kind = identifier_kind(key)
            if kind is not None:
                raise EgressRejected("identifier", where, kind)
            field = model.model_fields[key] if known else None
            sub = _models_in(field.annotation) if field is not None else []
            _walk(value, sub[0] if sub else None, where, depth + 1,
                  is_dt=field is not None and _is_datetime(field.annotation),
                  scalars=field is not None and _scalar_list(field.annotation))
    elif isinstance(node, list):
        where = path or "body"
        if len(node) > MAX_ITEMS:
            raise EgressRejected("oversized_list", where)
        if (len(node) >= 2 and all(isinstance(x, list) for x in node)) or (not scalars and sum(
                isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in node) >= MIN_COUNT):
            raise EgressRejected("per_row_array", where)  # no schema has rows, nor plain values where not declared
        for item in node:
            _walk(item, model, where, depth + 1)
    elif isinstance(node, str) and not is_dt:
        kind = identifier_kind(node)
        if kind is not None:
            raise EgressRejected("identifier", path or "body", kind)


def _schema_error(exc: ValidationError, model: type[BaseModel]) -> EgressRejected:
    known = _field_names(model)
    e = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    if e["type"] == "json_invalid":
        return EgressRejected("not_json")
    parts: list[str] = []
    for p in e.get("loc", ()):
        if not (isinstance(p, int) or p in known):
            parts.append(UNKNOWN)
            break  # nothing below an unexpected field is named either
        parts.append(str(p))
    where = ".".join(parts) or "body"
    t = e["type"]
    if t in _PHRASES:
        phrase = _PHRASES[t]
    elif t == "value_error":  # our own validators' messages, which never quote a value
        phrase = str(e.get("msg", "")).removeprefix("Value error, ").split(":")[-1].strip() or "breaks a schema rule"
    elif t.endswith(_WRONG_TYPE):
        phrase = "has the wrong type"
    elif t in _OUT_OF_RANGE:
        phrase = "is out of range"
    else:
        phrase = f"is invalid ({t})"
    return EgressRejected("schema", where, phrase)


def _cohort(payload: BaseModel) -> int | None:
    """The smallest patient count a payload reports (fields `*_count` or `patients`), if any is positive."""
    counts = [v for k, v in payload if (k.endswith("_count") or k == "patients") and isinstance(v, int) and v > 0]
    return min(counts) if counts else None


def check_payload(raw: bytes, model: type[P], *, site: str) -> P:
    """The validated payload of `raw` sent by `site`; EgressRejected (422, a one-line reason) otherwise."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EgressRejected("not_json") from None
    if not isinstance(doc, dict):
        raise EgressRejected("not_json")
    _walk(doc, model, "", 0)
    try:
        payload = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _schema_error(exc, model) from None
    cohort = _cohort(payload)
    if cohort is not None:
        for name, value in payload:
            if isinstance(value, tuple) and len(value) >= MIN_COUNT and len(value) >= cohort - ROUNDING_SLACK:
                raise EgressRejected("cohort_shaped_list", name)
    if payload.site != site:
        raise EgressRejected("site_mismatch", "site")
    return payload


def verify_signature(payload: SitePayload, *, public_key_hex: str) -> None:
    """Check a payload's Ed25519 signature over its canonical bytes; EgressRejected when it does not verify."""
    signature = getattr(payload, "signature", None)
    if not signature:
        raise EgressRejected("unsigned", "signature")
    if getattr(payload, "key_fingerprint", None) is not None:
        if hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest() != payload.key_fingerprint:
            raise EgressRejected("unknown_key", "key_fingerprint")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(signature),
                                                                                 canonical_bytes(payload))
    except (InvalidSignature, ValueError):
        raise EgressRejected("bad_signature", "signature") from None


def record_rejection(*, session: Session, site: str, endpoint: str, rejection: EgressRejected, size: int,
                     request_id: str = "") -> None:
    """Audit a refused payload (site, endpoint, reason, where, size; never the body) in the caller's transaction."""
    append_event(session=session, action="egress.reject", outcome="rejected", actor=f"site:{site}", role="site",
                 resource=endpoint, request_id=request_id,
                 detail={"endpoint": endpoint, "reason": rejection.reason, "where": rejection.where, "bytes": size})
    log.warning("egress guard refused a payload from site %s at %s: %s at %s", site, endpoint, rejection.reason,
                rejection.where)
