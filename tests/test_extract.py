"""The extraction job and the store: resume, incremental runs, bad files, safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.extraction import extract
from embedstore.store import StoreError, StoreWriter, open_store, parts_dir
from embedstore_cli.app import cli
from tests.conftest import SAMPLE, photo


def _rows_by_path(store) -> dict:
    with open_store(store) as s:
        return dict(zip(s.paths, s.sha256))


def test_sample_store_matches_the_schema(sample_store):
    with h5py.File(sample_store / "index.h5", "r") as f:
        assert f.attrs["format"] == "embedstore"
        assert f.attrs["backbone_name"] == "mobilenet_v2"
        n = f["embeddings"].shape[0]
        assert f["embeddings"].shape == (300, 1280) and f["embeddings"].dtype == np.float32
        assert f["embeddings"].compression is None  # a virtual dataset over the shards
        assert f["embeddings"].maxshape == (None, 1280)
        for name, dtype in [("labels", np.int32), ("views", np.int16)]:
            assert f[name].shape == (n,) and f[name].dtype == dtype
        assert len(f["paths"]) == len(f["sha256"]) == n
        classes = [c.decode() for c in f["classes"][()]]
        assert classes == sorted(classes) and len(classes) == 10
        assert len(f["failures/paths"]) == 0
        first = f["paths"][0].decode()
        assert classes[f["labels"][0]] == first.split("/")[0]


def test_info_json_agrees_with_h5py(sample_store):
    result = CliRunner().invoke(cli, ["info", str(sample_store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    with h5py.File(sample_store / "index.h5", "r") as f:
        assert info["rows"] == f["embeddings"].shape[0]
        assert info["dim"] == f["embeddings"].shape[1]
        assert info["images"] == len({s for s in f["sha256"][()]})
        assert info["failures"] == len(f["failures/paths"])
        labels = f["labels"][()]
        classes = [c.decode() for c in f["classes"][()]]
        assert info["classes"] == {c: int((labels == i).sum()) for i, c in enumerate(classes)}
        assert info["backbone"]["fingerprint"] == f.attrs["backbone_fingerprint"]
        assert info["backbone"]["name"] == "mobilenet_v2"


def test_chunked_reads_equal_full_reads(sample_store):
    with open_store(sample_store) as s:
        full = s.embeddings()
        chunks = np.concatenate([block for _, block in s.iter_embeddings(chunk_rows=64)])
        np.testing.assert_array_equal(full, chunks)
        rows = [299, 3, 150, 3]
        np.testing.assert_array_equal(s.embeddings(rows), full[rows])


def test_store_embeddings_equal_direct_embedding(sample_store, backbone):
    from embedstore.pipeline import Resizer, decode_image

    with open_store(sample_store) as s:
        i = 17
        path, stored = s.paths[i], s.embeddings([i])[0]
    r = Resizer(backbone.input_size, backbone.crop_fraction)
    direct = backbone.embed(r.batch([decode_image((SAMPLE / path).read_bytes())]))[0]
    np.testing.assert_allclose(stored, direct, atol=1e-4)


def test_rerun_is_incremental(small_tree, tmp_path, backbone):
    store = tmp_path / "s.h5"
    first = extract(small_tree, store, backbone, batch_size=5)
    assert (first.embedded, first.failed) == (12, 0)
    again = extract(small_tree, store, backbone)
    assert (again.embedded, again.unchanged) == (0, 12)

    # rename: same content, new path -> no inference, path updated
    old = next((small_tree / "Bag").glob("*.png"))
    old.rename(small_tree / "Bag" / "renamed.png")
    # change: new content at an existing path -> a new row replaces the old one
    changed = sorted((small_tree / "Sneaker").glob("*.png"))[0]
    photo(9).save(changed)
    # copy into another class: known content -> reused with the new label
    shutil.copy(small_tree / "Trouser" / sorted(os.listdir(small_tree / "Trouser"))[0],
                small_tree / "Bag" / "copy.png")
    third = extract(small_tree, store, backbone)
    assert third.embedded == 1 and third.reused == 2
    rows = _rows_by_path(store)
    assert len(rows) == 13 and f"Bag/{old.name}" not in rows and "Bag/renamed.png" in rows
    with open_store(store) as s:
        assert len(s.paths) == len(set(s.paths)) == 13  # each image exactly once
        labels = dict(zip(s.paths, s.labels))
        assert s.classes[labels["Bag/copy.png"]] == "Bag"


def test_broken_files_are_recorded_and_never_stop_the_job(tmp_path, backbone):
    root = tmp_path / "mixed"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    photo(1).save(root / "good" / "a.jpg")
    photo(2).convert("CMYK").save(root / "good" / "cmyk.JPEG")
    photo(3).save(root / "good" / "c.webp")
    photo(4).save(root / "good" / "d.tif")
    photo(5).save(root / "good" / "e.bmp")
    photo(6).convert("RGBA").save(root / "good" / "f.PNG")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("not an image")
    jpeg = (root / "good" / "a.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "bad" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    photo(7, (200, 200)).save(root / "bad" / "huge.png")

    store = tmp_path / "m.h5"
    result = extract(root, store, backbone, max_pixels=100 * 100)
    assert result.embedded == 6 and result.failed == 5
    with open_store(store) as s:
        assert sorted(p.split("/")[1] for p in s.paths) == sorted(os.listdir(root / "good"))
        reasons = {f["path"]: f["reason"] for f in s.failures()}
    assert set(reasons) == {f"bad/{n}" for n in os.listdir(root / "bad")}
    assert "empty" in reasons["bad/empty.jpg"]
    assert "not an image" in reasons["bad/text.png"]
    assert "unreadable" in reasons["bad/dangling.jpg"]
    assert "over the limit" in reasons["bad/huge.png"]
    # a re-run does not record the same failures twice, and a fixed file embeds
    photo(8).save(root / "bad" / "text.png", "PNG")
    again = extract(root, store, backbone, max_pixels=100 * 100)
    assert again.embedded == 1
    with open_store(store) as s:
        assert len(s.failures()) == 4 and "bad/text.png" in set(s.paths)


def test_a_store_never_mixes_backbones(tmp_path):
    meta = {"name": "a", "fingerprint": "f" * 64, "dim": 4, "config": {}}
    store = tmp_path / "x.h5"
    with StoreWriter(store, meta) as w:
        w.add(np.ones((1, 4)), ["p.png"], ["s" * 64], ["cls"])
    with pytest.raises(StoreError, match="this extraction uses backbone b .* but .*x.h5 uses "
                                         "a .* another store, or extract with --backbone a"):
        StoreWriter(store, {**meta, "name": "b", "fingerprint": "e" * 64})


def test_second_writer_is_refused_while_readers_keep_reading(sample_store):
    meta = _meta_of(sample_store)
    with StoreWriter(sample_store, meta):
        with pytest.raises(StoreError, match="being written by another process"):
            StoreWriter(sample_store, meta)
        with open_store(sample_store) as s:
            assert s.n_rows == 300
    with StoreWriter(sample_store, meta):  # the lock is released on exit
        pass


def _meta_of(store) -> dict:
    with open_store(store) as s:
        return {"name": s.backbone["name"], "fingerprint": s.backbone["fingerprint"],
                "dim": s.dim, "config": s.backbone["config"]}


def test_kill_minus_nine_then_rerun_embeds_each_image_once(tmp_path):
    store = tmp_path / "k.h5"
    cmd = [sys.executable, "-m", "embedstore", "extract", str(SAMPLE), str(store),
           "--batch-size", "8", "--commit-every", "8", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts_dir(store).glob("shard-*.h5"))) < 3:
        if proc.poll() is not None:
            pytest.fail("extract finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_store(store) as s:  # every committed shard is in the store at once
        committed = s.n_rows // 8
    assert committed >= 2  # of 3 shard files seen, at most the last was not committed yet

    result = CliRunner().invoke(cli, ["extract", str(SAMPLE), str(store), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["embedded"] <= 300 - 8 * committed and summary["failed"] == 0
    with open_store(store) as s:
        assert s.n_rows == 300 and len(set(s.paths)) == 300
    assert not list(store.glob(".*.tmp-*")) and not (store / "lock").exists()


@pytest.mark.tf
def test_cli_extract_summary_and_errors(small_tree, tmp_path):
    store = tmp_path / "c.h5"
    runner = CliRunner()
    ok = runner.invoke(cli, ["extract", str(small_tree), str(store)])
    assert ok.exit_code == 0 and "12 embedded" in ok.output
    not_store = tmp_path / "plain.h5"
    with h5py.File(not_store, "w") as f:
        f["x"] = 1
    bad = runner.invoke(cli, ["info", str(not_store)])
    assert bad.exit_code != 0 and "not an embedstore store" in str(bad.exception or bad.output)


def test_prune_drops_rows_and_failures_of_deleted_files(small_tree, tmp_path, backbone):
    store = tmp_path / "p.h5"
    (small_tree / "Bag" / "broken.png").write_bytes(b"nope")
    extract(small_tree, store, backbone)
    gone = sorted((small_tree / "Sneaker").glob("*.png"))[0]
    gone.unlink()
    (small_tree / "Bag" / "broken.png").unlink()
    kept = extract(small_tree, store, backbone)  # without --prune the store keeps them
    assert kept.pruned == 0 and f"Sneaker/{gone.name}" in _rows_by_path(store)
    result = CliRunner().invoke(cli, ["extract", str(small_tree), str(store), "--prune", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["pruned"] == 2
    with open_store(store) as s:
        assert s.n_rows == 11 and f"Sneaker/{gone.name}" not in set(s.paths)
        assert s.failures() == []
