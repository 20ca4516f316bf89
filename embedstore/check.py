"""The backbone check: classify photos with the backbone's own ImageNet head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedstore.backbones import imagenet_class_names, load_backbone
from embedstore.pipeline import DecodeError, Resizer, decode_image


def sample_photos() -> list[str]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg): always installed."""
    import sklearn.datasets

    return sorted(str(p) for p in (Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))


def check_images(paths: list[str], backbone: str = "mobilenet_v2", top: int = 5) -> list[dict]:
    """[{path, top5: [{label, probability}]}] per image, or {path, error}."""
    bb = load_backbone(backbone)
    names = imagenet_class_names()
    resizer = Resizer(bb.input_size, bb.crop_fraction)
    results = []
    for path in paths:
        try:
            pixels = resizer.batch([decode_image(Path(path).read_bytes(),
                                                 min_side=resizer.min_side)])
        except (DecodeError, OSError) as exc:
            results.append({"path": path, "error": str(exc)})
            continue
        probs = bb.classify(pixels)[0]
        best = np.argsort(-probs)[:top]
        results.append({"path": path, "top5": [
            {"label": names[i] if probs.shape[0] == len(names) else str(i),
             "probability": float(probs[i])} for i in best]})
    return results
