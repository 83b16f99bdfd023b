"""Text answers of the local model: descriptions, comparisons and syntheses from OCR and image facts.

Schema-shaped JSON is built in local/schema_fill.py, from label lookups in local/ocr_doc.py.

Nothing here pretends to understand a picture. Every answer is built from what was measured
(size, orientation, brightness, colours, sharpness) and what RapidOCR read, and says so, so the
plumbing (prompts, structured outputs, validation, re-asks) is exercised against honest content.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

from local.ocr_engine import DecodedImage, OcrLine

MODEL_BANNER = "Local OCR stand-in (not a vision-language model)."
STOPWORDS = set(
    "the a an and or of to in on for with at by from is are was were be this that these those it its as "
    "image images photo picture describe please analyze analyse text what which into about your you "
    "their there here have has had not but all any each more most other some such than then them they "
    "will would should could can may also only over under between compare comparison synthesis common "
    "themes found reading order local model brightness mostly lines none".split()
)


@dataclass
class Analysis:
    """Everything an answer may use: the request's text, the decoded images and whether OCR ran."""

    prompt: str
    images: list[DecodedImage]
    ocr: bool = True

    @property
    def lines(self) -> list[OcrLine]:
        return [line for im in self.images for line in im.lines]

    @property
    def full_text(self) -> str:
        return "\n".join(line.text for line in self.lines)


def wants_synthesis(prompt: str) -> bool:
    p = prompt.lower()
    return "synthesis" in p or "synthesi" in p or "common themes" in p or "common_themes" in p


def wants_compare(prompt: str, n_images: int) -> bool:
    p = prompt.lower()
    return n_images >= 2 and ("compar" in p or "difference" in p or re.search(r"\[image \d+\]", p) is not None)


# ---------------------------------------------------------------------------------------- text


def _text_block(im: DecodedImage, ocr: bool, limit: int | None = None) -> str:
    if not ocr:
        return "Text: not read (facts mode, OCR off)."
    if not im.lines:
        return "Text found: none."
    lines = im.lines if limit is None else im.lines[:limit]
    more = "" if limit is None or len(im.lines) <= limit else f"\n... ({len(im.lines) - limit} more lines)"
    return f"Text found (reading order, {len(im.lines)} lines):\n" + "\n".join(ln.text for ln in lines) + more


def describe(a: Analysis) -> str:
    """One image: facts, then the OCR lines top to bottom, left to right."""
    im = a.images[0]
    return f"{MODEL_BANNER} Image: {im.facts.phrase()}.\n{_text_block(im, a.ocr)}"


def content_words(lines: list[OcrLine]) -> set[str]:
    """Lower-case words of 3+ letters, without stop words: what images are compared on."""
    return {w for w in re.findall(r"[a-zäöüéèàç]{3,}", " ".join(ln.text for ln in lines).lower()) if w not in STOPWORDS}


