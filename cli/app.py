"""The click commands. Each one parses, calls one library function, prints."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from embedstore.pipeline import DEFAULT_MAX_PIXELS

BACKBONE_HELP = ("Backbone: mobilenet_v2 (default, offline), keras:<Application>[@weights.h5], "
                 "hub:<handle-or-SavedModel-dir>, or a directory saved by embedstore.")


def _json_out(obj) -> None:
    from embedstore_cli import dump_json

    dump_json(obj)


def _tty() -> bool:
    return sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedstore")
def cli() -> None:
    """Image transfer learning on a precomputed-embedding feature store.

    Run a frozen ImageNet backbone once over your images (extract), keep the
    embeddings in one HDF5 file, then train and compare classifier heads on
    that cache in seconds.
    """


# --- backbones -----------------------------------------------------------------------

@cli.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def backbones_cmd(as_json: bool) -> None:
    """List the named backbones and whether their weights are available here.

    Besides these names, any hub:<handle-or-SavedModel-dir> and any backbone
    directory saved by embedstore can be used wherever --backbone is taken.
    """
    from embedstore.backbones import registry

    rows = [{"name": s.name, "dim": s.dim, "input_size": s.input_size,
             "weights": s.weights_source, "available": s.is_available()}
            for s in registry().values()]
    if as_json:
        _json_out(rows)
        return
    click.echo(f"{'name':<24}{'dim':>6}{'input':>7}  {'available':<10} weights")
    for r in rows:
        dim = r["dim"] if r["dim"] else "-"
        click.echo(f"{r['name']:<24}{dim:>6}{r['input_size']:>7}  "
                   f"{'yes' if r['available'] else 'no':<10} {r['weights']}")


@cli.group("backbone")
def backbone_group() -> None:
    """Inspect one backbone."""


@backbone_group.command("check")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", "backbone_name", default="mobilenet_v2", show_default=True,
              help=BACKBONE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: [{path, top5: [{label, probability}]}].")
def backbone_check_cmd(images: tuple[str, ...], backbone_name: str, as_json: bool) -> None:
    """Classify IMAGES with the backbone's own ImageNet head (top 5 each).

    A quick proof that weights and preprocessing are right: scikit-learn's
    china.jpg should come out as "palace". Without IMAGES, scikit-learn's
    bundled sample photos are used.
    """
    from embedstore.check import check_images, sample_photos

    results = check_images(list(images) or sample_photos(), backbone_name)
    if as_json:
        _json_out(results)
        return
    for r in results:
        click.echo(r["path"])
        if "error" in r:
            click.echo(f"  error: {r['error']}")
        for t in r.get("top5", []):
            click.echo(f"  {t['probability']:7.2%}  {t['label']}")


# --- extract / info / compact --------------------------------------------------------

@cli.command("extract")
@click.argument("images", type=click.Path(exists=True))
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--backbone", "backbone_name", default="mobilenet_v2", show_default=True,
              help=BACKBONE_HELP)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Images per forward pass.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              type=click.IntRange(1), help="Refuse images with more pixels (decompression bombs).")
@click.option("--commit-every", default=512, show_default=True, type=click.IntRange(1),
              help="Commit to disk after this many new embeddings (the most a crash can lose).")
@click.option("--workers", type=click.IntRange(1, 64), help="Decode threads [default: cores + 2].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def extract_cmd(images, store, backbone_name, batch_size, max_pixels, commit_every, workers,
                quiet, as_json) -> None:
    """Embed every image under IMAGES into the HDF5 STORE.

    IMAGES is a folder with one subfolder per class (labels from folder
    names), a flat folder of images (unlabelled), or a text file with one
    path per line. Re-running embeds only new or changed files; a crash or
    Ctrl-C keeps every committed batch and the next run resumes. Bad files
    are recorded in the store's /failures with the reason.
    """
    from embedstore.extract import extract

    bar = None
    if not quiet and _tty():
        from embedstore.sources import scan

        bar = click.progressbar(length=len(scan(images).images), label="extracting",
                                file=sys.stderr, show_eta=True, show_pos=True,
                                item_show_func=lambda s: s)
        bar.__enter__()

    def on_progress(state):
        if bar is not None:
            bar.update(state.done - bar.pos,
                       f"{state.images_per_second:.0f} img/s, {state.failed} failed")

    try:
        result = extract(images, store, backbone_name, batch_size=batch_size,
                         max_pixels=max_pixels, commit_every=commit_every, workers=workers,
                         progress=on_progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        _json_out(result.__dict__)
    elif not quiet:
        click.echo(f"{result.total} images: {result.embedded} embedded, {result.reused} reused, "
                   f"{result.unchanged} unchanged, {result.failed} failed in "
                   f"{result.seconds:.1f} s ({result.images_per_second:.0f} img/s) -> {store}",
                   err=True)
        for f in result.new_failures[:10]:
            click.echo(f"  failed: {f['path']}: {f['reason']}", err=True)
        if len(result.new_failures) > 10:
            click.echo(f"  ... and {len(result.new_failures) - 10} more "
                       f"(embedstore info {store} --failures)", err=True)


@cli.command("info")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (rows, images, failures, "
              "classes, dim, backbone, ...).")
@click.option("--failures", "show_failures", is_flag=True, help="Also list every failed file.")
def info_cmd(store, as_json, show_failures) -> None:
    """Describe STORE: rows, images, classes with counts, backbone, failures."""
    from embedstore.store import open_store

    with open_store(store) as s:
        info = s.info()
        if show_failures:
            info["failed_files"] = s.failures()
    if as_json:
        _json_out(info)
        return
    bb = info["backbone"]
    click.echo(f"store       {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, "
               f"format v{info['format_version']})")
    click.echo(f"backbone    {bb['name']} (fingerprint {bb['fingerprint'][:16]}, dim {info['dim']})")
    click.echo(f"rows        {info['rows']} ({info['images']} distinct images, "
               f"{info['unlabelled']} unlabelled)")
    click.echo(f"failures    {info['failures']}")
    if info["pending_parts"]:
        click.echo(f"pending     {info['pending_parts']} committed parts not merged yet "
                   f"(embedstore compact {store})")
    click.echo(f"classes     {len(info['classes'])}")
    for name, n in info["classes"].items():
        click.echo(f"  {n:>8}  {name}")
    for f in info.get("failed_files", []):
        click.echo(f"failed: {f['path']}: {f['reason']}")


@cli.command("compact")
@click.argument("store", type=click.Path(dir_okay=False))
def compact_cmd(store) -> None:
    """Merge committed parts into STORE (after a crash; extract does this itself)."""
    from embedstore.store import merge

    changed = merge(store)
    click.echo(f"{store}: {'merged pending parts' if changed else 'nothing to merge'}", err=True)
