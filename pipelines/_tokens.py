"""Shared by the pipelines' tiny tokenizers; a leaf module (no ML imports), so any pipeline may
import it without pulling in another's libraries."""

from __future__ import annotations


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-symbol table (what byte-level BPE vocabularies, GPT-2's, CLIP's and
    Whisper's, are written in), in byte order: printable bytes stand for themselves, the others
    map past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
