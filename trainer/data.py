"""Datasets that need no network, addressed by batch index so a run resumes exactly.

Every dataset answers ``batch(index, batch_size) -> dict of numpy arrays`` as a pure function
of the seed and the index: the data position saved in a checkpoint is just the next index.
The default corpus is the source code of the running interpreter's standard library (bytes).

A dataset may also answer ``batch_rows(index, batch_size, rows)``: rows ``rows`` (a ``slice``)
of ``batch(index, batch_size)``, built without the others. With several processes each asks
only for the rows its devices hold; datasets without it are sliced after ``batch``.
"""
from __future__ import annotations

import queue
import sysconfig
import threading
from pathlib import Path

import jax
import numpy as np

from trainer._errors import DataError
from trainer._text import TEXT_SUFFIXES, text_files


def _read_text_files(files, max_bytes: int) -> np.ndarray:
    chunks, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def stdlib_corpus(max_bytes: int) -> np.ndarray:
    """The interpreter's standard-library ``.py`` sources, sorted by path, as bytes (uint8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3")
    files = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    return _read_text_files(files, max_bytes)


def text_corpus(path: str, max_bytes: int) -> np.ndarray:
    """A text file, or every text file under a folder (sorted), as bytes."""
    data = _read_text_files(text_files(path), max_bytes)
    if data.size == 0:
        raise DataError(
            f"data.path {path!r} holds no text (looked for {', '.join(TEXT_SUFFIXES)} files)"
        )
    return data


def token_file(path: str) -> np.ndarray:
    """Pre-tokenized ids: ``.npy`` (loaded without pickle) or a raw ``.bin`` of uint16."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path {path!r} is not a file; tokens need a .npy or .bin file")
    if p.suffix == ".npy":
        tokens = np.load(p, mmap_mode="r", allow_pickle=False)
    elif p.suffix == ".bin":
        tokens = np.memmap(p, dtype=np.uint16, mode="r")
    else:
        raise DataError(f"data.path {path!r}: token files must end in .npy or .bin")
    if tokens.ndim != 1 or tokens.size == 0:
        raise DataError(f"data.path {path!r} must hold a non-empty 1-D token array, got {tokens.shape}")
    return tokens


class TokenDataset:
    """Random windows of a token stream: ``inputs`` and next-token ``targets``, both [B, T]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, name: str = "data"):
        if tokens.size < seq_len + 2:
            raise DataError(
                f"{name} has {tokens.size} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                "lower data.seq_len or use more data"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def batch(self, index: int, batch_size: int) -> dict:
        return self.batch_rows(index, batch_size, slice(None))

    def batch_rows(self, index: int, batch_size: int, rows: slice) -> dict:
        """Rows ``rows`` of ``batch(index, batch_size)``; only those windows are read."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=batch_size)[rows]
        window = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}  # (rows, T) each


class SyntheticImages:
    """Noisy copies of one random prototype image per class, so a model can learn the labels.

    Train and eval share the prototypes (``seed``) and differ in their ``stream`` of samples.
    Each row has its own random stream, so a process builds just its rows (``batch_rows``).
    """

    def __init__(self, image_size: int, num_classes: int, seed: int, stream: int = 0, channels: int = 3):
        self.shape, self.num_classes = (image_size, image_size, channels), num_classes
        self.seed, self.stream = seed, stream
        self._prototypes = None

    @property
    def prototypes(self) -> np.ndarray:
        """One image per class, (classes, H, W, C); made on first use (large for 224x224)."""
        if self._prototypes is None:
            rng = np.random.default_rng([self.seed, 7])
            self._prototypes = rng.standard_normal((self.num_classes, *self.shape), np.float32)
        return self._prototypes

    def batch(self, index: int, batch_size: int) -> dict:
        return self.batch_rows(index, batch_size, slice(None))

    def batch_rows(self, index: int, batch_size: int, rows: slice) -> dict:
        rngs = [np.random.default_rng([self.seed, self.stream, index, row])
                for row in range(*rows.indices(batch_size))]
        labels = np.array([rng.integers(0, self.num_classes) for rng in rngs], np.int32)
        noise = np.stack([rng.standard_normal(self.shape, np.float32) for rng in rngs]) if rngs \
            else np.zeros((0, *self.shape), np.float32)
        images = (self.prototypes[labels] + noise).astype(np.float32)  # (rows, H, W, C)
        return {"inputs": images, "targets": labels}


