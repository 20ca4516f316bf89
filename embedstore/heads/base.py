"""What every head is: a scikit-learn classifier on embeddings, plus what the rest of
embedstore asks of a head (its CLI options, export layer, training history).

Constructors store hyper-parameters; `fit` validates them (scikit-learn's
parameter-constraints machinery, so a typo is an error everywhere), learns,
and returns self; learned state ends in `_`. Heads take arrays and know
nothing of stores or files: `fitted_state()` / `from_fitted_state()` give
their learned state as arrays, JSON values and (dense) a Keras model, which
`embedstore.headdir` writes without pickle. Every head passes scikit-learn's
`check_estimator` (tests/test_sklearn_checks.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypedDict

import numpy as np

# scikit-learn's private helpers are imported here only (the parameter-constraint
# machinery and fit's context); head modules take them from this module, and
# pyproject pins the scikit-learn range they were tested with
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.base import _fit_context as fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from embedstore.heads.options import HeadOption

__all__ = ["CLASS_WEIGHT_CONSTRAINT", "EmbeddingHead", "FitSummary", "Interval", "StrOptions",
           "class_weights", "fit_context"]

CLASS_WEIGHT_CONSTRAINT = [dict, StrOptions({"balanced"}), None]


def class_weights(class_weight, y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Weight per class of `classes`: none, balanced, or a dict class -> weight."""
    if class_weight is None:
        return np.ones(len(classes))
    if class_weight == "balanced":
        return compute_class_weight("balanced", classes=classes, y=y)
    return np.array([class_weight.get(c, 1.0) for c in classes], dtype=float)


class FitSummary(TypedDict, total=False):
    """What a fit chose or how it went, as metrics.json records it (each where it applies)."""

    chosen_C: float  # logreg: the C used (chosen by cross-validation with C="auto")
    converged: bool  # logreg: L-BFGS met its tolerance within max_iter
    epochs_run: int  # dense: epochs trained (early stopping may end sooner)


class EmbeddingHead(ClassifierMixin, BaseEstimator):
    """What every head shares: input validation, `predict` from `predict_proba`, and the
    hooks train, evaluate, export and the CLI read instead of testing for a head class."""

    summary: ClassVar[str] = ""  # one line for --head's help
    options: ClassVar[tuple[HeadOption, ...]] = ()  # its hyper-parameters as CLI flags
    # probabilities are a softmax of logits, so temperature scaling applies exactly
    calibrated: ClassVar[bool] = False
    # why its export layer is not a standard Keras layer ("" when it is): such a head's
    # .keras export would need embedstore to load, so export refuses that format
    nonstandard_export: ClassVar[str] = ""

    def _validate_fit_data(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        return X, y

    def _validate_predict_data(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float32, reset=False)

    def predict(self, X) -> np.ndarray:
        """Most probable class of each row of X (an element of `classes_`)."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def check_params(self) -> None:
        """Raise scikit-learn's InvalidParameterError (a ValueError naming the parameter)
        for hyper-parameters fit would refuse, without fitting."""
        self._validate_params()

    @classmethod
    def string_choices(cls, param: str) -> set[str]:
        """The strings `param` allows when its constraint is strings only (e.g. weights:
        uniform, distance); empty otherwise."""
        constraints = getattr(cls, "_parameter_constraints", {}).get(param, [])
        if constraints and all(isinstance(c, StrOptions) for c in constraints):
            return {o for c in constraints for o in c.options}
        return set()

    def fit_summary(self) -> FitSummary:
        """What this fit chose or how it went, for metrics.json."""
        return {}

    def training_history(self) -> dict[str, list[float]] | None:
        """Per-epoch curves ("loss", "accuracy", "val_*") for a head trained in epochs."""
        return None

    def folded_linear(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(W, b) with softmax(X @ W + b) == predict_proba(X), for a head that is one
        linear softmax; None for any other."""
        return None

    def export_layer(self, dim: int, temperature: float = 1.0) -> Any:
        """The fitted head as a Keras layer (or model) from embeddings to probabilities, with
        a calibration temperature folded in (softmax(z / T)); export stacks it on the backbone."""
        raise NotImplementedError(f"{type(self).__name__} has no export layer")

    def fitted_state(self) -> dict:
        """Learned state: name -> ndarray, JSON value or Keras model (no pickle needed)."""
        check_is_fitted(self)
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    @classmethod
    def from_fitted_state(cls, params: dict, state: dict) -> EmbeddingHead:
        head = cls(**params)
        for name, value in state.items():
            setattr(head, name, value)
        return head


def softmax_layer(W: np.ndarray, b: np.ndarray, temperature: float, name: str) -> Any:
    """A built Keras Dense softmax computing softmax((X @ W + b) / T)."""
    import keras

    layer = keras.layers.Dense(W.shape[1], activation="softmax", name=name)
    layer.build((None, W.shape[0]))
    layer.set_weights([W / temperature, b / temperature])
    return layer
