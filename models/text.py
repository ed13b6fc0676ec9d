"""Real English text that a package ships: the Lee news corpus in gensim's test data.

Calibration sentences come from `lee_background.cor` (300 news articles), evaluation sentences from
`lee.cor` (50 other articles). The same folder has two word-similarity benchmarks with human
scores (WordSim-353, SimLex-999). Only the files are read: gensim itself is never imported.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from qcompile.errors import QCompileError

CALIBRATION_FILE = "lee_background.cor"
EVALUATION_FILE = "lee.cor"
MIN_WORDS = 5


def corpus_path(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise QCompileError("the text corpus needs the gensim package: pip install --no-deps gensim==4.4.0")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name


def sentences(name: str, limit: int) -> list[str]:
    """The first `limit` sentences of at least MIN_WORDS words, in corpus order."""
    text = corpus_path(name).read_text(encoding="utf-8", errors="replace")
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        sentence = " ".join(sentence.split())
        if len(sentence.split()) >= MIN_WORDS:
            found.append(sentence)
            if len(found) == limit:
                break
    return found


WORD_SIMILARITY_FILES = ("wordsim353.tsv", "simlex999.txt")


def word_pairs(name: str) -> tuple[list[str], list[str], list[float]]:
    """(first words, second words, human similarity scores) of a word-similarity benchmark file."""
    first, second, scores = [], [], []
    for line in corpus_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, score = line.split("\t")[:3]
        first.append(a)
        second.append(b)
        scores.append(float(score))
    return first, second, scores
