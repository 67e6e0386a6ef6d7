"""Text that other people will read: NFC, nothing invisible or reordering, bounded (SPEC 10.11).

A preferred name (and later a request's note) is shown to someone else: in lists, watch
events, notifications, pushes and contact cards. A bidi override or isolate could make
"Alice" + U+202E + "gnp.exe" read as "Aliceexe.png", zero-width characters make two names that look
alike differ (or hide a word from a filter), and control characters break terminals, logs
and layouts. So the text is normalised to NFC (one spelling per look: "e" + combining acute
becomes "é") and then refused when it holds any character of the Unicode categories
- Cc (control: C0, DEL, C1),
- Cf (format: the bidi embeddings, overrides, isolates and marks U+202A-202E, U+2066-2069,
  U+200E/200F, U+061C; the zero-width space, non-joiner and joiner U+200B-200D; the word
  joiner U+2060; the byte order mark U+FEFF; the soft hyphen; tag characters), or
- Zl / Zp (the line and paragraph separators U+2028, U+2029),
or when it is longer than its limit, counted in code points after NFC. The zero-width joiner
goes with the rest, so emoji written as joined sequences (e.g. a family) are refused; single
emoji are fine.
"""

from __future__ import annotations

import unicodedata

from umbra_grpc.domain.errors import InvalidText

FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def clean_text(value: str, field: str, *, limit: int) -> str:
    """`value` in NFC, or `InvalidText` naming `field` (never echoing the value)."""
    text = unicodedata.normalize("NFC", value)
    if any(unicodedata.category(char) in FORBIDDEN_CATEGORIES for char in text):
        raise InvalidText(
            f"{field} may not contain control, bidirectional-formatting or zero-width characters"
        )
    if len(text) > limit:
        raise InvalidText(f"{field} is longer than {limit} characters")
    return text
