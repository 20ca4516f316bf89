"""The click commands. Each one parses, calls one library function, prints."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import click

from embedstore.engines import ENGINES
from embedstore.pipeline import DEFAULT_MAX_PIXELS


class _RegistryChoice(click.Choice):
    """click.Choice over a registry that is imported only when a value is checked."""

    def __init__(self, load):  # click.Choice.__init__ would read the registry now
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self._load())


class _RuntimeOption(click.Option):
    """--runtime, its choices and help read from the runtime registry when used."""

    def __init__(self, *args, extract: bool = False, **kwargs):
        kwargs.update(type=_RegistryChoice(lambda: _runtime_choices(extract)), default="auto",
                      show_default=True, metavar="RUNTIME")
        super().__init__(*args, **kwargs)
        self.extract = extract

    def get_help_record(self, ctx):
        from embedstore.backbones.runtimes import runtime_help

        self.help = "Where the backbone runs: " + runtime_help(self.extract)
        if not self.extract:
            self.help += " A head on an int8 backbone runs it on OpenVINO whatever this says."
        return super().get_help_record(ctx)


def _runtime_choices(extract: bool) -> list[str]:
    from embedstore.backbones.runtimes import runtime_choices

    return runtime_choices(extract)


RUNTIME_OPTION = click.option("--runtime", cls=_RuntimeOption)
EXTRACT_RUNTIME_OPTION = click.option("--runtime", cls=_RuntimeOption, extract=True)

BACKBONE_HELP = ("Backbone: mobilenet_v2 (default, offline), keras:<Application>[@weights.h5], "
                 "hub:<handle-or-SavedModel-dir>, or a directory saved by embedstore.")


TRUST_HELP = ("The head's backbone, needed when it is a hub: SavedModel: one named in a head "
              "directory is loaded only when you name it here too, since its graph runs "
              "when loaded.")


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
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: [{path, top5: [{label, probability}], expected, passed}] "
                   "(expected and passed for sample photos of known class), or {path, error}.")
def backbone_check_cmd(images: tuple[str, ...], backbone_name: str, as_json: bool) -> None:
    """Classify IMAGES with the backbone's own ImageNet head (top 5 each); give a verdict.

    A quick proof that weights and preprocessing are right. Without IMAGES,
    the bundled sample photos are used (scikit-learn's china.jpg and
    flower.jpg, and scikit-image's coffee.png if it is installed); the check
    passes when each one of known class comes out as that class (china.jpg a
    "palace", coffee.png an "espresso"). Exits 1 when it fails or when a file
    cannot be read as an image.
    """
    from embedstore.check import check_images, sample_photos, verdict

    results = check_images(list(images) or sample_photos(), backbone_name)
    passed, line = verdict(results)
    if as_json:
        _json_out(results)
    else:
        for r in results:
            if "error" in r:
                continue
            click.echo(r["path"])
            for t in r["top5"]:
                click.echo(f"  {t['probability']:7.2%}  {t['label']}")
        click.echo(line)
    for r in results:
        if "error" in r:
            click.echo(f"embedstore: error: {r['path']}: {r['error']}", err=True)
    if passed is False or any("error" in r for r in results):
        sys.exit(1)


# --- extract / info / compact --------------------------------------------------------

@cli.command("extract")
@click.argument("images", type=click.Path(exists=True))
@click.argument("store", type=click.Path())
@click.option("--backbone", "backbone_name", default="mobilenet_v2", show_default=True,
              help=BACKBONE_HELP)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Images per forward pass.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              type=click.IntRange(1), help="Refuse images with more pixels (decompression bombs).")
@click.option("--commit-every", default=512, show_default=True, type=click.IntRange(1),
              help="Commit to disk after this many new embeddings (the most a crash can lose).")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Decode threads [default: one per core; more hide slow storage]; with "
                   "--engine ray, decode tasks running at once [default: as many as the "
                   "cluster's free CPUs].")
@click.option("--prune", is_flag=True,
              help="Drop rows (and failures) of files that are no longer under IMAGES.")
@click.option("--follow-links", is_flag=True,
              help="Also read symlinks that lead outside IMAGES (by default they are "
                   "recorded as failures and not read).")
@EXTRACT_RUNTIME_OPTION
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
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON "
              "(counts, seconds, startup_seconds, runtime, seconds per stage).")
def extract_cmd(images, store, backbone_name, batch_size, max_pixels, commit_every, workers,
                prune, follow_links, runtime, engine, address, num_workers, gpus_per_worker,
                quiet, as_json) -> None:
    """Embed every image under IMAGES into the HDF5 STORE.

    IMAGES is a folder with one subfolder per class (labels from folder
    names), a flat folder of images (unlabelled), one image, or a text file
    with one path per line. Re-running embeds only new or changed files; a crash or
    Ctrl-C keeps every committed batch and the next run resumes. Bad files
    are recorded in the store's /failures with the reason.
    """
    from embedstore.extraction import extract
    from embedstore.lazy_backbone import NOT_LOADED

    bar = None

    def on_progress(state):
        nonlocal bar
        if bar is None and not quiet and _tty():  # after start-up, which says what it does
            # click's own ETA is an unlabelled clock: the line says which time is which
            bar = click.progressbar(length=state.total, label="extracting", file=sys.stderr,
                                    show_eta=False, show_pos=True, item_show_func=lambda s: s)
            bar.__enter__()
        if bar is not None:
            bar.update(state.done - bar.pos, _progress_text(state))

    def on_status(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    try:
        result = extract(images, store, backbone_name, batch_size=batch_size,
                         max_pixels=max_pixels, commit_every=commit_every, workers=workers,
                         prune=prune, progress=on_progress, runtime=runtime, status=on_status,
                         follow_links=follow_links, engine=engine,
                         engine_options={"address": address, "num_workers": num_workers,
                                         "gpus_per_worker": gpus_per_worker})
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        _json_out(result.__dict__)
    elif not quiet:
        counts = (f"{result.unchanged} unchanged, {result.failed} failed"
                  + (f", {result.pruned} pruned" if prune else "") + f" in {result.seconds:.1f} s")
        if result.runtime == NOT_LOADED:
            click.echo(f"nothing new: {result.total} images, {result.reused} reused, {counts} (no "
                       f"image needed the model, so it was not loaded) -> {store}", err=True)
        else:
            click.echo(f"{result.total} images: {result.embedded} embedded, {result.reused} "
                       f"reused, {counts} ({result.images_per_second:.0f} img/s, "
                       f"{result.runtime}; start-up {result.startup_seconds:.1f} s) -> {store}",
                       err=True)
        for f in result.new_failures[:10]:
            click.echo(f"  failed: {f['path']}: {f['reason']}", err=True)
        if len(result.new_failures) > 10:
            click.echo(f"  ... and {len(result.new_failures) - 10} more "
                       f"(embedstore info {store} --failures)", err=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
        f"{minutes}:{seconds:02d}"


def _progress_text(state) -> str:
    """Elapsed and estimated time left, each named; the rate; failures so far."""
    rate = state.done / state.seconds if state.seconds > 0 else 0.0
    eta = _clock((state.total - state.done) / rate) if rate else "?"
    return (f"{_clock(state.seconds)} elapsed, ETA {eta}, {state.images_per_second:.0f} img/s, "
            f"{state.failed} failed")


@cli.command("info")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (rows, images, failures, "
              "classes, dim, backbone, shards, quarantined, ...).")
@click.option("--failures", "show_failures", is_flag=True, help="Also list every failed file.")
@click.option("--verify", "check", is_flag=True,
              help="Also check every shard's checksum and every vector for NaN/inf; exit 1 "
                   "naming the files and rows on failure.")
def info_cmd(store, as_json, show_failures, check) -> None:
    """Describe STORE: rows, images, classes with counts, backbone, failures."""
    from embedstore.store import open_store, verify

    with open_store(store) as s:
        info = s.info()
        if show_failures:
            info["failed_files"] = s.failures()
    if check:
        info["verify"] = verify(store)
    if as_json:
        _json_out(info)
    else:
        _print_info(store, info)
    if check and not info["verify"]["ok"]:
        sys.exit(1)


def _print_info(store, info: Mapping) -> None:
    bb = info["backbone"]
    click.echo(f"store       {info['path']} ({info['file_bytes'] / 1e6:.1f} MB, "
               f"format v{info['format_version']}, {info['shards']} shards)")
    click.echo(f"backbone    {bb['name']} (fingerprint {bb['fingerprint'][:16]}, "
               f"dim {info['dim']})")
    click.echo(f"rows        {info['rows']} ({info['images']} distinct images, "
               f"{info['unlabelled']} unlabelled)")
    click.echo(f"failures    {info['failures']}")
    if info["dead_rows"]:
        click.echo(f"tombstoned  {info['dead_rows']} replaced rows still on disk "
                   f"(embedstore compact {store} reclaims them)")
    if info["pending_parts"]:
        click.echo(f"pending     {info['pending_parts']} committed parts not merged yet "
                   f"(embedstore compact {store})")
    if info["quarantined"]:
        click.echo(f"quarantined {len(info['quarantined'])} unreadable files moved aside: "
                   + ", ".join(info["quarantined"]))
    click.echo(f"classes     {len(info['classes'])}")
    for name, n in info["classes"].items():
        click.echo(f"  {n:>8}  {name}")
    for f in info.get("failed_files", []):
        click.echo(f"failed: {f['path']}: {f['reason']}")
    if "verify" in info:
        v = info["verify"]
        for problem in v["problems"]:
            click.echo(f"corrupt: {problem}")
        click.echo(f"verify      {'ok' if v['ok'] else 'FAILED'}: {v['files']} files, "
                   f"{v['rows_checked']} vectors checked")


@cli.command("compact")
@click.argument("store", type=click.Path())
@click.option("--shard-rows", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Fold shards smaller than this into shards of about this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def compact_cmd(store, shard_rows, as_json) -> None:
    """Fold STORE's small or mostly replaced shards into big ones (never required).

    Also finishes what a killed writer left (temp files, format-1 parts) and
    upgrades a format-1 store. Readers keep reading meanwhile.
    """
    from embedstore.store import compact

    result = compact(store, shard_rows)
    if as_json:
        _json_out(result)
    else:
        click.echo(f"{store}: {result['shards_before']} -> {result['shards_after']} shards, "
                   f"{result['rows_rewritten']} rows rewritten", err=True)


@cli.command("merge")
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="The store to merge into (created if missing, added to if it exists).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def merge_cmd(stores, out, as_json) -> None:
    """Combine STORES of one backbone into --out.

    Each (path, content, view) row is kept once, a path with different content
    takes the later store's; classes are matched by name; stores of different
    backbones are refused.
    """
    from embedstore.store import merge_stores

    result = merge_stores(stores, out)
    if as_json:
        _json_out(result)
    else:
        click.echo(f"{out}: {result['rows_added']} rows added from {result['sources']} stores, "
                   f"{result['rows']} rows, {result['classes']} classes", err=True)


# --- heads: train / sweep / evaluate -------------------------------------------------
# The head options come from the heads themselves (embedstore.heads): each head lists
# its flags, and which heads take one, its defaults and its choices are read from the
# constructors and parameter constraints, so help, errors and code cannot drift apart.

class _HeadCommand(click.Command):
    """train and sweep: --head's help and the heads' hyper-parameter options are read from
    the head registry when the command parses or shows help, so importing the CLI imports
    no scikit-learn (info and compact stay instant). With multi (sweep), each option takes
    a comma list."""

    def __init__(self, *args, multi: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.multi = multi
        self.own_params = list(self.params)
        self.read_from: tuple[str, ...] = ()  # the registry the options were read from

    def get_params(self, ctx):
        from embedstore.heads import HEADS

        if tuple(HEADS) != self.read_from:  # once per process (tests swap registries)
            self._read_heads()
            self.read_from = tuple(HEADS)
        return super().get_params(ctx)

    def _read_heads(self) -> None:
        from embedstore.heads import HEADS, head_options

        head = next(p for p in self.own_params if p.name in ("head", "heads"))
        kinds = "; ".join(f"{name}: {_summary(cls)}" for name, cls in HEADS.items())
        head.help = (f"Head type to include; repeat for several [default: all]. {kinds}."
                     if self.multi else f"{kinds}.")
        options = [click.Option([o.flag, o.param], default=None, help=_flag_help(o, self.multi),
                                metavar=f"{o.metavar}[,...]" if self.multi else o.metavar)
                   for o in head_options().values()]
        own = {name for p in self.own_params for name in (*p.opts, p.name)}
        for option in options:  # a head's option would shadow one of the command's own
            if own & {*option.opts, option.name}:
                raise click.ClickException(
                    f"a head's option {option.opts[0]} ({option.name}) clashes with "
                    f"`{self.name}`'s own options; rename it in the head's HeadOption")
        at = [p.name for p in self.own_params].index("seed") + 1  # after the split's options
        self.params = self.own_params[:at] + options + self.own_params[at:]


def _summary(head_class) -> str:
    """A head's one line for --head's help: its summary, else its docstring's first line."""
    doc = (head_class.__doc__ or "").strip()
    return head_class.summary or (doc.splitlines()[0].rstrip(".") if doc else head_class.__name__)


def _flag_help(option, multi: bool) -> str:
    from embedstore.heads import HEADS, heads_taking, param_choices

    heads = heads_taking(option.param)
    defaults = {option.show(d) for d in heads.values()}
    where = "all heads" if len(heads) == len(HEADS) else "/".join(heads)
    choices = param_choices(option.param)
    return (f"{where}: {option.help}" + (f" ({' or '.join(choices)})" if choices else "")
            + f" [default: {', '.join(sorted(defaults))}]"
            + (" (comma list)" if multi else "") + ".")


def _head_names():
    from embedstore.heads import HEADS

    return HEADS


def _options_by_param() -> dict:
    from embedstore.heads import head_options

    return {o.param: o for o in head_options().values()}


def parse_head_params(head: str, given: dict, multi: bool = False) -> dict:
    """Turn the given options into head parameters; refuse ones that do not apply and
    values the head would refuse, naming the option."""
    from embedstore.heads import heads_taking, validate_head_params

    options = _options_by_param()
    params = {}
    for dest, raw in given.items():
        if raw is None:
            continue
        option = options[dest]
        heads = heads_taking(dest)
        if head not in heads:
            if multi:
                continue  # a sweep option for another head in the same sweep
            raise click.UsageError(f"{option.flag} applies to the {'/'.join(heads)} head, "
                                   f"not {head}")
        try:
            values = ([option.parse(v.strip()) for v in raw.split(",")] if multi
                      else [option.parse(raw)])
        except ValueError:
            raise click.UsageError(f"{option.flag}: cannot read {raw!r} "
                                   f"({_flag_help(option, multi)})") from None
        for value in values:
            try:
                validate_head_params(head, {dest: value})
            except ValueError as exc:  # scikit-learn's InvalidParameterError is one
                raise click.UsageError(f"{option.flag} {raw}: {exc}") from None
        params[dest] = values if multi else values[0]
    return params


def _show_params(params: dict) -> str:
    options = _options_by_param()
    return ", ".join(f"{options[k].flag.lstrip('-')}={options[k].show(v)}" if k in options
                     else f"{k}={v}" for k, v in params.items())


@cli.command("train", cls=_HeadCommand)
@click.argument("store", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--head", default="logreg", show_default=True, type=_RegistryChoice(_head_names))
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="Share of images held out for validation (by content hash: stable).")
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@click.option("--overwrite", is_flag=True, help="Replace a head already in OUT_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
def train_cmd(store, out_dir, head, val_fraction, seed, overwrite, as_json, **options) -> None:
    """Train a classifier head on STORE's embeddings; write it to OUT_DIR.

    OUT_DIR gets the head's learned state (state.npz and state.json, plus
    model.keras for dense: no pickles), manifest.json (head, effective
    hyper-parameters, classes, backbone fingerprint, store, rows hash,
    split, versions) and metrics.json (val_accuracy, val_macro_f1,
    train_seconds, ...). An existing head is replaced only with --overwrite.
    """
    from embedstore.training import train

    params = parse_head_params(head, options)
    metrics = train(store, out_dir, head=head, val_fraction=val_fraction, seed=seed,
                    overwrite=overwrite, **params)
    if as_json:
        _json_out(metrics)
        return
    scored = (f"val_accuracy {metrics['val_accuracy']:.4f}  "
              f"val_macro_f1 {metrics['val_macro_f1']:.4f}" if "val_accuracy" in metrics
              else "no validation split (--val-fraction 0)")
    click.echo(f"{head}: {scored}  train {metrics['n_train']} rows in "
               f"{metrics['train_seconds']:.2f} s  -> {out_dir}")
    if metrics.get("chosen_C") is not None and params.get("C") == "auto":
        click.echo(f"cross-validation chose C = {metrics['chosen_C']}")
    if metrics["duplicates_across_classes"]:
        click.echo(f"warning: {metrics['duplicates_across_classes']} images appear under two "
                   f"or more classes (see {out_dir}/manifest.json)", err=True)


@cli.command("sweep", cls=_HeadCommand, multi=True)
@click.argument("store", type=click.Path(exists=True))
@click.option("--head", "heads", multiple=True, type=_RegistryChoice(_head_names))
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="Share of images held out for validation (by content hash: stable); every "
                   "candidate is scored on the same split.")
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
def sweep_cmd(store, heads, val_fraction, seed, as_json, **options) -> None:
    """Train many heads / hyper-parameters on one STORE; print a leaderboard.

    Each option takes a comma list and the grid is every combination, per
    head, of the options that apply to it. Example:

      embedstore sweep flowers.h5 --head logreg --head knn --C 0.01,0.1,1 --k 5,20
    """
    from embedstore.training import grid, sweep

    candidates = []
    for head in heads or _head_names():
        candidates += grid(head, parse_head_params(head, options, multi=True))

    def on_result(m):
        if not as_json and _tty():
            click.echo(f"  done: {m['head']} {_show_params(m['given_params']) or 'defaults'} "
                       f"-> {m.get('val_accuracy', 0):.4f}", err=True)

    board = sweep(store, candidates, val_fraction, seed, on_result)
    if as_json:
        _json_out(board)
        return
    click.echo(f"{'rank':<5}{'head':<8}{'val_acc':>8}{'val_f1':>8}{'train_s':>9}  params")
    for i, m in enumerate(board, 1):
        params = _show_params(m["given_params"]) or "defaults"
        click.echo(f"{i:<5}{m['head']:<8}{m.get('val_accuracy', 0):>8.4f}"
                   f"{m.get('val_macro_f1', 0):>8.4f}{m['train_seconds']:>9.2f}  {params}")


@cli.command("evaluate")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("store", required=False, type=click.Path(exists=True))
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
    from embedstore.evaluate import evaluate_head

    result = evaluate_head(head_dir, store, plots=not no_plots)
    if result.get("near_duplicate_leaks") and not as_json:  # JSON has the count
        click.echo(f"warning: {result['near_duplicate_leaks']} validation images have a near "
                   "duplicate among the training images, which inflates these figures; "
                   "`embedstore audit` lists them", err=True)
    if as_json:
        _json_out(result)
    else:
        click.echo(f"{result['source']}: {result['n']} images")
        click.echo(f"accuracy {result['accuracy']:.4f}  "
                   + (f"top-5 accuracy {result['top5_accuracy']:.4f}  "
                      if "top5_accuracy" in result else "")
                   + f"macro F1 {result['macro_f1']:.4f}")
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
@click.option("--store", type=click.Path(exists=True),
              help="Reuse embeddings of images already in this store (no backbone run).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Images per backbone forward pass.")
@click.option("--backbone", "backbone_name", metavar="NAME", help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="JSON list: path, label, probability, top_k, cached; or path, error.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV: path,label,probability,top_k,error.")
@click.option("--unknown-below", type=click.FloatRange(0, 1), metavar="P",
              help="Answer 'unknown' (none of the classes) when the top probability is below "
                   "P; JSON then has \"unknown\": true and label null.")
@RUNTIME_OPTION
def predict_cmd(head_dir, paths, top_k, store, batch_size, backbone_name, as_json,
                as_csv, unknown_below, runtime) -> None:
    """Predict labels for images with the head in HEAD_DIR.

    PATHS are what extract takes: image files, folders (recursive) and text
    files of image paths (one per line, relative to the file's folder).
    Images go through the same pipeline as extraction, with the backbone the
    head was trained on. Unreadable files are reported and the rest still
    predicted; the exit code is non-zero only if nothing could be predicted.
    """
    from embedstore.prediction import predict

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    results = predict(head_dir, list(paths), top_k=top_k, store=store, batch_size=batch_size,
                      backbone=backbone_name, runtime=runtime, unknown_below=unknown_below)
    # a file name is bytes: one that is not UTF-8 is printed with its bytes escaped
    results = [{**r, "path": _printable(r["path"])} for r in results]
    if as_json:
        _json_out(results)
    elif as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "label", "probability", "top_k", "error"])
        for r in results:
            topk = ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.get("top_k", []))
            writer.writerow([r["path"], r.get("label") or "",
                             f"{r['probability']:.6f}" if "probability" in r else "", topk,
                             r.get("error", "")])
    else:
        width = min(60, max(len(r["path"]) for r in results))
        for r in results:
            if "error" in r:
                click.echo(f"{r['path']:<{width}}  error: {r['error']}")
            else:
                shown = r["top_k"][0 if r.get("unknown") else 1:]
                others = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in shown)
                label = "(unknown)" if r.get("unknown") else r["label"]
                click.echo(f"{r['path']:<{width}}  {label:<16} {r['probability']:7.1%}"
                           + (f"   ({others})" if others else ""))
    listed = max((len(r["top_k"]) for r in results if "top_k" in r), default=top_k)
    if listed < top_k:  # predict() cuts k to the number of classes
        click.echo(f"--top-k {top_k}: the head has only {listed} classes, so {listed} are "
                   "listed", err=True)
    failed = sum("error" in r for r in results)
    if failed and not (as_json or as_csv):
        click.echo(f"{failed} of {len(results)} files could not be predicted", err=True)
    if failed == len(results):
        sys.exit(1)


