"""Where a field's value sits in OCR text: label lookups (same fragment, right, below) and field kinds.

A property name (`invoice_number`, `vendor.name`, `due_date`) says what kind of value it holds and
which printed labels announce it (local/invoice_vocab.py); `Doc.find` then looks for the first such
label with a value of the right kind next to it. General heuristics only: nothing here knows a
particular document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from local import invoice_vocab as vocab
from local.ocr_engine import Fragment, OcrLine
from local.ocr_parse import parse_date, parse_number

COMPANY_RE = re.compile(
    r"(?<![a-z])(pvt\.?\s*ltd|ltd|limited|gmbh|inc|llc|l\.l\.c|s\.?a\.?s?|sarl|b\.v|bv|ag|corp|corporation|co\.|plc|oy|ab|srl|spa)(?![a-z])",
    re.I,
)
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
TOTAL_EXCLUDE = re.compile(vocab.TOTAL_EXCLUDE, re.I)
TAX_EXCLUDE = re.compile(vocab.TAX_EXCLUDE, re.I)


def name_words(name: str) -> list[str]:
    """`invoiceNumber`, `invoice_number`, `invoice-number` -> ["invoice", "number"]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def label_pattern(label: str) -> re.Pattern[str]:
    parts = label.lower().split()
    body = r"[\s._\-]*".join(re.escape(p) for p in parts)
    tail = r"(?![a-z])" if label[-1].isalpha() else ""
    return re.compile(r"(?<![a-z0-9])" + body + tail, re.I)


def _label_like(text: str) -> bool:
    t = text.strip()
    if t.endswith(":"):
        return True
    if any(ch.isdigit() for ch in t):
        return False
    if re.fullmatch(r"[A-Z][A-Z .]{1,20}", t):
        return True  # a short all-caps heading such as BANK CODE or VAT ID
    words = re.findall(r"[a-z]+", t.lower())
    return 0 < len(words) <= 3 and any(w in vocab.LABEL_WORDS for w in words)


@dataclass
class Found:
    value: Any
    line: int  # index into Doc.lines


