"""The Ray Data engine writes the same store as the local engine, resumes after its driver
is killed, and says what to install when Ray is missing. Ray runs here for real, on this
machine (2 CPUs)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from embedstore.engines import EngineError, get_engine
from embedstore.extraction import extract
from embedstore.store import lock_path, open_store
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray for the module; the engine joins it instead of starting its own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """12 real images in 3 classes, one duplicated into another class, and 3 bad files."""
    root = tmp_path_factory.mktemp("ray") / "images"
    for cls in ["Bag", "Sneaker", "Trouser"]:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[:4]:
            shutil.copy(p, root / cls / p.name)
    first_bag = sorted((root / "Bag").glob("*.png"))[0]
    shutil.copy(first_bag, root / "Trouser" / "same-as-a-bag.png")
    (root / "Bag" / "empty.png").write_bytes(b"")
    (root / "Sneaker" / "notes.jpg").write_text("not an image")
    (root / "Trouser" / "cut.png").write_bytes(first_bag.read_bytes()[:60])
    return root


def _contents(store) -> tuple[dict, dict]:
    """Rows keyed by (path, view) -> (sha256, label name, vector); failures by path."""
    with open_store(store) as s:
        classes, vectors = s.classes, s.embeddings()
        rows = {(p, int(v)): (sha, classes[lab] if lab >= 0 else None, vectors[i])
                for i, (p, v, sha, lab) in enumerate(zip(s.paths, s.views, s.sha256, s.labels))}
        failures = {f["path"]: (f["sha256"], f["reason"]) for f in s.failures()}
    return rows, failures


# The driver of a Ray run, in its own process so that the test can kill -9 it. It joins
# the test's Ray and stalls once its first batch is committed (commit_every=4).
KILLED_DRIVER = """
import sys, time
from embedstore.extraction import extract

def stall_after_the_first_commit(state):
    if state.embedded >= 4:
        time.sleep(600)

extract(sys.argv[1], sys.argv[2], "mobilenet_v2", runtime=sys.argv[3], engine="ray",
        batch_size=4, commit_every=4, progress=stall_after_the_first_commit,
        engine_options={"address": sys.argv[4]})
"""


def _kill_driver_after_its_first_commit(ray, images, store, runtime: str) -> None:
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(images), str(store),
                             runtime, address])
    try:
        deadline = time.monotonic() + 300
        while not (store / "index.h5").exists():  # the index appears at the first commit
            assert proc.poll() is None and time.monotonic() < deadline, "driver never committed"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup, the writer's lock stays behind
        proc.wait()


def test_ray_store_equals_local_after_a_kill_minus_nine_and_resume(ray_session, mixed_tree,
                                                                    tmp_path, backbone):
    local = extract(mixed_tree, tmp_path / "local.h5", backbone)
    assert (local.embedded, local.failed) == (13, 3)
    store = tmp_path / "ray.h5"
    _kill_driver_after_its_first_commit(ray_session, mixed_tree, store, backbone.runtime)
    assert lock_path(store).exists()
    with open_store(store) as s:
        committed = len(set(s.paths))
    assert 4 <= committed < 13  # the committed batch survived, the rest never came

    resumed = extract(mixed_tree, store, backbone, engine="ray", batch_size=4, workers=1)
    assert resumed.unchanged == committed and resumed.failed == 3
    assert resumed.embedded + resumed.reused == 13 - committed
    # every stage is reported (read and hash of 16 small files round to 0.000 s)
    assert set(resumed.stages) == {"read", "hash", "decode", "resize", "infer", "write"}
    assert all(resumed.stages[s] > 0 for s in ("decode", "resize", "infer", "write")), \
        resumed.stages

    local_rows, local_failures = _contents(tmp_path / "local.h5")
    ray_rows, ray_failures = _contents(store)
    assert ray_failures == local_failures and len(local_failures) == 3
    assert sorted(ray_rows) == sorted(local_rows)
    for key, (sha, label, vector) in local_rows.items():
        assert ray_rows[key][:2] == (sha, label), key
        np.testing.assert_allclose(ray_rows[key][2], vector, atol=1e-5, rtol=0)

    again = extract(mixed_tree, store, backbone, engine="ray")
    assert (again.embedded, again.reused, again.unchanged, again.failed) == (0, 0, 13, 3)
    assert again.new_failures == []


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.delitem(sys.modules, "embedstore.engines.ray", raising=False)
    with pytest.raises(EngineError, match=r"pip install 'embedstore\[ray\]'"):
        get_engine("ray")

    from embedstore_cli import main

    store = tmp_path / "s.h5"
    monkeypatch.setattr(sys, "argv", ["embedstore", "extract", str(SAMPLE), str(store),
                                      "--engine", "ray"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err
    assert err.startswith("embedstore: error: ") and "pip install 'embedstore[ray]'" in err
    assert not store.exists()  # refused before touching the store


def test_ray_options_are_refused_for_the_local_engine():
    with pytest.raises(EngineError, match="address only apply"):
        get_engine("local", {"address": "auto", "num_workers": None})
    with pytest.raises(EngineError, match="unknown engine 'spark'"):
        get_engine("spark")


def test_a_pool_the_cluster_cannot_hold_is_refused(ray_session, mixed_tree, tmp_path,
                                                   backbone):
    store = tmp_path / "s.h5"
    with pytest.raises(EngineError, match="has 0 GPUs"):
        extract(mixed_tree, store, backbone, engine="ray",
                engine_options={"gpus_per_worker": 1})
    with pytest.raises(EngineError, match="leave none for decoding"):
        extract(mixed_tree, store, backbone, engine="ray", engine_options={"num_workers": 2})


def _session_processes(sid: int) -> list[str]:
    """Processes of session `sid` (a driver started with start_new_session and all it
    started, unless they left the session), as 'pid command' lines."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True)
    return [f"{f[0]} {f[2][:300]}" for f in (line.split(None, 2) for line in
                                             ps.stdout.splitlines())
            if len(f) == 3 and int(f[1]) == sid]


def test_a_killed_cli_driver_leaves_no_ray_process_and_no_ray_line(tmp_path):
    """`embedstore extract --engine ray` starts Ray on this machine; kill -9 it mid-run:
    no Ray process (gcs_server, raylet, agents, workers) outlives it, and the terminal
    got embedstore's lines only."""
    pytest.importorskip("ray")
    store = tmp_path / "s.h5"
    proc = subprocess.Popen([sys.executable, "-m", "embedstore", "extract", str(SAMPLE),
                             str(store), "--engine", "ray", "--batch-size", "4",
                             "--commit-every", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # until the first batch is committed: Ray and its actors are running
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the driver never committed"
            try:
                with open_store(store) as s:
                    if s.n_rows >= 4:
                        break
            except Exception:  # not committed yet
                pass
            time.sleep(0.2)
        running = _session_processes(proc.pid)
        assert any("raylet" in p for p in running), running
        assert any("agent" in p.lower() for p in running), running
    finally:
        proc.kill()
        out, err = proc.communicate()
    deadline = time.monotonic() + 30
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == []
    # embedstore's status line only; Ray's (e.g. its core worker's error about actor
    # restarts, printed by the driver) are in the session's logs/embedstore_driver.err
    assert out == "" and all(line.startswith("loading mobilenet_v2")
                             for line in err.splitlines() if line.strip()), err
