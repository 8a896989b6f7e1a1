"""Datasets of two lm-eval tasks on held-out TinyStories, built at run time from the held-out text (which this
repository does not copy; see ../shared/data/SOURCES.md): deterministic, so a depth's score is reproducible.

- `tinystories_next` (loglikelihood, multiple choice): a paragraph's first sentences, then its real next sentence
  against three sentences of other paragraphs. Chance is 1/4.
- `tinystories_word` (generate_until): a paragraph cut before a word that already appeared in it (a name,
  mostly); the first word generated must be that word.

lm-eval calls these through the YAML files beside this one (`custom_dataset`), with `--metadata` as keyword
arguments (`heldout`: the text file, `docs`: how many documents):

    lm_eval --model local-completions --include_path eval/tasks --tasks tinystories_next --model_args \\
        model=demo:loops=6 base_url=http://127.0.0.1:8000/v1/completions tokenizer_backend=remote max_length=256 \\
        --metadata '{"heldout": "../shared/data/tinystories/heldout.txt"}'
"""

from __future__ import annotations

import random
import re
from pathlib import Path

HELDOUT = "../shared/data/tinystories/heldout.txt"
SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])')
WORD = re.compile(r"[A-Za-z]+")
MAX_CONTEXT = 700  # characters: well inside the demo's 256-token context with the answer


def paragraphs(path: str) -> list[list[str]]:
    """The file's paragraphs (blank-line separated), as sentences."""
    text = Path(path).read_text(encoding="utf-8")
    return [SENTENCE_END.split(p.strip()) for p in text.split("\n\n") if p.strip()]


def next_sentences(paras: list[list[str]], docs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i, sents in enumerate(paras):
        if len(sents) < 4:
            continue
        k = rng.randrange(2, len(sents))
        context = " ".join(sents[:k])
        if len(context) > MAX_CONTEXT:
            continue
        others = [s for j in rng.sample(range(len(paras)), 8) if abs(j - i) > 2 for s in paras[j][1:]]
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3) + [sents[k]]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(sents[k])})
        if len(out) == docs:
            break
    return out


def repeated_words(paras: list[list[str]], docs: int) -> list[dict]:
    """Per paragraph, its last capitalized word (not opening a sentence) that already appeared before it."""
    out = []
    for sents in paras:
        text = " ".join(sents)
        best = None
        for m in WORD.finditer(text):
            word, start = m.group(), m.start()
            opens = start == 0 or text[:start].rstrip()[-1:] in '.!?"'
            if word[0].isupper() and not opens and re.search(rf"\b{word}\b", text[:start]) and start < MAX_CONTEXT:
                best = (start, word)
        if best is not None:
            start, word = best
            out.append({"context": text[:start].rstrip(), "target": word})
        if len(out) == docs:
            break
    return out


def _dataset(rows: list[dict]):
    import datasets  # lm-eval's own dependency

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def next_sentence(heldout: str = HELDOUT, docs: int = 300, seed: int = 1234, **_):
    return _dataset(next_sentences(paragraphs(heldout), int(docs), int(seed)))


def repeated_word(heldout: str = HELDOUT, docs: int = 300, **_):
    return _dataset(repeated_words(paragraphs(heldout), int(docs)))
