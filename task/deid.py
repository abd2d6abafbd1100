"""De-identification of a site's texts before they are tokenised (`task.deidentify=true`).

What it is: a pattern-based PII scrubber that runs at the site on every record of a text
task before the tokenizer sees it, replacing each value it recognises by a typed
placeholder ("[PHONE]", "[EMAIL]", ...; consistent, the value itself is not kept). What it
is not: a privacy guarantee. It lowers the chance that a verbatim identifier is memorised
into the model; the guarantee is DP-SGD's ε (docs/auditor.md). Names, addresses and free-text
identifiers need a named-entity model: they are NOT caught (docs/site-operator.md).

Recognisers, in the order they run (a later one never looks inside an earlier one's
placeholder, so scrubbing scrubbed text changes nothing):

1. the site's own patterns (`task.deidentify_patterns`, "NAME=REGEX": record numbers, MRN
   formats), first because they are the most specific (a deployed site runs only its own,
   never a coordinator's: client/app.py `_own_scrubbing`);
2. e-mail addresses and URLs (regular expressions);
3. IBANs (ISO 13616 mod-97 checksum, `stdnum.iban`) and payment card numbers (Luhn,
   `stdnum.luhn`, 13 to 19 digits with an issuer prefix);
4. national identity numbers of the regions in `task.deidentify_regions`, each in its usual
   written form and with its checksum where it has one (python-stdnum: US SSN, GB NHS number,
   CA SIN, IN Aadhaar, BR CPF, ES DNI, NL BSN, SE personnummer, DK CPR, FR NIR);
5. IPv4 and IPv6 addresses (candidates checked by `ipaddress`);
6. phone numbers (Google's libphonenumber port, `phonenumbers.PhoneNumberMatcher` at
   leniency VALID: valid under today's numbering plans, so retired or reserved ranges are
   missed; POSSIBLE would also take counts like "1234567" in prose): numbers in
   international form (+CC) always, national forms for each region in
   `task.deidentify_regions`; digits written mostly one by one (a tennis score) are not;
7. full calendar dates (day, month and year: 2021-05-03, 03/05/2021, 3 May 2021, May 3,
   2021), checked to be real dates. A year or a month alone ("in 2021", "in May") is left.

Why these libraries. Presidio needs a spaCy model download (not possible here, and a
model is no part of a site's install). scrubadub 2.0.1 (last release 2023-09) installs and
runs offline with its pattern detectors, but it pulls nltk, textblob 0.15 and Faker, has no
IBAN or national-ID checksums, and missed a spaced card number ("4111 1111 1111 1111") in
our check; its phone detector is `phonenumbers` anyway. `phonenumbers` (tracks Google's
metadata, released monthly) and `python-stdnum` (checksummed identifiers for 100+
countries) are small, pure Python, maintained, and need no data download.

Per-type counts (never a value) stay at the site: its log and `<state dir>/deidentified.json`
(client/app.py); nothing of this leaves the site.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedshield.conf.schema import DEIDENTIFY_TYPES, split_deidentify_pattern
from fedshield.privacy.errors import FedShieldError

if TYPE_CHECKING:
    from fedshield.conf.schema import TaskConfig
    from fedshield.task.data import LabeledData

COUNTS_FILE = "deidentified.json"

# The built-in entity types, as their placeholders name them (conf/schema.py keeps the list:
# a site pattern may not take one of these names).
EMAIL, URL, IBAN, CARD, NATIONAL_ID, IP, PHONE, DATE = DEIDENTIFY_TYPES

# A placeholder: what no recogniser looks inside (idempotence). Site pattern names are
# upper-case identifiers (conf/schema.py), so every placeholder has this one shape.
_PLACEHOLDER = re.compile(r"(\[[A-Z][A-Z0-9_]*\])")


class DeidentifyError(FedShieldError):
    """A de-identification setting that cannot work (a pattern, a region)."""


@dataclass(frozen=True)
class DeidSpec:
    """What a site scrubs with, hashable: the site patterns (name, regex) and the regions."""

    patterns: tuple[tuple[str, str], ...] = ()
    regions: tuple[str, ...] = ()

    @classmethod
    def of(cls, task: TaskConfig) -> DeidSpec | None:
        """The spec of a validated `task` section, or None when de-identification is off."""
        if not task.deidentify:
            return None
        return cls(tuple(parse_pattern(p, "task.deidentify_patterns") for p in task.deidentify_patterns),
                   tuple(r.upper() for r in task.deidentify_regions))


# ------------------------------------------------------------------ settings


def parse_pattern(item: str, key: str) -> tuple[str, str]:
    """"NAME=REGEX" -> (NAME, REGEX), or DeidentifyError naming `key` (conf/schema.py checks
    every pattern at config time with the same rule)."""
    name, regex, problem = split_deidentify_pattern(item, key)
    if problem:
        raise DeidentifyError(problem)
    return name, regex


# ------------------------------------------------------------------ recognisers

Span = tuple[int, int]
Finder = Callable[[str], Iterator[Span]]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'\[\]]+", re.IGNORECASE)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?![0-9A-Fa-f:])")
# A run of digits long enough to be a phone number: the phone matcher runs only where one is.
_DIGIT_RUN = re.compile(r"\d(?:[\s().\-/]{0,3}\d){5,}")
_TRAILING = ".,;:!?)]}'\""

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")
_MONTH_NAME = r"(?P<mon>" + "|".join(f"{m[:3]}(?:{m[3:]})?" for m in _MONTHS) + r")\.?"
_DATES = (
    re.compile(r"\b(?P<y>\d{4})[-/.](?P<m>\d{1,2})[-/.](?P<d>\d{1,2})\b"),  # ISO 2021-05-03
    re.compile(r"\b(?P<a>\d{1,2})[/.\-](?P<b>\d{1,2})[/.\-](?P<y>\d{4}|\d{2})\b"),  # 03/05/2021 (either order)
    re.compile(r"\b(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_NAME + r",?\s+(?P<y>\d{4})\b",
               re.IGNORECASE),  # 3 May 2021
    re.compile(r"\b" + _MONTH_NAME + r"\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y>\d{4})\b",
               re.IGNORECASE),  # May 3, 2021
)


def _spans(pattern: re.Pattern[str], valid: Callable[[str], bool] | None = None) -> Finder:
    def find(text: str) -> Iterator[Span]:
        for m in pattern.finditer(text):
            if valid is None or valid(m.group(0)):
                yield m.span()
    return find


def _url_spans(text: str) -> Iterator[Span]:
    for m in _URL.finditer(text):
        end = m.end()
        while end > m.start() and text[end - 1] in _TRAILING:  # the sentence's full stop is not the URL's
            end -= 1
        yield m.start(), end


def _card(candidate: str) -> bool:
    from stdnum import luhn

    digits = re.sub(r"\D", "", candidate)
    # 13-19 digits (ISO/IEC 7812), an issuer prefix (2-6: Mastercard, Amex/Diners/JCB, Visa,
    # Mastercard, Discover), and the Luhn check: an ordinary long number passes all three
    # only by chance (about 1 in 10 of those with such a prefix).
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and bool(luhn.is_valid(digits))


def _iban(candidate: str) -> bool:
    from stdnum import iban

    return bool(iban.is_valid(candidate))


def _ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _real_date(m: re.Match[str]) -> bool:
    parts = m.groupdict()
    year = int(parts["y"])
    year = year + 2000 if year < 100 and len(parts["y"]) == 2 else year
    if parts.get("mon"):
        month = next(i for i, name in enumerate(_MONTHS, 1) if name.startswith(parts["mon"].lower()[:3]))
        days = [(int(parts["d"]), month)]
    elif parts.get("m"):
        days = [(int(parts["d"]), int(parts["m"]))]
    else:  # 03/05/2021: day-month or month-day, a date if either reading is
        a, b = int(parts["a"]), int(parts["b"])
        days = [(a, b), (b, a)]
    for day, month in days:
        try:
            datetime.date(year, month, day)
        except ValueError:
            continue
        return True
    return False


def _date_spans(text: str) -> Iterator[Span]:
    for pattern in _DATES:
        for m in pattern.finditer(text):
            if _real_date(m):
                yield m.span()


# National identity numbers: region -> (the stdnum module, the usual written form). Written
# forms only (with their separators where they have them): a bare 9-digit number in prose is
# far more often a count than an SSN, and a form plus a checksum keeps false positives rare.
_NATIONAL_IDS: dict[str, tuple[str, str]] = {
    "US": ("stdnum.us.ssn", r"\b\d{3}-\d{2}-\d{4}\b"),
    "GB": ("stdnum.gb.nhs", r"\b\d{3}[ -]?\d{3}[ -]?\d{4}\b"),  # mod-11 checksum
    "CA": ("stdnum.ca.sin", r"\b\d{3}[ -]\d{3}[ -]\d{3}\b"),  # Luhn
    "IN": ("stdnum.in_.aadhaar", r"\b\d{4}[ -]\d{4}[ -]\d{4}\b"),  # Verhoeff
    "BR": ("stdnum.br.cpf", r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b"),  # two check digits
    "ES": ("stdnum.es.dni", r"\b\d{8}-?[A-Z]\b"),  # check letter
    "NL": ("stdnum.nl.bsn", r"\b\d{4}\.?\d{2}\.?\d{3}\b"),  # 11-proof
    "SE": ("stdnum.se.personnummer", r"\b(?:\d{2})?\d{6}[-+]\d{4}\b"),  # Luhn + date
    "DK": ("stdnum.dk.cpr", r"\b\d{6}-\d{4}\b"),  # date
    "FR": ("stdnum.fr.nir", r"\b[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}\b"),  # mod-97
}


def _national_id_finder(region: str) -> Finder | None:
    known = _NATIONAL_IDS.get(region)
    if known is None:
        return None
    import importlib

    module = importlib.import_module(known[0])
    pattern = re.compile(known[1])

    def valid(candidate: str) -> bool:
        try:
            return bool(module.is_valid(candidate))
        except Exception:  # a validator that trips on an odd candidate: not an ID
            return False

    return _spans(pattern, valid)


def _phone_finder(regions: tuple[str, ...]) -> Finder:
    def find(text: str) -> Iterator[Span]:
        if _DIGIT_RUN.search(text) is None:
            return
        import phonenumbers

        # None: the international form (+CC ...) only; a region adds its national forms.
        for region in (None, *regions):
            for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                if _grouped_like_a_phone(m.raw_string):
                    yield m.start, m.end
    return find


def _grouped_like_a_phone(raw: str) -> bool:
    """False for digits mostly written one by one ("(7-5) 4-6 6-3 4-6 6-0", a tennis score
    that reads as a valid US number): no numbering plan writes phone numbers so, and
    libphonenumber's stricter leniencies would also drop real numbers in unusual groupings."""
    groups = re.findall(r"\d+", raw)
    return sum(len(g) == 1 for g in groups) * 2 <= len(groups)


