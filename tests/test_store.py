"""The sharded store with the real writer: commits, tombstones, plain-h5py reads,
kill -9, merge, format-1 upgrade, quarantine, integrity, locking, temp files, full disk."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.store import (
    StoreError,
    StoreWriter,
    lock_path,
    merge,
    merge_stores,
    open_store,
    parts_dir,
    quarantine_dir,
    verify,
)
from embedstore_cli.app import cli

DIM = 8
META = {"name": "toy", "fingerprint": "f" * 64, "dim": DIM, "config": {}}
REPO = Path(__file__).resolve().parent.parent


def sha(i) -> str:
    return f"{i:064x}"


def add_batch(w: StoreWriter, start: int, n: int, label=None, prefix="img") -> None:
    ids = range(start, start + n)
    w.add(np.array([np.full(DIM, i, np.float32) for i in ids]), [f"{prefix}/{i}.png" for i in ids],
          [sha(i) for i in ids], [label or f"c{i % 3}" for i in ids])


def commit_batches(store, commits: int, rows: int) -> None:
    """A store grown by `commits` commits of `rows` rows (img/0.png, img/1.png, ...)."""
    with StoreWriter(store, META) as w:
        for c in range(commits):
            add_batch(w, c * rows, rows)
            w.commit()


def by_path(store) -> dict:
    """path -> (sha, label name, view, vector) as open_store sees it."""
    with open_store(store) as s:
        names = [s.classes[i] if i >= 0 else "" for i in s.labels]
        return {p: (h, c, int(v), tuple(e)) for p, h, c, v, e in
                zip(s.paths, s.sha256, names, s.views, s.embeddings())}


def shard_files(store) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in parts_dir(store).glob("shard-*.h5")}


def test_many_commits_read_the_same_through_plain_h5py(tmp_path):
    store = tmp_path / "s.h5"
    commit_batches(store, 12, 7)
    assert len(shard_files(store)) == 12 and not lock_path(store).exists()
    with open_store(store) as s, h5py.File(store / "index.h5", "r") as f:
        assert s.n_rows == 84 and f["embeddings"].shape == (84, DIM)
        np.testing.assert_array_equal(f["embeddings"][:], s.embeddings())
        assert list(f["paths"].asstr()[:]) == list(s.paths)
        assert list(f["sha256"].asstr()[:]) == list(s.sha256)
        table = list(f["classes"].asstr()[:])
        assert [table[i] for i in f["labels"][:]] == [s.classes[i] for i in s.labels]
        rows = [83, 0, 41, 41, 7]
        np.testing.assert_array_equal(s.embeddings(rows)[:, 0], [83, 0, 41, 41, 7])
        blocks = np.concatenate([b for _, b in s.iter_embeddings(chunk_rows=10)])
        np.testing.assert_array_equal(blocks, s.embeddings())


def test_replacing_and_removing_rows_leaves_other_shards_untouched(tmp_path):
    store = tmp_path / "s.h5"
    commit_batches(store, 3, 10)
    before = shard_files(store)
    with StoreWriter(store, META) as w:
        w.add(np.full((1, DIM), -1.0), ["img/3.png"], [sha(999)], ["c0"])  # changed content
        w.remove("img/25.png")  # pruned
        w.add_copy("moved/4.png", sha(4), "new")  # a copy of known content, new class
        w.remove("img/4.png")  # ... and its old path gone: a rename
        w.add_failure("img/12.png", sha(12), "became unreadable")
    after = shard_files(store)
    assert {k: after[k] for k in before} == before and len(after) == 4  # one new shard
    rows = by_path(store)
    assert len(rows) == 28 and "img/25.png" not in rows and "img/12.png" not in rows
    assert rows["img/3.png"][0] == sha(999) and rows["img/3.png"][3][0] == -1
    assert rows["moved/4.png"][1] == "new" and rows["moved/4.png"][3][0] == 4
    with open_store(store) as s:
        assert s.info()["dead_rows"] == 4 and [f["path"] for f in s.failures()] == ["img/12.png"]
        assert s.classes == ["c0", "c1", "c2", "new"]
    with h5py.File(store / "index.h5", "r") as f, open_store(store) as s:  # tombstones skipped
        np.testing.assert_array_equal(f["embeddings"][:], s.embeddings())
        assert list(f["paths"].asstr()[:]) == list(s.paths) and len(s.paths) == 28
    result = CliRunner().invoke(cli, ["compact", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"shards_before": 4, "shards_after": 1,
                                         "rows_rewritten": 28, "quarantined": []}
    assert by_path(store) == rows and verify(store)["ok"]


def _lookups_after_a_rename_and_a_change(store) -> dict:
    """Three commits, then a writer that looks rows up and changes two of them."""
    commit_batches(store, 3, 10)
    with StoreWriter(store, META) as w:
        assert w.known(sha(5)) and not w.known(sha(99))
        assert w.sha_of("img/7.png") == sha(7) and w.sha_of("img/99.png") is None
        assert w.paths_of(sha(12)) == ["img/12.png"]
        assert w.has_row("img/3.png", sha(3)) and not w.has_row("img/3.png", sha(4))
        w.add(np.full((1, DIM), -1.0), ["img/3.png"], [sha(999)], ["c0"])  # changed content
        w.add_copy("moved/4.png", sha(4), "c1")  # a rename: copy, then the old path goes
        w.remove("img/4.png")
        assert w.sha_of("img/4.png") is None and w.known(sha(999))
    return by_path(store)


def test_writer_lookups_never_trust_a_key_collision(tmp_path, monkeypatch):
    """The writer finds rows by 64-bit keys of paths and hashes; with every key equal it
    must still tell every path and content apart (each match is checked on disk)."""
    expected = _lookups_after_a_rename_and_a_change(tmp_path / "a.h5")
    assert len(expected) == 30 and expected["img/3.png"][0] == sha(999)
    assert "img/4.png" not in expected and expected["moved/4.png"][3][0] == 4
    from embedstore.store import _rowindex

    monkeypatch.setattr(_rowindex, "text_keys", lambda values: np.zeros(len(values), np.uint64))
    monkeypatch.setattr(_rowindex, "text_key", lambda value: np.uint64(0))
    assert _lookups_after_a_rename_and_a_change(tmp_path / "b.h5") == expected


def test_writer_memory_is_a_few_dozen_bytes_a_row_and_old_shards_reopen(tmp_path):
    store = tmp_path / "m.h5"
    commit_batches(store, 4, 5000)
    with StoreWriter(store, META) as w:
        assert w._where.nbytes == 32 * 20_000  # a 64-bit key and a location, by hash and by path
    for shard in parts_dir(store).glob("shard-*.h5"):  # as the first format-2 writer wrote them
        with h5py.File(shard, "r+") as f:
            del f["keys"]
    with StoreWriter(store, META) as w:  # keys are computed from the paths and hashes instead
        assert w.known(sha(19_999)) and w.sha_of("img/123.png") == sha(123)
        assert w._where.nbytes == 32 * 20_000 and not w.known(sha(20_000))


def test_sorted_runs_find_every_live_location_through_partitions_and_merges(monkeypatch):
    """The writer's key table against a plain dict: small partitions, repeated keys,
    and locations dying between additions (as folded shards and tombstones do); and a
    table built at once from uneven key ranges (as a writer opening a store builds it)."""
    from embedstore.store._rowindex import SortedRuns

    monkeypatch.setattr(SortedRuns, "PART_ROWS", 64)
    rng = np.random.default_rng(0)
    table, expected, dead = SortedRuns(), {}, set()

    def keep(locs):
        return ~np.isin(locs, np.fromiter(dead, np.int64, len(dead)))

    for step in range(60):
        keys = rng.integers(0, 2**64 - 1, 50, dtype=np.uint64, endpoint=True)
        keys[:5] = 7  # one key held by many locations, across partitions and runs
        locs = np.arange(step * 50, step * 50 + 50, dtype=np.int64)
        table.add(keys, locs, keep)
        for k, v in zip(keys.tolist(), locs.tolist()):
            expected.setdefault(k, set()).add(v)
        dead.update(rng.choice(locs, 10, replace=False).tolist())
    assert len(table.base) > 10 and len(table.tail) >= 1
    for k, locs in expected.items():
        assert set(table.find(np.uint64(k))) - dead == locs - dead
    live = [k for k, locs in expected.items() if locs - dead][:100]
    assert table.may_hold(np.array(live + list(range(8, 100)), np.uint64)).tolist() == (
        [True] * len(live) + [False] * 92)  # keys never added are never "maybe"
    assert table.nbytes < 16 * 60 * 50  # dead locations were dropped by merges

    from embedstore.store._rowindex import _RangeFill

    fill = _RangeFill(3000, 64)  # 47 key ranges; these keys crowd a few of them
    keys = rng.integers(0, 2**60, 3000, dtype=np.uint64)
    for a in range(0, 3000, 500):
        fill.put(keys[a:a + 500], np.arange(a, a + 500))
    built = fill.table()  # its full ranges grew; each key is found where the bounds say
    assert all(built.find(np.uint64(k)) == [i] for i, k in enumerate(keys.tolist()))


def test_small_shards_fold_once_they_add_up(tmp_path, monkeypatch):
    from embedstore.store import writer

    monkeypatch.setattr(writer, "FOLD_ROWS", 20)
    store = tmp_path / "s.h5"
    commit_batches(store, 5, 6)
    with open_store(store) as s:  # 6+6+6 < 20 <= 24: one fold, then one small shard
        assert [sh.rows for sh in s.shards] == [24, 6] and s.n_rows == 30
    assert sorted(by_path(store)) == sorted(f"img/{i}.png" for i in range(30))


KILL_LOOP = """
import sys, numpy as np
from embedstore.store import StoreWriter
meta = {"name": "toy", "fingerprint": "f" * 64, "dim": 8, "config": {}}
with StoreWriter(sys.argv[1], meta) as w:
    for c in range(100000):
        ids = range(c * 50, c * 50 + 50)
        w.add(np.ones((50, 8)) * c, [f"img/{i}.png" for i in ids], [f"{i:064x}" for i in ids],
              ["a"] * 50)
        w.commit()
