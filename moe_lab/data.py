"""An offline corpus of two kinds of text, a byte-level tokenizer, and seeded batches.

Prose is the English help text in ``pydoc_data.topics``; code is the Python standard library's
own source (tests and IDLE left out). Both ship with every CPython install, so nothing is
downloaded. Documents are split into train/validation by a seeded shuffle, per kind, and the
validation set is one fixed set of evenly spaced windows, the same for every run and seed.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lab.config import check_positive_int

VOCAB_SIZE = 256  # one token per byte
KINDS = ("prose", "code")
SEPARATOR = b"\n\n"  # between documents in a stream
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids in [0, 256)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    """Token ids back to text; byte sequences that are not valid UTF-8 become U+FFFD."""
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE})")
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def prose_documents() -> list[str]:
    """The pydoc help topics, one document per topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def code_documents(max_bytes: int | None = None) -> list[str]:
    """Standard-library modules (no tests, no IDLE), sorted by path; at most ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    docs, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            break
        docs.append(text)
        total += len(text)
    return docs


def _stream(docs: list[str]) -> torch.Tensor:
    data = SEPARATOR.join(d.encode("utf-8") for d in docs)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()  # (N,) uint8


@dataclass
class Corpus:
    """Token streams (uint8 tensors) per split and kind: ``streams[split][kind]``."""

    streams: dict[str, dict[str, torch.Tensor]]

    def num_tokens(self, split: str, kind: str) -> int:
        return int(self.streams[split][kind].numel())


def load_corpus(*, seed: int = 0, val_fraction: float = 0.1, max_code_bytes: int | None = None):
    """Split each kind's documents into train/val by a seeded shuffle (by document, not byte)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    streams: dict[str, dict[str, torch.Tensor]] = {"train": {}, "val": {}}
    for kind, docs in (("prose", prose_documents()), ("code", code_documents(max_code_bytes))):
        order = list(range(len(docs)))
        random.Random(f"{seed}-{kind}").shuffle(order)
        n_val = max(1, round(val_fraction * len(docs)))
        streams["val"][kind] = _stream([docs[i] for i in sorted(order[:n_val])])
        streams["train"][kind] = _stream([docs[i] for i in sorted(order[n_val:])])
    return Corpus(streams)


@dataclass(kw_only=True)
class BatchConfig:
    """Batches of ``batch_size`` windows of ``block_size`` bytes; the first rows are prose."""

    batch_size: int
    block_size: int
    prose_fraction: float = 0.25

    def __post_init__(self):
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("block_size", self.block_size)
        if not 0 <= self.prose_fraction <= 1:
            raise ValueError(f"prose_fraction must be in [0, 1], got {self.prose_fraction}")

    @property
    def prose_rows(self) -> int:
        return round(self.prose_fraction * self.batch_size)


def get_batch(corpus: Corpus, split: str, cfg: BatchConfig, *, seed: int, step: int):
    """Batch number ``step``: (x (B, L), y (B, L), kind (B,)) with y = x shifted by one byte.

    The windows depend only on (seed, split, step), so a resumed run sees the same batches.
    """
    if split not in corpus.streams:
        raise ValueError(f"split must be one of {tuple(corpus.streams)}, got {split!r}")
    split_id = sorted(corpus.streams).index(split)
    # An explicit mix, not hash(): str hashes change between processes.
    g = torch.Generator().manual_seed(
        ((seed * 1_000_003 + split_id) * 1_000_000_007 + step) % 2**62
    )
    B, L = cfg.batch_size, cfg.block_size
    kind_B = torch.ones(B, dtype=torch.long)
    kind_B[: cfg.prose_rows] = 0
    rows = []
    for kind_id, kind in enumerate(KINDS):
        n = int((kind_B == kind_id).sum())
        data = corpus.streams[split][kind]
        if n == 0:
            continue
        if data.numel() < L + 1:
            raise ValueError(f"the {split}/{kind} stream has {data.numel()} bytes, need {L + 1}")
        starts = torch.randint(0, data.numel() - L, (n,), generator=g)
        rows.append(torch.stack([data[s : s + L + 1] for s in starts.tolist()]))
    xy = torch.cat(rows).long()  # (B, L + 1)
    return xy[:, :-1], xy[:, 1:], kind_B


# The fixed validation set: windows per kind, a quarter prose as in the default training mix.
VAL_WINDOWS = {"prose": 512, "code": 1536}


def validation_windows(
    corpus: Corpus, block_size: int, *, windows: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed validation set: (x (N, L), y (N, L), kind (N,)), prose rows first.

    Starts are evenly spaced over each kind's validation stream, so the set depends on neither
    the training seed nor the step: every run, seed and variant is scored on the same bytes.
    """
    check_positive_int("block_size", block_size)
    windows = dict(VAL_WINDOWS if windows is None else windows)
    if set(windows) != set(KINDS):
        raise ValueError(f"windows must give a count for each of {KINDS}, got {sorted(windows)}")
    rows, kinds = [], []
    for kind_id, kind in enumerate(KINDS):
        n = windows[kind]
        check_positive_int(f"windows[{kind!r}]", n)
        data = corpus.streams["val"][kind]
        if data.numel() < block_size + 1:
            raise ValueError(
                f"the val/{kind} stream has {data.numel()} bytes, need {block_size + 1}"
            )
        starts = torch.linspace(0, data.numel() - block_size - 1, n).round().long()
        rows.append(torch.stack([data[s : s + block_size + 1] for s in starts.tolist()]))
        kinds.append(torch.full((n,), kind_id, dtype=torch.long))
    xy = torch.cat(rows).long()  # (N, L + 1)
    return xy[:, :-1], xy[:, 1:], torch.cat(kinds)