class SyntheticRegression:
    """Inputs ``x`` and targets ``tanh(x @ W)`` for a fixed random teacher ``W`` (from ``seed``).

    Each row has its own random stream, so a process builds just its rows (``batch_rows``).
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int, stream: int = 0):
        self.in_dim = in_dim
        self.teacher = np.random.default_rng([seed, 11]).normal(size=(in_dim, out_dim)) / np.sqrt(in_dim)
        self.seed, self.stream = seed, stream

    def batch(self, index: int, batch_size: int) -> dict:
        return self.batch_rows(index, batch_size, slice(None))

    def batch_rows(self, index: int, batch_size: int, rows: slice) -> dict:
        x = np.array([np.random.default_rng([self.seed, self.stream, index, row]).normal(size=self.in_dim)
                      for row in range(*rows.indices(batch_size))]).reshape(-1, self.in_dim)
        return {"inputs": x.astype(np.float32), "targets": np.tanh(x @ self.teacher).astype(np.float32)}


def split_tokens(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: the last ``eval_fraction`` of the stream is held out for eval."""
    cut = int(tokens.size * (1 - eval_fraction)) if eval_fraction > 0 else tokens.size
    return tokens[:cut], tokens[cut:] if eval_fraction > 0 else tokens


def place_batch(local_rows, shardings, global_shapes):
    """Puts this process's rows of a batch on its devices as one global array per leaf.

    Args:
      local_rows: the batch pytree (e.g. a dict) of numpy arrays holding the rows this process
        feeds (all of them with one process).
      shardings: a matching pytree of the ``jax.sharding.Sharding`` the step expects per leaf.
      global_shapes: a matching pytree of ``jax.ShapeDtypeStruct``: the global batch's shapes.

    Returns:
      The batch as ``jax.Array`` leaves laid out as ``shardings`` says.
    """
    def one(rows, sharding, spec):
        if not sharding.addressable_devices:  # another process's devices hold this leaf
            return jax.make_array_from_single_device_arrays(tuple(spec.shape), sharding, [],
                                                            dtype=spec.dtype)
        return jax.make_array_from_process_local_data(sharding, rows, tuple(spec.shape))

    return jax.tree.map(one, local_rows, shardings, global_shapes)


class ProcessShare:
    """One process's rows of every batch of ``dataset``, in a run of several processes.

    Each process feeds only the rows its own devices hold (``process_rows``), so no host
    builds the whole global batch; a leaf held on no device of this process gets no rows. A
    dataset with ``batch_rows(index, batch_size, rows)`` is asked for just the rows some leaf
    needs; any other is sliced after ``batch`` (``note`` says so once). Batches of another
    size than ``batch_size`` (a sampling prompt, a shape example) come whole.

    Args:
      dataset: an object with ``batch(index, batch_size) -> pytree of numpy arrays``.
      rows: a pytree matching the batch: this process's ``slice`` of each leaf's rows.
      batch_size: the global batch size.
      name: how messages name the dataset (e.g. ``"train_data()"``).
    """

    def __init__(self, dataset, rows, batch_size: int, name: str = "the dataset"):
        self.dataset, self.rows, self.batch_size, self.name = dataset, rows, batch_size, name
        spans = [r for r in jax.tree.leaves(rows) if r.stop > r.start]
        self.span = (slice(min(r.start for r in spans), max(r.stop for r in spans)) if spans
                     else slice(0, 0))
        self.ranged = callable(getattr(dataset, "batch_rows", None))

    @property
    def note(self) -> str | None:
        """A line for the log when this process builds whole batches to keep part of them."""
        if self.ranged or self.span.stop - self.span.start == self.batch_size:
            return None
        return (f"{self.name} ({type(self.dataset).__name__}) has no batch_rows(index, "
                f"batch_size, rows), so each process builds whole batches of {self.batch_size} "
                f"rows and keeps its own (process 0: rows {self.span.start}-{self.span.stop - 1}); "
                "define batch_rows to build only those")

    def batch(self, index: int, batch_size: int):
        if batch_size != self.batch_size:
            return self.dataset.batch(index, batch_size)
        if self.ranged:
            block, offset = self.dataset.batch_rows(index, batch_size, self.span), self.span.start
            self._check_rows(block, index)
        else:
            block, offset = self.dataset.batch(index, batch_size), 0
        return jax.tree.map(lambda leaf, r: leaf[r.start - offset:r.stop - offset] if r.stop > r.start
                            else leaf[:0], block, self.rows)

    def _check_rows(self, block, index: int) -> None:
        want = self.span.stop - self.span.start
        for path, leaf in jax.tree_util.tree_leaves_with_path(block):
            if np.shape(leaf)[:1] != (want,):
                raise DataError(
                    f"{self.name}.batch_rows({index}, {self.batch_size}, slice({self.span.start}, "
                    f"{self.span.stop})) returned {np.shape(leaf)[:1] or 'no'} rows in leaf "
                    f"{jax.tree_util.keystr(path)}, expected {want}: batch_rows must return those "
                    "rows of batch(index, batch_size), in order")