"""


def test_kill_minus_nine_mid_commit_keeps_every_commit_and_resumes(tmp_path):
    store = tmp_path / "k.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(store)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(shard_files(store)) < 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(store).exists()  # left by the killed writer; harmless
    with open_store(store) as s:
        n = s.n_rows
        assert n >= 950 and n % 50 == 0
        assert len(set(s.paths)) == n
    with StoreWriter(store, META) as w:  # resume: the next writer cleans up and adds more
        assert all(w.known(sha(i)) for i in range(n))
        add_batch(w, n, 50, label="a")
    assert not list(store.glob(".*tmp*")) and not list(parts_dir(store).glob(".*"))
    assert not lock_path(store).exists()
    with open_store(store) as s:
        assert s.n_rows == n + 50 and len(s.shards) == len(shard_files(store))
    assert verify(store)["ok"]


def test_merge_of_two_halves_equals_the_whole(tmp_path):
    whole, a, b, out = (tmp_path / f"{n}.h5" for n in ("whole", "a", "b", "out"))
    with StoreWriter(whole, META) as w:
        add_batch(w, 0, 30)
        w.add_failure("bad.png", sha(500), "truncated")
    with StoreWriter(a, META) as w:
        add_batch(w, 0, 20)  # 10..19 are in both halves
    with StoreWriter(b, META) as w:
        add_batch(w, 10, 20)
        w.add_failure("bad.png", sha(500), "truncated")
    result = CliRunner().invoke(cli, ["merge", str(a), str(b), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 30
    assert by_path(out) == by_path(whole)
    with open_store(out) as s, open_store(whole) as t:
        assert s.failures() == t.failures() and s.classes == t.classes
    again = merge_stores([a, b], out)  # nothing new: nothing rewritten
    assert again["rows_added"] == 0 and by_path(out) == by_path(whole)
    other = tmp_path / "other.h5"
    with StoreWriter(other, {**META, "name": "x", "fingerprint": "e" * 64}) as w:
        add_batch(w, 0, 1)
    with pytest.raises(StoreError, match="different backbones"):
        merge_stores([a, other], tmp_path / "mixed.h5")
    assert not (tmp_path / "mixed.h5").exists()


def _write_format1(store: Path) -> None:
    """A store as embedstore 0.1 wrote it: one file, vlen strings, plus one unmerged part."""
    strs = h5py.string_dtype()
    with h5py.File(store, "w") as f:
        f.attrs.update({"format": "embedstore", "format_version": 1, "backbone_name": "toy",
                        "backbone_fingerprint": "f" * 64, "backbone_dim": DIM,
                        "backbone_config": "{}", "absorbed_seq": 2})
        f.create_dataset("embeddings", data=np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM),
                         maxshape=(None, DIM), chunks=(64, DIM))
        f.create_dataset("paths", data=np.array(["a/1.png", "b/2.png", "b/3.png"], object),
                         dtype=strs)
        f.create_dataset("sha256", data=np.array([sha(1), sha(2), sha(3)], object), dtype=strs)
        f.create_dataset("labels", data=np.array([0, 1, 1], np.int32))
        f.create_dataset("views", data=np.zeros(3, np.int16))
        f.create_dataset("classes", data=np.array(["a", "b"], object), dtype=strs)
        for name in ("paths", "sha256", "reasons"):
            f.create_dataset(f"failures/{name}", data=np.array(["x"], object), dtype=strs)
    parts_dir(store).mkdir()
    with h5py.File(parts_dir(store) / "part-000000003.h5", "w") as f:
        f.attrs.update({"format": "embedstore", "backbone_fingerprint": "f" * 64, "seq": 3})
        f.create_dataset("embeddings", data=np.full((1, DIM), 7, np.float32))
        for name, values in (("paths", ["c/4.png"]), ("sha256", [sha(4)]), ("label_names", ["c"]),
                             ("copies/paths", ["c/1-copy.png"]), ("copies/sha256", [sha(1)]),
                             ("copies/label_names", ["c"]), ("failures/paths", []),
                             ("failures/sha256", []), ("failures/reasons", []),
                             ("removed", ["b/3.png"])):
            f.create_dataset(name, data=np.array(values, object), dtype=strs)
        f.create_dataset("views", data=np.zeros(1, np.int16))
    with h5py.File(parts_dir(store) / "part-000000002.h5", "w") as f:  # absorbed before a crash
        f.attrs.update({"format": "embedstore", "seq": 2})


def test_format1_store_is_read_and_upgraded_on_the_next_write(tmp_path):
    store = tmp_path / "old.h5"
    _write_format1(store)
    with open_store(store) as s:
        assert s.format_version == 1 and s.n_rows == 3 and s.classes == ["a", "b"]
        assert list(s.labels) == [0, 1, 1] and s.embeddings([2])[0, 0] == 2 * DIM
        assert s.failures() == [{"path": "x", "sha256": "x", "reason": "x"}]
    assert merge(store)  # what the next writer does first
    rows = by_path(store)
    assert sorted(rows) == ["a/1.png", "b/2.png", "c/1-copy.png", "c/4.png"]
    assert rows["c/1-copy.png"][1:] == ("c", 0, tuple(np.arange(DIM, dtype=np.float32)))
    assert rows["c/4.png"][3][0] == 7
    with open_store(store) as s, h5py.File(store / "index.h5", "r") as f:
        assert s.format_version == 3 and store.is_dir()
        assert s.failures() == [{"path": "x", "sha256": "x", "reason": "x"}]
        np.testing.assert_array_equal(f["embeddings"][:], s.embeddings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]  # the old files are gone


def test_unreadable_shards_and_parts_are_quarantined_not_blocking(tmp_path, caplog):
    store = tmp_path / "q.h5"
    commit_batches(store, 3, 5)
    bad = sorted(parts_dir(store).glob("shard-*.h5"))[1]
    bad.write_bytes(b"garbage")
    (parts_dir(store) / "notes.txt").write_bytes(b"not ours: never touched")
    with pytest.raises(StoreError, match="unreadable.*embedstore compact"):
        open_store(store)
    with caplog.at_level(logging.WARNING, "embedstore.store"):
        with StoreWriter(store, META) as w:
            assert not w.known(sha(5)) and w.known(sha(0))  # its images get re-embedded
            add_batch(w, 5, 5)
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 1
    assert [p.name for p in quarantine_dir(store).iterdir()] == [bad.name]
    assert (parts_dir(store) / "notes.txt").read_bytes() == b"not ours: never touched"
    result = CliRunner().invoke(cli, ["info", str(store)])
    assert result.exit_code == 0 and "quarantined 1 unreadable files" in result.output
    assert len(by_path(store)) == 15


def _patch_embedding_bytes(shard: Path, row: int, patch) -> None:
    """Change the bytes of one row's first float in the shard file on disk."""
    with h5py.File(shard, "r") as f:
        offset = f["embeddings"].id.get_offset() + row * DIM * 4  # shards are contiguous
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(4)
        fh.seek(offset)
        fh.write(patch(old))


