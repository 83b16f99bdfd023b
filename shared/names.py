"""One rule for every blob name the service builds from something a caller wrote.

Manifest entries, schema names and the folders walked for `_task.json` are joined into blob
names and sent in a URL path. HTTP stacks (Azure's and Azurite's included) normalise `.` and `..`
segments and some treat `\\` as `/`, so `../../cache/x` in a manifest would read a blob in
another container with the app's identity. Refusing such names before any storage call closes
that class, instead of escaping one spelling at a time.

Azure's own limits (https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata):
a blob name is 1 to 1,024 characters with at most 254 path segments, and control characters are
not allowed.
"""

from __future__ import annotations

import unicodedata

MAX_BLOB_NAME = 1024  # characters, Azure's limit (see the module docstring)
MAX_SEGMENTS = 254  # path segments, Azure's limit


def name_problem(name: object, *, max_length: int = MAX_BLOB_NAME) -> str | None:
    """Why `name` is not a safe blob name, or None when it is.

    Refused: anything but a non-empty string; more than `max_length` characters or
    MAX_SEGMENTS segments; a leading `/`, empty segments (`a//b`, a trailing `/`), `.` or `..`
    segments; backslashes; control characters. The reason never quotes the name itself, so it
    is safe to show to a caller.
    """
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > max_length:
        return f"is longer than {max_length} characters"
    if "\\" in name:
        return "must not contain a backslash"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "must not contain control characters"
    if name.startswith("/"):
        return "must not start with /"
    segments = name.split("/")
    if len(segments) > MAX_SEGMENTS:
        return f"has more than {MAX_SEGMENTS} path segments"
    if any(s == "" for s in segments):
        return "must not contain empty path segments (// or a trailing /)"
    if any(s in (".", "..") for s in segments):
        return "must not contain . or .. path segments"
    return None


def is_safe_name(name: object, *, max_length: int = MAX_BLOB_NAME) -> bool:
    return name_problem(name, max_length=max_length) is None
