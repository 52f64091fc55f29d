import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data import (DataError, Prefetcher, TokenDataset, build_datasets, split_tokens,
                          stdlib_corpus, text_corpus)


def test_windows_are_next_token_pairs():
    data = TokenDataset(np.arange(1000, dtype=np.int32), seq_len=8, seed=0)
    batch = data.batch(3, 4)
    assert batch["inputs"].shape == (4, 8) and batch["targets"].shape == (4, 8)
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), np.ones((4, 7)))


def test_batches_are_a_function_of_seed_and_index():
    tokens = np.arange(10_000, dtype=np.int32)
    a, b = TokenDataset(tokens, 16, seed=1), TokenDataset(tokens, 16, seed=1)
    np.testing.assert_array_equal(a.batch(7, 8)["inputs"], b.batch(7, 8)["inputs"])
    assert not np.array_equal(a.batch(7, 8)["inputs"], a.batch(8, 8)["inputs"])
    assert not np.array_equal(a.batch(7, 8)["inputs"], TokenDataset(tokens, 16, 2).batch(7, 8)["inputs"])


def test_prefetcher_resumes_at_the_exact_position():
    data = TokenDataset(np.arange(5000, dtype=np.int32), 8, seed=3)
    full = [(i, b["inputs"]) for i, b in Prefetcher(data, 4, 0, 10)]
    resumed = [(i, b["inputs"]) for i, b in Prefetcher(data, 4, 6, 10)]
    assert [i for i, _ in full] == list(range(10))
    assert [i for i, _ in resumed] == [6, 7, 8, 9]
    for (i, x), (j, y) in zip(full[6:], resumed):
        assert i == j
        np.testing.assert_array_equal(x, y)


def test_split_holds_out_the_tail():
    train, held = split_tokens(np.arange(100), 0.1)
    np.testing.assert_array_equal(held, np.arange(90, 100))
    np.testing.assert_array_equal(train, np.arange(90))


def test_stdlib_corpus_is_python_source():
    corpus = stdlib_corpus(200_000)
    assert corpus.dtype == np.uint8 and corpus.size == 200_000
    text = corpus.tobytes().decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_text_folder_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "b.txt").write_text("world")
    assert text_corpus(str(tmp_path), 100).tobytes() == b"hello world"
    with pytest.raises(DataError, match="does not exist"):
        text_corpus(str(tmp_path / "missing"), 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no text"):
        text_corpus(str(empty), 100)
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        TokenDataset(np.arange(10), seq_len=64, seed=0)


def test_token_file(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(500, dtype=np.int32) % 50)
    train, held = build_datasets(DataConfig(source="tokens", path=str(path), seq_len=4,
                                            eval_fraction=0.2), "lm", 0, {"vocab_size": 50})
    assert train.tokens.size == 400 and held.tokens.size == 100
    with pytest.raises(DataError, match="raise model.vocab_size to at least 50"):
        build_datasets(DataConfig(source="tokens", path=str(path), seq_len=4), "lm", 0, {"vocab_size": 40})


def test_synthetic_eval_shares_the_task_but_not_the_samples():
    train, held = build_datasets(DataConfig(source="synthetic", image_size=4, num_classes=3),
                                 "classify", 5, {"num_classes": 3})
    np.testing.assert_array_equal(train.prototypes, held.prototypes)
    assert not np.array_equal(train.batch(0, 4)["inputs"], held.batch(0, 4)["inputs"])
    train, held = build_datasets(DataConfig(), "regress", 5, {"in_features": 3, "out_features": 2})
    np.testing.assert_array_equal(train.teacher, held.teacher)
    batch = held.batch(2, 4)
    np.testing.assert_allclose(batch["targets"], np.tanh(batch["inputs"] @ held.teacher), rtol=1e-5)