def process_rows(shardings, global_shapes):
    """The rows of each leaf of a global batch that this process's devices hold.

    Args:
      shardings: the batch pytree's ``jax.sharding.Sharding`` per leaf.
      global_shapes: a matching pytree of ``jax.ShapeDtypeStruct``: the global batch's shapes.

    Returns:
      A matching pytree of ``slice``: empty where no device of this process holds the leaf.

    Raises:
      DataError: a process's rows of a leaf are not one block.
    """
    def rows(path, sharding, spec):
        shape = tuple(spec.shape)
        indices = sharding.addressable_devices_indices_map(shape)
        spans = sorted({index[0].indices(shape[0])[:2] for index in indices.values()})
        if not spans:
            return slice(0, 0)
        start, stop = spans[0]
        for begin, end in spans[1:]:
            if begin > stop:
                raise DataError(
                    f"batch leaf {jax.tree_util.keystr(path)}: this process holds rows {spans} "
                    "of the batch, not one block; use a mesh whose batch axis follows the processes")
            stop = max(stop, end)
        return slice(start, stop)

    return jax.tree_util.tree_map_with_path(rows, shardings, global_shapes)


class Prefetcher:
    """Prepares the batches of the next steps in a background thread.

    Yields ``(index, batch)`` for ``index`` in ``[start, stop)``; batches are built ahead, up to
    ``depth`` of them, so the device never waits for Python to slice the data. With ``place``
    (``host batch -> device batch``, e.g. ``place_batch`` bound to the step's shardings) they
    are put on the devices ahead of use too.
    """

    def __init__(self, dataset, batch_size: int, start: int, stop: int, depth: int = 2,
                 place=None):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(dataset, batch_size, start, stop, place), daemon=True
        )
        self._thread.start()

    def _fill(self, dataset, batch_size, start, stop, place):
        for index in range(start, stop):
            try:
                batch = dataset.batch(index, batch_size)
                item = (index, batch if place is None else place(batch))
            except Exception as e:  # handed to the consumer, raised in the training thread
                item = (index, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item[1], Exception):
                return

    def __iter__(self):
        return self

    def __next__(self):
        if not self._thread.is_alive() and self._queue.empty():
            raise StopIteration
        while True:
            try:
                index, batch = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise StopIteration from None
        if isinstance(batch, Exception):
            raise batch
        return index, batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)


def build_datasets(data, task: str, seed: int, model_options) -> tuple:
    """The (train, eval) datasets the config describes, for a model of the given task.

    Args:
      data: the ``DataConfig``.
      task: ``"lm"``, ``"classify"`` or ``"regress"`` (from the model registry).
      seed: ``train.seed``; eval data uses a different stream of the same seed.
      model_options: the model's options (vocabulary size, input width, classes).
    """
    if task == "classify":
        classes = model_options.get("num_classes", data.num_classes)
        size = model_options.get("image_size", data.image_size)
        return (SyntheticImages(size, classes, seed, stream=0),
                SyntheticImages(size, classes, seed, stream=1))
    if task == "regress":
        in_dim = model_options.get("in_features", 16)
        out_dim = model_options.get("out_features", in_dim)
        return (SyntheticRegression(in_dim, out_dim, seed, stream=0),
                SyntheticRegression(in_dim, out_dim, seed, stream=1))
    vocab = model_options.get("vocab_size", 256)
    if data.source == "synthetic":
        tokens = np.random.default_rng([seed, 13]).integers(0, vocab, size=2**20).astype(np.int32)
    elif data.source == "tokens":
        tokens = token_file(data.path)
        top = int(tokens.max())
        if top >= vocab:
            raise DataError(
                f"data.path {data.path!r} holds token id {top}, but model.vocab_size is {vocab}; "
                f"raise model.vocab_size to at least {top + 1}"
            )
    elif data.source == "text" and data.tokenizer not in (None, "bytes"):
        from trainer._tokenizer import tokenize

        tokens = tokenize(data.path, data.tokenizer, data.max_bytes, vocab)
    else:
        tokens = stdlib_corpus(data.max_bytes) if data.source == "stdlib" else text_corpus(data.path, data.max_bytes)
        if vocab < 256:
            raise DataError(f"byte-level text needs model.vocab_size >= 256, got {vocab}")
    train_tokens, eval_tokens = split_tokens(tokens, data.eval_fraction)
    return (TokenDataset(train_tokens, data.seq_len, seed, "the training split"),
            TokenDataset(eval_tokens, data.seq_len, seed + 1_000_003, "the eval split"))