def _printable(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _export_formats():
    from embedstore.export_formats import FORMATS

    return FORMATS


@cli.command("export")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", default="savedmodel", show_default=True,
              type=_RegistryChoice(_export_formats),
              help="savedmodel: OUT is a SavedModel with image-bytes and uint8 signatures; "
                   "keras / tflite: OUT/model.keras or OUT/model.tflite on resized pixels.")
@click.option("--backbone", "backbone_name", metavar="NAME", help=TRUST_HELP)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds an earlier export.")
def export_cmd(head_dir, out, fmt, backbone_name, overwrite) -> None:
    """Export backbone + head in HEAD_DIR as the folder OUT: image in, probabilities out.

    OUT holds the model, labels.txt (output order) and export.json (inputs
    and outputs); it is written beside and renamed into place, and a
    non-empty OUT is refused unless --overwrite. The SavedModel's
    `serving_default` takes encoded JPEG/PNG/GIF/BMP bytes ([N] string),
    `predict_images` a uint8 batch [N, H, W, 3]; both resize the way
    embedstore does and return probabilities, label and probability. The
    keras and tflite models take [N, S, S, 3] RGB floats in [0, 255] already
    resized (tflite: signature serving_default, input "pixels", output
    "probabilities"); model.keras loads in plain Keras, without embedstore.
    """
    from embedstore.exporting import export

    path = export(head_dir, out, fmt, backbone_name=backbone_name, overwrite=overwrite)
    click.echo(f"exported {fmt} to {path}{os.sep}", err=True)


