"""FHIR R4 ingest: Bundle JSON (transaction, collection, searchset) and NDJSON bulk exports.

Every resource is validated with `fhir.resources` (R4B models, which read R4 content);
supported resources become timeline events of the canonical record, base64 report text
becomes scrubbed notes, unknown resource types are counted and skipped. The index date
of a FHIR patient is the start of their first encounter (or their earliest dated
resource); every time is days since it, and the index date itself is shifted per patient.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from evoclone.federated.record import Event, Note, PatientRecord
from evoclone.privacy.pseudonym import Pseudonymizer, age_at, zip3
from evoclone.privacy.scrub import scrub

from .ingest import IngestError, IngestIssue
from .units import UnitError, normalize

SUPPORTED = {"Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "MedicationAdministration",
             "MedicationStatement", "Procedure", "Immunization", "DiagnosticReport", "AllergyIntolerance",
             "DocumentReference"}
BUNDLE_TYPES = {"transaction", "collection", "searchset", "batch", "document", "message"}


@dataclass
class FhirResult:
    """Records plus what was skipped."""

    records: list[PatientRecord]
    skipped: Counter = field(default_factory=Counter)
    resources: int = 0


def _iter_resources(path: Path, issues: list[IngestIssue]) -> Iterator[tuple[str, dict]]:
    """(location, resource dict) for every resource in a Bundle file or an NDJSON file."""
    name = path.name
    if path.suffix.lower() == ".ndjson":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"line {i}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        issues.append(IngestIssue(name, f"line {i}", "-", f"not JSON ({exc.msg})"))
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        issues.append(IngestIssue(name, "file", "-", "not UTF-8 text"))
        return
    except json.JSONDecodeError as exc:
        issues.append(IngestIssue(name, f"line {exc.lineno}", "-", f"not JSON ({exc.msg}); truncated file?"))
        return
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        if isinstance(doc, dict) and "resourceType" in doc:
            yield "resource 0", doc
            return
        issues.append(IngestIssue(name, "file", "resourceType", "not a FHIR Bundle or resource"))
        return
    if doc.get("type") not in BUNDLE_TYPES:
        issues.append(IngestIssue(name, "Bundle", "type", f"unsupported Bundle type {doc.get('type')!r}"))
        return
    for i, entry in enumerate(doc.get("entry") or []):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            issues.append(IngestIssue(name, f"entry {i}", "resource", "entry has no resource"))
            continue
        yield f"entry {i} ({res.get('resourceType', '?')}/{res.get('id', '?')})", res


def _when(model, *fields: str) -> datetime | date | None:
    for f in fields:
        v = getattr(model, f, None)
        if v is None:
            continue
        if f.endswith("Period") or f == "period":
            v = v.start
        if isinstance(v, datetime | date):
            return v
    return None


def _day(v: datetime | date) -> date:
    return v.date() if isinstance(v, datetime) else v


def _code(cc, default: str) -> str:
    if cc is None or not cc.coding:
        return default
    c = cc.coding[0]
    # LOINC codes stay bare (they are the lab codes every adapter shares); other systems
    # keep a short prefix from the end of their URI (sct, cvx, rxnorm, ...)
    system = (c.system or "").rstrip("/").rsplit("/", 1)[-1].upper()
    return str(c.code) if system in ("LOINC.ORG", "") else f"{system}:{c.code}"


def _subject(res: dict) -> str | None:
    ref = (res.get("subject") or res.get("patient") or {}).get("reference") if isinstance(res, dict) else None
    if not ref:
        return None
    return ref.split("/", 1)[1] if ref.startswith("Patient/") else ref.removeprefix("urn:uuid:")


def read_fhir(paths: list[Path], *, site: str, pseudonymizer: Pseudonymizer) -> FhirResult:
    """Parse, validate and anonymize FHIR files; raise IngestError listing every problem."""
    issues: list[IngestIssue] = []
    result = FhirResult(records=[])
    patients: dict[str, object] = {}
    items: list[tuple[str, str, str, object]] = []  # (patient id, source, location, model)
    for path in paths:
        for loc, res in _iter_resources(path, issues):
            result.resources += 1
            rtype = res.get("resourceType")
            if rtype not in SUPPORTED:
                result.skipped[str(rtype)] += 1
                continue
            try:
                model = get_fhir_model_class(rtype).model_validate(res)
            except (ValidationError, ValueError) as exc:
                errs = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("-",), "msg": str(exc)}]
                first = errs[0]
                # the message names the field, never the offending value (it may be an identifier)
                issues.append(IngestIssue(path.name, loc.split(" (")[0], ".".join(map(str, first["loc"])),
                                          first["msg"].split(":")[0]))
                continue
            if rtype == "Patient":
                patients[str(model.id)] = model
            else:
                items.append((_subject(res) or "", path.name, loc.split(" (")[0], model))
    if not patients and not issues:
        issues.append(IngestIssue(paths[0].name if paths else "-", "Bundle", "Patient", "no Patient resource; every batch needs its patients"))
    by_patient: dict[str, list[tuple[str, str, object]]] = {pid: [] for pid in patients}
    for pid, src, loc, model in items:
        if pid not in by_patient:
            issues.append(IngestIssue(src, loc, "subject", "refers to a Patient that is not in this batch"))
            continue
        by_patient[pid].append((src, loc, model))
    for pid, patient in patients.items():
        record = _record(pid, patient, by_patient[pid], site=site, pseudonymizer=pseudonymizer, issues=issues)
        if record is not None:
            result.records.append(record)
    if issues:
        raise IngestError(issues)
    return result


def _names(patient) -> list[str]:
    names = []
    for n in patient.name or []:
        names += [*(n.given or []), n.family or "", *(n.prefix or []), *(n.suffix or [])]
    for ext in patient.extension or []:
        if ext.url.endswith("patient-mothersMaidenName") and ext.valueString:
            names.append(ext.valueString)
    return [n for n in names if n]


def _record(pid: str, patient, items, *, site: str, pseudonymizer: Pseudonymizer,
            issues: list[IngestIssue]) -> PatientRecord | None:
    dated: list[tuple[date, str, str, object]] = []
    for src, loc, m in items:
        when = _when(m, "period", "effectiveDateTime", "effectiveInstant", "effectivePeriod", "onsetDateTime",
                     "recordedDate", "authoredOn", "performedDateTime", "performedPeriod", "occurrenceDateTime",
                     "date", "issued")
        if when is None:
            issues.append(IngestIssue(src, loc, "effective[x]", "no date; cannot place it on the timeline"))
            continue
        dated.append((_day(when), src, loc, m))
    encounters = [d for d, _, _, m in dated if m.__resource_type__ == "Encounter"]
    if not dated:
        index = None
    else:
        index = min(encounters) if encounters else min(d for d, *_ in dated)
    birth = patient.birthDate
    if birth is None or index is None:
        issues.append(IngestIssue("Patient", f"Patient {pseudonymizer.pseudonym(pid)}", "birthDate" if birth is None else "-",
                                  "missing birth date" if birth is None else "no dated resources for this patient"))
        return None
    names = _names(patient)
    events: list[Event] = []
    notes: list[Note] = []
    for day, src, loc, m in dated:
        if day < birth:
            issues.append(IngestIssue(src, loc, "date", "before the patient's birth date"))
            continue
        if day > date.today():
            issues.append(IngestIssue(src, loc, "date", "in the future"))
            continue
        t = float((day - index).days)
        try:
            events += _events(m, t)
        except UnitError as exc:
            issues.append(IngestIssue(src, loc, "valueQuantity", str(exc)))
        notes += _notes(m, t, names)
    zip_code = next((a.postalCode for a in patient.address or [] if a.postalCode), None)
    return PatientRecord(
        patient_id=pseudonymizer.pseudonym(pid), site=site, index_date=pseudonymizer.shift(index, pid),
        baseline={"age": float(age_at(birth, index)), "sex": {"male": "M", "female": "F"}.get(patient.gender or "", None),
                  "zip3": zip3(zip_code) if zip_code else None},
        arm=None, events=tuple(sorted(events, key=lambda e: (e.time, e.code))), notes=tuple(notes))


def _events(m, t: float) -> list[Event]:
    rtype = m.__resource_type__
    if rtype == "Observation":
        out = []
        if m.valueQuantity is not None:
            out.append(_quantity(_code(m.code, "OBS"), m.valueQuantity, t))
        elif m.valueCodeableConcept is not None:
            out.append(Event(time=t, code=f"{_code(m.code, 'OBS')}={_code(m.valueCodeableConcept, '?')}"))
        for comp in m.component or []:
            if comp.valueQuantity is not None:
                out.append(_quantity(_code(comp.code, "OBS"), comp.valueQuantity, t))
        return out
    code_field = {"Encounter": "type", "Condition": "code", "Procedure": "code", "Immunization": "vaccineCode",
                  "DiagnosticReport": "code", "AllergyIntolerance": "code", "DocumentReference": "type"}.get(rtype)
    if rtype.startswith("Medication"):
        cc = getattr(m, "medicationCodeableConcept", None)
        return [Event(time=t, code=f"{rtype}:{_code(cc, 'MED')}")]
    cc = getattr(m, code_field, None) if code_field else None
    if isinstance(cc, list):
        cc = cc[0] if cc else None
    return [Event(time=t, code=f"{rtype}:{_code(cc, rtype.upper())}")]


def _quantity(code: str, q, t: float) -> Event:
    value, unit = normalize(code, float(q.value) if q.value is not None else None, q.code or q.unit)
    return Event(time=t, code=code, value=value, unit=unit)


def _notes(m, t: float, names: list[str]) -> list[Note]:
    attachments = []
    if m.__resource_type__ == "DiagnosticReport":
        attachments = list(m.presentedForm or [])
    elif m.__resource_type__ == "DocumentReference":
        attachments = [c.attachment for c in m.content or [] if c.attachment is not None]
    out = []
    for a in attachments:
        if a.data and (a.contentType or "text/plain").startswith("text/"):
            raw = a.data if isinstance(a.data, bytes) else base64.b64decode(a.data)
            out.append(Note(time=t, kind=m.__resource_type__, text=scrub(raw.decode("utf-8", "replace"), names=names)))
    return out