def compare(a: Analysis) -> str:
    """Two or more images: per-image facts, then similarities and differences, each image as [Image N]."""
    ims = a.images
    facts = [im.facts for im in ims]
    tag = [f"[Image {i + 1}]" for i in range(len(ims))]
    out = [f"{MODEL_BANNER} Comparison of {len(ims)} images."]
    for t, im in zip(tag, ims, strict=True):
        snippet = "; ".join(ln.text for ln in im.lines[:3]) if im.lines else ""
        text = (
            "text not read (facts mode)"
            if not a.ocr
            else (f'{len(im.lines)} text lines, starting "{snippet}"' if im.lines else "no text found")
        )
        out.append(f"{t}: {im.facts.phrase()}; {text}.")
    same: list[str] = []
    diff: list[str] = []
    orient = {f.orientation for f in facts}
    if len(orient) == 1:
        same.append(f"all are {facts[0].orientation}")
    else:
        diff.append("orientation: " + ", ".join(f"{t} {f.orientation}" for t, f in zip(tag, facts, strict=True)))
    colours = {f.colour for f in facts}
    if len(colours) == 1:
        same.append(f"all are mostly {facts[0].colour}")
    else:
        diff.append("dominant colour: " + ", ".join(f"{t} {f.colour}" for t, f in zip(tag, facts, strict=True)))
    b = [f.brightness for f in facts]
    if max(b) - min(b) < 20:
        same.append(f"similar brightness (about {round(sum(b) / len(b))}/255)")
    else:
        hi, lo = b.index(max(b)), b.index(min(b))
        diff.append(f"{tag[hi]} is the brightest ({round(b[hi])}/255), {tag[lo]} the darkest ({round(b[lo])}/255)")
    px = [f.width * f.height for f in facts]
    if max(px) <= 1.1 * min(px):
        same.append(f"similar size (about {facts[0].width}x{facts[0].height})")
    else:
        big, small = px.index(max(px)), px.index(min(px))
        diff.append(
            f"{tag[big]} is the largest ({facts[big].width}x{facts[big].height}), "
            f"{tag[small]} the smallest ({facts[small].width}x{facts[small].height})"
        )
    sharp = {f.sharpness_word for f in facts}
    if len(sharp) == 1:
        same.append(f"all look {facts[0].sharpness_word}")
    else:
        diff.append("sharpness: " + ", ".join(f"{t} {f.sharpness_word}" for t, f in zip(tag, facts, strict=True)))
    if a.ocr:
        has = [bool(im.lines) for im in ims]
        if all(has):
            common = set.intersection(*(content_words(im.lines) for im in ims))
            same.append("all contain text" + (f"; shared words: {', '.join(sorted(common)[:8])}" if common else ""))
            for t, im in zip(tag, ims, strict=True):
                only = content_words(im.lines) - set().union(*(content_words(o.lines) for o in ims if o is not im))
                if only:
                    diff.append(f"words only in {t}: {', '.join(sorted(only)[:6])}")
        elif not any(has):
            same.append("none contains readable text")
        else:
            diff.append(
                "text: " + ", ".join(f"{t} {'has text' if h else 'no text'}" for t, h in zip(tag, has, strict=True))
            )
    out.append("Similarities: " + ("; ".join(same) if same else "none measured") + ".")
    out.append("Differences: " + ("; ".join(diff) if diff else "none measured") + ".")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- synthesis


@dataclass
class _Item:
    label: str
    orientation: str | None = None
    colour: str | None = None
    brightness: float | None = None
    sharpness_word: str | None = None
    text_lines: int = 0
    words: set[str] = field(default_factory=set)


_PHRASE_RE = re.compile(
    r"(\d+)x(\d+) (landscape|portrait|square), mostly ([a-z ]+?)(?: with some [a-z ]+?)?, brightness (\d+)/255"
)


def _items(a: Analysis) -> list[_Item]:
    """The sequence's members: decoded images, or the `[Image N]` sections of a text-only prompt."""
    if a.images:
        return [
            _Item(
                f"[Image {i + 1}]",
                im.facts.orientation,
                im.facts.colour,
                im.facts.brightness,
                im.facts.sharpness_word,
                len(im.lines),
                content_words(im.lines),
            )
            for i, im in enumerate(a.images)
        ]
    parts = re.split(r"\[Image (\d+)\]", a.prompt)
    items: list[_Item] = []
    for n, body in zip(parts[1::2], parts[2::2], strict=False):
        item = _Item(f"[Image {n}]")
        m = _PHRASE_RE.search(body)
        if m:
            item.orientation, item.colour, item.brightness = m[3], m[4].strip(), float(m[5])
        for word in ("blurry", "soft", "sharp"):
            if re.search(rf"\b{word}\b", body):
                item.sharpness_word = word
                break
        t = re.search(r"Text found \(reading order, (\d+) lines\)", body)
        item.text_lines = int(t[1]) if t else (0 if "Text found: none" in body else len(body.splitlines()))
        item.words = {w for w in re.findall(r"[a-zäöüéèàç]{4,}", body.lower()) if w not in STOPWORDS}
        items.append(item)
    return items


@dataclass
class Synthesis:
    items: int
    common_themes: list[str]
    progression: list[str]
    key_insights: list[str]
    recommendations: list[str]

    def text(self) -> str:
        def block(title: str, rows: list[str]) -> str:
            return title + ":\n" + "\n".join(f"- {r}" for r in rows)

        return "\n".join(
            [
                f"{MODEL_BANNER} Synthesis over {self.items} items, from measured facts and OCR only.",
                block("Common themes", self.common_themes),
                block("Progression / changes", self.progression),
                block("Key insights", self.key_insights),
                block("Recommendations", self.recommendations),
            ]
        )


