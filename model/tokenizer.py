"""The seed's vocabulary: BERT-uncased WordPiece ids plus five added special tokens.

Generation only needs the id <-> token mapping and decoding; encoding text is only needed to
teacher-force captions in tests and benchmarks, so a small lower-casing WordPiece encoder is
kept here too. The vocabulary file travels with the package (and inside the archive): nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

from .config import BASE_VOCAB_SIZE, CLS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS

VOCAB_PATH = Path(__file__).parent / "assets" / "vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
_CONTROL_TOKENS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SPECIAL_TOKENS}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Vocabulary:
    def __init__(self, path: str | Path = VOCAB_PATH):
        try:
            tokens = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read tokenizer vocabulary {path}: {exc}") from exc
        if len(tokens) != BASE_VOCAB_SIZE:
            raise ValueError(f"{path}: expected {BASE_VOCAB_SIZE} WordPiece tokens, found {len(tokens)}")
        self.tokens = tokens + list(SPECIAL_TOKENS)
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        misplaced = [f"{token} at line {self.ids[token] + 1 if token in self.ids else 'none'}"
                     for token, expected in (("[PAD]", PAD_ID), ("[CLS]", CLS_ID), ("[SEP]", SEP_ID))
                     if self.ids.get(token) != expected]
        if misplaced:  # the engine feeds and stops on these ids (model/config.py)
            raise ValueError(f"{path}: not the BERT-uncased layout the model was trained with: {', '.join(misplaced)}")
        self.unk_id = self.ids["[UNK]"]
        # What each token adds to text after a previous word: None (special, skipped), the piece
        # glued on ("##ing" -> "ing"), or a space and the word.
        self._after_word = [None if t in _CONTROL_TOKENS else t[2:] if t.startswith("##") else " " + t
                            for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def decode(self, ids) -> str:
        """Join WordPiece tokens into text, skipping special tokens (BERT's decode rule: a "##"
        piece joins the previous word; one that comes first stays as it is). A served batch
        decodes hundreds of captions on the worker's thread, so per token this is one lookup."""
        after_word = self._after_word
        kept = [i for i in map(int, ids) if after_word[i] is not None]
        if not kept:
            return ""
        return self.tokens[kept[0]] + "".join([after_word[i] for i in kept[1:]])

    def decode_word_by_word(self, ids) -> str:
        """`decode`'s slow, obviously correct form (the reference its test compares against)."""
        words: list[str] = []
        for i in ids:
            token = self.tokens[int(i)]
            if token in _CONTROL_TOKENS:
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)

    def encode(self, text: str) -> list[int]:
        """Lower-case, split on whitespace and punctuation, then greedy longest-match WordPiece."""
        return [i for word in _basic_split(text) for i in self._wordpiece(word)]

    def _wordpiece(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return pieces


def _basic_split(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, current = [], []
    for char in text:
        if char.isspace() or _is_punctuation(char):
            if current:
                words.append("".join(current))
                current = []
            if not char.isspace():
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")
