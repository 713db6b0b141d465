"""Out-of-domain English text that ships inside an installed package: nothing is downloaded.

``python_docs`` samples prose sentences of the Python Language Reference as CPython ships it in
``pydoc_data.topics`` (the text ``help()`` shows: data model, statements, expressions, types;
Copyright Python Software Foundation, under the PSF License Agreement version 2). Technical
reference prose is far from news: another vocabulary (identifiers, "iterator", "subclass"),
another register, and quoted names. Code is dropped (interactive examples, ``...``, lines that
are mostly symbols); what is left are sentences that read as English.

The sample is fixed by its seed and by the Python release that ships the text (the venv's);
sentences that also occur in a workload's own corpus are excluded, so the set stays disjoint
from every training and evaluation split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable

from shrinkflow.errors import SpecError

N_OOD = 1000
OOD_SEED = 0
_WORD = re.compile(r"^[\"'“‘(*]*[A-Za-z][a-z]*(?:[-'’][A-Za-z]+)*[\"'”’)*,.;:!?]*$")
_CODE = (">>>", "...", "::", " = ", "==", "->", "{", "}", "[", "]", "\\", "|")


def is_prose(sentence: str, min_word_share: float = 0.8) -> bool:
    """Whether ``sentence`` reads as English: it starts with a capital letter, holds no code
    marks, and at least ``min_word_share`` of its whitespace-separated tokens are plain words."""
    if not sentence[:1].isupper() or any(mark in sentence for mark in _CODE):
        return False
    tokens = sentence.split()
    return sum(bool(_WORD.match(t)) for t in tokens) >= min_word_share * len(tokens)


def python_docs(split: Callable[[str], list[str]], n: int = N_OOD, seed: int = OOD_SEED,
                exclude: Iterable[str] = ()) -> list[str]:
    """``n`` prose sentences of ``pydoc_data.topics``, cut by ``split`` (a text -> sentences
    function), deduplicated, minus ``exclude``, drawn by a generator fixed by ``seed``."""
    from pydoc_data.topics import topics

    excluded = set(exclude)
    pool = [s for key in sorted(topics) for s in split(topics[key]) if is_prose(s) and s not in excluded]
    pool = list(dict.fromkeys(pool))
    if len(pool) < n:
        raise SpecError(f"pydoc_data.topics yielded {len(pool)} prose sentences; expected at least {n}.")
    return random.Random(seed).sample(pool, n)