def recognisers(spec: DeidSpec) -> list[tuple[str, Finder]]:
    """(type, finder) in the order they run (the module's docstring says why this order)."""
    out: list[tuple[str, Finder]] = [(name, _spans(re.compile(regex))) for name, regex in spec.patterns]
    out += [(EMAIL, _spans(_EMAIL)), (URL, _url_spans), (IBAN, _spans(_IBAN, _iban)), (CARD, _spans(_CARD, _card))]
    out += [(NATIONAL_ID, f) for f in (_national_id_finder(r) for r in spec.regions) if f is not None]
    out += [(IP, _spans(_IPV4, _ip)), (IP, _spans(_IPV6, _ip)), (PHONE, _phone_finder(spec.regions)),
            (DATE, _date_spans)]
    return out


# ------------------------------------------------------------------ scrubbing


class Scrubber:
    """Replaces what `spec`'s recognisers find by typed placeholders, and counts by type."""

    def __init__(self, spec: DeidSpec) -> None:
        self.spec = spec
        self._recognisers = recognisers(spec)

    def scrub(self, text: str, counts: Counter[str] | None = None) -> str:
        """`text` with every recognised value replaced by "[TYPE]"; `counts` gains one per value."""
        for kind, find in self._recognisers:
            text = _replace_outside_placeholders(text, kind, find, counts)
        return text

    def scrub_all(self, texts: Iterable[str]) -> tuple[list[str], Counter[str]]:
        counts: Counter[str] = Counter()
        return [self.scrub(t, counts) for t in texts], counts


