"""Text data tokenized with a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

The corpus is encoded once, one document per file (``encode_batch``, the tokenizer's own
normalization, pre-tokenization and special tokens), and cached as a ``.npy`` token file beside
the data, keyed by the tokenizer file, the data files and ``data.max_bytes``: later runs memory-map
it. Nothing here downloads anything.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from trainer._errors import ConfigError, DataError
from trainer._text import TEXT_SUFFIXES, text_files


def tokenizer_file(tokenizer: str) -> Path:
    """The ``tokenizer.json`` that ``data.tokenizer`` names (a directory or the file).

    Raises:
      ConfigError: neither exists.
    """
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no tokenizer.json" if path.is_dir() else f"{path} does not exist"
        raise ConfigError(f"data.tokenizer: {where}; point it at a Hugging Face tokenizer "
                          "directory (tokenizer.json), or use data.tokenizer=bytes for bytes")
    return file


@functools.lru_cache(maxsize=4)
def load(tokenizer: str):
    """The ``tokenizers.Tokenizer`` of ``data.tokenizer``."""
    from tokenizers import Tokenizer

    file = tokenizer_file(tokenizer)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"data.tokenizer: {file} is not a tokenizers file: {e}") from None


def vocab_size(tokenizer: str) -> int:
    """Token ids the tokenizer can produce (added tokens included)."""
    return load(tokenizer).get_vocab_size(with_added_tokens=True)


def decode(tokenizer: str | None, ids) -> str:
    """Text of ``ids``: with ``data.tokenizer`` (special tokens left out), else as UTF-8 bytes
    (a byte-level model's sample may cut a character: invalid bytes become U+FFFD)."""
    if tokenizer in (None, "bytes"):
        return bytes(np.clip(np.asarray(ids), 0, 255).astype(np.uint8)).decode("utf-8", errors="replace")
    return load(tokenizer).decode([int(i) for i in ids], skip_special_tokens=True)


def _documents(path: str, max_bytes: int) -> list[tuple[Path, bytes]]:
    """The text files of ``data.path`` (a file, or a folder's text files sorted), up to
    ``max_bytes`` in all: the same bytes the byte-level ``text`` source reads."""
    files = text_files(path)
    docs, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        try:
            data = f.read_bytes()[:max_bytes - total]
        except OSError:
            continue
        docs.append((f, data))
        total += len(data)
    if not total:
        raise DataError(f"data.path {path!r} holds no text (looked for {', '.join(TEXT_SUFFIXES)} "
                        "files)")
    return docs


def cache_path(path: str, tokenizer: str, max_bytes: int) -> Path:
    """Where the tokens of ``data.path`` are cached: beside it, named by a key of the tokenizer
    file's bytes, the data files' names, sizes and times, and ``max_bytes``."""
    p = Path(path).resolve()
    files = text_files(p)
    key = hashlib.sha256(tokenizer_file(tokenizer).read_bytes())
    key.update(str(max_bytes).encode())
    for f in files:
        stat = f.stat()
        key.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return p.parent / f"{p.name}.tokens-{key.hexdigest()[:16]}.npy"


def tokenize(path: str, tokenizer: str, max_bytes: int, model_vocab: int) -> np.ndarray:
    """The token ids of text ``path`` under ``tokenizer`` (int32, 1-D), from the cache if there.

    Raises:
      DataError: the tokenizer's vocabulary is larger than the model's embedding, or the data
        is missing.
    """
    size = vocab_size(tokenizer)
    if size > model_vocab:
        raise DataError(f"the tokenizer {tokenizer_file(tokenizer)} has {size} tokens but "
                        f"model.vocab_size is {model_vocab}: ids past {model_vocab - 1} have no "
                        "embedding row; use the model's own tokenizer or a larger vocab_size")
    cache = cache_path(path, tokenizer, max_bytes)
    if cache.is_file():
        return np.load(cache, mmap_mode="r", allow_pickle=False)
    docs = _documents(path, max_bytes)
    total = sum(len(d) for _, d in docs)
    print(f"tokenizing {total:,} bytes of {path} with {tokenizer_file(tokenizer)} "
          f"({len(docs)} document{'s' if len(docs) != 1 else ''})", file=sys.stderr)
    texts = [data.decode("utf-8", errors="replace") for _, data in docs]
    encodings = load(tokenizer).encode_batch(texts)
    tokens = np.concatenate([np.asarray(e.ids, np.int32) for e in encodings])
    try:  # written whole under another name, then renamed: a reader never sees half a file
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial.npy")
        np.save(partial, tokens, allow_pickle=False)
        os.replace(partial, cache)
    except OSError as e:
        print(f"note: could not cache the tokens beside the data ({e}); they are kept in memory",
              file=sys.stderr)
    return tokens
