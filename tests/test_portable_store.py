"""A store is one self-contained folder: copied, renamed or moved, it works for the
library and for plain h5py, independently of the original; nothing recorded inside a
store (shard names, links, virtual sources) can make it read, move or delete a file
outside it; corruption is never folded into a fresh checksum."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.extraction import extract
from embedstore.store import StoreError, StoreWriter, open_store, parts_dir, verify
from embedstore.store.writer import _lock_file
from embedstore_cli.app import cli
from tests.conftest import SAMPLE
from tests.test_store import META, _patch_embedding_bytes, add_batch, by_path, commit_batches


def inodes(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def plain_h5py(store: Path) -> tuple[np.ndarray, list[str]]:
    """What a user reading the documented way gets (from another working directory)."""
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with h5py.File(store / "index.h5", "r") as f:
            return f["embeddings"][:], list(f["paths"].asstr()[:])
    finally:
        os.chdir(cwd)


def tree(root: Path, classes: dict[str, int], start: int = 0) -> Path:
    """Real Fashion-MNIST images: `n` of class `c` for each entry."""
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[start:start + n]:
            shutil.copy(p, root / cls / p.name)
    return root


def test_a_copy_and_its_original_are_extended_independently(tmp_path, backbone):
    a, b = tmp_path / "photos.h5", tmp_path / "copy.h5"
    extract(tree(tmp_path / "img", {"Bag": 4, "Sneaker": 4}), a, backbone, commit_every=3)
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)  # what the README says
    original_parts = inodes(parts_dir(a))
    extract(tree(tmp_path / "img_b", {"Bag": 4, "Trouser": 4}, start=4), b, backbone,
            commit_every=3)
    assert inodes(parts_dir(a)) == original_parts  # the copy's writer never touched them
    extract(tree(tmp_path / "img_a", {"Coat": 5}), a, backbone, commit_every=3)
    for store, want in ((a, {"Bag": 4, "Sneaker": 4, "Coat": 5}),
                        (b, {"Bag": 8, "Sneaker": 4, "Trouser": 4})):
        with open_store(store) as s:
            counts = {c: int((s.labels == i).sum()) for i, c in enumerate(s.classes)}
            assert counts == want
            assert all(p.split("/")[0] == s.classes[y] for p, y in zip(s.paths, s.labels))
            vectors, paths = plain_h5py(store)
            np.testing.assert_array_equal(vectors, s.embeddings())
            assert paths == list(s.paths) and np.isfinite(vectors).all()
        assert verify(store)["ok"]


def test_a_renamed_or_moved_store_reads_everywhere_and_re_embeds_nothing(tmp_path, backbone):
    images = tree(tmp_path / "img", {"Bag": 3, "Sneaker": 3})
    store = tmp_path / "a.h5"
    extract(images, store, backbone)
    before = by_path(store)
    moved = tmp_path / "elsewhere" / "b.h5"
    moved.parent.mkdir()
    subprocess.run(["mv", str(store), str(moved)], check=True)
    assert by_path(moved) == before
    vectors, _ = plain_h5py(moved)
    assert np.isfinite(vectors).all() and len(vectors) == 6
    result = extract(images, moved, backbone)
    assert result.embedded == 0 and result.unchanged == 6
    assert not store.exists() and not Path(f"{store}.parts").exists()


def _as_format2(store: Path, legacy: Path) -> None:
    """Turn a format-3 store into the format-2 layout embedstore 0.2 wrote: the index as
    the file LEGACY (recording its parts folder by name), shards in LEGACY.parts/."""
    shutil.move(str(store / "parts"), f"{legacy}.parts")
    shutil.move(str(store / "index.h5"), legacy)
    shutil.rmtree(store)
    with h5py.File(legacy, "r+") as f:
        f.attrs["format_version"] = 2
        f.attrs["parts_dir"] = f"{legacy.name}.parts"


def test_a_copied_format2_store_is_upgraded_from_its_own_parts(tmp_path):
    store = tmp_path / "photos.h5"
    commit_batches(tmp_path / "new", 3, 5)
    _as_format2(tmp_path / "new", store)
    copy = tmp_path / "b.h5"
    shutil.copy(store, copy)  # the copy's index still names photos.h5.parts
    shutil.copytree(f"{store}.parts", f"{copy}.parts")
    original = inodes(Path(f"{store}.parts"))
    rows = by_path(store)
    with StoreWriter(copy, META) as w:  # the next write upgrades it, from b.h5.parts
        add_batch(w, 100, 2)
    assert copy.is_dir() and not Path(f"{copy}.parts").exists()
    assert inodes(Path(f"{store}.parts")) == original and by_path(store) == rows
    assert len(by_path(copy)) == 17 and verify(copy)["ok"]
    vectors, paths = plain_h5py(copy)
    assert np.isfinite(vectors).all() and len(paths) == 17


def test_two_hard_links_of_a_format2_store_cannot_both_be_upgraded(tmp_path):
    store = tmp_path / "s.h5"
    commit_batches(tmp_path / "new", 1, 3)
    _as_format2(tmp_path / "new", store)
    os.link(store, tmp_path / "t.h5")
    held = _lock_file(store, store)
    try:
        with pytest.raises(StoreError, match="being upgraded by another process"):
            StoreWriter(tmp_path / "t.h5", META)
    finally:
        os.close(held)
    with StoreWriter(store, META) as w:
        add_batch(w, 10, 1)
    assert len(by_path(store)) == 4


def _rename_shard(index: Path, name: str) -> None:
    with h5py.File(index, "r+") as f:
        names = f["shards/names"]
        values = [n.decode() if isinstance(n, bytes) else n for n in names[()]]
        values[0] = name
        del f["shards/names"]
        f.create_dataset("shards/names", data=np.array(values, object),
                         dtype=h5py.string_dtype())


@pytest.mark.parametrize("name", ["../../victim/important.txt", "/etc/passwd",
                                  "../other.h5/parts/shard-000000001.h5", "shard-1.h5"])
def test_a_shard_name_outside_the_pattern_is_refused_and_nothing_outside_moves(tmp_path, name):
    victim = tmp_path / "victim" / "important.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    store = tmp_path / "s" / "crafted.h5"
    commit_batches(store, 2, 3)
    _rename_shard(store / "index.h5", name)
    runner = CliRunner()
    for args in (["info", str(store)], ["compact", str(store)], ["info", str(store), "--verify"],
                 ["train", str(store), str(tmp_path / "head")]):
        result = runner.invoke(cli, args)
        assert result.exit_code != 0 and "not a name embedstore writes" in str(result.exception)
    with pytest.raises(StoreError, match="index.h5: names a shard"):
        StoreWriter(store, META)
    assert victim.read_text() == "keep me" and not (store / "quarantine").exists()


def test_external_links_and_foreign_virtual_sources_are_refused(tmp_path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["embeddings"] = np.full((6, 8), 42, np.float32)
    store = tmp_path / "s.h5"
    commit_batches(store, 2, 3)
    with h5py.File(store / "index.h5", "r+") as f:  # plain h5py would read the outside data
        del f["embeddings"]
        f["embeddings"] = h5py.ExternalLink(str(outside), "embeddings")
    with pytest.raises(StoreError, match="external link"):
        open_store(store)
    report = verify(store)
    assert not report["ok"] and "external link" in report["problems"][0]

    other = tmp_path / "o.h5"
    commit_batches(other, 2, 3)
    with h5py.File(other / "index.h5", "r+") as f:  # a virtual column mapping another file
        del f["labels"]
        layout = h5py.VirtualLayout((6,), np.int32)
        layout[:] = h5py.VirtualSource(str(outside), "embeddings", (6,))
        f.create_virtual_dataset("labels", layout)
    report = verify(other)
    assert not report["ok"] and "not one of the store's shards" in " ".join(report["problems"])

    linked = tmp_path / "l.h5"
    commit_batches(linked, 2, 3)
    shard = sorted(parts_dir(linked).glob("shard-*.h5"))[0]
    with h5py.File(shard, "r+") as f:  # inside a shard: the library must not follow it
        del f["embeddings"]
        f["embeddings"] = h5py.ExternalLink(str(outside), "embeddings")
    with pytest.raises(StoreError, match="external link"):
        open_store(linked)
    with StoreWriter(linked, META):  # the writer quarantines it, inside the store
        pass
    assert (linked / "quarantine" / shard.name).exists() and len(by_path(linked)) == 3
    with h5py.File(outside, "r") as f:
        assert f["embeddings"][0, 0] == 42


def test_compact_and_merge_never_re_bless_a_changed_shard(tmp_path):
    store = tmp_path / "c.h5"
    commit_batches(store, 3, 4)
    bad = sorted(parts_dir(store).glob("shard-*.h5"))[1]
    _patch_embedding_bytes(bad, 2, lambda b: bytes([b[0] ^ 1]) + b[1:])  # one bit
    assert not verify(store)["ok"]
    merged = tmp_path / "m.h5"
    runner = CliRunner()
    assert runner.invoke(cli, ["merge", str(store), "--out", str(merged)]).exit_code == 0
    assert len(by_path(merged)) == 8 and verify(merged)["ok"]  # the changed shard's rows left out
    result = runner.invoke(cli, ["compact", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert (store / "quarantine" / bad.name).exists()
    assert verify(store)["ok"] and sorted(by_path(store)) == sorted(by_path(merged))


@pytest.mark.tf
def test_a_file_name_that_is_not_utf8_is_a_failure_not_a_stop(tmp_path, backbone):
    images = tree(tmp_path / "img", {"Bag": 2, "Sneaker": 2})
    raw = os.fsencode(str(images / "Bag")) + b"/caf\xe9.png"
    shutil.copy(sorted((SAMPLE / "Bag").glob("*.png"))[5], os.fsdecode(raw))
    store = tmp_path / "s.h5"
    for _ in range(2):  # and every re-run goes past it too
        result = CliRunner().invoke(cli, ["extract", str(images), str(store), "--json"])
        assert result.exit_code == 0, result.output
    with open_store(store) as s:
        assert len(s.paths) == 4
        [failure] = s.failures()
    assert failure["path"] == "Bag/caf\\xe9.png" and "not valid UTF-8" in failure["reason"]


def test_training_on_a_damaged_vector_names_the_shard(tmp_path):
    store = tmp_path / "n.h5"
    commit_batches(store, 2, 6)
    shard = sorted(parts_dir(store).glob("shard-*.h5"))[1]
    _patch_embedding_bytes(shard, 1, lambda b: np.float32(np.nan).tobytes())
    result = CliRunner().invoke(cli, ["train", str(store), str(tmp_path / "head")])
    assert result.exit_code != 0
    assert f"{shard} of {store} holds 1 vectors with NaN" in str(result.exception)


def test_a_folder_that_is_not_a_store_is_never_written_into(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not an embedstore store"):
        StoreWriter(folder, META)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


def test_the_index_file_names_its_store(tmp_path):
    store = tmp_path / "s.h5"
    commit_batches(store, 1, 3)
    with StoreWriter(store / "index.h5", META) as w:  # as the h5py snippet spells it
        add_batch(w, 10, 2)
    assert store.is_dir() and (store / "index.h5").is_file()
    assert len(by_path(store / "index.h5")) == 5 and verify(store)["ok"]


def test_links_planted_in_a_store_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store = tmp_path / "s.h5"
    commit_batches(store, 2, 3)
    (store / "lock").symlink_to(victim)  # a writer would truncate and write its pid there
    with pytest.raises(StoreError, match="lock file"):
        StoreWriter(store, META)
    (store / "lock").unlink()
    planted = store / f".index.h5.tmp-{os.getpid()}"  # the temp name this writer will use
    planted.symlink_to(victim)
    with StoreWriter(store, META) as w:
        add_batch(w, 10, 1)
    (store / "parts").rename(tmp_path / "elsewhere")
    (store / "parts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="symbolic link"):
        open_store(store)
    assert victim.read_text() == "keep me"
