"""The dense head's defaults on small sets, and what its training-curve plots say."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from embedstore import DenseHead, LogRegHead
from embedstore.evaluate import plot_training_curves
from embedstore.store import open_store


@pytest.fixture(scope="module")
def sample_split(sample_store):
    with open_store(sample_store) as s:
        X, y = s.embeddings(), s.labels
    return train_test_split(X, y, test_size=100, stratify=y, random_state=0)


def test_default_dense_trains_every_epoch_on_a_small_set_and_matches_logreg(sample_split):
    X_train, X_test, y_train, y_test = sample_split  # 200 real rows, 10 classes
    dense = DenseHead().fit(X_train, y_train)
    # no 10%-hold-out early stopping here: it kept the epoch-1 weights on ~13-row hold-outs
    assert dense.early_stopping_ is False
    assert dense.n_epochs_ == dense.epochs and "val_loss" not in dense.history_
    assert dense.history_["loss"][-1] < dense.history_["loss"][0] / 2
    logreg = LogRegHead().fit(X_train, y_train)
    assert dense.score(X_test, y_test) >= logreg.score(X_test, y_test) - 0.05


def test_forced_early_stopping_holds_out_a_row_of_every_class(sample_split):
    X_train, _, y_train, _ = sample_split
    X, _, y, _ = train_test_split(X_train, y_train, train_size=40, stratify=y_train,
                                  random_state=0)  # 10% is 4 rows for 10 classes: main failed
    head = DenseHead(early_stopping=True, epochs=3).fit(X, y)
    assert head.early_stopping_ and "val_loss" in head.history_
    assert list(head.classes_) == sorted(set(y))


def test_auto_early_stopping_switches_on_above_the_size_threshold():
    X, y = make_classification(400, 16, n_informative=8, n_classes=3, random_state=0)
    head = DenseHead(epochs=2)
    head.EARLY_STOPPING_MIN_ROWS = 300  # the same rule as at 10,000 rows, at test size
    assert head.fit(X, y).early_stopping_ and "val_loss" in head.history_
    assert not DenseHead(epochs=2).fit(X, y).early_stopping_
    assert DenseHead(epochs=2).fit(X, y, validation_data=(X[:30], y[:30])).early_stopping_
    with pytest.raises(ValueError, match="early_stopping"):
        DenseHead(early_stopping="yes").fit(X, y)


def test_training_curves_name_the_hold_out_and_tick_whole_epochs(tmp_path, monkeypatch):
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig),
                                                                  save(fig, *a, **k))[1])
    history = {"loss": [1.0, 0.6, 0.5], "val_loss": [1.1, 0.8, 0.9],
               "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.4, 0.6, 0.6]}
    paths = plot_training_curves(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    for fig in figures:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("early-stopping hold-out" in t for t in legend)
        assert "not the validation split in metrics.json" in ax.get_title()
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
