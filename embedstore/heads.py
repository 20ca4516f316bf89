"""Classifier heads on embeddings, as scikit-learn estimators.

Constructors store hyper-parameters; `fit` validates them (scikit-learn's
parameter-constraints machinery, so a typo is an error everywhere), learns,
and returns self; learned state ends in `_`. Heads take arrays and know
nothing of stores or files: `fitted_state()` / `from_fitted_state()` give
their learned state as arrays, JSON values and (dense) a Keras model, which
`embedstore.headdir` writes without pickle. All three pass scikit-learn's
`check_estimator` (tests/test_sklearn_checks.py).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from numbers import Integral, Real

import numpy as np

# scikit-learn's private helpers are used here only (the parameter-constraint machinery
# and fit's context); pyproject pins the range they were tested with
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

_CLASS_WEIGHT = [dict, StrOptions({"balanced"}), None]


def _class_weights(class_weight, y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if class_weight is None:
        return np.ones(len(classes))
    if class_weight == "balanced":
        return compute_class_weight("balanced", classes=classes, y=y)
    return np.array([class_weight.get(c, 1.0) for c in classes], dtype=float)


class EmbeddingHead(ClassifierMixin, BaseEstimator):
    """What every head shares: input validation, `predict` from `predict_proba`."""

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


class LogRegHead(EmbeddingHead):
    """Standardisation + multinomial logistic regression (L-BFGS).

    `max_iter` is an iteration budget, not a safety net: every L-BFGS
    iteration streams the whole matrix through memory, and on embeddings test
    accuracy plateaus long before the tolerance is met (Fashion-MNIST 60k:
    0.897 after 40 iterations at C=0.1, 0.896 after 100).

    Parameters
    ----------
    C : float or "auto", default=0.1
        Inverse regularisation strength; "auto" chooses it from `Cs` by
        stratified `cv`-fold cross-validation on macro F1.
    Cs : tuple of float, default=(0.001, 0.01, 0.1, 1.0)
        Candidates for C="auto".
    cv : int, default=3
        Folds for C="auto" (fewer when the smallest class is smaller).
    max_iter : int, default=40
        L-BFGS iteration budget.
    tol : float, default=1e-4
        L-BFGS tolerance.
    class_weight : dict, "balanced" or None, default=None
        Weights per class, as in scikit-learn.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in fit.
    n_features_in_ : int
        Embedding dimension seen in fit.
    pipeline_ : sklearn.pipeline.Pipeline
        The fitted StandardScaler + LogisticRegression.
    C_ : float
        The C used (chosen by cross-validation when C="auto").
    cv_results_ : dict
        Mean macro F1 per candidate C (only with C="auto").
    n_iter_ : int
        L-BFGS iterations run.
    converged_ : bool
        Whether the tolerance was reached within `max_iter`.
    """

    _parameter_constraints = {
        "C": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "Cs": ["array-like"],
        "cv": [Interval(Integral, 2, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "class_weight": _CLASS_WEIGHT,
    }

    def __init__(self, C=0.1, Cs=(0.001, 0.01, 0.1, 1.0), cv: int = 3,
                 max_iter: int = 40, tol: float = 1e-4, class_weight=None):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight

    def _pipeline(self, C: float):
        return make_pipeline(StandardScaler(), LogisticRegression(
            C=C, max_iter=self.max_iter, tol=self.tol, class_weight=self.class_weight))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fit on embeddings X (n, d) and labels y (n,); returns self."""
        X, y = self._validate_fit_data(X, y)
        with warnings.catch_warnings():  # reported as converged_, not as a warning per fit
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.C == "auto":
                self._fit_cross_validated(X, y)
            else:
                self.C_ = float(self.C)
                self.pipeline_ = self._pipeline(self.C_).fit(X, y)
        self.n_iter_ = int(np.max(self.pipeline_[-1].n_iter_))
        self.converged_ = bool(self.n_iter_ < self.max_iter)
        return self

    def _fit_cross_validated(self, X, y) -> None:
        smallest = int(np.unique(y, return_counts=True)[1].min())
        n_splits = max(2, min(self.cv, smallest))
        search = GridSearchCV(self._pipeline(1.0), {"logisticregression__C": list(self.Cs)},
                              cv=StratifiedKFold(n_splits, shuffle=True, random_state=0),
                              scoring="f1_macro", n_jobs=1)
        search.fit(X, y)
        self.C_ = float(search.best_params_["logisticregression__C"])
        self.cv_results_ = {str(c): float(s) for c, s in zip(
            self.Cs, search.cv_results_["mean_test_score"])}
        self.pipeline_ = search.best_estimator_

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in `classes_` order."""
        X = self._validate_predict_data(X)
        return self.pipeline_.predict_proba(X)

    def folded_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) with the scaler folded in: softmax(X @ W + b) == predict_proba(X).

        Two classes: scikit-learn keeps one logit z with p(class 1) = sigmoid(z),
        which is softmax([0, z]), so a zero column is put in front.
        """
        check_is_fitted(self)
        scaler, lr = self.pipeline_[0], self.pipeline_[-1]
        coef, intercept = lr.coef_, lr.intercept_
        if coef.shape[0] == 1 and len(self.classes_) == 2:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        W = coef.T / scaler.scale_[:, None]
        b = intercept - (scaler.mean_ / scaler.scale_) @ coef.T
        return W.astype(np.float32), b.astype(np.float32)

    def fitted_state(self) -> dict:
        state = super().fitted_state()
        pipeline = state.pop("pipeline_")
        scaler, lr = pipeline[0], pipeline[-1]
        state.update(scaler_mean_=scaler.mean_, scaler_scale_=scaler.scale_,
                     coef_=lr.coef_, intercept_=lr.intercept_)
        return state

    @classmethod
    def from_fitted_state(cls, params: dict, state: dict) -> LogRegHead:
        state = dict(state)
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = state.pop("scaler_mean_"), state.pop("scaler_scale_")
        scaler.var_ = scaler.scale_ ** 2
        lr = LogisticRegression()
        lr.coef_, lr.intercept_ = state.pop("coef_"), state.pop("intercept_")
        lr.classes_ = state["classes_"]
        for est in (scaler, lr):
            est.n_features_in_ = int(state["n_features_in_"])
        head = super().from_fitted_state(params, state)
        head.pipeline_ = make_pipeline(scaler, lr)
        return head


