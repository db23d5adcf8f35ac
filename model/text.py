"""Caption tidying: turn decoded WordPiece text into a clean sentence-cased caption.

The seed only upper-cased the first letter and added a period. Here every sentence is
sentence-cased, WordPiece artefacts are joined (`chain - link` -> `chain-link`,
`cup ' s` -> `cup's`), punctuation gets one space after it and none before, and the caption
ends with a period if it has no final punctuation.
"""

from __future__ import annotations

import re

# Whitespace before closing punctuation, removed; a lookahead, not a group put back through a
# replacement template (`\1`), which took twice as long.
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[.,!?;:%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_NUMBER = re.compile(r"(\d)\s*([.,])\s*(\d)")
_HYPHEN = re.compile(r"(\w)\s*-\s*(\w)")
_APOSTROPHE = re.compile(r"(\w)\s*'\s*(s|t|re|ve|ll|d|m)\b")
_PUNCT_THEN_WORD = re.compile(r"([.,!?;:])(?=[^\s\d.,!?;:'\")\]])")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_MULTI_SPACE = re.compile(r"\s{2,}")
_FINAL_PUNCT = (".", "!", "?")


def tidy_caption(text: str) -> str:
    text = _MULTI_SPACE.sub(" ", text.strip())
    if not text:
        return ""
    # Each rule runs only when its character occurs (most captions have none): a served batch
    # tidies hundreds of captions on the worker's main thread.
    if "." in text or "," in text:
        text = _NUMBER.sub(r"\1\2\3", text)
    if "-" in text:
        text = _HYPHEN.sub(r"\1-\2", text)
    if "'" in text:
        text = _APOSTROPHE.sub(r"\1'\2", text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    if "(" in text or "[" in text:
        text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    text = _PUNCT_THEN_WORD.sub(r"\1 ", text)
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    if not text.endswith(_FINAL_PUNCT):
        text = text.rstrip(",;: ") + "."
    return text
