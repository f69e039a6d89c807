"""CaseOps: the 1.0611 record's lossless capitalisation transform
("lossless_caps_caseops_v1"), applied to text before its SP8192 tokenizer, and
the original-byte count of each piece that bits per byte needs afterwards.

Over each maximal run of ASCII letters (a word):
- lowercase: unchanged;
- ALLCAPS, two letters or more: ALLCAPS, then the word in lowercase;
- Titlecase: TITLE, then the word in lowercase;
- any other mix: TITLE if the first letter is uppercase, then the word in
  lowercase with CAPNEXT before each later uppercase letter.
The four operators are private-use characters (the tokenizer's reserved pieces
4-7); one of them in the input is written ESC + the character. Everything else
passes through unchanged, so `decode(encode(text)) == text` for any text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = frozenset((TITLE, ALLCAPS, CAPNEXT, ESC))
NAME = "lossless_caps_caseops_v1"
# The record's SP8192 tokenizer reserves these ids for the operators, in this order.
OPERATOR_IDS = {4: TITLE, 5: ALLCAPS, 6: CAPNEXT, 7: ESC}


class CaseOpsError(ValueError):
    """Text that no `encode` output can be: an operator out of place."""


def _ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _encode_word(word: str, out: list[str]) -> None:
    lower = word.lower()
    if word == lower:
        out.append(word)
    elif len(word) >= 2 and word == word.upper():
        out += [ALLCAPS, lower]
    elif word[0].isupper() and word[1:] == lower[1:]:
        out += [TITLE, lower]  # one uppercase letter alone is Titlecase too
    else:
        if word[0].isupper():
            out.append(TITLE)
        out.append(lower[0])
        for ch, low in zip(word[1:], lower[1:]):
            if ch != low:
                out.append(CAPNEXT)
            out.append(low)


def encode(text: str) -> str:
    out: list[str] = []
    start = None  # where the current ASCII word began
    for i, ch in enumerate(text):
        if _ascii_letter(ch):
            start = i if start is None else start
            continue
        if start is not None:
            _encode_word(text[start:i], out)
            start = None
        out += [ESC, ch] if ch in OPERATORS else [ch]
    if start is not None:
        _encode_word(text[start:], out)
    return "".join(out)


class _Decoder:
    """The inverse, one character at a time: `feed` returns the original
    character a transformed one stands for ("" for an operator), and raises
    CaseOpsError on an operator out of place. `finish` checks that nothing is
    left pending. One instance reads a whole document, across pieces."""

    def __init__(self):
        self.escaped = False  # the previous character was ESC
        self.word_mode = None  # TITLE or ALLCAPS, waiting for a word's first letter
        self.capnext = False  # CAPNEXT, waiting for a letter
        self.in_word = False  # inside a run of ASCII letters
        self.allcaps_word = False  # inside a word begun by ALLCAPS

    def feed(self, ch: str) -> str:
        if self.escaped:
            if self.word_mode is not None and not _ascii_letter(ch):
                raise CaseOpsError("an escaped character where a capitalised word should start")
            self.escaped = False
            self.in_word = _ascii_letter(ch)
            self.allcaps_word = self.allcaps_word and self.in_word
            return ch
        if ch == ESC:
            self.escaped = True
            return ""
        if ch in (TITLE, ALLCAPS):
            if self.word_mode is not None or self.in_word or self.capnext:
                raise CaseOpsError(f"a {'TITLE' if ch == TITLE else 'ALLCAPS'} operator inside a word")
            self.word_mode = ch
            return ""
        if ch == CAPNEXT:
            if self.capnext:
                raise CaseOpsError("two CAPNEXT operators in a row")
            self.capnext = True
            return ""
        if _ascii_letter(ch):
            if self.in_word:
                if self.word_mode is not None:
                    raise CaseOpsError("a word operator inside a word")
                upper = self.allcaps_word or self.capnext
            else:
                upper = self.word_mode is not None or self.capnext
                self.allcaps_word = self.word_mode == ALLCAPS
                self.word_mode, self.in_word = None, True
            self.capnext = False
            return ch.upper() if upper else ch
        if self.word_mode is not None or self.capnext:
            raise CaseOpsError("a capitalisation operator not followed by an ASCII letter")
        self.in_word = self.allcaps_word = False
        return ch

    def finish(self) -> None:
        if self.escaped:
            raise CaseOpsError("ESC at the end")
        if self.word_mode is not None or self.capnext:
            raise CaseOpsError("a capitalisation operator at the end")


def _decoded(decoder: _Decoder, text: str) -> Iterator[str]:
    for ch in text:
        yield decoder.feed(ch)


def decode(text: str) -> str:
    decoder = _Decoder()
    out = "".join(_decoded(decoder, text))
    decoder.finish()
    return out


def decode_sampled(text: str) -> str:
    """`decode` for a model's samples, which may put an operator out of place:
    such an operator stands for no text and is dropped, never raised."""
    decoder, out = _Decoder(), []
    for ch in text:
        try:
            out.append(decoder.feed(ch))
        except CaseOpsError:
            decoder = _Decoder()  # the pending operator dropped; a fresh decoder takes any character
            out.append(decoder.feed(ch))
    return "".join(out)


def original_byte_counts(surfaces: Iterable[str]) -> list[int]:
    """The UTF-8 bytes of the original text that each piece of a transformed
    document stands for (the record's byte sidecar): 0 for an operator, 1 for a
    letter, the UTF-8 length of anything else (an escaped operator: 3). The
    counts of a document's pieces sum to its original length in bytes."""
    decoder = _Decoder()
    counts = [sum(len(ch.encode("utf-8")) for ch in _decoded(decoder, surface)) for surface in surfaces]
    decoder.finish()
    return counts


# ----------------------------------------------------------------------------- with a tokenizer

def is_caseops_tokenizer(sp) -> bool:
    """Whether a SentencePiece model reserves its pieces 4-7 for the operators
    (the record's tokenizer): its shards hold transformed text."""
    return sp.vocab_size() > max(OPERATOR_IDS) and all(sp.id_to_piece(i) == op for i, op in OPERATOR_IDS.items())


def _pieces(sp, texts: list[str]):
    protos = sp.encode(texts, out_type="proto")
    if protos and isinstance(protos[0], bytes):
        # sentencepiece 0.2.0 serializes "proto"; its parsed form is "immutable_proto"
        # (the record's), which 0.2.2 on refuse. Same pieces, checked on 0.2.0, 0.2.2, 0.2.3.
        protos = sp.encode(texts, out_type="immutable_proto")
    return protos


def encode_documents(sp, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Each text transformed and tokenized (without BOS): its token ids and
    the original UTF-8 bytes each token stands for (`original_byte_counts` of
    the pieces' surfaces, the byte sidecar's entries). The surfaces include
    whitespace the normalizer collapsed (a double space read as one piece
    counts 2), but not leading or trailing whitespace, which SentencePiece drops."""
    out = []
    for proto in _pieces(sp, [encode(t) for t in texts]):
        out.append(([p.id for p in proto.pieces], original_byte_counts(p.surface for p in proto.pieces)))
    return out
