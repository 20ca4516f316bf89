"""similar: exact blockwise cosine search, queries by stored path or by image file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedstore.extraction import extract
from embedstore.similarity import Neighbour, SimilarError, SimilarResult, normalise, similar, top_k
from embedstore_cli.app import cli
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> Path:
    """4 classes x 6 real Fashion-MNIST images."""
    root = tmp_path_factory.mktemp("similar") / "images"
    for cls in ["Bag", "Dress", "Sandal", "Trouser"]:
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / cls).glob("*.png"))[:6]:
            shutil.copy(p, root / cls / p.name)
    path = root.parent / "store.h5"
    extract(root, path, backbone)
    return path


def test_blockwise_top_k_equals_brute_force():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 32)).astype(np.float32)
    Q = normalise(rng.normal(size=(7, 32)))
    blocks = ((a, X[a:a + 97].copy()) for a in range(0, len(X), 97))  # ragged last block
    sims, rows = top_k(Q, blocks, 5)
    full = Q @ normalise(X.copy()).T
    expected = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, axis=1), rtol=1e-5)


def test_a_reencoded_copy_finds_its_original_first(store, backbone, tmp_path):
    original = sorted((SAMPLE / "Sandal").glob("*.png"))[2]
    copy = tmp_path / "copy.jpg"
    Image.open(original).convert("RGB").save(copy, quality=75)
    [result] = similar(store, [str(copy)], k=3, backbone=backbone)
    assert result["source"] == "embedded"
    first = result["neighbours"][0]
    assert first["path"] == f"Sandal/{original.name}" and first["label"] == "Sandal"
    sims = [n["similarity"] for n in result["neighbours"]]
    assert sims == sorted(sims, reverse=True) and len(sims) == 3


def test_a_stored_path_uses_its_vector_and_leaves_itself_out(store):
    # no backbone is given or loaded: both queries are answered from the cache
    stored = similar(store, ["Bag/" + sorted(p.name for p in (SAMPLE / "Bag").glob("*.png"))[0]],
                     k=30, chunk_rows=5)[0]
    assert stored["source"] == "store"
    assert len(stored["neighbours"]) == 23  # every other row, k capped by the store
    assert stored["query"] not in [n["path"] for n in stored["neighbours"]]
    file = sorted((SAMPLE / "Dress").glob("*.png"))[0]
    cached = similar(store, [str(file)], k=2)[0]
    assert cached["source"] == "cached"
    assert cached["neighbours"][0]["path"] != f"Dress/{file.name}"


def test_a_query_that_is_neither_file_nor_stored_path_is_one_clear_error(store):
    with pytest.raises(SimilarError, match="neither an image file nor a path in"):
        similar(store, ["no/such.png"])
    result = CliRunner().invoke(cli, ["similar", str(store), "no/such.png"])
    assert result.exit_code != 0 and "neither an image file" in str(result.exception)


def test_cli_json(store):
    query = "Trouser/" + sorted(p.name for p in (SAMPLE / "Trouser").glob("*.png"))[1]
    result = CliRunner().invoke(cli, ["similar", str(store), query, "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.output)
    assert set(answer) == set(SimilarResult.__annotations__)
    assert [set(n) for n in answer["neighbours"]] == [{"row", "path", "label", "similarity"}] * 4
    assert set(Neighbour.__annotations__) == {"row", "path", "label", "similarity"}
    # a trouser's nearest neighbours in a store of bags, dresses, sandals and trousers
    assert answer["neighbours"][0]["label"] == "Trouser"