class Doc:
    """OCR lines of all pages with label -> value lookup (same fragment, to the right, or just below)."""

    def __init__(self, lines: list[OcrLine]) -> None:
        self.lines = lines
        self.text = "\n".join(ln.text for ln in lines)

    def _column_below(self, li: int, frag: Fragment, max_lines: int) -> list[str]:
        """Fragments under `frag` (overlapping it horizontally) on the next lines, stopping at a gap."""
        out: list[str] = []
        prev = self.lines[li]
        for lj in range(li + 1, len(self.lines)):
            nxt = self.lines[lj]
            if nxt.page != prev.page or nxt.y0 - prev.y1 > 2.5 * prev.height:
                break
            best, best_ov = None, 0.0
            for f in nxt.fragments:
                ov = min(f.x1, frag.x1) - max(f.x0, frag.x0)
                if ov > best_ov:
                    best, best_ov = f, ov
            if best is None or (out and _label_like(best.text)):
                if out or lj - li > 1:
                    break
                continue
            out.append(best.text)
            prev = nxt
            if len(out) >= max_lines:
                break
        return out

    def _below(self, li: int, frag: Fragment) -> Iterator[str]:
        yield from self._column_below(li, frag, 1)

    def _candidates(self, li: int, fi: int, end: int, kind: str) -> Iterator[str]:
        line = self.lines[li]
        frag = line.fragments[fi]
        rem = frag.text[end:].strip(" :#.-|=\t")
        if rem:
            yield rem
        right = [f.text for f in line.fragments[fi + 1 :]]
        if kind == "address":
            if not rem:
                below = self._column_below(li, frag, 5)
                if len(below) > 1 and not any(ch.isdigit() for ch in below[0]):
                    below = below[1:]  # the first line under "Bill to" is usually the name
                if below:
                    yield ", ".join(b.strip(" ,") for b in below[:4])
            return
        if kind == "amount":
            yield from reversed(right)  # amounts sit in the right-hand column
        elif right and not _label_like(right[0]):
            yield right[0]
        yield from self._below(li, frag)

    def find(self, labels: list[str], kind: str, exclude: re.Pattern[str] | None = None) -> Found | None:
        """The first label (in priority order) with a value of the right kind next to it."""
        for label in labels:
            pattern = label_pattern(label)
            for li, line in enumerate(self.lines):
                for fi, frag in enumerate(line.fragments):
                    if exclude is not None and exclude.search(frag.text):
                        continue
                    m = pattern.search(frag.text)
                    if not m:
                        continue
                    for cand in self._candidates(li, fi, m.end(), kind):
                        value = convert(cand, kind)
                        if value is not None:
                            return Found(value, li)
        return None

    def first_date(self) -> str | None:
        for line in self.lines:
            d = parse_date(line.text)
            if d:
                return d
        return None

    def company_line(self) -> str | None:
        for line in self.lines:
            for frag in line.fragments:
                if COMPANY_RE.search(frag.text) and re.search(r"[a-z]{3}", frag.text, re.I):
                    return frag.text.strip(" :,.")
        return None

    def prominent_line(self) -> str | None:
        """The tallest text in the top third of the first page that is not just the document's title."""
        first = [ln for ln in self.lines if ln.page == (self.lines[0].page if self.lines else 0)]
        top = first[: max(1, len(first) // 3)]
        frags = [
            f
            for ln in top
            for f in ln.fragments
            if re.search(r"[a-z]{2}", f.text, re.I) and f.text.strip().lower() not in vocab.TITLE_WORDS
        ]
        return max(frags, key=lambda f: f.h).text if frags else None


def convert(text: str, kind: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if kind == "amount":
        return parse_number(text)
    if kind == "date":
        return parse_date(text)
    if kind == "id":
        if _label_like(text) or not any(ch.isdigit() for ch in text):
            return None
        # The identifier is the first token with a digit ("n° 2022-17" -> "2022-17").
        token = next((t for t in (w.strip(" :#.,") for w in text.split()) if any(ch.isdigit() for ch in t)), None)
        return token or None
    if kind in ("text", "address"):
        return None if _label_like(text) or not re.search(r"[a-z0-9]", text, re.I) else text.strip(" :,")
    return text


@dataclass
class FieldSpec:
    kind: str  # amount | date | id | text | currency | party | email
    labels: list[str]
    exclude: re.Pattern[str] | None = None
    fallback: str | None = None  # first_date | company | prominent


def field_spec(path: tuple[str, ...]) -> FieldSpec:
    """What a property probably holds, from its name and its parent's name."""
    name = path[-1] if path else ""
    words = name_words(name)
    wset = set(words)
    parent = set(name_words(path[-2])) if len(path) > 1 else set()
    joined = " ".join(words)
    not_party = {"address", "id", "email", "phone"}
    is_vendor = bool(parent & vocab.VENDOR_PARENTS) or bool(wset & vocab.VENDOR_PARENTS and not wset & not_party)
    is_customer = bool(parent & vocab.CUSTOMER_PARENTS) or bool(wset & vocab.CUSTOMER_PARENTS and not wset & not_party)
    if "currency" in wset:
        return FieldSpec("currency", [])
    if "email" in wset or "mail" in wset:
        return FieldSpec("email", [])
    if "date" in wset or name.endswith("_at"):
        if "due" in wset:
            return FieldSpec("date", vocab.DUE_DATE_LABELS)
        rest = [w for w in words if w != "date"]
        if not rest or wset & {"invoice", "issue", "issued", "bill", "document", "receipt", "billing"}:
            return FieldSpec("date", vocab.ISSUE_DATE_LABELS, fallback="first_date")
        return FieldSpec("date", [" ".join([*rest, "date"]), " ".join(rest)])
    if wset & {"tax", "vat", "gstin", "tin", "ein", "siret"} and wset & (
        vocab.ID_WORDS | {"gstin", "tin", "ein", "siret"}
    ):
        if is_customer:  # an unlabelled number belongs to the issuer, not the customer
            return FieldSpec(
                "id", [f"{p} {t}" for p in ("customer", "buyer", "client") for t in ("vat", "gstin", "tax id")]
            )
        return FieldSpec("id", vocab.TAX_ID_LABELS)
    if wset & vocab.ID_WORDS and not wset & vocab.AMOUNT_WORDS - {"due"}:
        base = [w for w in words if w not in vocab.ID_WORDS]
        b = " ".join(base)
        if not base or "invoice" in base or "receipt" in base or "bill" in base:
            labels = (
                vocab.invoice_number_labels()
                if (not base or "invoice" in base)
                else [f"{b} no", f"{b} number", f"{b} #"]
            )
            return FieldSpec("id", [*labels, "number", "no"])
        if "phone" in base or "tel" in base or "mobile" in base:
            return FieldSpec("id", vocab.PHONE_LABELS)
        return FieldSpec("id", [f"{b} {s}" for s in ("no", "number", "#", "num", "id", "nr", "ref", "code")])
    if wset & {"phone", "telephone", "mobile", "tel"}:
        return FieldSpec("id", vocab.PHONE_LABELS)
    if "subtotal" in wset or {"sub", "total"} <= wset or ("net" in wset and wset & {"total", "amount"}):
        return FieldSpec("amount", vocab.SUBTOTAL_LABELS)
    if wset & {"tax", "vat", "gst"}:
        return FieldSpec("amount", vocab.TAX_LABELS, TAX_EXCLUDE)
    if wset & {"total", "due", "balance", "grand"} or joined in ("amount", "total amount", "amount due"):
        return FieldSpec("amount", vocab.TOTAL_LABELS, TOTAL_EXCLUDE)
    if wset & {"price", "rate", "cost"}:
        return FieldSpec("amount", ["unit price", "price", "rate", "cost"])
    if wset & {"quantity", "qty"}:
        return FieldSpec("amount", ["quantity", "qty"])
    if wset & vocab.AMOUNT_WORDS:
        return FieldSpec("amount", [joined, *words])
    if "address" in wset:
        if is_customer:
            return FieldSpec("address", vocab.CUSTOMER_ADDRESS_LABELS)
        return FieldSpec("address", vocab.ADDRESS_LABELS)
    if wset & {"name", "company", "legal", "title"} or is_vendor or is_customer:
        if is_customer:
            return FieldSpec("text", vocab.CUSTOMER_LABELS)
        if is_vendor:
            return FieldSpec("text", vocab.VENDOR_LABELS, fallback="company")
    return FieldSpec("text", [joined] if joined else [])
