"""The click commands. Each one parses, calls one library function, prints."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from embedstore.engines import ENGINES
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
@click.option("--prune", is_flag=True,
              help="Drop rows (and failures) of files that are no longer under IMAGES.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(list(ENGINES)),
              help="Where decoding and the model run: this process, or a Ray cluster "
                   "(needs pip install 'embedstore[ray]').")
@click.option("--address", help="ray: the cluster to join, e.g. auto or HOST:6379 "
                                "[default: start Ray on this machine].")
@click.option("--num-workers", type=click.IntRange(1),
              help="ray: model workers (actors) [default: one per GPU share with "
                   "--gpus-per-worker, else half the cluster's CPUs].")
@click.option("--gpus-per-worker", type=click.FloatRange(0, min_open=True),
              help="ray: GPUs each model worker reserves (e.g. 1, or 0.5 to share one).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON.")
def extract_cmd(images, store, backbone_name, batch_size, max_pixels, commit_every, workers,
                prune, engine, address, num_workers, gpus_per_worker, quiet, as_json) -> None:
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
                         prune=prune, progress=on_progress, engine=engine,
                         engine_options={"address": address, "num_workers": num_workers,
                                         "gpus_per_worker": gpus_per_worker})
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        _json_out(result.__dict__)
    elif not quiet:
        click.echo(f"{result.total} images: {result.embedded} embedded, {result.reused} reused, "
                   f"{result.unchanged} unchanged, {result.failed} failed"
                   + (f", {result.pruned} pruned" if prune else "") + " in "
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


# --- heads: train / sweep / evaluate -------------------------------------------------

def _float_or_auto(text: str):
    return text if text == "auto" else float(text)


def _int_or_auto(text: str):
    return text if text == "auto" else int(text)


def _hidden(text: str) -> tuple[int, ...]:
    """"256" -> (256,); "512x128" -> (512, 128); "0" or "none" -> ()."""
    if text.lower() in ("", "0", "none"):
        return ()
    return tuple(int(t) for t in text.lower().split("x"))


def _class_weight(text: str):
    return None if text == "none" else text


# option -> (head parameter, parser, heads it applies to)
HEAD_OPTIONS = {
    "C": ("C", _float_or_auto, {"logreg"}),
    "max_iter": ("max_iter", int, {"logreg"}),
    "class_weight": ("class_weight", _class_weight, {"logreg", "dense", "knn"}),
    "hidden": ("hidden", _hidden, {"dense"}),
    "dropout": ("dropout", float, {"dense"}),
    "label_smoothing": ("label_smoothing", float, {"dense"}),
    "optimizer": ("optimizer", str, {"dense"}),
    "learning_rate": ("learning_rate", float, {"dense"}),
    "momentum": ("momentum", float, {"dense"}),
    "epochs": ("epochs", int, {"dense"}),
    "batch_size": ("batch_size", _int_or_auto, {"dense"}),
    "patience": ("patience", int, {"dense"}),
    "k": ("k", int, {"knn"}),
    "weights": ("weights", str, {"knn"}),
}


def head_options(multi: bool):
    """The head hyper-parameter options; with multi, each takes a comma list (sweep)."""
    lst = " (comma list)" if multi else ""
    specs = [
        ("--C", "C", f"logreg: inverse regularisation [0.1], or 'auto' to cross-validate{lst}."),
        ("--max-iter", "max_iter", f"logreg: L-BFGS iteration budget [40]{lst}."),
        ("--class-weight", "class_weight", f"'balanced' or 'none' (all heads){lst}."),
        ("--hidden", "hidden", f"dense: hidden sizes, e.g. 256 or 512x128; 0 for none{lst}."),
        ("--dropout", "dropout", f"dense: dropout rate{lst}."),
        ("--label-smoothing", "label_smoothing", f"dense: label smoothing{lst}."),
        ("--optimizer", "optimizer", f"dense: adam or sgd (with momentum){lst}."),
        ("--learning-rate", "learning_rate", f"dense: learning rate{lst}."),
        ("--momentum", "momentum", f"dense: SGD momentum{lst}."),
        ("--epochs", "epochs", f"dense: most epochs (early stopping on validation loss){lst}."),
        ("--head-batch-size", "batch_size", f"dense: training batch size, or auto "
                                            f"(min(512, max(32, rows/100))){lst}."),
        ("--patience", "patience", f"dense: early-stopping patience in epochs{lst}."),
        ("--k", "k", f"knn: neighbours{lst}."),
        ("--weights", "weights", f"knn: uniform or distance{lst}."),
    ]

    def decorate(f):
        for flag, dest, help_text in reversed(specs):
            f = click.option(flag, dest, default=None, help=help_text)(f)
        return f

    return decorate


def parse_head_params(head: str, given: dict, multi: bool = False) -> dict:
    """Turn the given options into head parameters; refuse ones that do not apply."""
    params = {}
    for dest, raw in given.items():
        if raw is None:
            continue
        name, parse, heads = HEAD_OPTIONS[dest]
        if head not in heads:
            if multi:
                continue  # a sweep option for another head in the same sweep
            flag = "--" + ("head-batch-size" if dest == "batch_size" else dest.replace("_", "-"))
            raise click.UsageError(f"{flag} applies to the {'/'.join(sorted(heads))} head, "
                                   f"not {head}")
        try:
            params[name] = [parse(v.strip()) for v in raw.split(",")] if multi else parse(raw)
        except ValueError:
            raise click.UsageError(f"cannot read {raw!r} for --{dest.replace('_', '-')}") from None
    return params


HEAD_CHOICE = click.Choice(["logreg", "dense", "knn"])


@cli.command("train")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--head", default="logreg", show_default=True, type=HEAD_CHOICE,
              help="logreg: standardise + multinomial logistic regression; dense: a Keras "
                   "head; knn: cosine nearest neighbours.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of images held out for validation (by content hash: stable).")
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@head_options(multi=False)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
def train_cmd(store, out_dir, head, val_fraction, seed, as_json, **options) -> None:
    """Train a classifier head on STORE's embeddings; write it to OUT_DIR.

    OUT_DIR gets the model (model.joblib, plus model.keras for dense),
    manifest.json (head, hyper-parameters, classes, backbone fingerprint,
    store, rows hash, split, versions) and metrics.json (val_accuracy,
    val_macro_f1, train_seconds, ...).
    """
    from embedstore.train import train

    params = parse_head_params(head, options)
    metrics = train(store, out_dir, head=head, val_fraction=val_fraction, seed=seed, **params)
    if as_json:
        _json_out(metrics)
        return
    click.echo(f"{head}: val_accuracy {metrics.get('val_accuracy', float('nan')):.4f}  "
               f"val_macro_f1 {metrics.get('val_macro_f1', float('nan')):.4f}  "
               f"train {metrics['n_train']} rows in {metrics['train_seconds']:.2f} s  "
               f"-> {out_dir}")
    if metrics.get("chosen_C") is not None and params.get("C") == "auto":
        click.echo(f"cross-validation chose C = {metrics['chosen_C']}")
    if metrics["duplicates_across_classes"]:
        click.echo(f"warning: {metrics['duplicates_across_classes']} images appear under two "
                   f"or more classes (see {out_dir}/manifest.json)", err=True)


@cli.command("sweep")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--head", "heads", multiple=True, type=HEAD_CHOICE,
              help="Head type to include; repeat for several [default: logreg, dense, knn].")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@head_options(multi=True)
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
def sweep_cmd(store, heads, val_fraction, seed, as_json, **options) -> None:
    """Train many heads / hyper-parameters on one STORE; print a leaderboard.

    Each option takes a comma list and the grid is every combination, per
    head, of the options that apply to it. Example:

      embedstore sweep flowers.h5 --head logreg --head knn --C 0.01,0.1,1 --k 5,20
    """
    from embedstore.train import grid, sweep

    candidates = []
    for head in heads or ("logreg", "dense", "knn"):
        candidates += grid(head, parse_head_params(head, options, multi=True))

    def on_result(m):
        if not as_json and _tty():
            click.echo(f"  done: {m['head']} {m['params']} -> {m.get('val_accuracy', 0):.4f}",
                       err=True)

    board = sweep(store, candidates, val_fraction, seed, on_result)
    if as_json:
        _json_out(board)
        return
    click.echo(f"{'rank':<5}{'head':<8}{'val_acc':>8}{'val_f1':>8}{'train_s':>9}  params")
    for i, m in enumerate(board, 1):
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items()) or "defaults"
        click.echo(f"{i:<5}{m['head']:<8}{m.get('val_accuracy', 0):>8.4f}"
                   f"{m.get('val_macro_f1', 0):>8.4f}{m['train_seconds']:>9.2f}  {params}")


@cli.command("evaluate")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("store", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print every metric as JSON.")
@click.option("--assert-accuracy-at-least", "min_accuracy", type=float,
              help="Exit with code 1 when accuracy is below this.")
@click.option("--no-plots", is_flag=True, help="Do not write PNGs.")
def evaluate_cmd(head_dir, store, as_json, min_accuracy, no_plots) -> None:
    """Evaluate the head in HEAD_DIR on its validation split, or on every labelled row of
    STORE (a test set extracted with the same backbone).

    Reports accuracy, top-k accuracy, macro F1, per-class precision / recall /
    F1 / support and the confusion matrix; writes confusion_matrix.png (and
    loss.png, accuracy.png for dense heads) into HEAD_DIR.
    """
    from embedstore.train import evaluate_head

    result = evaluate_head(head_dir, store, plots=not no_plots)
    if as_json:
        _json_out(result)
    else:
        topk = next(k for k in result if k.startswith("top"))
        click.echo(f"{result['source']}: {result['n']} images")
        click.echo(f"accuracy {result['accuracy']:.4f}  {topk.replace('_', ' ')} "
                   f"{result[topk]:.4f}  macro F1 {result['macro_f1']:.4f}")
        click.echo(f"{'class':<24}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
        for name, m in result["per_class"].items():
            click.echo(f"{name:<24}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}"
                       f"{m['support']:>9}")
        for p in result.get("plots", []):
            click.echo(f"wrote {p}")
    if min_accuracy is not None and result["accuracy"] < min_accuracy:
        click.echo(f"embedstore: accuracy {result['accuracy']:.4f} is below "
                   f"{min_accuracy}", err=True)
        sys.exit(1)


# --- predict / export ----------------------------------------------------------------

@cli.command("predict")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1),
              help="How many classes to list per image.")
@click.option("--store", type=click.Path(exists=True, dir_okay=False),
              help="Reuse embeddings of images already in this store (no backbone run).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--json", "as_json", is_flag=True,
              help="JSON list: path, label, probability, top_k, cached; or path, error.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path,label,probability,top_k,error.")
def predict_cmd(head_dir, paths, top_k, store, batch_size, as_json, as_csv) -> None:
    """Predict labels for image files and folders (recursive) with the head in HEAD_DIR.

    Images go through the same pipeline as extraction, with the backbone the
    head was trained on. Unreadable files are reported and the rest still
    predicted; the exit code is non-zero only if nothing could be predicted.
    """
    from embedstore.predict import predict

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    results = predict(head_dir, list(paths), top_k=top_k, store=store, batch_size=batch_size)
    if as_json:
        _json_out(results)
    elif as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "label", "probability", "top_k", "error"])
        for r in results:
            topk = ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.get("top_k", []))
            writer.writerow([r["path"], r.get("label", ""),
                             f"{r['probability']:.6f}" if "probability" in r else "", topk,
                             r.get("error", "")])
    else:
        width = min(60, max(len(r["path"]) for r in results))
        for r in results:
            if "error" in r:
                click.echo(f"{r['path']:<{width}}  error: {r['error']}")
            else:
                others = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in r["top_k"][1:])
                click.echo(f"{r['path']:<{width}}  {r['label']:<16} {r['probability']:7.1%}"
                           + (f"   ({others})" if others else ""))
    failed = sum("error" in r for r in results)
    if failed and not (as_json or as_csv):
        click.echo(f"{failed} of {len(results)} files could not be predicted", err=True)
    if failed == len(results):
        sys.exit(1)


@cli.command("export")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", default="savedmodel", show_default=True,
              type=click.Choice(["savedmodel", "keras", "tflite"]),
              help="savedmodel: a directory with image-bytes and uint8 signatures; "
                   "keras / tflite: one file on resized pixels.")
def export_cmd(head_dir, out, fmt) -> None:
    """Export backbone + head in HEAD_DIR as one model: image in, probabilities out.

    The SavedModel's `serving_default` takes encoded JPEG/PNG/GIF/BMP bytes
    ([N] string), `predict_images` a uint8 batch [N, H, W, 3]; both resize
    the way embedstore does and return probabilities, label and probability.
    The keras and tflite files take [N, S, S, 3] RGB floats in [0, 255]
    already resized. labels.txt and export.json are written beside.
    """
    from embedstore.export import export

    path = export(head_dir, out, fmt)
    click.echo(f"exported {fmt} to {path}", err=True)
