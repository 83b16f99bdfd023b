"""Invoice fields the local stand-in gets right, per corpus invoice: a figure about `local/`, not the product.

    python -m bench.invoice_accuracy [--invoices STEM,STEM,...]

Starts the local stack as `make run` does (Azurite, the model server with real OCR, the Functions host)
on free ports in a temporary folder, posts every corpus invoice (../shared/corpus/documents, its PNG
render where there is one, else the PDF with every page) to POST /api/analyze with task=invoice, checks
each answer against the invoice schema, and compares the fields with the corpus' `NAME.expected.json`
(invoice2data's field names mapped to ours). It prints one line per invoice and the rate for two groups:
the invoices the stand-in's label rules were first written against and the held-back rest.

The product sends the page and the schema; what comes back is the local stand-in's OCR and label
matching (local/schema_fill.py, local/ocr_doc.py), so the figure measures that stand-in only. With about
20 fields per group one field moves a group's rate by ~5 points. It was a test's print-out
(tests/test_structured_integration.py keeps two invoices to prove validation and extraction work);
OCR on all ten invoices took 36-226 s of every `make test`, so the figure lives here.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
DOCUMENTS = CORPUS / "documents"

# The invoices the stand-in's label rules were written against (issue 15): its first version
# named their wording ("booking id", "guest name", "nights" from oyo; "warehouse address" from
# FlipkartInvoice, which tests/test_model_server.py also reads; "facture n" from NetpresseInvoice
# and free_fiber; "factuurnummer" from coolblue1). Every other corpus invoice is held back.
DEVELOPED_ON = frozenset({"oyo", "FlipkartInvoice", "NetpresseInvoice", "free_fiber", "coolblue1"})


def _norm(value: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(value).lower())


def field_hits(expected: dict[str, Any], got: dict[str, Any]) -> dict[str, bool]:
    """invoice2data's names mapped to ours (corpus README): issuer -> vendor.name, amount -> total, ..."""
    hits = {}
    if "issuer" in expected:
        name = (got.get("vendor") or {}).get("name") or ""
        hits["vendor.name"] = bool(name) and (
            _norm(expected["issuer"]) in _norm(name) or _norm(name) in _norm(expected["issuer"])
        )
    if "amount" in expected:
        hits["total"] = got.get("total") is not None and abs(float(got["total"]) - float(expected["amount"])) < 0.01
    if "date" in expected:
        hits["invoice_date"] = got.get("invoice_date") == expected["date"]
    if "invoice_number" in expected:
        hits["invoice_number"] = _norm(got.get("invoice_number") or "") == _norm(expected["invoice_number"])
    if "currency" in expected:
        hits["currency"] = got.get("currency") == expected["currency"]
    return hits


def invoice_files(documents: Path = DOCUMENTS) -> list[Path]:
    """Each corpus invoice once: its PNG render where there is one, else the PDF (every page)."""
    stems = sorted((p.name.removesuffix(".expected.json") for p in documents.glob("*.expected.json")), key=str.lower)
    return [documents / f"{s}.png" if (documents / f"{s}.png").exists() else documents / f"{s}.pdf" for s in stems]


def expected_fields(path: Path) -> dict[str, Any]:
    """The first expected document of `path` (invoice2data's files hold a list)."""
    return json.loads((path.parent / f"{stem(path)}.expected.json").read_text())[0]


def stem(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def group(path: Path) -> str:
    return "developed-on" if stem(path) in DEVELOPED_ON else "held-back"


def mime(path: Path) -> str:
    return "image/png" if path.suffix == ".png" else "application/pdf"


def _start_stack(tmp: Path) -> Any:
    from local.procs import free_port
    from local.stack import EXAMPLE, Stack, StackConfig

    values = json.loads(EXAMPLE.read_text())["Values"]
    values["LOCAL_FUNCTION_KEY"] = secrets.token_urlsafe(16)
    config = StackConfig(
        root=ROOT,
        data_dir=tmp,
        host_port=free_port(),
        blob_port=free_port(),
        queue_port=free_port(),
        model_port=free_port(),
        values=values,
        model_args=["--mode", "ocr", "--log-level", "WARNING"],
    )
    return Stack(config).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.invoice_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--invoices", default="", help="comma-separated stems (default: every corpus invoice)")
    a = p.parse_args(argv)
    import urllib3
    from jsonschema import Draft202012Validator

    from shared.task_schemas import INVOICE_SCHEMA

    paths = invoice_files()
    if a.invoices:
        wanted = set(a.invoices.split(","))
        paths = [path for path in paths if stem(path) in wanted]
    validator = Draft202012Validator(INVOICE_SCHEMA)
    http = urllib3.PoolManager(timeout=urllib3.Timeout(total=300), retries=False)
    groups: dict[str, list[int]] = {"developed-on": [0, 0], "held-back": [0, 0]}
    invalid = 0
    print("local stand-in OCR extraction, invoice fields right (measures local/, not the product):", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-invoices-") as tmp:
        stack = _start_stack(Path(tmp))
        try:
            url = f"{stack.host_url}/api/analyze?code={stack.function_key}"
            for path in paths:
                fields = {"file": (path.name, path.read_bytes(), mime(path)), "task": "invoice"}
                resp = http.request("POST", url, fields=fields, headers={"Cache-Control": "no-cache"})
                body = json.loads(resp.data or b"null")
                if resp.status != 200 or list(validator.iter_errors(body["result"])):
                    invalid += 1
                    print(f"  {stem(path):24} {group(path):13} HTTP {resp.status}, or an answer the schema refuses")
                    continue
                hits = field_hits(expected_fields(path), body["result"])
                groups[group(path)][0] += sum(hits.values())
                groups[group(path)][1] += len(hits)
                print(f"  {stem(path):24} {group(path):13} {sum(hits.values())}/{len(hits)}  {hits}", flush=True)
        finally:
            stack.stop()
    rate = {g: 100 * h / n for g, (h, n) in groups.items() if n}
    for g, (h, n) in groups.items():
        print(f"  {g:13} {h}/{n} = {rate.get(g, 0):.0f}%")
    if len(rate) == 2:
        print(f"  held-back minus developed-on: {rate['held-back'] - rate['developed-on']:+.0f} points")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
