"""audit: planted copies come back as groups with their originals (same class, another
class, across the split), planted wrong labels rank near the top; evaluate warns of leaks."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedstore.auditing import (
    AuditReport,
    AuditSummary,
    DuplicateGroup,
    GroupMember,
    LabelError,
    Outlier,
    audit,
    near_duplicate_pairs,
)
from embedstore.extraction import extract
from embedstore.splits import hash_unit
from embedstore_cli.app import cli
from tests.conftest import SAMPLE

CLASSES = ["Bag", "Sandal", "Trouser", "Dress"]


def _jpeg(path: Path, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _in_validation(data: bytes) -> bool:
    """The split `train` (val_fraction 0.2, seed 0) gives this content, before the nudges
    that only touch classes left without a training or validation image."""
    return hash_unit(hashlib.sha256(data).hexdigest(), 0) < 0.2


@pytest.fixture(scope="module")
def planted(tmp_path_factory, backbone) -> dict:
    """4 classes x 10 real images, plus: a re-encoded copy in its own class, a byte copy
    under another class, a re-encoded copy on the other side of the split from its
    original, and two images filed under the wrong class."""
    root = tmp_path_factory.mktemp("audit") / "images"
    files = {c: sorted((SAMPLE / c).glob("*.png"))[:10] for c in CLASSES}
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for p in files[c]:
            shutil.copy(p, root / c / p.name)
    same = files["Bag"][1]
    (root / "Bag" / "copy-same-class.jpg").write_bytes(_jpeg(same, 90))
    other = files["Sandal"][2]
    shutil.copy(other, root / "Trouser" / "copy-other-class.png")
    # a copy whose content hash lands on the other side of the split from its original
    leak_src = files["Dress"][3]
    original_in_val = _in_validation(leak_src.read_bytes())
    leak = next(d for q in range(80, 100) for d in [_jpeg(leak_src, q)]
                if _in_validation(d) != original_in_val)
    (root / "Dress" / "copy-across-split.jpg").write_bytes(leak)
    wrong = [files["Trouser"][5], files["Sandal"][6]]
    shutil.move(root / "Trouser" / wrong[0].name, root / "Bag" / "wrong-trouser.png")
    shutil.move(root / "Sandal" / wrong[1].name, root / "Dress" / "wrong-sandal.png")
    store = root.parent / "store.h5"
    extract(root, store, backbone)
    return {"store": store, "root": root, "same": f"Bag/{same.name}",
            "other": f"Sandal/{other.name}", "leak": f"Dress/{leak_src.name}",
            "wrong": ["Bag/wrong-trouser.png", "Dress/wrong-sandal.png"]}


@pytest.fixture(scope="module")
def result(planted) -> dict:
    return audit(planted["store"], top=None)


def _group_with(result: dict, path: str) -> dict:
    return next(g for g in result["duplicates"] if path in [m["path"] for m in g["members"]])


def test_planted_copies_come_back_as_groups_with_their_originals(planted, result):
    same = _group_with(result, planted["same"])
    assert {m["path"] for m in same["members"]} == {planted["same"], "Bag/copy-same-class.jpg"}
    assert not same["exact"] and not same["across_classes"]
    other = _group_with(result, planted["other"])
    assert {m["path"] for m in other["members"]} == {planted["other"],
                                                      "Trouser/copy-other-class.png"}
    assert other["exact"] and other["across_classes"]
    assert "Sandal vs Trouser" in other["reason"]
    leak = _group_with(result, planted["leak"])
    assert "Dress/copy-across-split.jpg" in [m["path"] for m in leak["members"]]
    assert leak["across_split"] and "leak" in leak["reason"]
    # leaks and label conflicts are listed before groups that are neither
    flags = [(g["across_split"] or g["across_classes"]) for g in result["duplicates"]]
    assert flags == sorted(flags, reverse=True)


def test_planted_wrong_labels_rank_near_the_top(planted, result):
    ranked = [e["path"] for e in result["label_errors"]]
    for path in planted["wrong"]:
        assert path in ranked[:6], (path, ranked[:6])
    by_path = {e["path"]: e for e in result["label_errors"]}
    assert by_path["Bag/wrong-trouser.png"]["suggested"] == "Trouser"
    assert by_path["Dress/wrong-sandal.png"]["suggested"] == "Sandal"


def test_outliers_are_ranked_with_a_reason(result):
    scores = [o["score"] for o in result["outliers"]]
    assert scores == sorted(scores, reverse=True)
    assert all("nearest" in o["reason"] for o in result["outliers"])


def test_the_result_is_an_audit_report(result):
    """Every key the TypedDicts name is there, and nothing else (they are the JSON's shape)."""
    assert set(result) == set(AuditReport.__annotations__)
    assert set(result["summary"]) == set(AuditSummary.__annotations__)
    assert result["duplicates"] and result["label_errors"] and result["outliers"]
    for group in result["duplicates"]:
        assert set(group) == set(DuplicateGroup.__annotations__)
        assert all(set(m) == set(GroupMember.__annotations__) for m in group["members"])
    assert all(set(e) == set(LabelError.__annotations__) for e in result["label_errors"])
    assert all(set(o) == set(Outlier.__annotations__) for o in result["outliers"])


def test_mutual_nearest_neighbours_pair_below_the_threshold():
    # rows 0 and 1: each other's nearest at 0.92 with a clear lead; 2 and 3 at 0.92 but
    # row 3 has another neighbour almost as close, so they are not paired
    sims = np.array([[0.92, 0.5], [0.92, 0.6], [0.92, 0.91], [0.92, 0.91]], np.float32)
    rows = np.array([[1, 2], [0, 2], [3, 0], [2, 0]])
    assert [(i, j) for i, j, _ in near_duplicate_pairs(sims, rows)] == [(0, 1)]
    assert near_duplicate_pairs(sims, rows, mutual_threshold=0.95) == []


def test_cli_report_and_evaluate_warning(planted, tmp_path):
    runner = CliRunner()
    report = tmp_path / "report"
    out = runner.invoke(cli, ["audit", str(planted["store"]), "--json", "--report", str(report),
                              "--images", str(planted["root"])])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["summary"]["groups_across_split"] >= 1
    for name in ("index.html", "duplicates.png", "label_errors.png", "map.png"):
        assert (report / name).stat().st_size > 1000
    assert "copy-across-split.jpg" in (report / "index.html").read_text()
    head = tmp_path / "head"
    assert runner.invoke(cli, ["train", str(planted["store"]), str(head)]).exit_code == 0
    ev = runner.invoke(cli, ["evaluate", str(head), "--no-plots"])
    assert ev.exit_code == 0 and "near duplicate among the training images" in ev.stderr