class KNNHead(EmbeddingHead):
    """k nearest neighbours by cosine similarity (brute force on L2-normalised rows).

    Probabilities are the (class-weighted) share of the k votes; with
    weights="distance" each vote counts by its cosine similarity.

    Parameters
    ----------
    k : int, default=10
        Neighbours that vote (fewer when fit saw fewer rows).
    weights : {"uniform", "distance"}, default="uniform"
        Equal votes, or votes weighted by similarity.
    class_weight : dict, "balanced" or None, default=None
        Multiplies each neighbour's vote by its class's weight.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in fit.
    n_features_in_ : int
        Embedding dimension seen in fit.
    X_ : ndarray of shape (n_train, n_features)
        The L2-normalised training embeddings.
    index_ : sklearn.neighbors.NearestNeighbors
        Brute-force search over `X_`.
    y_index_ : ndarray of shape (n_train,)
        Index into `classes_` of each training row.
    class_weight_ : ndarray of shape (n_classes,)
        Vote weight per class.
    k_ : int
        Neighbours actually used: min(k, n_train).
    """

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "weights": [StrOptions({"uniform", "distance"})],
        "class_weight": _CLASS_WEIGHT,
    }

    def __init__(self, k: int = 10, weights: str = "uniform", class_weight=None):
        self.k = k
        self.weights = weights
        self.class_weight = class_weight

    @staticmethod
    def _normalise(X: np.ndarray) -> np.ndarray:
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fit on embeddings X (n, d) and labels y (n,); returns self."""
        X, y = self._validate_fit_data(X, y)
        self.X_ = self._normalise(X)
        self.y_index_ = np.searchsorted(self.classes_, y)
        self.class_weight_ = _class_weights(self.class_weight, y, self.classes_)
        self.k_ = int(min(self.k, len(y)))
        self.index_ = self._build_index(self.X_, self.k_)
        return self

    @staticmethod
    def _build_index(X: np.ndarray, k: int) -> NearestNeighbors:
        # brute force computes the search in bounded chunks (sklearn's working_memory)
        return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in `classes_` order."""
        X = self._normalise(self._validate_predict_data(X))
        dist, idx = self.index_.kneighbors(X)
        votes = np.ones_like(dist) if self.weights == "uniform" else 1.0 - dist ** 2 / 2
        votes = np.maximum(votes, 1e-6) * self.class_weight_[self.y_index_[idx]]
        out = np.zeros((len(idx), len(self.classes_)))
        np.add.at(out, (np.arange(len(idx))[:, None], self.y_index_[idx]), votes)
        return out / out.sum(axis=1, keepdims=True)

    def fitted_state(self) -> dict:
        state = super().fitted_state()
        del state["index_"]  # derived from X_: rebuilt on load, never saved
        return state

    @classmethod
    def from_fitted_state(cls, params: dict, state: dict) -> KNNHead:
        head = super().from_fitted_state(params, state)
        head.index_ = cls._build_index(head.X_, int(head.k_))
        return head