# --- finetune ------------------------------------------------------------------------

@cli.command("finetune")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--images", type=click.Path(exists=True), metavar="PATH",
              help="The folder (or file list) the head's store was extracted from; needed "
                   "until the activation cache is complete (the store does not record it).")
@click.option("--unfreeze-from", "block", default="14", show_default=True, metavar="BLOCK",
              help="First block to train: 1..18 for mobilenet_v2, a layer name for keras: "
                   "backbones; 0 trains the whole network from pixels (slow on CPU).")
@click.option("--recipe", default="auto", show_default=True,
              type=click.Choice(["auto", "small", "large"]),
              help="small: the softmax starts as the frozen logreg head, BatchNorm frozen, "
                   "peak learning rate 1e-4, 5+ epochs; large: a fresh softmax, BatchNorm "
                   "trained, 1e-3, 3 epochs (0.941 on Fashion-MNIST 60k); auto: large from "
                   "2000 training rows on (about 2800 images with the default split).")
@click.option("--epochs", type=click.IntRange(1), metavar="INTEGER",
              help="Most epochs [default: the recipe's: 5 small, 3 large, more when that is "
                   "under 30 / 150 training steps].")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), metavar="FLOAT",
              help="Peak of the warm-up + cosine schedule (AdamW) [default: the recipe's, "
                   "1e-4 small, 1e-3 large].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Rows per training step.")
