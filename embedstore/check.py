"""The backbone check: classify photos with the backbone's own ImageNet head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedstore.backbones import imagenet_class_names, load_backbone
from embedstore.pipeline import DecodeError, Resizer, decode_image

# what a correct port of the default weights calls each bundled sample photo (top 1);
# scikit-learn's flower.jpg has no ImageNet class, so it is shown but not judged
KNOWN_LABELS = {("sklearn", "china.jpg"): "palace", ("skimage", "coffee.png"): "espresso"}


def _sample_files() -> dict[str, tuple[str, str]]:
    """resolved path -> (package, file name) of the bundled photos that are installed."""
    import sklearn.datasets

    found = {str(p.resolve()): ("sklearn", p.name)
             for p in (Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg")}
    try:  # scikit-image is optional: its coffee.png is the clearest single-object photo
        import skimage
    except ImportError:
        return found
    coffee = Path(skimage.__file__).parent / "data" / "coffee.png"
    if coffee.is_file():
        found[str(coffee.resolve())] = ("skimage", coffee.name)
    return found


def sample_photos() -> list[str]:
    """scikit-learn's bundled photos (china.jpg, flower.jpg), and scikit-image's coffee.png
    when scikit-image is installed."""
    return sorted(_sample_files())


def check_images(paths: list[str], backbone: str = "mobilenet_v2", top: int = 5) -> list[dict]:
    """[{path, top5: [{label, probability}], expected?, passed?}] per image, or {path, error}.

    `expected` (and `passed`: it is the top class) only for a bundled sample photo
    whose class is known.
    """
    bb = load_backbone(backbone)
    names = imagenet_class_names()
    resizer = Resizer(bb.input_size, bb.crop_fraction)
    samples = _sample_files()
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            pixels = resizer.batch([decode_image(Path(path).read_bytes(),
                                                 min_side=resizer.min_side)])
        except (DecodeError, OSError) as exc:
            results.append({"path": path, "error": str(exc)})
            continue
        probs = bb.classify(pixels)[0]
        best = np.argsort(-probs)[:top]
        top5 = [{"label": names[i] if probs.shape[0] == len(names) else str(i),
                 "probability": float(probs[i])} for i in best]
        result: dict[str, Any] = {"path": path, "top5": top5}
        key = samples.get(str(Path(path).resolve()))
        expected = KNOWN_LABELS.get(key) if key else None
        if expected:
            result.update(expected=expected, passed=top5[0]["label"] == expected)
        results.append(result)
    return results


def verdict(results: list[dict]) -> tuple[bool | None, str]:
    """(passed, one line): None when no image had a known class to judge by."""
    judged = [r for r in results if "expected" in r]
    if not judged:
        return None, ("no verdict: none of these images is a bundled sample photo with a known "
                      "class (run `embedstore backbone check` without IMAGES for one)")
    failed = [r for r in judged if not r["passed"]]
    if failed:
        return False, "FAIL: " + "; ".join(
            f"{Path(r['path']).name} came out as {r['top5'][0]['label']!r}, a correct "
            f"backbone says {r['expected']!r}" for r in failed) + (
            ": the weights or the preprocessing are wrong")
    return True, "PASS: " + ", ".join(
        f"{Path(r['path']).name} is {r['expected']!r} ({r['top5'][0]['probability']:.0%})"
        for r in judged) + ", as a correct backbone says"
