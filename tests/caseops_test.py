"""CaseOps (golf_jax.caseops): by example, round trips on arbitrary text, and the
1.0611 record's own lossless_caps.py on the same inputs; with the record's SP8192
tokenizer, the token ids and byte counts its prepare script writes."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golf_jax import caseops, data, datasets
from golf_jax.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from tests.conftest import REFERENCE, missing

# Text where the transform has work to do: ASCII letters of both cases, the
# operators themselves, spaces, punctuation and non-ASCII letters.
CHARS = (st.sampled_from("aBcDeXyZ  '.-é\u00c9ß\u1e9e" + TITLE + ALLCAPS + CAPNEXT + ESC)
         | st.characters(codec="utf-8"))
TEXT = st.text(CHARS, max_size=60)


@pytest.fixture(scope="module")
def reference():
    path = REFERENCE / "frontier_1855" / "lossless_caps.py"
    if not path.is_file():
        missing(f"reference code {path} not present (set GOLF_JAX_REFERENCE)")
    spec = importlib.util.spec_from_file_location("reference_lossless_caps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, want", [
    ("the cat", "the cat"),
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("I am A", f"{TITLE}i am {TITLE}a"),
    ("iPhone McDonald ABc", f"i{CAPNEXT}phone {TITLE}mc{CAPNEXT}donald {TITLE}a{CAPNEXT}bc"),
    ("x2Y É", f"x2{TITLE}y É"),  # digits end a word; non-ASCII letters pass through
    (f"a{TITLE}b", f"a{ESC}{TITLE}b"),
])
def test_examples(text, want):
    assert caseops.encode(text) == want
    assert caseops.decode(want) == text


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_round_trip_on_any_text(text):
    assert caseops.decode(caseops.encode(text)) == text


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} a", f"a{ALLCAPS}b", f"{CAPNEXT}{CAPNEXT}a", f"x{ESC}",
                                 f"{TITLE}{ESC}1"])
def test_operators_out_of_place_are_errors(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(bad)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_encode_and_decode_are_the_references(reference, text):
    assert caseops.encode(text) == reference.encode_lossless_caps_v2(text)
    # decode on any string, valid or not: the same text, or an error on both sides
    try:
        want = reference.decode_lossless_caps_v2(text)
    except reference.LosslessCapsError:
        with pytest.raises(caseops.CaseOpsError):
            caseops.decode(text)
    else:
        assert caseops.decode(text) == want


@settings(max_examples=300, deadline=None)
@given(TEXT, st.lists(st.integers(0, 80), max_size=8))
def test_byte_counts_are_the_references_and_sum_to_the_original(reference, text, cuts):
    encoded = caseops.encode(text)
    bounds = sorted({0, len(encoded), *(c for c in cuts if c < len(encoded))})
    surfaces = [encoded[a:b] for a, b in zip(bounds, bounds[1:])]
    got = caseops.original_byte_counts(surfaces)
    assert got == reference.surface_piece_original_byte_counts(surfaces, text_transform_name=caseops.NAME)
    assert sum(got) == len(text.encode("utf-8"))


# ----------------------------------------------------------------------------- with the tokenizer

@pytest.fixture(scope="module")
def sp(caseops_tokenizer):
    return data.load_tokenizer(caseops_tokenizer, 8192, "caseops")


def test_the_records_tokenizer_is_recognised(sp, shared_data):
    assert caseops.is_caseops_tokenizer(sp)
    assert not caseops.is_caseops_tokenizer(data.load_tokenizer(shared_data / datasets.EMBEDDED_TOKENIZER))


def reference_documents(reference, sp, texts):
    """What prepare_caseops_data.py computes per document: ids and sidecar counts (BOS left out)."""
    out = []
    for text in texts:
        transformed = reference.encode_lossless_caps_v2(text)
        surfaces = [p.surface for p in sp.encode(transformed, out_type="proto").pieces]
        out.append((sp.encode(transformed, out_type=int),
                    reference.surface_piece_original_byte_counts(surfaces, text_transform_name=caseops.NAME)))
    return out


def test_documents_are_the_reference_prepares(reference, sp, shared_data):
    """The module docstring's example, text the transform and the normalizer
    both act on, and every 10th speech of tinyshakespeare."""
    speeches = list(datasets.iter_documents(shared_data / datasets.EMBEDDED_CORPUS))
    texts = ["The NASA Launch", f"x{TITLE}y {ESC}", "  Two  SPACES\tand\n\nMcDonald's iPhone  ", "ﬁ Ｈello é",
             "\ue000 漢字 🙂", *speeches[::10]]
    assert caseops.encode_documents(sp, texts) == reference_documents(reference, sp, texts)


NORMAL_WORD = st.text(st.sampled_from("aBcDeXyZqQ09.,;:!?'-()é" + TITLE + ALLCAPS + CAPNEXT + ESC),
                      min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(st.lists(NORMAL_WORD, min_size=1, max_size=8).map(" ".join))
def test_text_to_tokens_and_back(sp, text):
    """On text the tokenizer's normalizer leaves as it is (single spaces, no
    edge whitespace, NFKC-stable characters): decoded tokens, inverse
    transform, the same text; the counts sum to its UTF-8 length."""
    [(ids, counts)] = caseops.encode_documents(sp, [text])
    assert caseops.decode(sp.decode(ids)) == text
    assert len(counts) == len(ids) and sum(counts) == len(text.encode("utf-8"))


def test_sampled_text_with_operators_out_of_place_decodes():
    """A model's samples may put an operator where encode never does: dropped."""
    T, A, C = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT
    assert caseops.decode_sampled(caseops.encode("Hello WORLD McX")) == "Hello WORLD McX"
    assert caseops.decode_sampled(f"{T} hello{T}") == " hello"  # no letter after TITLE; one at the end
    assert caseops.decode_sampled(f"{C}{C}ab {A}cd") == "Ab CD"
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(f"{T} hello")
