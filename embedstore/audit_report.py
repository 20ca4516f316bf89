"""Pictures of an audit a person can scan in seconds: contact sheets of duplicate
groups, likely label errors and outliers, a 2-D map of the store coloured by
class, and an index.html that shows them together."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embedstore.evaluate import _pyplot
from embedstore.similarity import normalise
from embedstore.store import open_store

THUMB = 96
MAP_ROWS = 5000  # t-SNE / UMAP on a sample: 70k points would take minutes


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def _sheet(cells: list[list[tuple[str, str]]], images: Path, path: Path, title: str) -> Path:
    """A grid of thumbnails: one list of (file, caption) per row of the figure."""
    plt = _pyplot()
    cols = max(len(r) for r in cells)
    fig, axes = plt.subplots(len(cells), cols, figsize=(1.9 * cols, 2.2 * len(cells)),
                             squeeze=False)
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            file, caption = row[c]
            thumb = _thumbnail(images / file)
            if thumb is None:
                ax.text(0.5, 0.5, "file not found", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(thumb, cmap="gray")
            ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _short(p: str, width: int = 28) -> str:
    return p if len(p) <= width else "..." + p[-width + 3:]


def _map(store: str | Path, path: Path, seed: int = 0) -> tuple[Path, str]:
    """2-D map of a sample of the store, coloured by class (UMAP where installed)."""
    with open_store(store) as reader:
        rows = np.flatnonzero(reader.views == 0)
        if len(rows) > MAP_ROWS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, MAP_ROWS, replace=False))
        X = normalise(reader.embeddings(rows))
        labels, classes = reader.labels[rows], reader.classes
    from sklearn.decomposition import PCA

    X50 = PCA(min(50, len(X) - 1, X.shape[1]), random_state=seed).fit_transform(X)
    try:
        import umap  # optional

        xy, method = umap.UMAP(random_state=seed).fit_transform(X50), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        xy = TSNE(perplexity=min(30.0, (len(X) - 1) / 3), init="pca",
                  random_state=seed).fit_transform(X50)
        method = "t-SNE"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c, name in enumerate(classes):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(c % cmap.N), label=name)
    if (labels < 0).any():
        m = labels < 0
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color="lightgray", label="(unlabelled)")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(f"{method} of {len(rows)} images (cosine embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path, method


def write_report(result: Mapping[str, Any], out_dir: str | Path, images: str | Path = ".",
                 per_sheet: int = 24) -> Path:
    """Contact sheets, the map and index.html for an `audit` result (an AuditReport, or
    its JSON read back); returns index.html.
    `images`: the folder the store was extracted from (stored paths are relative to it)."""
    out, images = Path(out_dir), Path(images)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    groups = result["duplicates"][:12]
    if groups:
        cells = [[(m["path"], f"{_short(m['path'])}\n{m['label'] or '-'} {m['split']}")
                  for m in g["members"][:6]] for g in groups]
        figures.append(("Duplicate groups (leaks and label conflicts first)",
                        _sheet(cells, images, out / "duplicates.png", "Duplicate groups")))
    for key, name, caption in (
            ("label_errors", "Likely label errors",
             lambda e: f"{_short(e['path'])}\n{e['given']} -> {e['suggested']} "
                       f"({e['p_given']:.2f})"),
            ("outliers", "Outliers",
             lambda e: f"{_short(e['path'])}\n{e['label']} ({e['score']:.0f} MADs)")):
        items = result[key][:per_sheet]
        if items:
            cells = [[(e["path"], caption(e)) for e in items[i:i + 6]]
                     for i in range(0, len(items), 6)]
            figures.append((name, _sheet(cells, images, out / f"{key}.png", name)))
    map_png, method = _map(result["store"], out / "map.png")
    figures.append((f"Map of the store ({method})", map_png))
    index = out / "index.html"
    index.write_text(_html(result, figures))
    return index


def _html(result: Mapping[str, Any], figures: list[tuple[str, Path]]) -> str:
    e = html.escape
    s = result["summary"]
    lines = [f"<!doctype html><meta charset='utf-8'><title>audit of {e(result['store'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}"
             "li{font-family:monospace;font-size:90%}</style>",
             f"<h1>Audit of {e(result['store'])}</h1>",
             f"<p>{result['rows']} images; {s['duplicate_groups']} duplicate groups "
             f"({s['groups_across_split']} across the train/validation split, "
             f"{s['groups_across_classes']} across classes); {s['likely_label_errors']} likely "
             f"label errors (out-of-fold accuracy {s['oof_accuracy']}); {s['outliers']} "
             "outliers.</p>"]
    for title, png in figures:
        lines.append(f"<h2>{e(title)}</h2><img src='{e(png.name)}'>")
    for key, title in (("duplicates", "Duplicate groups"), ("label_errors", "Likely label errors"),
                       ("outliers", "Outliers")):
        lines.append(f"<h2>{title}</h2><ol>")
        for item in result[key]:
            where = (", ".join(m["path"] for m in item["members"]) if key == "duplicates"
                     else item["path"])
            lines.append(f"<li>{e(where)}: {e(item['reason'])}</li>")
        lines.append("</ol>")
    return "\n".join(lines) + "\n"