class DenseHead(EmbeddingHead):
    """A Keras head as in the transfer-learning tutorials, trained on the cache.

    Normalisation (fitted on the training rows) -> [Dense(relu) -> Dropout]
    per hidden size -> Dense(softmax). Categorical cross-entropy with label
    smoothing; Adam, or SGD with momentum; a fixed number of epochs, or early
    stopping on the loss of a hold-out of the training rows (restoring the
    best weights).

    Parameters
    ----------
    hidden : tuple of int, default=(256,)
        Hidden layer sizes; () for none (softmax on the normalised input).
    dropout : float, default=0.2
        Dropout after each hidden layer (or on the input when there is none).
    label_smoothing : float, default=0.0
        Label smoothing of the cross-entropy.
    optimizer : {"adam", "sgd"}, default="adam"
        Adam, or SGD with `momentum`.
    learning_rate : float, default=1e-3
        Optimizer learning rate.
    momentum : float, default=0.9
        SGD momentum (ignored by Adam).
    epochs : int, default=20
        Most epochs.
    batch_size : int or "auto", default="auto"
        Rows per step; "auto" is min(512, max(32, n_rows // 100)), as in
        scikit-learn's MLP.
    early_stopping : bool or "auto", default="auto"
        Stop when the hold-out loss stops improving, keeping the best weights.
        "auto": only with `validation_data` or more than
        EARLY_STOPPING_MIN_ROWS (10,000) training rows, as scikit-learn's
        HistGradientBoosting does. A small hold-out cannot choose an epoch: on
        157 images its ~13 rows had their lowest loss after epoch 1, the
        epoch-1 weights were kept, and accuracy fell from 0.886 to 0.786.
    patience : int, default=3
        Epochs without improvement before stopping.
    validation_fraction : float, default=0.1
        Share of the training rows held out for early stopping (stratified,
        at least one row per class).
    class_weight : dict, "balanced" or None, default=None
        Loss weight per class.
    random_state : int, default=0
        Seed for the hold-out split, initialisation and shuffling.
    verbose : int, default=0
        Keras verbosity.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels seen in fit.
    n_features_in_ : int
        Embedding dimension seen in fit.
    model_ : keras.Model
        The trained network, embeddings -> probabilities.
    history_ : dict
        Per-epoch "loss", "accuracy" (training rows) and, with early
        stopping, "val_loss", "val_accuracy" (the hold-out of training rows,
        not the validation split).
    n_epochs_ : int
        Epochs run.
    early_stopping_ : bool
        Whether this fit early-stopped on a hold-out.
    batch_size_ : int
        Batch size used.
    """

    EARLY_STOPPING_MIN_ROWS = 10_000  # "auto" early-stops above this: a 1000-row hold-out

    _parameter_constraints = {
        "hidden": ["array-like"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "optimizer": [StrOptions({"adam", "sgd"})],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "patience": [Interval(Integral, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "class_weight": _CLASS_WEIGHT,
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["verbose"],
    }

    def __init__(self, hidden=(256,), dropout: float = 0.2, label_smoothing: float = 0.0,
                 optimizer: str = "adam", learning_rate: float = 1e-3, momentum: float = 0.9,
                 epochs: int = 20, batch_size="auto", early_stopping: bool | str = "auto",
                 patience: int = 3, validation_fraction: float = 0.1, class_weight=None,
                 random_state: int = 0, verbose: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state
        self.verbose = verbose

    def _hidden_sizes(self) -> list[int]:
        sizes = [int(u) for u in (self.hidden or ())]
        if any(u < 1 for u in sizes):
            raise ValueError(f"hidden sizes must be positive, not {tuple(self.hidden)}")
        return sizes

    def _build(self, X, n_classes: int):
        import keras

        norm = keras.layers.Normalization(name="normalise")
        norm.adapt(X)
        layers = [keras.Input((X.shape[1],), name="embedding"), norm]
        for i, units in enumerate(self._hidden_sizes()):
            layers += [keras.layers.Dense(units, activation="relu", name=f"hidden_{i}"),
                       keras.layers.Dropout(self.dropout, name=f"dropout_{i}")]
        if not self._hidden_sizes() and self.dropout:
            layers.append(keras.layers.Dropout(self.dropout, name="dropout"))
        layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
        model = keras.Sequential(layers, name="dense_head")
        if self.optimizer == "adam":
            opt = keras.optimizers.Adam(self.learning_rate)
        else:
            opt = keras.optimizers.SGD(self.learning_rate, momentum=self.momentum)
        # A head's step is tiny: run 32 of them per call, or Python overhead dominates
        # (bench/bench_dense_defaults.py).
        model.compile(opt, keras.losses.CategoricalCrossentropy(
            label_smoothing=self.label_smoothing), metrics=["accuracy"],
            steps_per_execution=32)
        return model

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, validation_data=None):
        """Fit on embeddings X (n, d) and labels y (n,); returns self.

        validation_data=(X_val, y_val) replaces the hold-out of training rows
        for early stopping.
        """
        import keras

        X, y = self._validate_fit_data(X, y)
        self._hidden_sizes()
        keras.utils.set_random_seed(self.random_state)
        if self.early_stopping == "auto":
            self.early_stopping_ = (validation_data is not None
                                    or len(y) > self.EARLY_STOPPING_MIN_ROWS)
        else:
            self.early_stopping_ = bool(self.early_stopping)
        if validation_data is None and self.early_stopping_:
            # stratified, at least one row per class; off where no such split exists
            holdout = max(int(np.ceil(self.validation_fraction * len(y))), len(self.classes_))
            counts = np.unique(y, return_counts=True)[1]
            self.early_stopping_ = (self.validation_fraction > 0 and counts.min() >= 2
                                    and len(y) - holdout >= len(self.classes_))
        if validation_data is None and self.early_stopping_:
            X, Xv, y, yv = train_test_split(X, y, test_size=holdout, stratify=y,
                                            random_state=self.random_state)
            validation_data = (Xv, yv)
        n = len(self.classes_)
        onehot = lambda labels: keras.utils.to_categorical(  # noqa: E731
            np.searchsorted(self.classes_, labels), n)
        val = None if validation_data is None else (
            np.asarray(validation_data[0], np.float32), onehot(validation_data[1]))
        weights = _class_weights(self.class_weight, y, self.classes_)
        callbacks = []
        if self.early_stopping_:
            callbacks.append(keras.callbacks.EarlyStopping(
                "val_loss", patience=self.patience, restore_best_weights=True))
        self.model_ = self._build(X, n)
        # "auto": like scikit-learn's MLP, sized to the data; ~100 steps an epoch
        # on small sets, capped at 512 rows so large sets run fast
        self.batch_size_ = (min(512, max(32, len(X) // 100)) if self.batch_size == "auto"
                            else int(self.batch_size))
        hist = self.model_.fit(X, onehot(y), validation_data=val, epochs=self.epochs,
                               batch_size=self.batch_size_, callbacks=callbacks,
                               class_weight=dict(enumerate(weights)) if self.class_weight else None,
                               verbose=self.verbose, shuffle=True)
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        self.n_epochs_ = len(hist.epoch)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in `classes_` order."""
        X = self._validate_predict_data(X)
        # eager calls in blocks: Keras's predict() compiles a function per model, which
        # a sweep or cross-validation (a new model per fit) answers with retracing warnings
        blocks = [np.asarray(self.model_(X[i:i + 4096], training=False))
                  for i in range(0, len(X), 4096)]
        return np.concatenate(blocks).astype(np.float64)

    # Pickle carries the Keras model as its .keras bytes, so a pickled head is complete.
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object's is the live __dict__
        if "model_" in state:
            state["model_"] = keras_model_to_bytes(state["model_"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            state["model_"] = keras_model_from_bytes(state["model_"])
        super().__setstate__(state)


def keras_model_to_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def keras_model_from_bytes(data: bytes):
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.models.load_model(path, compile=False, safe_mode=True)


HEADS: dict[str, type[EmbeddingHead]] = {"logreg": LogRegHead, "dense": DenseHead,
                                         "knn": KNNHead}


def make_head(kind: str, **params) -> EmbeddingHead:
    """A head by registry name, with hyper-parameters (validated when it is fit)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return HEADS[kind](**params)


def validate_head_params(kind: str, params: dict) -> None:
    """Raise scikit-learn's InvalidParameterError (a ValueError naming the parameter)
    for values fit would refuse, without fitting."""
    head = make_head(kind, **params)
    head._validate_params()
    if isinstance(head, DenseHead):
        head._hidden_sizes()


def param_choices(param: str) -> list[str]:
    """The strings a hyper-parameter allows, for heads whose constraint on it is only
    strings (e.g. weights: uniform, distance); [] otherwise."""
    found: set[str] = set()
    for cls in HEADS.values():
        constraints = getattr(cls, "_parameter_constraints", {}).get(param, [])
        if constraints and all(isinstance(c, StrOptions) for c in constraints):
            found |= {o for c in constraints for o in c.options}
    return sorted(found)


def head_kind(head: BaseEstimator) -> str:
    return next(k for k, cls in HEADS.items() if isinstance(head, cls))

