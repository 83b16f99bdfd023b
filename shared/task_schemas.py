"""Built-in schemas and prompts of the structured tasks (invoice, table, classify, schema).

The schemas here are "original" schemas in the caller's sense: `schemas.to_strict` turns them
into the strict form sent to the model, and answers are validated against them as written.

INVOICE_SCHEMA lists every key as required but lets every scalar be null. No invoice field is
present on every document (receipts lack due dates and customers, scans are cropped), so none
can be demanded as a value; but callers get a stable shape: every key is always in the result,
`null` meaning "not on the document or not legible", never absent. `vendor` and `customer`
are always objects (their fields may all be null) and `line_items` is always a list (may be
empty), so consumers never branch on a missing container.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequest

MAX_LABELS = 100
MAX_LABEL_CHARS = 100  # 100 labels x 100 chars stays inside the 15,000-character schema limit

_NULLABLE_TEXT: dict[str, Any] = {"type": ["string", "null"]}


def _text(description: str, **extra: Any) -> dict[str, Any]:
    return {**_NULLABLE_TEXT, "description": description, **extra}


def _amount(description: str) -> dict[str, Any]:
    return {"type": ["number", "null"], "description": description}


def _party_fields() -> dict[str, Any]:
    return {
        "name": _text("Legal or trading name as printed"),
        "address": _text("Full postal address as printed, lines joined with ', '"),
    }


INVOICE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Invoice",
    "type": "object",
    "properties": {
        "vendor": {
            "type": "object",
            "description": "The party issuing the invoice (seller, supplier)",
            "properties": {
                **_party_fields(),
                "tax_id": _text("VAT / GST / tax registration number exactly as printed"),
            },
            "required": ["name", "address", "tax_id"],
            "additionalProperties": False,
        },
        "customer": {
            "type": "object",
            "description": "The party being billed (buyer, bill-to)",
            "properties": _party_fields(),
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "invoice_number": _text("Invoice number or identifier exactly as printed"),
        "invoice_date": _text("Issue date, ISO 8601 (YYYY-MM-DD)", format="date"),
        "due_date": _text("Payment due date, ISO 8601 (YYYY-MM-DD)", format="date"),
        "line_items": {
            "type": "array",
            "description": "One entry per billed line, in printed order; empty if the invoice lists none",
            "items": {
                "type": "object",
                "properties": {
                    "description": _text("Line text as printed"),
                    "quantity": _amount("Quantity as a number"),
                    "unit_price": _amount("Price per unit as a number, without currency symbol"),
                    "total": _amount("Line total as a number, without currency symbol"),
                },
                "required": ["description", "quantity", "unit_price", "total"],
                "additionalProperties": False,
            },
        },
        "subtotal": _amount("Total before tax as a number"),
        "tax": _amount("Total tax amount as a number"),
        "total": _amount("Amount due including tax as a number"),
        "currency": _text("ISO 4217 currency code, e.g. EUR, USD, GBP", pattern="^[A-Z]{3}$"),
    },
    "required": [
        "vendor",
        "customer",
        "invoice_number",
        "invoice_date",
        "due_date",
        "line_items",
        "subtotal",
        "tax",
        "total",
        "currency",
    ],
    "additionalProperties": False,
}

TABLE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Table",
    "type": "object",
    "properties": {
        "columns": {
            "type": "array",
            "description": "Column headers, left to right",
            "items": {"type": "string"},
        },
        "rows": {
            "type": "array",
            "description": "Data rows, top to bottom; each row has one cell per column",
            "items": {"type": "array", "items": {"type": ["string", "number", "null"]}},
        },
    },
    "required": ["columns", "rows"],
    "additionalProperties": False,
}


def check_labels(labels: Any) -> list[str]:
    """The caller's labels, checked: 1-100 unique, non-blank strings of at most 100 characters."""
    if not isinstance(labels, list) or not labels:
        raise InvalidRequest("`labels` must be a non-empty list of strings", details={"field": "labels"})
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(
            f"`labels` has {len(labels)} entries; at most {MAX_LABELS} are allowed",
            details={"field": "labels", "count": len(labels), "limit": MAX_LABELS},
        )
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise InvalidRequest(
                f"label {i} must be a non-empty string, got {_kind(label)}", details={"field": "labels", "index": i}
            )
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidRequest(
                f"label {i} is {len(label)} characters long; at most {MAX_LABEL_CHARS} are allowed",
                details={"field": "labels", "index": i, "limit": MAX_LABEL_CHARS},
            )
        if label in seen:
            raise InvalidRequest(f"label {label!r} is given twice", details={"field": "labels", "index": i})
        seen.add(label)
    return list(labels)


