"""Schema-shaped answers of the local model: an instance of the caller's JSON Schema from OCR and facts.

Every walk over the schema is bounded (memoised normalisation, a step budget, depth caps, RE2 for
patterns), so any schema the service can send is answered or refused (SchemaError, a 400) in
bounded time.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from local import invoice_vocab as vocab
from local.ocr_answers import Analysis, Synthesis, content_words, synthesize, text_answer, wants_synthesis
from local.ocr_doc import (
    EMAIL_RE,
    Doc,
    FieldSpec,
    field_spec,
    label_pattern,
    name_words,
)
from local.ocr_engine import Fragment, ImageFacts
from local.ocr_parse import currencies, is_numeric_fragment, numbers, parse_number
from shared import safe_regex
from shared.schemas import json_type

CLASS_NAMES = {"label", "category", "class", "type", "kind", "classification", "document_type", "doc_type"}

THEME_KEYS = {
    "common_themes": "common_themes", "themes": "common_themes", "theme": "common_themes",
    "progression": "progression", "changes": "progression", "progression_changes": "progression",
    "evolution": "progression", "trends": "progression", "progression_and_changes": "progression",
    "key_insights": "key_insights", "insights": "key_insights", "findings": "key_insights",
    "recommendations": "recommendations", "next_steps": "recommendations", "actions": "recommendations",
}  # fmt: skip


class SchemaError(ValueError):
    """The schema uses something the filler cannot satisfy (an unresolvable $ref)."""


def resolve_ref(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#"):
        raise SchemaError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, dict):
        raise SchemaError(f"$ref {ref!r} is not a schema")
    return node


_MISSING = object()


class SchemaFiller:
    """Builds an instance of a JSON Schema from the OCR document, the facts and the prompt.

    Strategy, per property: classification-like enums first (they set the confidence), then
    label/value lookups by property name (FieldSpec), then facts, then null when the schema allows
    it, otherwise a type-correct default that honours const/enum/minimum/minItems/minLength.
    """

    MAX_DEPTH = 8
    # Work units (schema nodes normalised, values built) one answer may spend. A schema whose
    # expansion needs more (refs fanning out, wide recursive objects) is refused as a 400, so any
    # schema the service can send is answered or refused in bounded time.
    MAX_STEPS = 20_000
    MAX_STRING = 100_000  # characters of filler a minLength may ask for

    def __init__(self, root: dict[str, Any], analysis: Analysis) -> None:
        self.root = root
        self.a = analysis
        self.doc = Doc(analysis.lines)
        self.confidence = 0.5
        self.steps = 0
        self._synthesis: Synthesis | None = None
        # id(node) -> (node, result): the node is kept so its id cannot be reused by another dict.
        self._normalized: dict[int, tuple[Any, tuple[dict[str, Any], bool]]] = {}
        self._active: set[int] = set()

    def _tick(self) -> None:
        self.steps += 1
        if self.steps > self.MAX_STEPS:
            raise SchemaError(f"the schema expands past {self.MAX_STEPS} steps")

    # -- schema helpers
    def normalize(self, schema: Any) -> tuple[dict[str, Any], bool]:
        """The node with $ref, anyOf/oneOf, allOf and type lists resolved, and whether null is allowed.

        Memoised per node, so a `$defs` chain of oneOf-of-two-refs costs one step per definition,
        not 2^depth; a node met again while it is being resolved (a cycle) counts as unconstrained.
        """
        if not isinstance(schema, dict):
            return {}, True
        key = id(schema)
        hit = self._normalized.get(key)
        if hit is not None:
            return hit[1]
        if key in self._active:
            return {}, True
        self._tick()
        self._active.add(key)
        try:
            result = self._normalize(schema)
        finally:
            self._active.discard(key)
        self._normalized[key] = (schema, result)
        return result

    def _normalize(self, schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        nullable = False
        if "$ref" in schema:
            target, nullable = self.normalize(resolve_ref(self.root, schema["$ref"]))
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            if not siblings:
                return target, nullable
            schema = {**target, **siblings}
        for key in ("anyOf", "oneOf"):
            if key in schema and isinstance(schema[key], list):
                # The first branch that is not null is the one answered; the others only say
                # whether null is allowed (each is normalised once, memoised).
                branches = [self.normalize(b) for b in schema[key]]
                nullable = nullable or any(_is_null(b) or n for b, n in branches)
                real = [b for b, _ in branches if not _is_null(b)]
                merged = {k: v for k, v in schema.items() if k != key}
                schema = {**merged, **(real[0] if real else {"type": "null"})}
        if "allOf" in schema and isinstance(schema["allOf"], list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in schema["allOf"]:
                s, n = self.normalize(sub)
                nullable = nullable or n
                props = {**merged.get("properties", {}), **s.get("properties", {})}
                req = list(dict.fromkeys([*merged.get("required", []), *s.get("required", [])]))
                merged = {**merged, **s}
                if props:
                    merged["properties"] = props
                if req:
                    merged["required"] = req
            schema = merged
        t = schema.get("type")
        if isinstance(t, list):
            nullable = nullable or "null" in t
            real_t = [x for x in t if x != "null"]
            schema = {**schema, "type": real_t[0] if real_t else "null"}
        if "enum" in schema and None in schema["enum"]:
            nullable = True
        if "type" not in schema:
            if "properties" in schema:
                schema = {**schema, "type": "object"}
            elif "items" in schema:
                schema = {**schema, "type": "array"}
            elif schema.get("enum"):
                first = next((v for v in schema["enum"] if v is not None), None)
                schema = {**schema, "type": json_type(first)}
            elif "const" in schema:
                schema = {**schema, "type": json_type(schema["const"])}
        return schema, nullable

    # -- entry
    def fill(self) -> Any:
        return self.value(self.root, (), 0)

    def value(self, schema: Any, path: tuple[str, ...], depth: int) -> Any:
        self._tick()
        s, nullable = self.normalize(schema)
        if "const" in s:
            return s["const"]
        t = s.get("type")
        if depth > self.MAX_DEPTH:
            return None if nullable else self.default(s)
        if "enum" in s:
            return self.enum(s, path, nullable)
        if t == "object":
            return self.obj(s, path, depth)
        if t == "array":
            return self.array(s, path, depth, nullable)
        if t == "null":
            return None
        found = self.scalar(s, path)
        if found is _MISSING or found is None:
            return None if nullable else self.default(s)
        return found

    def default(self, s: dict[str, Any], depth: int = 0) -> Any:
        """A type-correct filler honouring const/enum/minimum/minItems/minLength (depth-capped for recursion)."""
        self._tick()
        t = s.get("type")
        if "const" in s:
            return s["const"]
        if s.get("enum"):
            return next((v for v in s["enum"] if v is not None), s["enum"][0])
        if t == "string":
            return "x" * self._min_length(s)
        if t in ("number", "integer"):
            lo = s.get("minimum", s.get("exclusiveMinimum"))
            v = 0 if lo is None else (lo + 1 if "exclusiveMinimum" in s and "minimum" not in s else lo)
            return int(v) if t == "integer" else v
        if t == "boolean":
            return False
        if depth > self.MAX_DEPTH:
            return None
        if t == "array":
            item = self.normalize(s.get("items", {}))[0]
            return [self.default(item, depth + 1) for _ in range(int(s.get("minItems", 0)))]
        if t == "object":
            return {k: self.default(self.normalize(v)[0], depth + 1) for k, v in s.get("properties", {}).items()}
        return None

    # -- objects and arrays
    def obj(self, s: dict[str, Any], path: tuple[str, ...], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = s.get("properties", {})
        out: dict[str, Any] = {}
        order = sorted(props, key=lambda k: 0 if "enum" in self.normalize(props[k])[0] else 1)
        for key in order:
            out[key] = self.value(props[key], (*path, key), depth + 1)
        return {k: out[k] for k in props}

    def array(self, s: dict[str, Any], path: tuple[str, ...], depth: int, nullable: bool) -> list[Any] | None:
        items_schema, _ = self.normalize(s.get("items", {}))
        name = path[-1] if path else ""
        key = "_".join(name_words(name))
        values: list[Any] = []
        if key in THEME_KEYS:
            texts = getattr(self.synthesis(), THEME_KEYS[key])
            values = [self._from_text(items_schema, t, (*path, "item"), depth) for t in texts]
        elif items_schema.get("type") == "object" and self._is_line_item(items_schema):
            values = [
                self._line_item(items_schema, row, (*path, "item"), depth) for row in self.line_items(items_schema)
            ]
        elif key in ("rows",) and self.a.lines:
            cols, rows = self.table()
            values = [self._row(items_schema, cols, r, (*path, "row"), depth) for r in rows]
        elif key in ("columns", "headers", "header") and items_schema.get("type") == "string":
            values = self.table()[0]
        elif items_schema.get("type") == "string" and (
            set(name_words(name)) & {"lines", "text", "texts", "ocr", "transcript"} or key == "text_lines"
        ):
            values = [ln.text for ln in self.a.lines]
        elif items_schema.get("type") == "string" and set(name_words(name)) & {"keywords", "tags", "words"}:
            counts = Counter(w for ln in self.a.lines for w in content_words([ln]))
            values = [w for w, _ in counts.most_common(10)]
        elif items_schema.get("type") == "string" and set(name_words(name)) & {"colors", "colours"}:
            values = list(
                dict.fromkeys(c for im in self.a.images for c in (im.facts.colour, im.facts.second_colour) if c)
            )
        elif items_schema.get("type") == "string" and "enum" in items_schema:
            values = [self.enum(items_schema, path, False)]
        lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
        if hi is not None:
            values = values[: int(hi)]
        while len(values) < lo:
            values.append(self.value(items_schema, (*path, "item"), depth + 1))
        if s.get("uniqueItems"):
            uniq: list[Any] = []
            for v in values:
                if v not in uniq:
                    uniq.append(v)
            values = uniq
        return values

    def _from_text(self, items_schema: dict[str, Any], text: str, path: tuple[str, ...], depth: int) -> Any:
        if items_schema.get("type") == "string":
            return self._fit_string(items_schema, text)
        if items_schema.get("type") == "object":
            obj = self.obj(items_schema, path, depth + 1)
            for k, v in items_schema.get("properties", {}).items():
                if self.normalize(v)[0].get("type") == "string":
                    obj[k] = self._fit_string(self.normalize(v)[0], text)
                    break
            return obj
        return self.value(items_schema, path, depth + 1)

    # -- tables and line items
    def table(self) -> tuple[list[str], list[list[str]]]:
        """Columns from the line with the most fragments; rows aligned to them by x position."""
        lines = self.a.lines
        if not lines:
            return [], []
        header_i = max(range(len(lines)), key=lambda i: (len(lines[i].fragments), -i))
        header = lines[header_i]
        if len(header.fragments) < 2:
            return ["text"], [[ln.text] for ln in lines]
        cols = [f.text for f in header.fragments]
        rows: list[list[str]] = []
        for ln in lines[header_i + 1 :]:
            if ln.page != header.page or len(ln.fragments) < 2:
                continue
            cells = [""] * len(cols)
            for f in ln.fragments:
                j = min(range(len(cols)), key=lambda c: abs(header.fragments[c].xc - f.xc))
                cells[j] = (cells[j] + " " + f.text).strip()
            rows.append(cells)
        return cols, rows

    def _row(
        self, items_schema: dict[str, Any], cols: list[str], cells: list[str], path: tuple[str, ...], depth: int
    ) -> Any:
        if items_schema.get("type") == "array":
            inner, _ = self.normalize(items_schema.get("items", {}))
            return [self._fit_string(inner, c) if inner.get("type") == "string" else self.default(inner) for c in cells]
        if items_schema.get("type") == "object":
            obj = self.obj(items_schema, path, depth + 1)
            for k, v in items_schema.get("properties", {}).items():
                vs, _ = self.normalize(v)
                for c, cell in zip(cols, cells, strict=False):
                    if set(name_words(k)) & set(name_words(c)):
                        obj[k] = self._typed(vs, cell, obj[k])
            return obj
        return self.default(items_schema)

    def _is_line_item(self, items_schema: dict[str, Any]) -> bool:
        roles = {self._item_role(k) for k in items_schema.get("properties", {})}
        return "description" in roles and len(roles & {"quantity", "unit_price", "total"}) >= 1

    @staticmethod
    def _item_role(prop: str) -> str | None:
        w = set(name_words(prop))
        if w & {"description", "item", "product", "name", "title", "details", "service"}:
            return "description"
        if w & {"quantity", "qty", "units", "count"}:
            return "quantity"
        if w & {"price", "rate", "cost"} or {"unit", "price"} <= w:
            return "unit_price"
        if w & {"tax", "vat", "gst"}:
            return "tax"
        if w & {"total", "amount", "value", "sum"}:
            return "total"
        return None

    def line_items(self, items_schema: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows under a header naming at least two of description/qty/price/amount, until a total line."""
        lines = self.a.lines
        rows: list[dict[str, Any]] = []
        i = 0
        while i < len(lines):
            header = lines[i]
            roles: list[tuple[str, Fragment]] = []
            for f in header.fragments:
                for role, names in vocab.ITEM_HEADERS.items():
                    if any(label_pattern(n).search(f.text) for n in names):
                        roles.append((role, f))
                        break
            if len({r for r, _ in roles}) < 2 or not any(r == "description" for r, _ in roles):
                i += 1
                continue
            j = i + 1
            while j < len(lines) and lines[j].page == header.page:
                ln = lines[j]
                if re.search(r"(?<![a-z])(sub\s*-?\s*total|total|balance|amount due)(?![a-z])", ln.text, re.I):
                    break
                j += 1
                numeric = [f for f in ln.fragments if is_numeric_fragment(f.text)]
                if not numeric or not any(re.search(r"[a-z]{2}", f.text, re.I) for f in ln.fragments):
                    continue
                row: dict[str, Any] = {}
                desc: list[str] = []
                for f in ln.fragments:
                    role, _ = min(roles, key=lambda rf: abs(rf[1].xc - f.xc))
                    if role == "description" or (
                        not is_numeric_fragment(f.text) and f.x1 < numeric[0].x0 and role != "unit_price"
                    ):
                        desc.append(f.text)
                    elif role not in row:
                        n = numbers(f.text)
                        if n:
                            row[role] = n[0] if role != "total" else n[-1]
                row["description"] = " ".join(desc)
                if "quantity" not in row and row.get("unit_price") and row.get("total"):
                    row["quantity"] = round(row["total"] / row["unit_price"], 3)
                rows.append(row)
            i = j + 1
            if rows:
                break
        return rows

    def _line_item(
        self, items_schema: dict[str, Any], row: dict[str, Any], path: tuple[str, ...], depth: int
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items_schema.get("properties", {}).items():
            vs, nullable = self.normalize(v)
            role = self._item_role(k)
            if role in row and row[role] not in (None, ""):
                out[k] = self._typed(vs, row[role], None if nullable else self.default(vs))
            else:
                out[k] = None if nullable else self.default(vs)
        return out

    def _typed(self, s: dict[str, Any], raw: Any, fallback: Any) -> Any:
        t = s.get("type")
        if t in ("number", "integer"):
            n = raw if isinstance(raw, (int, float)) else parse_number(str(raw))
            return fallback if n is None else self._fit_number(s, n)
        if t == "string":
            return self._fit_string(s, str(raw))
        return fallback

    # -- scalars
    def scalar(self, s: dict[str, Any], path: tuple[str, ...]) -> Any:
        t = s.get("type")
        name = path[-1] if path else ""
        words = set(name_words(name))
        if t == "boolean":
            return self.boolean(words)
        if t in ("number", "integer"):
            n = self.number(words, path)
            return _MISSING if n is None else self._fit_number(s, n)
        if t == "string":
            v = self.string(s, words, path)
            return _MISSING if v is None else self._fit_string(s, v, strict=True)
        return _MISSING

    def boolean(self, words: set[str]) -> bool:
        f = self.a.images[0].facts if self.a.images else None
        if words & {"text", "readable", "document"} and self.a.ocr:
            return bool(self.a.lines)
        if f is not None:
            for w in ("landscape", "portrait", "square"):
                if w in words:
                    return f.orientation == w
            if "dark" in words:
                return f.brightness_word == "dark"
            if "bright" in words:
                return f.brightness_word == "bright"
            if words & {"blurry", "blur", "blurred"}:
                return f.sharpness_word == "blurry"
            if "sharp" in words:
                return f.sharpness_word == "sharp"
        content = [w for w in words if w not in {"is", "has", "contains", "contain", "with", "any"} and len(w) > 2]
        text = self.doc.text.lower()
        return bool(content) and all(re.search(rf"(?<![a-z]){re.escape(w)}", text) for w in content)

    def number(self, words: set[str], path: tuple[str, ...]) -> float | None:
        f: ImageFacts | None = self.a.images[0].facts if self.a.images else None
        if words & {"confidence", "score", "probability", "certainty"}:
            return self.confidence
        if f is not None:
            for w in ("width", "height", "brightness", "sharpness", "contrast"):
                if w in words and not words & vocab.AMOUNT_WORDS:
                    return float(getattr(f, w))
        if (words & {"pages", "page"} and words & {"count", "number", "num", "total"}) or words == {"pages"}:
            return float(len(self.a.images))
        if words & {"lines"}:
            return float(len(self.a.lines))
        spec = field_spec(path)
        if spec.kind == "amount" and spec.labels:
            found = self.doc.find(spec.labels, "amount", spec.exclude)
            return None if found is None else float(found.value)
        return None

    def string(self, s: dict[str, Any], words: set[str], path: tuple[str, ...]) -> str | None:
        f: ImageFacts | None = self.a.images[0].facts if self.a.images else None
        key = "_".join(name_words(path[-1])) if path else ""
        if key in THEME_KEYS:
            return "; ".join(getattr(self.synthesis(), THEME_KEYS[key]))
        if key in ("summary", "overview", "synthesis") and wants_synthesis(self.a.prompt):
            syn = self.synthesis()
            return "; ".join(syn.common_themes + syn.key_insights)
        if words & {"text", "ocr", "transcript", "transcription", "content", "raw"} and not words & {"date", "number"}:
            return self.doc.text
        if key in ("description", "summary", "caption", "answer", "result", "analysis", "comparison"):
            return text_answer(self.a)
        if f is not None:
            if words & {"orientation"}:
                return f.orientation
            if words & {"color", "colour", "dominant"}:
                return f.colour
        fmt = s.get("format")
        spec = field_spec(path)
        if fmt == "date" and spec.kind != "date":
            spec = FieldSpec("date", [*spec.labels, "date"], fallback="first_date")
        if spec.kind == "currency":
            codes = currencies(self.doc.text)
            return codes[0] if codes else None
        if spec.kind == "email":
            m = EMAIL_RE.search(self.doc.text)
            return m.group() if m else None
        if spec.kind == "date":
            found = self.doc.find(spec.labels, "date")
            if found is not None:
                return found.value
            return self.doc.first_date() if spec.fallback == "first_date" else None
        if spec.kind == "amount":
            return None
        if spec.labels:
            found = self.doc.find(spec.labels, spec.kind)
            if found is not None:
                return str(found.value)
        if spec.fallback == "company":
            return self.doc.company_line() or self.doc.prominent_line()
        if key in ("title", "heading", "name") and self.a.lines:
            return self.a.lines[0].text
        return None

    def enum(self, s: dict[str, Any], path: tuple[str, ...], nullable: bool) -> Any:
        """The enum value best supported by the OCR text, then by the image facts; sets the confidence."""
        values = [v for v in s["enum"] if v is not None]
        if not values:
            return None
        name = path[-1] if path else ""
        text = self.doc.text.lower()
        fact_words: set[str] = set()
        for im in self.a.images:
            fact_words |= im.facts.words()
        many_text = len(self.a.lines) >= 5
        if self.a.images:
            fact_words |= (
                {"document", "text", "scan", "page", "paper", "form"}
                if many_text
                else {"photo", "photograph", "picture", "image", "scene"}
            )
        codes = currencies(self.doc.text) if "currency" in name_words(name) else []
        best, best_score, best_pos = None, 0.0, 1e9
        for v in values:
            sv = str(v)
            words = [w for w in re.split(r"[\s_\-/]+", sv.lower()) if w]
            score, pos = 0.0, 1e9
            if sv.upper() in codes:
                score += 3 - codes.index(sv.upper()) * 0.5
            for w in words:
                for variant in {w, w.rstrip("s"), w + "s"}:
                    hits = [m.start() for m in re.finditer(rf"(?<![a-z]){re.escape(variant)}(?![a-z])", text)]
                    if hits:
                        score += 2 * min(3, len(hits))
                        pos = min(pos, hits[0])
                        break
                if w in fact_words:
                    score += 1
            if score > best_score or (score == best_score and score > 0 and pos < best_pos):
                best, best_score, best_pos = v, score, pos
        if best is None:
            self.confidence = round(1 / len(values), 3)
            if nullable and set(name_words(name)) & CLASS_NAMES == set():
                return None
            return values[0]
        self.confidence = round(min(0.95, 0.5 + 0.08 * best_score), 3)
        return best

    # -- fitting values to constraints
    def _fit_number(self, s: dict[str, Any], n: float) -> float | int:
        if "minimum" in s:
            n = max(n, s["minimum"])
        if "maximum" in s:
            n = min(n, s["maximum"])
        if "exclusiveMinimum" in s and n <= s["exclusiveMinimum"]:
            n = s["exclusiveMinimum"] + (1 if s.get("type") == "integer" else 1e-6)
        if "exclusiveMaximum" in s and n >= s["exclusiveMaximum"]:
            n = s["exclusiveMaximum"] - (1 if s.get("type") == "integer" else 1e-6)
        if s.get("type") == "integer":
            return round(n)
        return float(n)

    def _min_length(self, s: dict[str, Any]) -> int:
        n = int(s.get("minLength", 0))
        if n > self.MAX_STRING:
            raise SchemaError(f"minLength over {self.MAX_STRING} characters")
        return n

    def _fit_string(self, s: dict[str, Any], v: str, strict: bool = False) -> Any:
        if s.get("enum"):
            return v if v in s["enum"] else s["enum"][0]
        if "maxLength" in s:
            v = v[: int(s["maxLength"])]
        if len(v) < self._min_length(s):
            v = v + " " * (self._min_length(s) - len(v))
        pattern = s.get("pattern")
        if isinstance(pattern, str) and not _matches(pattern, v):
            return None if strict else self.default(s)
        fmt = s.get("format")
        if fmt == "date" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            return None if strict else "1970-01-01"
        return v

    def synthesis(self) -> Synthesis:
        if self._synthesis is None:
            self._synthesis = synthesize(self.a)
        return self._synthesis


def _matches(pattern: str, text: str) -> bool:
    """A caller's pattern, run by RE2 (linear time) like the service does; one RE2 refuses never matches."""
    try:
        return safe_regex.search(pattern, text)
    except safe_regex.RegexRefused:
        return False


def _is_null(s: dict[str, Any]) -> bool:
    return s.get("type") == "null"


def schema_answer(a: Analysis, schema: dict[str, Any]) -> Any:
    """An instance of `schema` filled from OCR and facts."""
    return SchemaFiller(schema, a).fill()


def find_schema_in_prompt(prompt: str) -> dict[str, Any] | None:
    """The first JSON object in the prompt that looks like a JSON Schema (json_object mode carries it as text)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", prompt):
        try:
            obj, _ = decoder.raw_decode(prompt, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and ("properties" in obj or obj.get("type") == "object" or "$defs" in obj):
            return obj
    return None


def json_object_answer(a: Analysis) -> dict[str, Any]:
    """json_object mode: fill a schema found in the prompt, else a synthesis object, else {"text": ...}."""
    schema = find_schema_in_prompt(a.prompt)
    if schema is not None:
        value = schema_answer(a, schema)
        return value if isinstance(value, dict) else {"value": value}
    if wants_synthesis(a.prompt):
        syn = synthesize(a)
        return {
            "common_themes": syn.common_themes,
            "progression": syn.progression,
            "key_insights": syn.key_insights,
            "recommendations": syn.recommendations,
        }
    return {"text": text_answer(a)}
