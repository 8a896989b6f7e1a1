"""Tokenizer: tiktoken, either a named encoding (gpt2) or our own BPE stored beside the weights.

Our own BPE is trained with rustbpe and saved in tiktoken's file format (`tokenizer.tiktoken`: one
base64 token and its rank per line) plus `tokenizer.json` (split pattern and special tokens), so a
checkpoint directory is self-contained and loads offline.

    python -c "from loopgpt.model.tokenizer import load_tokenizer; print(load_tokenizer('gpt2').encode('Hello world'))"
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Iterable
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"
BPE_FILE = "tokenizer.tiktoken"
BPE_META = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer could not be found or read."""


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, name: str):
        self.encoding = encoding
        self.name = name  # "gpt2", or "bpe" for a trained one
        self.eot_token = encoding.eot_token

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text are encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_document(self, text: str) -> list[int]:
        """A training document: its tokens followed by end-of-text."""
        return self.encoding.encode_ordinary(text) + [self.eot_token]

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def save(self, directory: str | Path) -> None:
        """Write the trained BPE files into a checkpoint directory (named encodings need none)."""
        if self.name != "bpe":
            return
        directory = Path(directory)
        ranks = sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks)
        (directory / BPE_FILE).write_text("".join(lines))
        meta = {"pat_str": self.encoding._pat_str, "special_tokens": self.encoding._special_tokens}
        (directory / BPE_META).write_text(json.dumps(meta, indent=2) + "\n")


class StreamDecoder:
    """Incremental decoding that never emits half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still open)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def load_tokenizer(spec: str, directory: str | Path | None = None) -> Tokenizer:
    """`spec` is a tiktoken encoding name, or "bpe" to read the files in `directory`."""
    if spec == "bpe":
        if directory is None:
            raise TokenizerError("tokenizer 'bpe' needs the checkpoint directory that holds its files")
        return _load_bpe(Path(directory))
    try:
        encoding = tiktoken.get_encoding(spec)
    except ValueError as e:
        raise TokenizerError(f"unknown tokenizer {spec!r}: not a tiktoken encoding name and not 'bpe'") from e
    except Exception as e:  # network or cache failures surface from tiktoken's downloader
        raise TokenizerError(
            f"could not load tiktoken encoding {spec!r} ({type(e).__name__}: {e}); "
            "offline, point TIKTOKEN_CACHE_DIR at a directory holding its files"
        ) from e
    return Tokenizer(encoding, spec)


def _load_bpe(directory: Path) -> Tokenizer:
    ranks_path, meta_path = directory / BPE_FILE, directory / BPE_META
    for path in (ranks_path, meta_path):
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file is missing")
    try:
        meta = json.loads(meta_path.read_text())
        pat_str, special = meta["pat_str"], meta["special_tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TokenizerError(f"{meta_path}: not a tokenizer description with pat_str and special_tokens ({e})") from e
    ranks = _read_ranks(ranks_path)
    if EOT not in special:
        raise TokenizerError(f"{meta_path}: special_tokens must define {EOT}")
    encoding = tiktoken.Encoding("bpe", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)
    return Tokenizer(encoding, "bpe")


def _read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's format, read here: tiktoken.load caches local files by path, so an overwritten
    checkpoint could load stale ranks, and it writes into TIKTOKEN_CACHE_DIR."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}: line {n} is not '<base64 token> <rank>' ({e})") from e
    if len(ranks) < 256:
        raise TokenizerError(f"{path}: holds {len(ranks)} tokens, fewer than the 256 single bytes")
    return ranks


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids in all: vocab_size - 1 merged tokens, then end-of-text."""
    if vocab_size < 257 + 1:
        raise TokenizerError(f"a trained BPE needs vocab_size >= 258 (256 bytes + merges + {EOT}), got {vocab_size}")
    try:
        import rustbpe
    except ImportError as e:
        raise TokenizerError('training a BPE needs rustbpe: pip install -e ".[train]"') from e
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1)
    ranks = dict(trainer.get_mergeable_ranks())
    encoding = tiktoken.Encoding(
        "bpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )
    return Tokenizer(encoding, "bpe")