def _replace_outside_placeholders(text: str, kind: str, find: Finder, counts: Counter[str] | None) -> str:
    pieces = _PLACEHOLDER.split(text)  # odd indices are placeholders: never looked inside
    for i in range(0, len(pieces), 2):
        piece = pieces[i]
        spans = _disjoint(find(piece)) if piece else []
        if not spans:
            continue
        out, last = [], 0
        for start, end in spans:
            out += [piece[last:start], f"[{kind}]"]
            last = end
        out.append(piece[last:])
        pieces[i] = "".join(out)
        if counts is not None:
            counts[kind] += len(spans)
    return "".join(pieces)


def _disjoint(spans: Iterable[Span]) -> list[Span]:
    """Non-empty spans, sorted; an overlapping one is merged into the earlier one."""
    merged: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# (id(data), spec) -> (data, scrubbed, counts): a worker's site data objects are cached
# (client/app.py), so each is scrubbed once, not on every message; the object is kept so
# that its id is not reused.
_SCRUBBED: dict[tuple[int, DeidSpec], tuple[LabeledData, LabeledData, Counter[str]]] = {}


def deidentified(data: LabeledData, spec: DeidSpec) -> tuple[LabeledData, Counter[str]]:
    """`data` with every text scrubbed (labels, groups, order unchanged), and the counts by type."""
    kept = _SCRUBBED.get((id(data), spec))
    if kept is not None and kept[0] is data:
        return kept[1], kept[2]
    if data.texts is None:
        raise DeidentifyError(f"task.deidentify=true: {data.source or 'this data'} has no texts (text tasks only)")
    texts, counts = Scrubber(spec).scrub_all(data.texts)
    scrubbed = dataclasses.replace(data, texts=texts)
    if len(_SCRUBBED) >= 16:
        _SCRUBBED.clear()
    _SCRUBBED[(id(data), spec)] = (data, scrubbed, counts)
    return scrubbed, counts


def counts_record(counts: Mapping[str, int], records: int, spec: DeidSpec) -> dict[str, Any]:
    """What `<state dir>/deidentified.json` holds: counts by type, the records scanned, and
    the settings (pattern NAMES and regions; never a value found)."""
    return {"records": int(records), "replaced": {k: int(v) for k, v in sorted(counts.items())},
            "patterns": [name for name, _ in spec.patterns], "regions": list(spec.regions)}


def write_counts(state_dir: Path, record: Mapping[str, Any]) -> bool:
    """Write `record` to `<state_dir>/deidentified.json` (atomically); False if it holds it already."""
    path = Path(state_dir) / COUNTS_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return False
    except (OSError, ValueError):
        pass  # absent or torn: written again
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{COUNTS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return True
