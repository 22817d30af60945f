"""Command-line tools: thin argparse wrappers, and the only place that reads argv (with ``msi.tools``, what they
share).

Every tool exits with status 2 and a one-line ``error: ...`` (no traceback) on a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from functools import partial
from pathlib import Path

from msi.errors import Interrupted, MSIError, shown
from msi.tools import HelpFormatter, guard, parser, say, whole

EPILOG_OVERRIDES = (
    "Overrides are dotted key=value pairs applied after the YAML file, e.g. "
    "model.n_layers=2 loss.alpha=0.01 train.epochs=5 eval.ks=[10,20,50]. Run 'msi-train --list-keys' for all keys."
)



def _train(argv: list[str] | None) -> int:
    from msi.config import RESUME_KEYS

    p = parser("msi-train", "Train a model; select it on the valid split; score test once.", EPILOG_OVERRIDES)
    p.add_argument("--config", help="YAML config (relative paths inside resolve against its folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt with its saved config (a finished run: print "
                   f"its results); key=value may change only {', '.join(RESUME_KEYS)} (more epochs extend a "
                   "finished run)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's train.device)")
    p.add_argument("--out", metavar="DIR", help="run directory, empty or new (default: "
                   "<train.out_dir>/<train.run_name or data-model-time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds an earlier run (its run files are removed)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: accept data of the same shape but another fingerprint")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-epoch lines (the run's train.log keeps them)")
    p.add_argument("--list-keys", action="store_true",
                   help="print every config key with its default and what it does, then exit; the model and loss "
                   "keys are those of model.name (default msi): --list-keys model.name=lightgcn")
    args = p.parse_intermixed_args(argv)  # key=value anywhere: after --quiet as well as before it
    from msi.config import describe_keys, load_config

    if args.list_keys:
        say(describe_keys(args.overrides))
        return 0
    if args.resume and (args.config or args.out or args.overwrite):
        raise MSIError("--resume continues a run in its own directory with its saved config; drop --config, "
                       "--out and --overwrite")
    if not args.resume and not args.config:
        p.error("--config is required (or --resume RUN_DIR); try --config configs/quickstart.yaml")
    from msi.train import resume, train

    if args.resume:
        results = resume(args.resume, args.overrides, quiet=args.quiet, device=args.device,
                         allow_other_data=args.allow_other_data)
    else:
        results = train(load_config(args.config, args.overrides), out=args.out, overwrite=args.overwrite,
                        quiet=args.quiet, device=args.device)
    say(_result_line(results))
    return 0


def _result_line(results: dict) -> str:
    """msi-train's last line: the run directory, its best epoch, the selection metric on valid and test, and the
    popularity floor (a results.json written before msi recorded it has none)."""
    metric = results["selected_by"].removeprefix("valid ")
    where = os.path.relpath(results["run_dir"])
    where = results["run_dir"] if where.startswith("..") else where
    floor = results.get("popularity")
    beside = f" (popularity: valid {floor['valid'][metric]:.4f} test {floor['test'][metric]:.4f})" if floor else ""
    return (f"{where}: best epoch {results['best_epoch']} of {results['epochs_run']}, {metric} valid "
            f"{results['valid'][metric]:.4f} test {results['test'][metric]:.4f}{beside}; every metric in its "
            "results.json")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by msi-train")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--mask-valid", action="store_true", help="at test, also mask each user's valid items")
    p.add_argument("--allow-other-data", action="store_true",
                   help="accept a data set of the checkpoint's shape whose rows differ (another fingerprint)")


def _eval(argv: list[str] | None) -> int:
    p = parser("msi-eval", "Full-ranking evaluation of a checkpoint on the valid split (or --split test); prints "
               "JSON metrics.")
    _checkpoint_args(p)
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="which split to score (the output's 'split' says which); test only for a checkpoint "
                        "already selected on valid")
    p.add_argument("--item-view", default="id", help="represent items by 'id' or a modality name (the probe)")
    p.add_argument("--ks", default=None, help="comma-separated cut-offs (default: the run's eval.ks)")
    _items_arg(p)
    args = p.parse_args(argv)
    from msi.evaluate import Evaluator
    from msi.runtime import open_run, resolve_device

    device = resolve_device(args.device)
    model, cfg, dataset, _ = open_run(args.checkpoint, device, allow_other_data=args.allow_other_data)
    if args.item_view not in model.item_views:
        raise MSIError(f"--item-view {shown(args.item_view)}: this model has {', '.join(model.item_views)}")
    evaluator = Evaluator.from_config(dataset, device, cfg, _parse_ks(args.ks) if args.ks else None, args.mask_valid,
                                      args.items)
    metrics = evaluator(model, args.split, args.item_view)
    say(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, "items": args.items,
                    "item_view": args.item_view, **metrics}, indent=2))
    return 0


def _items_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", choices=("all", "warm", "cold"), default="all",
                   help="score the split's rows of every item, of warm items (with a train row) only, or of cold "
                        "ones (none) only; every item stays a candidate")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise MSIError(f"--ks {shown(text)}: expected comma-separated positive integers, e.g. 10,20") from None
    from msi.config import MAX_INT

    if not ks or min(ks) <= 0 or max(ks) > MAX_INT:
        raise MSIError(f"--ks {shown(text)}: expected comma-separated positive integers below 2**63, e.g. 10,20")
    return ks


def _recommend(argv: list[str] | None) -> int:
    p = parser(
        "msi-recommend",
        "Write the top-k items of each user to a TSV (userID, rank, itemID, score); seen items are excluded.",
        "Ids are written as raw ids when the data folder has MMRec's u_id_mapping.csv / i_id_mapping.csv.",
    )
    _checkpoint_args(p)
    p.add_argument("--users", default="all",
                   help="'all', 'split' (the users with rows in --split), or a file of userIDs (as in .inter), "
                        "one per line")
    p.add_argument("--k", type=whole("--k", 1), default=20, help="items per user")
    p.add_argument("--split", choices=("valid", "test"), default="test",
                   help="recommend as for this split: train items are excluded (and valid ones at test with "
                        "--mask-valid)")
    p.add_argument("--out", required=True, help="output TSV file")
    args = p.parse_args(argv)
    from msi.recommend import check_output, write_recommendations
    from msi.runtime import open_run, resolve_device

    check_output(args.out)  # before the checkpoint and data are read
    device = resolve_device(args.device)
    model, cfg, dataset, _ = open_run(args.checkpoint, device, allow_other_data=args.allow_other_data)
    n_users, n_rows = write_recommendations(model, dataset, args.out, users=args.users, k=args.k, split=args.split,
                                            mask_valid=args.mask_valid or cfg.eval.mask_valid_at_test,
                                            batch_users=cfg.eval.batch_users)
    say(f"wrote {n_rows} rows for {n_users} users (at most {args.k} items each) to {args.out}")
    return 0


def _data(argv: list[str] | None) -> int:
    p = parser("msi-data", "Make data sets in the MMRec layout: generated ones, or from raw Amazon files.")
    sub = p.add_subparsers(dest="command", required=True)
    from msi.data.synth import PRESETS, SIGNALS

    s = sub.add_parser("synth", help="generate a data set with planted structure",
                       formatter_class=HelpFormatter,
                       description="Generate a data set in the MMRec layout (same seed, same bytes).")
    s.add_argument("--preset", required=True, choices=sorted(PRESETS), help="size preset")
    s.add_argument("--out", required=True, help="data set folder to write (<out>/<name>.inter, *_feat.npy)")
    s.add_argument("--seed", type=whole("--seed"), default=0, help="random seed")
    s.add_argument("--name", default=None,
                   help="data set name, the <name> of <name>.inter and of data.name (default: the folder's name)")
    s.add_argument("--signal", choices=SIGNALS, default=None,
                   help="where the preference factors live: mixed (both modalities, one shared nuisance), shared "
                        "(both, each with a nuisance of its own), specific (half the factors each, a shared "
                        "nuisance); default: the preset's own (mixed)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the data set in --out (a folder holding files is refused without it)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _prepare_arguments(sub.add_parser(
        "prepare", help="build a data set from raw Amazon review files (2014 or 2018 release)",
        formatter_class=HelpFormatter,
        description="Build a data set in the MMRec layout from raw Amazon review/metadata/image files."))
    args = p.parse_args(argv)
    if args.command == "synth":
        from msi.data.synth import generate

        path = generate(args.preset, args.out, seed=args.seed, name=args.name, progress=not args.quiet,
                        signal=args.signal, overwrite=args.overwrite)
        name = path.stem  # <name>.inter: the folder's name unless --name
        say(f"wrote {path.parent}: data set '{name}' (train on it with data.root={path.parent.parent} "
            f"data.name={name})")
    else:
        _run_prepare(args)
    return 0


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `msi-data prepare` to `parser`.

    Each help text shows its default itself (required options have none), so `HelpFormatter` adds none.
    """
    from msi.data.prepare import DEDUPE, ID_ORDERS, SPLIT_METHODS

    required = {"required": True, "default": argparse.SUPPRESS}
    paths = parser.add_argument_group("input and output")
    paths.add_argument("--reviews", type=Path, metavar="PATH", **required,
                       help="reviews, JSON lines, plain or gzip (2014 reviews_<Cat>_5.json.gz or 2018 <Cat>_5.json.gz)")
    paths.add_argument("--meta", type=Path, metavar="PATH", **required,
                       help="item metadata, plain or gzip: 2014 Python-literal lines or 2018 JSON lines")
    paths.add_argument("--image-features", type=Path, metavar="PATH",
                       help="2014 image features (.b: 10-byte ASIN + 4096 float32 per record), plain or gzip "
                       "(default: %(default)s, a text-only data set, as for the 2018 release)")
    paths.add_argument("--name", metavar="NAME", **required, help="data set name: writes <out>/<name>/<name>.inter ...")
    paths.add_argument("--out", type=Path, metavar="DIR", **required, help="folder that receives <name>/")
    paths.add_argument("--overwrite", action="store_true",
                       help="replace an earlier data set in <out>/<name>/ (default: %(default)s)")
    recipe = parser.add_argument_group("recipe (defaults follow MMRec; docs/prepare.md gives each rule)")
    recipe.add_argument("--k-core", type=whole("--k-core", 1), default=5, metavar="K",
                        help="iterative k-core: every user and item keeps >= K interactions (default: %(default)s)")
    recipe.add_argument("--k-core-user", type=whole("--k-core-user", 1), metavar="K",
                        help="K for users (default: %(default)s, meaning --k-core)")
    recipe.add_argument("--k-core-item", type=whole("--k-core-item", 1), metavar="K",
                        help="K for items (default: %(default)s, meaning --k-core)")
    recipe.add_argument("--dedupe", choices=DEDUPE, default="earliest",
                        help="which review of a repeated (user, item) pair to keep, by timestamp; none keeps "
                        "them all (default: %(default)s)")
    recipe.add_argument("--id-order", choices=ID_ORDERS, default="appearance",
                        help="contiguous ids in order of first appearance in the reviews (MMRec) or of the "
                        "sorted raw ids (default: %(default)s)")
    recipe.add_argument("--split", choices=SPLIT_METHODS, default="random",
                        help="per-user split, seeded random or chronological (latest rows test, then valid): "
                        "n < 10 rows gives n-2/1/1, else floor(n/5) held out, half valid, the rest test "
                        "(default: %(default)s)")
    recipe.add_argument("--seed", type=whole("--seed"), default=0, metavar="N",
                        help="seed of the random split (default: %(default)s)")
    recipe.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed lines instead of stopping at the first (default: %(default)s)")
    recipe.add_argument("--no-progress", action="store_true", help="hide the progress bars (default: %(default)s)")


