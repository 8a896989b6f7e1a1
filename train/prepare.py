"""Text → token shards: documents split by a rule, tokenized, EOT between them, saved as numpy memmaps.

Writes `train.bin`, `val.bin` (uint16, or uint32 for vocabularies over 65,535 ids), `meta.json`, and
for `--tokenizer train:VOCAB` the trained BPE files that the checkpoint will carry.

    loopgpt prepare --input ../shared/data/tinystories/train.txt --val-input ../shared/data/tinystories/valid.txt \
        --out data/tinystories --tokenizer train:4096
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from loopgpt.model.tokenizer import EOT, Tokenizer, load_tokenizer, train_bpe
from tqdm import tqdm

SPLITS = ("eot", "blank", "none")


def split_documents(text: str, rule: str) -> list[str]:
    """`eot`: on <|endoftext|> markers; `blank`: on blank lines; `none`: the whole file is one document."""
    if rule == "eot":
        docs = text.split(EOT)
    elif rule == "blank":
        docs = re.split(r"\n\s*\n", text)
    elif rule == "none":
        docs = [text]
    else:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {rule!r}")
    return [d.strip("\n") for d in docs if d.strip()]


def read_documents(paths: Iterable[str | Path], rule: str) -> list[str]:
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input file does not exist")
        try:
            docs += split_documents(path.read_text(encoding="utf-8"), rule)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    if not docs:
        raise ValueError("the input files hold no documents")
    return docs


def read_hf_dataset(name: str, split: str = "train", field: str = "text", limit: int = 0) -> list[str]:
    """Documents from a Hugging Face dataset (online; needs the `datasets` package)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"--hf-dataset {name} needs the datasets package: pip install datasets") from e
    ds = datasets.load_dataset(name, split=split, streaming=True)
    docs = []
    for row in tqdm(ds, desc=f"reading {name}:{split}", unit="doc", leave=False, disable=None):
        if field not in row:
            raise ValueError(f"dataset {name} has no field {field!r}; choose one of {', '.join(row)} with --hf-field")
        if row[field].strip():
            docs.append(row[field])
        if limit and len(docs) >= limit:
            break
    return docs


def make_tokenizer(spec: str, train_docs: list[str]) -> Tokenizer:
    """`gpt2` (any tiktoken name) or `train:VOCAB` for a byte-level BPE trained on the training documents."""
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError as e:
            raise ValueError(f"--tokenizer train:VOCAB needs an integer vocabulary size, got {spec!r}") from e
        return train_bpe(train_docs, vocab)
    return load_tokenizer(spec)


def tokenize(docs: list[str], tokenizer: Tokenizer, desc: str) -> np.ndarray:
    dtype = np.uint16 if tokenizer.n_vocab <= 65535 else np.uint32
    ids: list[int] = []
    for doc in tqdm(docs, desc=f"tokenizing {desc}", unit="doc", leave=False, disable=None):
        ids += tokenizer.encode_document(doc)
    return np.asarray(ids, dtype=dtype)


def write_shard(tokens: np.ndarray, path: Path) -> None:
    mm = np.memmap(path, dtype=tokens.dtype, mode="w+", shape=tokens.shape)
    mm[:] = tokens
    mm.flush()


def prepare(inputs: list[str], out: str | Path, tokenizer_spec: str = "gpt2", split: str = "eot",
            val_inputs: list[str] | None = None, val_fraction: float = 0.05, docs: list[str] | None = None) -> dict:
    """Tokenize the corpus; validation is `val_inputs`, or the last `val_fraction` of the documents.
    `docs` (e.g. from `read_hf_dataset`) replaces reading `inputs`."""
    docs = docs if docs is not None else read_documents(inputs, split)
    if val_inputs:
        train_docs, val_docs = docs, read_documents(val_inputs, split)
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        n_val = max(1, int(len(docs) * val_fraction))
        if n_val >= len(docs):
            raise ValueError(f"{len(docs)} document(s) cannot be split into train and validation; add --val-input")
        train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    tokenizer = make_tokenizer(tokenizer_spec, train_docs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = tokenize(train_docs, tokenizer, "train"), tokenize(val_docs, tokenizer, "val")
    write_shard(train, out / "train.bin")
    write_shard(val, out / "val.bin")
    tokenizer.save(out)
    meta = {
        "tokenizer": tokenizer.name, "vocab_size": tokenizer.n_vocab, "eot_token": tokenizer.eot_token,
        "dtype": str(train.dtype), "train_tokens": int(train.size), "val_tokens": int(val.size),
        "train_documents": len(train_docs), "val_documents": len(val_docs),
        "inputs": [str(p) for p in inputs], "val_inputs": [str(p) for p in (val_inputs or [])], "split": split,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
