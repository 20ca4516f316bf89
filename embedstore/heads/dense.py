"""dense: a Keras head as in the transfer-learning tutorials, trained on the cache.

Keras is imported when a dense head is built or loaded, not with this module,
so the CLI and the logreg and knn heads never import TensorFlow.
"""

from __future__ import annotations

import os
import tempfile
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from embedstore.heads import options as opt
from embedstore.heads.base import (
    CLASS_WEIGHT_CONSTRAINT,
    EmbeddingHead,
    FitSummary,
    Interval,
    StrOptions,
    class_weights,
    fit_context,
)


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

    summary = "a Keras MLP head"
    options = (
        opt.HeadOption("--hidden", "hidden", "SIZES",
                       "hidden layer sizes, e.g. 256 or 512x128; 0 for none", opt.sizes,
                       opt.show_sizes),
        opt.HeadOption("--dropout", "dropout", "FLOAT", "dropout rate", float),
        opt.HeadOption("--label-smoothing", "label_smoothing", "FLOAT", "label smoothing", float),
        opt.HeadOption("--optimizer", "optimizer", "adam|sgd", "optimizer"),
        opt.HeadOption("--learning-rate", "learning_rate", "FLOAT", "learning rate", float),
        opt.HeadOption("--momentum", "momentum", "FLOAT", "SGD momentum", float),
        opt.HeadOption("--epochs", "epochs", "INTEGER", "most epochs", int),
        opt.HeadOption("--head-batch-size", "batch_size", "INTEGER|auto",
                       "training batch size, or auto: min(512, max(32, rows/100))",
                       opt.int_or_auto),
        opt.HeadOption("--early-stopping", "early_stopping", "on|off|auto",
                       "on, off or auto: stop when the loss on a hold-out of the training rows "
                       "stops improving; auto = on above 10,000 training rows", opt.on_off_auto,
                       opt.show_on_off),
        opt.HeadOption("--patience", "patience", "INTEGER", "early-stopping patience in epochs",
                       int),
        opt.CLASS_WEIGHT,
    )
    calibrated = True

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
        "class_weight": CLASS_WEIGHT_CONSTRAINT,
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

    def check_params(self) -> None:
        super().check_params()
        self._hidden_sizes()

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

    @fit_context(prefer_skip_nested_validation=True)
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
        weights = class_weights(self.class_weight, y, self.classes_)
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

    def fit_summary(self) -> FitSummary:
        return {"epochs_run": self.n_epochs_}

    def training_history(self) -> dict[str, list[float]] | None:
        return self.history_

    def export_layer(self, dim: int, temperature: float = 1.0) -> Any:
        """The trained Keras model itself; with a temperature, a copy whose softmax layer's
        weights are divided by it."""
        import keras

        if temperature == 1.0:
            return self.model_
        x = inputs = keras.Input((dim,), name="embedding")
        for layer in self.model_.layers[:-1]:
            x = layer(x)
        last = self.model_.layers[-1]
        W, b = last.get_weights()
        out = keras.layers.Dense(W.shape[1], activation="softmax", name=last.name)
        y = out(x)
        out.set_weights([W / temperature, b / temperature])
        return keras.Model(inputs, y, name=self.model_.name)

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


HEAD = DenseHead