def _kind(value: Any) -> str:
    """What a bad label is, without echoing it (it may be large)."""
    if isinstance(value, str):
        return "a blank string"
    return "null" if value is None else f"a JSON {type(value).__name__}"


def classify_schema(labels: list[str]) -> dict[str, Any]:
    """`{label, confidence}` with `label` restricted to the caller's labels."""
    checked = check_labels(labels)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Classification",
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": checked, "description": "The one label that best fits the image"},
            "confidence": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "How sure you are that the label is right, from 0 to 1",
            },
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    }


# --- prompts ----------------------------------------------------------------------------------

_HONESTY = (
    "Use only what is visible in the image(s); never guess or invent values. "
    "Use null when a value is absent, illegible or unknown."
)
_FORMATS = (
    "write dates as ISO 8601 (YYYY-MM-DD), and amounts and quantities as plain JSON numbers: no currency "
    "symbols, no thousands separators, a dot as decimal separator (1.234,50 EUR becomes 1234.5), negative for "
    "credits and discounts."
)

INVOICE_PROMPT = (
    "Extract the invoice shown in the image(s) into the JSON schema. Multiple images are pages of one "
    "invoice, in order. " + _HONESTY + " Always " + _FORMATS + " "
    "Copy invoice numbers and tax IDs exactly as printed. Give currency as an ISO 4217 code (EUR, USD, GBP) "
    "only when a code or an unambiguous symbol is printed, otherwise null. "
    "List line items in printed order; do not add subtotal, tax or shipping summary rows as line items "
    "unless they are billed lines."
)

TABLE_PROMPT = (
    "Transcribe the main table in the image into the JSON schema: `columns` holds the header texts left to "
    "right, `rows` holds the data rows top to bottom, each with exactly one cell per column. "
    "Keep cell text as printed; give a cell as a number only when it is a plain number (no units or symbols), "
    "and use null for empty cells. If the table has no header row, use 'Column 1', 'Column 2', ... "
    "Never invent rows or values."
)

SCHEMA_PROMPT = (
    "Extract the information shown in the image(s) into the JSON schema. Follow each field's description and "
    "the constraints noted in it (format, pattern, minimum, ...). " + _HONESTY + " Unless a description says "
    "otherwise, " + _FORMATS
)


def classify_prompt(labels: list[str]) -> str:
    """The classification instruction naming every allowed label."""
    listed = "\n".join(f"- {label}" for label in check_labels(labels))
    return (
        "Classify the image into exactly one of these labels:\n"
        f"{listed}\n"
        "Answer with the label exactly as written and a confidence between 0 and 1. "
        "If none fits well, choose the closest one and give a low confidence."
    )


MAX_REASK_ERRORS = 20


def reask_message(errors: list[str]) -> str:
    """The one follow-up turn after an answer failed validation, listing what was wrong."""
    shown = errors[:MAX_REASK_ERRORS]
    lines = "\n".join(f"- {e}" for e in shown)
    more = f"\n- ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return (
        "Your previous answer did not match the schema:\n"
        f"{lines}{more}\n"
        "Return a corrected JSON object that matches the schema exactly, with every field; "
        "use null where a value is not shown rather than inventing one."
    )


def json_object_instructions(strict_schema: Any) -> str:
    """Text for the json_object fallback: the endpoint will not enforce the schema, so state it.

    Takes a `schemas.StrictSchema` or the strict schema dict itself.
    """
    schema = getattr(strict_schema, "schema", strict_schema)
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return (
        "Respond in JSON. The answer must be a JSON object that matches this JSON Schema exactly, "
        "with every property present (null where a value is unknown) and no other properties:\n"
        f"{text}\n"
        "Return only a JSON object: no text before or after it, no code fences."
    )
