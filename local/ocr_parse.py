"""Parsing OCR text into values: numbers in either decimal convention, dates to ISO 8601, currencies.

Rules (kept simple on purpose, and stated so a test can rely on them):
- Numbers: currency symbols and codes are ignored; with both `,` and `.` the later one is the
  decimal mark (1,234.56 and 1.234,56); a lone `,` followed by exactly three digits is a thousands
  separator, otherwise decimal (12,50); a lone `.` is decimal; several of one mark are thousands.
  A number directly followed by `%` is a rate, not an amount.
- Dates: YYYY-MM-DD, D/M/Y (M/D/Y only when the day cannot be a month), `31 Dec 2017`,
  `Dec 31, 2017`, with English, French, German and Dutch month names; two-digit years are 20xx
  below 70.
"""

from __future__ import annotations

import datetime as dt
import re

CURRENCY_WORDS: dict[str, str] = {
    "inr": "INR",
    "rs": "INR",
    "rs.": "INR",
    "₹": "INR",
    "usd": "USD",
    "us$": "USD",
    "$": "USD",
    "eur": "EUR",
    "€": "EUR",
    "euro": "EUR",
    "gbp": "GBP",
    "£": "GBP",
    "chf": "CHF",
    "jpy": "JPY",
    "¥": "JPY",
    "cad": "CAD",
    "aud": "AUD",
}
_CURRENCY_RE = re.compile(r"(?<![a-z])(inr|rs\.?|usd|us\$|eur|euro|gbp|chf|jpy|cad|aud)(?![a-z])|[₹$€£¥]", re.I)
_NUMBER_RE = re.compile(r"[-−]?\d[\d.,']*\d|[-−]?\d")
_NUMERIC_FRAGMENT_RE = re.compile(
    r"[\s(\[*:=]*(?:rs\.?|inr|usd|eur|gbp|[₹$€£¥])?\s*[-−+]?\d[\d.,' ]*\s*(?:rs\.?|inr|usd|eur|gbp|[₹$€£¥])?[\s)\].,]*",
    re.I,
)

MONTHS: dict[str, int] = {
    "jan": 1, "janv": 1, "jän": 1,
    "feb": 2, "febr": 2, "fév": 2, "fev": 2, "févr": 2,
    "mar": 3, "mär": 3, "mars": 3, "maa": 3, "maart": 3,
    "apr": 4, "avr": 4, "avri": 4,
    "may": 5, "mai": 5, "mei": 5,
    "jun": 6, "juin": 6, "juni": 6,
    "jul": 7, "juil": 7, "juli": 7,
    "aug": 8, "aoû": 8, "aou": 8, "août": 8,
    "sep": 9, "sept": 9,
    "oct": 10, "okt": 10,
    "nov": 11,
    "dec": 12, "déc": 12, "dez": 12,
}  # fmt: skip
_MONTH_WORD = r"([a-zäéû]{3,10})\.?"
_DATE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)"), "ymd"),
    (re.compile(r"(?<!\d)(\d{1,2})\s*[-/.]\s*(\d{1,2})\s*[-/.]\s*(\d{4}|\d{2})(?!\d)"), "dmy"),
    (
        re.compile(
            r"(?<!\d)(\d{1,2})(?:st|nd|rd|th|er)?[\s\-/.,]*" + _MONTH_WORD + r"[\s\-/.,]*(\d{4}|\d{2})(?!\d)", re.I
        ),
        "dMy",
    ),
    (re.compile(_MONTH_WORD + r"[\s\-/.]*(\d{1,2})(?:st|nd|rd|th)?[\s,\-/.]*(\d{4})(?!\d)", re.I), "Mdy"),
]


def _month(word: str) -> int | None:
    w = word.lower()
    return MONTHS.get(w) or MONTHS.get(w[:4]) or MONTHS.get(w[:3])


def _year(text: str) -> int:
    y = int(text)
    if len(text) == 2:
        y += 2000 if y < 70 else 1900
    return y


def _iso(y: int, m: int, d: int) -> str | None:
    try:
        return dt.date(y, m, d).isoformat()
    except ValueError:
        return None


def parse_date(text: str) -> str | None:
    """The first date in the text as YYYY-MM-DD, or None."""
    found: list[tuple[int, str]] = []
    for pattern, kind in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            iso: str | None = None
            if kind == "ymd":
                iso = _iso(int(m[1]), int(m[2]), int(m[3]))
            elif kind == "dmy":
                a, b, y = int(m[1]), int(m[2]), _year(m[3])
                iso = _iso(y, b, a) if b <= 12 else _iso(y, a, b)
            elif kind == "dMy":
                month = _month(m[2])
                iso = _iso(_year(m[3]), month, int(m[1])) if month else None
            else:
                month = _month(m[1])
                iso = _iso(int(m[3]), month, int(m[2])) if month else None
            if iso:
                found.append((m.start(), iso))
                break
    return min(found)[1] if found else None


def _number_token(token: str) -> float | None:
    t = token.replace("−", "-").replace("'", "")
    neg = t.startswith("-")
    t = t.lstrip("-")
    if "," in t and "." in t:
        dec = "," if t.rfind(",") > t.rfind(".") else "."
        t = t.replace("." if dec == "," else ",", "").replace(dec, ".")
    elif "," in t:
        head, _, tail = t.rpartition(",")
        t = t.replace(",", "") if (t.count(",") > 1 or len(tail) == 3) else head.replace(",", "") + "." + tail
    elif t.count(".") > 1:
        t = t.replace(".", "")
    try:
        value = float(t)
    except ValueError:
        return None
    return -value if neg else value


def parse_number(text: str, allow_percent: bool = False) -> float | None:
    """The first amount in the text (see the module rules), or None."""
    for m in _NUMBER_RE.finditer(text):
        after = text[m.end() : m.end() + 2].lstrip()
        if not allow_percent and after.startswith("%"):
            continue
        value = _number_token(m.group())
        if value is not None:
            return value
    return None


def numbers(text: str) -> list[float]:
    """Every amount in the text, left to right (rates with % excluded)."""
    out: list[float] = []
    for m in _NUMBER_RE.finditer(text):
        if text[m.end() : m.end() + 2].lstrip().startswith("%"):
            continue
        value = _number_token(m.group())
        if value is not None:
            out.append(value)
    return out


def is_numeric_fragment(text: str) -> bool:
    """True for a table cell that is just an amount, like `Rs1939`, `319.00`, `€ 1.234,56` or `14.50%`."""
    t = text.strip().rstrip("%").strip()
    return bool(t) and _NUMERIC_FRAGMENT_RE.fullmatch(t) is not None


def currencies(text: str) -> list[str]:
    """ISO codes of the currency marks in the text, most frequent first."""
    counts: dict[str, int] = {}
    for m in _CURRENCY_RE.finditer(text):
        code = CURRENCY_WORDS.get(m.group().lower())
        if code:
            counts[code] = counts.get(code, 0) + 1
    return sorted(counts, key=lambda c: -counts[c])
