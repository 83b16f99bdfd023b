"""Count the frames of a GIF or TIFF from its structure, stopping at a cap.

Pillow's `n_frames` walks every frame before it answers: for TIFF it parses every tag of
every IFD and checks each new IFD against a list of those seen (quadratic: a 20 MB file of
200k chained IFDs takes minutes); for GIF it walks every block in Python. Both are
unbounded in the caller's favour. These walkers read only what is needed to find the next
frame (no tags, no pixels) and stop as soon as the count passes `cap`, so the cost is
bounded by the cap, not by the file. A structure that ends early (truncated, broken) ends
the count there: decoding that frame then fails with the usual 400.

GIF: a sequence of blocks after the header and global colour table; each image
descriptor (0x2C) is a frame (GIF89a spec, sections 17-23). TIFF: a chain of IFDs, each
"entry count, entries, next offset" (TIFF 6.0 section 2; BigTIFF uses 8-byte counts and
offsets); a loop back to a seen IFD ends the chain, as it does in Pillow. An IFD claiming
more than MAX_IFD_ENTRIES tags also ends it: real files use a few dozen, and Pillow parses
every tag of every IFD it seeks through, so overlapping IFDs of 65535 tags each would make
seeking cost ~0.1 s a frame.
"""

from __future__ import annotations

import struct

__all__ = ["MAX_IFD_ENTRIES", "gif_frames", "tiff_frames"]

MAX_IFD_ENTRIES = 1024  # TIFF 6.0 defines ~80 tags; GeoTIFF/EXIF IFDs stay well under 100


def gif_frames(data: bytes, cap: int) -> int:
    """Frames (image descriptors) in a GIF, at least 1; returns cap + 1 as soon as there are more than cap."""
    size = len(data)
    if size < 13:
        return 1
    pos = 13 + _colour_table(data[10])
    frames = 0
    while pos < size:
        block = data[pos]
        if block == 0x2C:  # image descriptor: 9 bytes, local colour table, LZW code size, data sub-blocks
            if pos + 10 > size:
                break
            frames += 1
            if frames > cap:
                return frames
            pos = _skip_sub_blocks(data, pos + 10 + _colour_table(data[pos + 9]) + 1)
        elif block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        else:  # 0x3B trailer, or anything a decoder would not read past
            break
    return max(frames, 1)


def _colour_table(flags: int) -> int:
    return 3 * (2 << (flags & 7)) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """The position after a chain of data sub-blocks (each a length byte and that many bytes; 0 ends it)."""
    size = len(data)
    while pos < size:
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos
    return size


def tiff_frames(data: bytes, cap: int) -> int:
    """IFDs in the main chain of a TIFF/BigTIFF, at least 1; returns cap + 1 as soon as there are more than cap."""
    if len(data) < 16 or data[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    if big:
        count_fmt, entry_size, next_fmt = "Q", 20, "Q"
        offset = struct.unpack(order + "Q", data[8:16])[0]
    else:
        count_fmt, entry_size, next_fmt = "H", 12, "I"
        offset = struct.unpack(order + "I", data[4:8])[0]
    count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
    seen: set[int] = set()
    frames = 0
    while offset and offset not in seen and offset + count_size <= len(data):
        seen.add(offset)
        frames += 1
        if frames > cap:
            return frames
        entries = struct.unpack_from(order + count_fmt, data, offset)[0]
        if entries > MAX_IFD_ENTRIES and frames > 1:
            return frames - 1  # not a frame a reader should be sent through: the chain ends before it
        next_at = offset + count_size + entries * entry_size
        if next_at + next_size > len(data):
            break
        offset = struct.unpack_from(order + next_fmt, data, next_at)[0]
    return max(frames, 1)
