"""Caller regular expressions, evaluated in linear time (RE2), never by Python's `re`.

Python's `re` backtracks: `^(a+)+$` against 35 characters takes hours and holds the GIL, so
one caller could stall a whole worker. RE2 (`google-re2` on PyPI, https://github.com/google/re2)
matches in time linear in the text and bounds the memory a compiled pattern may use, so
every regex that comes from a caller (`pattern`, `patternProperties`, `format: regex`) goes
through here. What RE2 cannot do in linear time (backreferences, look-around) it refuses to
compile, and so do we: the caller gets a 400 naming the path, not a slow worker.

RE2 also bounds repetition counts (`{n}` with n > 1000 does not compile) and the size of the
compiled program (`max_mem`), so `a{4294967296}` or `((a{1000}){1000}){1000}` fail fast
instead of raising OverflowError or allocating gigabytes. Its dialect is close to the
ECMA-262 one JSON Schema specifies; `$` matches only at the very end, as in ECMA-262 (Python's
`$` also matches before a final newline).

re2's own LRU cache keeps at most 128 compiled patterns per process
(https://github.com/google/re2/blob/main/python/re2.py), each within MAX_MEM.
"""

from __future__ import annotations

import re2

__all__ = ["MAX_MEM", "MAX_PATTERN_CHARS", "RegexRefused", "compile_safe", "is_valid_regex", "search"]

# The memory one compiled pattern (program plus DFA cache) may use; past it RE2 fails the
# compile (or falls back from its DFA to its NFA while matching, still linear). 1 MiB fits
# every realistic field pattern; 128 cached patterns stay within 128 MiB.
MAX_MEM = 1 << 20
# Longer patterns are refused before RE2 sees them (a field pattern is a few dozen characters).
MAX_PATTERN_CHARS = 2_000


class RegexRefused(ValueError):
    """A pattern RE2 cannot run in linear time, or one over the size limits.

    `reason` is a short fixed phrase of ours, never RE2's message (which echoes the pattern).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False  # RE2 would otherwise print the caller's pattern to stderr
    options.never_capture = True  # only "does it match" is ever asked
    return options


_OPTIONS = _options()


def compile_safe(pattern: str) -> re2._Regexp:
    """The compiled pattern, or RegexRefused with a short reason (no RE2 text, no pattern)."""
    if not isinstance(pattern, str):
        raise RegexRefused("a regular expression must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexRefused(f"longer than {MAX_PATTERN_CHARS} characters")
    try:
        # surrogatepass: a lone surrogate (valid in JSON text) must not raise UnicodeEncodeError.
        return re2.compile(pattern.encode("utf-8", "surrogatepass"), options=_OPTIONS)
    except re2.error:
        raise RegexRefused(
            "not a regular expression that runs in linear time (RE2 syntax: no backreferences or "
            "look-around, repetition counts up to 1000, bounded size)"
        ) from None


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches anywhere in `text` (JSON Schema's unanchored semantics)."""
    return compile_safe(pattern).search(text.encode("utf-8", "surrogatepass")) is not None


def is_valid_regex(text: object) -> bool:
    """The `format: regex` check: a string RE2 compiles within the limits (non-strings pass)."""
    if not isinstance(text, str):
        return True
    try:
        compile_safe(text)
    except RegexRefused:
        return False
    return True
