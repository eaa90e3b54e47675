"""FolderCache: the `rfclip` command's text embeddings kept on disk between runs."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from rfclip_engine.text import FolderCache, TextEmbedder


def vector(seed, width=16):
    return torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_an_embedding_comes_back_exactly_in_another_run(tmp_path):
    FolderCache(tmp_path).put("rfclip:text:m:w:t:cat", vector(0))
    again = FolderCache(tmp_path)  # another process: nothing in memory
    assert torch.equal(again.get("rfclip:text:m:w:t:cat"), vector(0))
    assert again.get("rfclip:text:m:w:t:dog") is None
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy" and ":" not in files[0].name  # no part file left
    assert np.load(files[0], allow_pickle=False).dtype == np.float32


@pytest.mark.parametrize("content", [
    b"not a numpy file", b"",
    pickle.dumps(np.array([object()])),  # numpy's own pickle path is refused, never run
    "matrix", "float64", "object",
])
def test_a_file_that_is_not_a_vector_is_a_miss_and_is_written_again(tmp_path, content):
    cache = FolderCache(tmp_path)
    cache.put("key", vector(1))
    path, = tmp_path.iterdir()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        array = {"matrix": np.ones((2, 8), np.float32), "float64": np.ones(16), "object": np.array([{}, 1], object)}[
            content]
        with path.open("wb") as f:
            np.save(f, array, allow_pickle=True)
    fresh = FolderCache(tmp_path)
    assert fresh.get("key") is None
    fresh.put("key", vector(1))
    assert torch.equal(FolderCache(tmp_path).get("key"), vector(1))


def test_the_folder_keeps_to_its_size_least_recently_used_first_out(tmp_path, monkeypatch):
    monkeypatch.setattr(FolderCache, "PRUNE_EVERY", 1)
    FolderCache(tmp_path / "one").put("k", vector(0))
    entry = next((tmp_path / "one").iterdir()).stat().st_size  # 16 floats and numpy's header
    folder = tmp_path / "text"
    cache = FolderCache(folder, max_bytes=5 * entry)
    for n in range(5):
        cache.put(f"k{n}", vector(n))
    assert sum(p.stat().st_size for p in folder.iterdir()) == 5 * entry
    for n in range(5):  # written long ago, k0 the oldest
        os.utime(cache._path(f"k{n}"), (1_000_000 + n, 1_000_000 + n))
    assert torch.equal(FolderCache(folder).get("k0"), vector(0))  # read: now the most recently used
    cache.put("k5", vector(5))  # over the size: down to 80 % of it, the least recently used out
    assert {n for n in range(6) if cache._path(f"k{n}").exists()} == {0, 3, 4, 5}


def test_a_folder_that_cannot_be_written_is_warned_about_once_and_the_run_goes_on(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    cache = FolderCache(tmp_path / "file" / "text")  # its parent is a file: no folder can be made
    caplog.set_level(logging.WARNING, logger="rfclip_engine.text")
    for n in range(3):
        cache.put(f"k{n}", vector(n))
    assert torch.equal(cache.get("k2"), vector(2))  # from memory
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot be kept in" in warnings[0] and "computes them for itself" in warnings[0]


def test_a_second_run_computes_no_text(tiny_model, tmp_path, monkeypatch):
    first = TextEmbedder(tiny_model, FolderCache(tmp_path)).embed_queries(["cat", "dog"])
    computed = []
    original = tiny_model.encode_text
    monkeypatch.setattr(tiny_model, "encode_text", lambda prompts: computed.append(len(prompts)) or original(prompts))
    second = TextEmbedder(tiny_model, FolderCache(tmp_path)).embed_queries(["dog", "cat", "bird"])
    assert computed == [80]  # bird's 80 prompts only
    assert torch.equal(second[:2], first.flip(0))