@click.option("--random-flip/--no-random-flip", default=True, show_default=True,
              help="Flip training batches left to right at random (from pixels, block 0: also "
                   "small random rotations and zooms). Not the store's augmented views: "
                   "fine-tuning reads the original images only.")
@click.option("--augment", type=click.Choice(["flip", "none"]), hidden=True,
              help="Deprecated: --augment flip is --random-flip, --augment none is "
                   "--no-random-flip.")
@click.option("--patience", type=click.IntRange(1), metavar="INTEGER",
              help="Epochs without a lower hold-out loss before stopping; the best epoch, "
                   "the start included, is kept [default: 2, scaled up with the epochs the "
                   "large recipe adds for a small set].")
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the activation cache lives [default: STORE.activations/BLOCK-FP].")
@click.option("--guard/--no-guard", default=True, show_default=True,
              help="Keep the original weights unless the retrained head is significantly "
                   "better on a hold-out of the training images (--no-guard: always adopt).")
@click.option("--force", is_flag=True,
              help="Train even when the hold-out is too small for the guard ever to adopt "
                   "(by default that run stops before training).")
@click.option("--backbone", "backbone_name", metavar="NAME", help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def finetune_cmd(head_dir, out_dir, images, block, recipe, epochs, learning_rate, batch_size,
                 random_flip, augment, patience, cache_dir, guard, force, backbone_name,
                 as_json) -> None:
    """Fine-tune the top of the backbone of the head in HEAD_DIR; rebuild store and head.

    First it says how many hold-out images (a part of the training split) the
    guard will judge on and the smallest gain it could show there; when it
    could show none, it stops before training (--force, --no-guard go on).
    The frozen bottom runs once over the store's images into an activation
    cache (reused by later runs with the same block); the top blocks and a
    softmax layer train on it. Each epoch line gives the hold-out loss and
    accuracy beside the frozen head's; epoch 0 is before any update, and the
    best epoch (epoch 0 included) is kept. The tuned weights are adopted only
    if the head retrained on them is significantly better on the hold-out.
    OUT_DIR gets store.h5 (rebuilt), head/ (the same head type retrained),
    report.json and, when training ran, backbone/ (use it with --backbone;
    with the original weights when they were kept, and then the store and
    head name the original backbone). The original store and head are only
    read.
    """
    from pathlib import Path

    from embedstore.finetuning import finetune

    random_flip = _deprecated_augment(augment, random_flip)
    report = finetune(head_dir, out_dir, images=images, unfreeze_from=block, epochs=epochs,
                      learning_rate=learning_rate, batch_size=batch_size,
                      random_flip=random_flip, patience=patience, cache_dir=cache_dir,
                      guard=guard, force=force,
                      recipe=recipe, log=lambda line: click.echo(line, err=True),
                      backbone_name=backbone_name)
    if as_json:
        _json_out(report)
        return
    b, a = report["before"], report["after"]
    click.echo(f"{'':<10}{'val_acc':>9}{'val_f1':>9}")
    for name, scores in (("before", b), ("after", a)):  # none without a validation split
        click.echo(f"{name:<10}" + "".join("{:>9}".format("-" if v is None else f"{v:.4f}")
                                           for v in (scores["val_accuracy"],
                                                     scores["val_macro_f1"])))
    if report["stopped_before_training"]:
        click.echo("weights: original (not trained: the hold-out is too small to show a gain)")
    else:
        click.echo("weights: " + ("original (the tuned ones were not significantly better "
                                  "on the hold-out)" if report["kept_original_weights"]
                                  else "tuned"))
    click.echo("seconds: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}"
                                       for k, v in report["timings"].items()))
    for p in report["left_out"][:10]:
        click.echo(f"left out: {p['path']}: {p['reason']}", err=True)
    out = Path(out_dir)
    written = ([out / "backbone"] if report["backbone"]["path"] else []) + [
        out / "store.h5", out / "head", out / "report.json"]
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)