def _run_prepare(args: argparse.Namespace) -> None:
    """Run `prepare` from parsed arguments and print a short summary."""
    from msi.data.prepare import prepare, summary_text

    summary = prepare(
        args.reviews, args.meta, args.image_features, args.name, args.out, k_core=args.k_core,
        k_core_user=args.k_core_user, k_core_item=args.k_core_item, dedupe=args.dedupe, id_order=args.id_order,
        split=args.split, seed=args.seed, skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    say(summary_text(summary))


def _sweep(argv: list[str] | None) -> int:
    p = parser(
        "msi-sweep", "Configs x grid x seeds on Ray Tune; the grid point with the best mean valid train.metric "
        "wins (test is read for it only); re-running the same command finishes an interrupted sweep.",
        "Locally Ray starts embedded; with --address (or RAY_ADDRESS) the trials run on that Ray cluster, and --out "
        "and the data must be on storage every node sees. Needs the extra: pip install -e '.[sweep]'.")
    p.add_argument("--config", nargs="+", type=Path, help="YAML configs (each one a row of the table)")
    p.add_argument("--grid", nargs="*", default=None, action="extend", metavar="key=v1,v2",
                   help="axes searched on valid; commas inside [...] stay in a value: eval.ks=[10,20],[5,10]")
    p.add_argument("--seeds", nargs="+", type=whole("--seeds"), default=[999, 42, 2026],
                   help="train.seed of each trial")
    p.add_argument("--out", type=Path, help="sweep folder: run directories, sweep.yaml and the tables")
    p.add_argument("--set", nargs="*", default=None, action="extend", metavar="key=value",
                   help="overrides for every trial (repeatable)")
    p.add_argument("--cpus-per-trial", type=whole("--cpus-per-trial", 1), default=1,
                   help="CPUs (and torch threads) per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; 0.25 packs four on one GPU")
    p.add_argument("--max-concurrent", type=whole("--max-concurrent", 1), default=None,
                   help="trials at a time (default: as resources allow)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: RAY_ADDRESS, else embedded)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds; then running trials stop (their last.pt stays) and the table covers finished ones")
    p.add_argument("--asha", action="store_true", help="stop weak trials early on valid (never scored, never selected)")
    p.add_argument("--report", type=Path, nargs="+", metavar="DIR",
                   help="re-render DIR's tables from its run directories; with several DIRs (a grid run in parts), "
                        "one selection over all their points, written to --out (with one DIR, --out writes its "
                        "tables there instead of in DIR)")
    p.add_argument("--baseline", metavar="CONFIG",
                   help="with --report: results.md also gets each config's selected point against this config's "
                        "(its YAML file's name without .yaml), on test, with msi-compare's statistics")
    p.add_argument("--mmrec-rule", action="store_true",
                   help="with --report: a last column with what MMRec's rule would report (each config's point best "
                        "on test: it reads test at every point, selects nothing, and shows that rule's optimism)")
    args = p.parse_args(argv)
    if (args.baseline or args.mmrec_rule) and not args.report:
        p.error("--baseline and --mmrec-rule go with --report DIR")
    from msi.sweep import report_sweeps, run_sweep

    if args.report:
        say((report_sweeps(args.report, args.out, args.baseline, args.mmrec_rule) / "results.md").read_text(), end="")
        return 0
    if not args.config or not args.out:
        p.error("--config and --out are required (or --report DIR)")
    try:
        run_sweep(args.config, args.grid or [], args.seeds, args.out, overrides=args.set or [],
                  cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                  max_concurrent=args.max_concurrent, address=args.address, deadline=args.deadline, asha=args.asha)
    except KeyboardInterrupt:
        command = shlex.join(["msi-sweep", *map(str, sys.argv[1:] if argv is None else argv)])
        raise Interrupted(f"interrupted; finished trials are kept and the others resume from their last.pt: "
                          f"continue with {command}") from None
    say((args.out / "results.md").read_text(), end="")
    return 0


def _plot(argv: list[str] | None) -> int:
    p = parser("msi-plot", "Learning curves of run directories (seeds overlaid with their mean, each run's best "
                "epoch marked), or a sweep's grid of valid metrics (mean ± std over seeds) with the selected point "
                "starred, as a picture. Needs: pip install -e '.[plot]'.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run directories, or one msi-sweep folder")
    p.add_argument("--out", required=True, type=Path, help="file to write: .png, .pdf or .svg (an existing file "
                   "only when msi-plot wrote it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out also when msi-plot did not write it")
    args = p.parse_args(argv)
    from msi.plot import plot

    width, height = plot(args.dirs, args.out, args.overwrite)
    say(f"wrote {args.out} ({width}x{height})")
    return 0


def _compare(argv: list[str] | None) -> int:
    from msi.compare import BOOTSTRAP_RESAMPLES

    p = parser(
        "msi-compare", "Paired comparison of two sets of runs on one data set, paired by seed: each side's per-seed "
        f"and mean metric, the mean difference B - A, a 95% CI by paired bootstrap over users ({BOOTSTRAP_RESAMPLES:,} "
        "resamples of the per-user metric averaged over seeds, fixed seed), the Wilcoxon signed-rank p over users "
        "and the paired t-test p over seeds.",
        "Each run's best.pt is scored per user. SWEEP_DIR:CONFIG stands for the run directories of CONFIG's "
        "selected point in an msi-sweep folder (CONFIG: the YAML file's name without .yaml).")
    p.add_argument("--a", nargs="+", required=True, metavar="RUN_DIR", help="runs of A (or SWEEP_DIR:CONFIG)")
    p.add_argument("--b", nargs="+", required=True, metavar="RUN_DIR", help="runs of B (or SWEEP_DIR:CONFIG)")
    p.add_argument("--split", choices=("valid", "test"), default="valid",
                   help="test is for points already selected on valid only (e.g. SWEEP_DIR:CONFIG), never for "
                        "choosing between settings")
    p.add_argument("--metric", default="recall@20", help="recall, ndcg, precision, map, hit or mrr @ a cut-off")
    _items_arg(p)
    p.add_argument("--out", type=Path, metavar="FILE.md", help="also write the markdown summary here")
    p.add_argument("--json", type=Path, metavar="FILE.json", help="write the statistics as JSON here")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--unfinished", action="store_true",
                   help="also compare runs that never finished (no results.json) by their best.pt so far")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from msi.compare import compare, ours_json, ours_markdown, render_markdown
    from msi.files import check_replace, write_text
    from msi.runtime import resolve_device

    outputs = [(path, ours, kind) for path, ours, kind in ((args.out, ours_markdown, "md"),
                                                           (args.json, ours_json, "json")) if path]
    for path, ours, _ in outputs:
        check_replace(path, ours, "msi-compare")  # before any run is scored
    result = compare(args.a, args.b, args.metric, args.split, resolve_device(args.device), not args.quiet,
                     args.unfinished, args.items)
    texts = {"md": render_markdown(result, " ".join(args.a), " ".join(args.b)),
             "json": json.dumps(result.to_json(), indent=2) + "\n"}
    say(texts["md"], end="")
    for path, ours, kind in outputs:
        write_text(path, texts[kind], ours, "msi-compare")
        say(f"wrote {path}")
    return 0


compare_main = partial(guard, _compare)
sweep_main = partial(guard, _sweep)
plot_main = partial(guard, _plot)
train_main = partial(guard, _train)
eval_main = partial(guard, _eval)
recommend_main = partial(guard, _recommend)
data_main = partial(guard, _data)

TOOLS = {"train": train_main, "eval": eval_main, "recommend": recommend_main, "data": data_main,
         "sweep": sweep_main, "plot": plot_main, "compare": compare_main}


def msi_main(argv: list[str] | None = None) -> int:
    """``msi TOOL ...`` runs ``msi-TOOL ...``; ``msi --version`` prints the version."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]](argv[1:])
    p = parser("msi", "MSI multi-modal recommendation. Tools: " + ", ".join(f"msi {t}" for t in TOOLS)
                + " (the same as msi-train, msi-eval, ...).")
    p.add_argument("tool", choices=sorted(TOOLS), help="the tool to run")
    p.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(msi_main())
