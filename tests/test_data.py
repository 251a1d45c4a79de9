"""The offline corpus: byte tokenizer round trip, seeded split by document, seeded batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab.data import (
    SEPARATOR,
    BatchConfig,
    code_documents,
    decode,
    encode,
    get_batch,
    load_corpus,
    prose_documents,
)

MAX_CODE = 200_000


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(seed=0, max_code_bytes=MAX_CODE)


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_encode_decode_round_trip(text):
    ids = encode(text)
    assert ids.dtype == torch.long and (ids.numel() == 0 or int(ids.max()) < 256)
    assert decode(ids) == text


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="text"):
        encode(b"bytes")
    with pytest.raises(ValueError, match="token ids"):
        decode([65, 256])
    with pytest.raises(ValueError, match="batch_size"):
        BatchConfig(batch_size=0, block_size=8)
    with pytest.raises(ValueError, match="prose_fraction"):
        BatchConfig(batch_size=4, block_size=8, prose_fraction=1.5)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=0.0)


def test_both_kinds_are_substantial():
    assert sum(len(d) for d in prose_documents()) > 100_000
    assert sum(len(d) for d in code_documents()) > 2_000_000  # the long run must not loop much


def test_split_is_by_document_seeded_and_complete(corpus):
    docs = {"prose": prose_documents(), "code": code_documents(MAX_CODE)}
    again = load_corpus(seed=0, max_code_bytes=MAX_CODE)
    other = load_corpus(seed=1, max_code_bytes=MAX_CODE)
    for kind, kind_docs in docs.items():
        train, val = corpus.streams["train"][kind], corpus.streams["val"][kind]
        assert torch.equal(train, again.streams["train"][kind])
        assert not torch.equal(val, other.streams["val"][kind])
        # Whole documents: every byte of every document lands in exactly one split.
        total = sum(len(d.encode()) for d in kind_docs)
        n_sep = len(kind_docs) - 2  # one separator fewer per stream
        assert train.numel() + val.numel() == total + n_sep * len(SEPARATOR)
        val_text = decode(val)
        assert kind_docs[0] in val_text or kind_docs[0] in decode(train)


def test_batches_are_seeded_shifted_and_labelled(corpus):
    cfg = BatchConfig(batch_size=8, block_size=32, prose_fraction=0.25)
    x, y, kind = get_batch(corpus, "train", cfg, seed=3, step=5)
    x2, y2, _ = get_batch(corpus, "train", cfg, seed=3, step=5)
    x3, _, _ = get_batch(corpus, "train", cfg, seed=3, step=6)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next byte
    assert kind.tolist() == [0, 0] + [1] * 6
    prose = decode(corpus.streams["train"]["prose"])
    assert decode(torch.cat([x[0], y[0, -1:]])) in prose
    with pytest.raises(ValueError, match="split"):
        get_batch(corpus, "test", cfg, seed=0, step=0)
