"""scikit-learn's own estimator checks, for every head."""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedstore import DenseHead, KNNHead, LogRegHead
from embedstore.heads import make_head, validate_head_params

# Small and quick, but a real dense head: it still has to learn sklearn's test problems.
CHECKED = [LogRegHead(), KNNHead(), DenseHead(hidden=(16,), epochs=12, learning_rate=0.01)]


def expected_failures(estimator) -> dict:
    return {}


# one class (check_classifiers_one_label): a softmax over one unit is right, and Keras
# warns about it anyway
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1:UserWarning",
                            "ignore:In loss categorical_crossentropy:SyntaxWarning")
@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failures)
def test_head_passes_sklearn_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("kind, params, name", [
    ("knn", {"weights": "distnace"}, "weights"),
    ("knn", {"k": 0}, "k"),
    ("logreg", {"C": -1.0}, "C"),
    ("logreg", {"class_weight": "balance"}, "class_weight"),
    ("dense", {"optimizer": "adamw"}, "optimizer"),
    ("dense", {"batch_size": "big"}, "batch_size"),
    ("dense", {"dropout": 1.5}, "dropout"),
])
def test_a_bad_hyper_parameter_is_an_error_naming_it(kind, params, name):
    with pytest.raises(ValueError, match=f"'{name}' parameter"):
        validate_head_params(kind, params)
    with pytest.raises(ValueError, match=f"'{name}' parameter"):
        make_head(kind, **params).fit([[0.0, 1.0], [1.0, 0.0]], [0, 1])
