"""Wall time of the everyday commands, before and after, side by side in one run.

"before" is an earlier commit of embedstore checked out into a temporary
worktree and imported ahead of the installed package; "after" is this
checkout. Each command runs --repeat times per side, alternating sides, and
the median is reported, with whether the process imported TensorFlow.

  .venv/bin/python -m bench.bench_startup --before 75dddbf
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "fashion-mnist-sample"

# Runs the CLI from the tree on sys.path[0], then says whether TensorFlow was imported.
RUNNER = ("import sys, atexit; "
          "atexit.register(lambda: sys.stderr.write("
          "'\\nTF=%d\\n' % ('tensorflow' in sys.modules))); "
          "sys.argv = ['embedstore'] + sys.argv[1:]; "
          "from embedstore_cli import main; main()")


def tree_on_path(checkout: Path, into: Path) -> Path:
    """A folder with `embedstore` and `embedstore_cli` pointing into a checkout."""
    into.mkdir(parents=True, exist_ok=True)
    (into / "embedstore").symlink_to(checkout / "embedstore")
    (into / "embedstore_cli").symlink_to(checkout / "cli")
    return into


def run(path_dir: Path, args: list[str], cwd: Path) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(path_dir)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, cwd=cwd,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed: {proc.stderr[-500:]}")
    return seconds, "TF=1" in proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="75dddbf", help="git revision to compare against")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="es-startup-"))
    before_checkout = work / "before-src"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_checkout),
                    args.before], check=True, capture_output=True)
    try:
        sides = {"before": tree_on_path(before_checkout, work / "before-path"),
                 "after": tree_on_path(REPO, work / "after-path")}
        rows = []
        for side, path_dir in sides.items():  # a store and a head per side, made by that side
            store, head = work / f"{side}.h5", work / f"{side}-head"
            run(path_dir, ["extract", str(SAMPLE), str(store), "--quiet"], work)
            run(path_dir, ["train", str(store), str(head)], work)
        files = [str(p) for p in sorted(SAMPLE.glob("*/*.png"))[::30]]
        commands = {
            "embedstore --help": lambda s: ["--help"],
            "info STORE": lambda s: ["info", str(work / f"{s}.h5")],
            "extract (unchanged re-run)": lambda s: ["extract", str(SAMPLE), str(work / f"{s}.h5"),
                                                     "--quiet"],
            "predict --store (all cached)": lambda s: ["predict", str(work / f"{s}-head"), *files,
                                                       "--store", str(work / f"{s}.h5")],
        }
        for label, make in commands.items():
            times = {s: [] for s in sides}
            imported = {}
            for _ in range(args.repeat):
                for side, path_dir in sides.items():
                    seconds, tf = run(path_dir, make(side), work)
                    times[side].append(seconds)
                    imported[side] = tf
            b, a = (statistics.median(times[s]) for s in ("before", "after"))
            rows.append((label, b, imported["before"], a, imported["after"]))
            print(f"{label:<30} before {b:6.2f} s (TF {imported['before']})  "
                  f"after {a:6.2f} s (TF {imported['after']})", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                        str(before_checkout)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    table = ["| command | before (s) | TF imported | after (s) | TF imported |",
             "|---|---|---|---|---|"]
    table += [f"| `{c}` | {b:.2f} | {'yes' if tb else 'no'} | {a:.2f} | {'yes' if ta else 'no'} |"
              for c, b, tb, a, ta in rows]
    text = "\n".join(table)
    if args.no_append:
        print(text)
    else:
        report("Everyday commands: wall time before and after (issue 9)",
               f"Median of {args.repeat} runs per side, sides alternating, on the bundled "
               f"300-image sample. Before = commit {args.before}.\n\n{text}")


if __name__ == "__main__":
    main()