def test_verify_detects_a_flipped_bit_and_nan_vectors_naming_them(tmp_path):
    store = tmp_path / "v.h5"
    with StoreWriter(store, META) as w:
        for c in range(3):
            add_batch(w, 1 + 10 * c, 10)
            w.commit()
    runner = CliRunner()
    ok = runner.invoke(cli, ["info", str(store), "--verify"])
    assert ok.exit_code == 0 and "verify      ok" in ok.output
    shards = sorted(parts_dir(store).glob("shard-*.h5"))
    _patch_embedding_bytes(shards[1], 4, lambda b: bytes([b[0] ^ 1]) + b[1:])  # one bit
    report = verify(store)
    assert not report["ok"] and len(report["problems"]) == 1
    assert shards[1].name in report["problems"][0]
    assert "checksum does not match" in report["problems"][0]
    _patch_embedding_bytes(shards[2], 3, lambda b: np.float32(np.nan).tobytes())
    problems = verify(store)["problems"]
    assert len(problems) == 3 and "1 vectors with NaN or inf (rows 3: img/24.png)" in problems[2]
    bad = runner.invoke(cli, ["info", str(store), "--verify"])
    assert bad.exit_code == 1 and "checksum does not match" in bad.output
    assert "img/24.png" in bad.output


def test_nan_vectors_become_failures_not_rows(tmp_path):
    store = tmp_path / "n.h5"
    vectors = np.ones((3, DIM), np.float32)
    vectors[1, 2] = np.nan
    with StoreWriter(store, META) as w:
        w.add(vectors, ["a.png", "b.png", "c.png"], [sha(1), sha(2), sha(3)], ["x"] * 3)
    with open_store(store) as s:
        assert list(s.paths) == ["a.png", "c.png"]
        assert [f["path"] for f in s.failures()] == ["b.png"]