def synthesize(a: Analysis) -> Synthesis:
    """Themes (what all share), progression (changes between neighbours), insights and recommendations."""
    items = _items(a)
    n = len(items)
    themes: list[str] = []
    changes: list[str] = []
    insights: list[str] = []
    recs: list[str] = []
    if n == 0:
        return Synthesis(
            0,
            ["no images or [Image N] sections to synthesise"],
            ["nothing to compare"],
            [f"the prompt has {len(a.prompt)} characters and no image analyses"],
            ["send the per-image analyses labelled [Image N]"],
        )
    orient = Counter(i.orientation for i in items if i.orientation)
    if orient:
        o, c = orient.most_common(1)[0]
        themes.append(f"{c} of {n} are {o}")
    colours = Counter(i.colour for i in items if i.colour)
    if colours:
        col, c = colours.most_common(1)[0]
        themes.append(f"dominant colour {col} in {c} of {n}")
    with_text = sum(1 for i in items if i.text_lines)
    themes.append(f"{with_text} of {n} contain readable text")
    word_counts = Counter(w for i in items for w in i.words)
    recurring = [w for w, c in word_counts.most_common(30) if c >= max(2, (n + 1) // 2)][:6]
    if recurring:
        themes.append("recurring words: " + ", ".join(recurring))
    for prev, cur in itertools.pairwise(items):
        step: list[str] = []
        if prev.brightness is not None and cur.brightness is not None and abs(cur.brightness - prev.brightness) >= 20:
            word = "brighter" if cur.brightness > prev.brightness else "darker"
            step.append(f"{word} ({round(prev.brightness)} -> {round(cur.brightness)}/255)")
        if prev.colour and cur.colour and prev.colour != cur.colour:
            step.append(f"colour {prev.colour} -> {cur.colour}")
        if prev.orientation and cur.orientation and prev.orientation != cur.orientation:
            step.append(f"{prev.orientation} -> {cur.orientation}")
        if bool(prev.text_lines) != bool(cur.text_lines):
            step.append("text appears" if cur.text_lines else "text disappears")
        if step:
            changes.append(f"{prev.label} -> {cur.label}: " + ", ".join(step))
    if not changes:
        changes.append("no marked change between consecutive items")
    bright = [(i.brightness, i.label) for i in items if i.brightness is not None]
    if bright:
        insights.append(
            f"brightest {max(bright)[1]} ({round(max(bright)[0])}/255), darkest {min(bright)[1]} ({round(min(bright)[0])}/255)"
        )
    most_text = max(items, key=lambda i: i.text_lines)
    if most_text.text_lines:
        insights.append(f"most text in {most_text.label} ({most_text.text_lines} lines)")
    blurry = [i.label for i in items if i.sharpness_word == "blurry"]
    if blurry:
        insights.append("blurry: " + ", ".join(blurry))
    dark = [i.label for i in items if i.brightness is not None and i.brightness < 85]
    if dark:
        recs.append("re-capture with more light: " + ", ".join(dark))
    if blurry:
        recs.append("re-shoot or steady the camera: " + ", ".join(blurry))
    if with_text and with_text < n:
        recs.append("route the text-bearing items to OCR with detail high")
    if not recs:
        recs.append("no issues measured; the set is consistent enough to process as is")
    return Synthesis(n, themes, changes, insights, recs)


def text_answer(a: Analysis) -> str:
    """The plain-text answer for whatever the prompt asks: synthesis, comparison or description."""
    if wants_synthesis(a.prompt):
        return synthesize(a).text()
    if not a.images:
        return (
            f"{MODEL_BANNER} No image in the request, so there is nothing to read (prompt: {len(a.prompt)} characters)."
        )
    if len(a.images) == 1:
        return describe(a)
    if wants_compare(a.prompt, len(a.images)):
        return compare(a)
    return "\n".join(
        [f"{MODEL_BANNER} {len(a.images)} images."]
        + [f"[Image {i + 1}]: {im.facts.phrase()}.\n{_text_block(im, a.ocr)}" for i, im in enumerate(a.images)]
    )
