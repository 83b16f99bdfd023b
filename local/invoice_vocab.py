"""General invoice vocabulary for the local model's label lookups: data, no logic.

The stand-in reads invoices the way a generic OCR-based extractor would, so its labels come from
public invoice standards and ordinary business language, never from the test corpus:
- the EN 16931 semantic model's business terms (BT-1 invoice number, BT-2 issue date, BT-9
  payment due date, BG-4 seller, BG-7 buyer, BT-31 seller VAT identifier, BT-109 total without
  VAT, BT-110 total VAT, BT-112 total with VAT, BT-115 amount due for payment), as named in
  https://raw.githubusercontent.com/OpenPEPPOL/peppol-bis-invoice-3/master/rules/sch/CEN-EN16931-UBL.sch;
- their usual printed labels in English, French, German, Dutch, Spanish and Italian.
Labels match case-insensitively with any spacing, dots or hyphens between their words (so
"invoice no" also matches "Invoice-No."), and compound labels are built from parts
(`invoice_number_labels`), so no list names one document's exact wording.
"""

from __future__ import annotations

# The document's own name, per language (a compound form such as German "Rechnungs-" included).
INVOICE_WORDS = ["invoice", "facture", "rechnungs", "rechnung", "factuur", "factura", "fattura"]
RECEIPT_WORDS = ["receipt", "bill", "quittung", "reçu", "recibo", "ricevuta"]
# "Number" and its abbreviations: n° / nº are the French, Spanish and Italian ones.
NUMBER_WORDS = ["number", "no", "nr", "num", "#", "n°", "nº", "numéro", "nummer", "número", "numero"]


def invoice_number_labels() -> list[str]:
    """BT-1 as printed: every invoice word with every number word, then receipt words, then the bare title."""
    return [
        *(f"{doc} {num}" for doc in INVOICE_WORDS for num in NUMBER_WORDS),
        *(f"{doc} {num}" for doc in RECEIPT_WORDS for num in NUMBER_WORDS),
        "numéro de facture",
        "número de factura",
        "numero fattura",
        *INVOICE_WORDS,
    ]


TITLE_WORDS = {"invoice", "tax invoice", "receipt", "bill", "facture", "rechnung", "factuur", "factura", "fattura"}

# BG-4 (seller) and BG-7 (buyer): words a schema uses for the parent object, and printed labels.
VENDOR_PARENTS = {"vendor", "seller", "supplier", "issuer", "merchant", "company", "from", "biller", "sender"}
CUSTOMER_PARENTS = {
    "customer", "buyer", "client", "bill_to", "billed_to", "recipient", "to", "ship_to", "purchaser", "billing",
}  # fmt: skip
VENDOR_LABELS = [
    "seller", "supplier", "vendor", "sold by", "issued by", "from", "company name", "merchant",
    "vendeur", "fournisseur", "verkäufer", "lieferant", "leverancier", "proveedor", "fornitore",
]  # fmt: skip
CUSTOMER_LABELS = [
    "bill to", "billed to", "billing address", "sold to", "customer name", "customer", "client", "buyer", "ship to",
    "kunde", "klant", "cliente", "acheteur", "name",
]  # fmt: skip

# BT-112 / BT-115 (what is to be paid), most specific first.
TOTAL_LABELS = [
    "amount due for payment", "grand total", "total amount", "amount due", "total due", "balance due",
    "amount payable", "total payable", "invoice total", "total to pay",
    "net à payer", "total à payer", "montant total", "total ttc", "montant ttc",
    "gesamtbetrag", "rechnungsbetrag", "endbetrag", "zu zahlen",
    "totaalbedrag", "te betalen", "totaal", "importe total", "total a pagar", "totale", "total",
]  # fmt: skip
TOTAL_EXCLUDE = r"sub\s*-?\s*total|total\s*(tax|vat|excl|ht|before)|tax\s*total|total\s*\(?%"
# BT-109 / BT-106 (before tax).
SUBTOTAL_LABELS = [
    "subtotal", "sub total", "net total", "net amount", "total excl", "taxable amount", "total without vat",
    "total ht", "montant ht", "zwischensumme", "nettobetrag", "netto", "subtotaal", "base imponible", "imponibile",
]  # fmt: skip
# BT-110 (tax), then the tax names themselves (VAT/GST and their local names).
TAX_LABELS = [
    "total tax", "tax amount", "tax total", "vat amount", "total vat", "sales tax",
    "montant tva", "mwst", "ust", "btw", "iva", "igst", "cgst", "sgst", "tva", "vat", "gst", "tax",
]  # fmt: skip
TAX_EXCLUDE = r"tin\b|/tin|tax\s*id|vat\s*(no|id|number|reg)|gstin|invoice|%"
# BT-31 / BT-32 (seller VAT or tax registration identifier), per country's usual abbreviation.
TAX_ID_LABELS = [
    "vat id", "vat no", "vat number", "vat reg", "tax id", "vat/tin", "gstin", "tin", "ein", "siret", "siren",
    "tva intracommunautaire", "ust-idnr", "ust-id", "steuernummer", "btw-nummer", "btw", "nif", "cif", "partita iva",
]  # fmt: skip
DUE_DATE_LABELS = [
    "due date",
    "payment due",
    "due on",
    "due by",
    "pay by",
    "échéance",
    "fällig",
    "vervaldatum",
    "vencimiento",
]
ISSUE_DATE_LABELS = [
    "invoice date", "date of issue", "issue date", "issued on", "bill date", "receipt date", "dated",
    "date de facture", "rechnungsdatum", "factuurdatum", "fecha de factura", "data fattura", "date", "datum", "fecha",
]  # fmt: skip
PHONE_LABELS = ["phone", "tel", "telephone", "mobile", "ph", "téléphone", "telefon", "teléfono"]
ADDRESS_LABELS = ["address", "adresse", "anschrift", "adres", "dirección", "indirizzo"]
CUSTOMER_ADDRESS_LABELS = ["billing address", "bill to", "shipping address", "customer address", "delivery address"]

# Words that make a short OCR fragment a label rather than a value.
LABEL_WORDS = {
    "address", "name", "date", "mode", "id", "no", "number", "details", "total", "amount", "qty", "price",
    "rate", "description", "from", "to", "phone", "email", "bill", "ship", "shipping", "billing", "invoice",
    "payment", "order", "customer", "seller", "vendor", "tax", "code", "account", "reference", "terms",
}  # fmt: skip
ID_WORDS = {"number", "no", "num", "id", "code", "reference", "ref", "nr"}
AMOUNT_WORDS = {
    "total", "amount", "subtotal", "tax", "vat", "gst", "price", "cost", "fee", "balance", "discount", "shipping",
    "paid", "due", "sum", "net", "gross", "charge", "charges", "rate",
}  # fmt: skip

# BG-25 invoice line columns (BT-153 item name, BT-129 quantity, BT-146 net price, BT-131 line net amount).
ITEM_HEADERS: dict[str, list[str]] = {
    "description": [
        "description", "item", "product", "title", "details", "particulars", "service", "article", "designation",
        "désignation", "bezeichnung", "beschreibung", "omschrijving", "descripción", "descrizione",
    ],
    "quantity": ["qty", "quantity", "units", "quantité", "qté", "menge", "anzahl", "aantal", "cantidad", "quantità"],
    "unit_price": ["unit price", "price", "rate", "unit cost", "prix", "preis", "prijs", "precio", "prezzo"],
    "tax": ["tax", "vat", "gst", "tva", "mwst", "btw", "iva"],
    "total": ["amount", "total", "line total", "value", "montant", "betrag", "bedrag", "importe", "importo"],
}  # fmt: skip
