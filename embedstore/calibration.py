"""Probabilities you can act on: temperature scaling and the expected calibration error.

A head's probabilities p are recalibrated as softmax(log p / T), one scalar
T fitted on the validation split by minimising the log loss (Guo et al.,
2017). For logreg and dense heads, whose outputs are a softmax of logits z,
that is exactly softmax(z / T): the argmax, so accuracy, never changes, and
export folds 1/T into the last Dense layer. kNN vote shares are not a
softmax (many are exactly 0) and are left as they are.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
EPS = 1e-12


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row."""
    if temperature == 1.0:
        return proba
    z = np.log(np.clip(proba, EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the log loss of softmax(log p / T) on (proba, y)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda t: log_loss(apply_temperature(proba, float(np.exp(t))), y),
                          bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins,
    weighted by the share of rows in each."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)


def calibrate(proba: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Temperature fitted on (proba, y), and the ECE before and after.

    "After" is measured on rows T was not fitted on: T fitted on one half,
    scored on the other, both ways round, averaged. T (fitted on every row)
    is kept only if it also lowered that held-out log loss, else it is 1: on a
    few dozen validation rows a fitted T can make things worse.
    """
    y = np.asarray(y)
    halves = np.random.default_rng(seed).permutation(len(y)) % 2 == 0
    ece_after, loss_before, loss_after = [], [], []
    for fit_on in (halves, ~halves):
        t = fit_temperature(proba[fit_on], y[fit_on])
        held = apply_temperature(proba[~fit_on], t)
        ece_after.append(expected_calibration_error(held, y[~fit_on]))
        loss_before.append(log_loss(proba[~fit_on], y[~fit_on]))
        loss_after.append(log_loss(held, y[~fit_on]))
    helps = float(np.mean(loss_after)) < float(np.mean(loss_before))
    ece_before = expected_calibration_error(proba, y)
    return {"method": "temperature", "temperature": round(fit_temperature(proba, y), 6)
            if helps else 1.0, "applied": helps, "fitted_on": "validation split",
            "n": int(len(y)),
            "ece_before": round(ece_before, 6),
            "ece_after": round(float(np.mean(ece_after)) if helps else ece_before, 6),
            "ece_with_fitted_temperature": round(float(np.mean(ece_after)), 6),
            "log_loss_before": round(float(np.mean(loss_before)), 6),
            "log_loss_after": round(float(np.mean(loss_after)), 6),
            "after_measured_on": "T fitted on half the validation rows, scored on the other "
                                 "half, both ways round, averaged"}