def _deprecated_augment(augment: str | None, random_flip: bool) -> bool:
    """--augment flip|none (before --random-flip had its name), still taken: scripts that
    pass it keep working, with a line saying what to write instead."""
    if augment is None:
        return random_flip
    wanted = augment == "flip"
    source = click.get_current_context().get_parameter_source("random_flip")
    given = f"--{'' if random_flip else 'no-'}random-flip"
    if source is not click.core.ParameterSource.DEFAULT and random_flip != wanted:
        raise click.UsageError(f"--augment {augment} contradicts {given}; give only {given}")
    click.echo(f"--augment {augment} is deprecated: use "
               f"--{'' if wanted else 'no-'}random-flip", err=True)
    return wanted


# --- know your data ------------------------------------------------------------------

@cli.command("similar")
@click.argument("store", type=click.Path(exists=True))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1),
              help="Neighbours per query.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON list: query, source, neighbours [{row, path, label, similarity}].")
@RUNTIME_OPTION
def similar_cmd(store, queries, k, as_json, runtime) -> None:
    """The K rows of STORE nearest (cosine) to each QUERY: an image file, or a path
    already in the store (its cached vector; its own row is left out).

    Image files whose content the store holds reuse its vector; others are
    embedded with the store's backbone. The search is exact, one block of
    rows at a time, so memory does not grow with the store.
    """
    from embedstore.similarity import similar

    results = similar(store, list(queries), k=k, runtime=runtime)
    if as_json:
        _json_out(results)
        return
    for r in results:
        click.echo(f"{r['query']}  ({r['source']})")
        for i, n in enumerate(r["neighbours"], 1):
            click.echo(f"  {i:>3}  {n['similarity']:.4f}  {n['label'] or '-':<16} {n['path']}")


