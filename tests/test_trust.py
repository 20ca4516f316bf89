"""Trust boundaries: names and links read from files never reach outside what the user asked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from embedstore import backbones
from embedstore.backbones import BackboneError
from embedstore.extraction import extract
from embedstore.prediction import predict
from embedstore.sources import SourceError, scan
from embedstore.store import open_store
from embedstore.training import train
from embedstore_cli.app import cli
from tests.conftest import SAMPLE


@pytest.fixture
def escaping_tree(tmp_path):
    """A class tree with links to a file outside, a folder outside, and one inside."""
    root = tmp_path / "images"
    (root / "Bag").mkdir(parents=True)
    shutil.copy(sorted((SAMPLE / "Bag").glob("*.png"))[0], root / "Bag" / "real.png")
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(sorted((SAMPLE / "Sneaker").glob("*.png"))[0], outside / "private.png")
    (root / "Bag" / "passwd.png").symlink_to("/etc/passwd")
    (root / "Sneaker").symlink_to(outside)  # a whole class folder outside the root
    (root / "Bag" / "inside.png").symlink_to(root / "Bag" / "real.png")
    return root


def test_links_out_of_the_root_are_not_read_by_default(escaping_tree):
    src = scan(escaping_tree)
    assert [r.relpath for r in src.images] == ["Bag/inside.png", "Bag/real.png"]
    assert sorted(s.relpath for s in src.skipped) == ["Bag/passwd.png", "Sneaker"]
    assert all("--follow-links" in s.reason for s in src.skipped)
    followed = scan(escaping_tree, follow_links=True)
    assert "Sneaker/private.png" in [r.relpath for r in followed.images]


def test_extract_records_escaping_links_as_failures(escaping_tree, backbone, tmp_path):
    store = tmp_path / "s.h5"
    result = extract(escaping_tree, store, backbone)
    assert result.embedded + result.reused == 2 and result.failed == 2
    with open_store(store) as s:
        assert sorted(s.paths) == ["Bag/inside.png", "Bag/real.png"]
        assert sorted(f["path"] for f in s.failures()) == ["Bag/passwd.png", "Sneaker"]
    again = extract(escaping_tree, store, backbone, prune=True)
    assert again.new_failures == [] and again.pruned == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_folder_is_a_failure_not_silence(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (root / "b").mkdir()
    (root / "b").chmod(0)
    try:
        assert [s.relpath for s in scan(root).skipped] == ["b"]
    finally:
        (root / "b").chmod(0o755)


def test_sources_say_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no image files"):
        scan(tmp_path / "empty")
    image = shutil.copy(sorted((SAMPLE / "Bag").glob("*.png"))[0], tmp_path / "one.png")
    single = scan(image)  # one image is accepted as it is
    assert [r.relpath for r in single.images] == ["one.png"] and not single.labelled
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SourceError, match="neither an image .* nor a UTF-8 file list"):
        scan(binary)


def test_a_file_named_backbone_is_never_loaded_without_the_user(sample_store, tmp_path,
                                                                monkeypatch):
    """A manifest (or a store it was copied from) may name a SavedModel: it runs graphs."""
    head = tmp_path / "head"
    train(sample_store, head)
    manifest = json.loads((head / "manifest.json").read_text())
    manifest["backbone"]["name"] = f"hub:{tmp_path / 'planted'}"
    (head / "manifest.json").write_text(json.dumps(manifest))

    def never(name):
        raise AssertionError(f"loaded {name}")

    monkeypatch.setattr(backbones, "load_backbone", never)
    monkeypatch.setattr("embedstore.backbones.runtimes.tflite.load_backbone", never)
    monkeypatch.setattr("embedstore.backbones.runtimes.keras.load_backbone", never)
    image = str(sorted((SAMPLE / "Bag").glob("*.png"))[0])
    with pytest.raises(BackboneError, match="only when you name it yourself: add --backbone hub:"):
        predict(head, [image])
    result = CliRunner().invoke(cli, ["export", str(head), str(tmp_path / "x")])
    assert result.exit_code == 1 and "add --backbone hub:" in str(result.exception)
    monkeypatch.undo()
    # a backbone the user names is accepted when its fingerprint is the manifest's
    assert predict(head, [image], backbone="mobilenet_v2", runtime="keras")[0]["label"]


INTERRUPTED = ["embedstore: interrupted; committed work is kept, re-run to resume"]


def _interrupt_when(wait_ready, python_args=()) -> tuple[int, list[str]]:
    """Start `embedstore backbone check` (seconds of work after start-up) and send Ctrl-C
    once `wait_ready(proc, lines)` returns: a real readiness signal, not a sleep, so
    that it holds on a busy machine. The exit code and stderr's lines."""
    proc = subprocess.Popen([sys.executable, *python_args, "-m", "embedstore", "backbone",
                             "check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    try:
        wait_ready(proc, lines)
        proc.send_signal(signal.SIGINT)
        lines += proc.communicate(timeout=300)[1].splitlines()
    finally:
        proc.kill()
    # click ends the terminal's "^C" with a newline once a command runs: no blank lines
    return proc.returncode, [x for x in lines if x and not x.startswith("import time:")]


@pytest.mark.parametrize("module", ["click", "numpy", "embedstore.pipeline"])
def test_ctrl_c_while_the_command_line_imports_is_one_line(module):
    """-X importtime writes a line as each import completes: Ctrl-C right after `module`
    was imported, while the command line is still starting up."""
    def imported(proc, lines) -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.split("|")[-1].strip() == module:
                return

    code, lines = _interrupt_when(imported, ["-X", "importtime"])
    assert code == 130 and lines == INTERRUPTED, lines


def test_ctrl_c_during_tensorflow_start_up_is_one_line():
    """Ctrl-C once TensorFlow's library is mapped into the process: mid-import."""
    def tensorflow_loading(proc, lines) -> None:
        while proc.poll() is None:
            with open(f"/proc/{proc.pid}/maps") as maps:
                if "tensorflow" in maps.read():
                    return
            time.sleep(0.01)

    code, lines = _interrupt_when(tensorflow_loading)
    assert code == 130 and lines == INTERRUPTED, lines


def test_a_planted_backbone_directory_cannot_run_code(sample_store, tmp_path):
    """A manifest may name a backbone directory; its .keras loads in safe mode, which
    refuses a layer that points at an arbitrary Python callable."""
    import zipfile

    import keras

    head = tmp_path / "head"
    train(sample_store, head)
    manifest = json.loads((head / "manifest.json").read_text())
    planted = tmp_path / "planted"
    planted.mkdir()
    cfg = manifest["backbone"]["config"]
    (planted / "backbone.json").write_text(json.dumps({**cfg, "dim": manifest["backbone"]["dim"]}))
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(tmp_path / "ok.keras")
    marker = tmp_path / "ran"
    with zipfile.ZipFile(tmp_path / "ok.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][-1].update({"module": "os", "class_name": "system",
                                            "registered_name": None,
                                            "config": f"touch {marker}"})
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(planted / "backbone.keras", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    manifest["backbone"]["name"] = str(planted)
    (head / "manifest.json").write_text(json.dumps(manifest))
    image = str(sorted((SAMPLE / "Bag").glob("*.png"))[0])
    with pytest.raises(BackboneError, match="not a readable embedstore backbone"):
        predict(head, [image])
    assert not marker.exists()
