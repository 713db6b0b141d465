"""General English text that ships inside an installed package, to distil on without labels.

A sentence encoder is distilled on its teacher's embeddings, so any English sentence is training
signal. The MiniLM workload's news corpus alone teaches a student news: out of domain (the pydoc
set) a 3-layer student kept only 0.74 of mean cosine. ``wikipedia`` adds general prose.

Source: the excerpt of the English Wikipedia dump that ``gensim`` ships as test data,
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(106 articles once redirects are dropped: Anarchism, Autism, Albedo, Aristotle, Afghanistan,
Alabama, Atlas Shrugged, ...). It is read with gensim's own dump reader and markup filter
(``gensim.corpora.wikicorpus.extract_pages`` and ``filter_wiki``); nothing is downloaded.

Licences: the article text is Wikipedia's, under CC BY-SA 3.0 (and the GFDL), as the dump states;
gensim is LGPL-2.1. The text is used as training input only: a student learns to reproduce the
teacher's embeddings of it. It is not shipped in any artifact (the vocabulary step keeps the
token ids it uses, not text).

Disjointness: sentences that occur in ``exclude`` (a workload passes every evaluation sentence:
validation, test and out-of-domain sets) are dropped, so the text never scores a variant.
"""

from __future__ import annotations

import bz2
import importlib.resources
import re
from collections.abc import Callable, Iterable

from shrinkflow.errors import SpecError
from shrinkflow.workloads.ood_text import is_prose

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_WIKI = 10_000  # fewer sentences means a different gensim data file: refuse rather than train on less
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'' and '''bold''' marks that filter_wiki leaves in


def wikipedia(split: Callable[[str], list[str]], exclude: Iterable[str] = ()) -> list[str]:
    """The prose sentences of gensim's English Wikipedia excerpt, in article order, cut by
    ``split`` (a text -> sentences function), deduplicated, minus ``exclude``."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise SpecError(f"extra_text needs gensim ({exc}); expected it installed (pip install 'shrinkflow[minilm]').") from None
    path = importlib.resources.files("gensim") / WIKI_DUMP
    if not path.is_file():
        raise SpecError(f"gensim ships no {WIKI_DUMP}; expected gensim 4.x with its test data.")
    excluded = set(exclude)
    sentences: list[str] = []
    with path.open("rb") as raw, bz2.open(raw) as dump:
        for _title, text, _page in extract_pages(dump):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            plain = " ".join(_EMPHASIS.sub("", filter_wiki(text)).split())
            sentences.extend(s for s in split(plain) if is_prose(s) and s not in excluded)
    sentences = list(dict.fromkeys(sentences))
    if len(sentences) < MIN_WIKI:
        raise SpecError(f"gensim's Wikipedia excerpt yielded {len(sentences)} prose sentences; expected at least {MIN_WIKI}.")
    return sentences