@cli.command("audit")
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the whole audit as JSON.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write contact sheets, a 2-D map and index.html into this directory.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=".",
              show_default=True, help="The folder STORE was extracted from (for thumbnails).")
@click.option("--threshold", default=0.97, show_default=True, type=click.FloatRange(-1, 1),
              help="Cosine at which two images are near duplicates whatever their neighbours.")
@click.option("--mutual-threshold", default=0.90, show_default=True,
              type=click.FloatRange(-1, 1),
              help="... or when each is the other's nearest neighbour at this cosine or more, "
                   "with a lead of --gap over either one's next neighbour.")
@click.option("--gap", default=0.03, show_default=True, type=click.FloatRange(0, 2),
              help="The lead over either image's next neighbour that --mutual-threshold "
                   "needs.")
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="The split to check for leaks, as given to train.")
@click.option("--seed", default=0, show_default=True, help="Split seed, as given to train.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1),
              help="Items listed per section.")
def audit_cmd(store, as_json, report_dir, images, threshold, mutual_threshold, gap,
              val_fraction, seed, top) -> None:
    """Duplicates, train/validation leaks, likely label errors and outliers in STORE.

    One pass over the cached vectors: exact and near-duplicate groups (those
    crossing the split or classes first), rows whose given label gets a low
    out-of-fold probability from a logreg head (with the class it looks
    like), and rows far from their own class. Each is ranked, with a reason.
    """
    from embedstore.auditing import audit

    result = audit(store, threshold=threshold, mutual_threshold=mutual_threshold, gap=gap,
                   val_fraction=val_fraction, seed=seed, top=top)
    if report_dir:
        from embedstore.audit_report import write_report

        index = write_report(result, report_dir, images)
        click.echo(f"wrote {index}", err=True)
    if as_json:
        _json_out(result)
        return
    s = result["summary"]
    click.echo(f"{result['store']}: {result['rows']} images")
    click.echo(f"duplicate groups: {s['duplicate_groups']} ({s['exact_duplicate_groups']} of "
               f"identical files; {s['groups_across_split']} across the train/validation "
               f"split, {s['groups_across_classes']} across classes)")
    for g in result["duplicates"]:
        click.echo(f"  {g['reason']}")
        for m in g["members"]:
            click.echo(f"      {m['path']}  ({m['label'] or '-'}, {m['split']})")
    click.echo(f"likely label errors: {s['likely_label_errors']} (out-of-fold accuracy "
               f"{s['oof_accuracy']})")
    for e in result["label_errors"]:
        click.echo(f"  {e['path']}  {e['reason']}")
    click.echo(f"outliers: {s['outliers']}")
    for o in result["outliers"]:
        click.echo(f"  {o['path']}  {o['reason']}")