def test_symlinked_store_is_one_store_with_one_writer(tmp_path):
    real = tmp_path / "real.h5"
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    with StoreWriter(real, META) as w:
        add_batch(w, 0, 2)
        with pytest.raises(StoreError, match="being written by another process"):
            StoreWriter(link, META)
    with StoreWriter(link, META) as w:
        add_batch(w, 2, 2)
    assert link.is_symlink() and len(by_path(real)) == 4
    assert not (tmp_path / "link.h5.parts").exists()


def test_lock_file_exists_only_while_a_writer_runs(tmp_path):
    store = tmp_path / "l.h5"
    w = StoreWriter(store, META)
    assert int(lock_path(store).read_text()) == os.getpid()
    w.release()
    assert not lock_path(store).exists()
    with StoreWriter(store, META):  # and the next writer can take it again
        assert lock_path(store).exists()
    assert not lock_path(store).exists()


def test_orphaned_temp_and_shard_files_are_removed_by_the_next_writer(tmp_path):
    store = tmp_path / "o.h5"
    with StoreWriter(store, META) as w:
        add_batch(w, 0, 3)
    orphans = [store / ".index.h5.tmp-4194300", parts_dir(store) / ".shard-000000007.h5.tmp-12",
               parts_dir(store) / "shard-000000099.h5"]
    for p in orphans:
        p.write_bytes(b"x" * 1000)
    with StoreWriter(store, META):
        pass
    assert not any(p.exists() for p in orphans)
    assert len(by_path(store)) == 3


def test_a_full_disk_is_one_clear_error_and_loses_nothing_committed(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = mnt / "full.h5"
        meta = {**META, "dim": 1280}
        w = StoreWriter(store, meta)
        w.add(np.ones((10, 1280)), [f"{i}.png" for i in range(10)], [sha(i) for i in range(10)],
              ["a"] * 10)
        w.commit()
        w.add(np.ones((1000, 1280)), [f"x{i}.png" for i in range(1000)],
              [sha(100 + i) for i in range(1000)], ["a"] * 1000)  # 5 MB: does not fit
        with pytest.raises(StoreError, match=f"no space left on {mnt} writing .*nothing "
                                             "committed was lost"):
            w.commit()
        w.release()
        assert sorted(p.name for p in mnt.iterdir()) == ["full.h5"]
        assert sorted(p.name for p in store.iterdir()) == ["index.h5", "parts"]
        assert not list(parts_dir(store).glob(".*"))  # no partial shard left
        with open_store(store) as s:
            assert s.n_rows == 10
        assert verify(store)["ok"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
