"""The ``finetune`` command: parses arguments, calls the Python API, prints. No logic of its own."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

EPILOG = "Docs: README.md and docs/ in the project. Every command takes --help."


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", help="shipped recipe name (natural, microscopy, ...), a YAML file, or auto "
                                          "(default: auto, chosen from the images; 'finetune plan' says why)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=3e-4 (repeatable)")


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("data", nargs=None if required else "?",
                   help="image folder: one sub-folder per class (optionally under train/, val/, test/)")
    p.add_argument("--csv", help="a CSV of path,label[,split] instead of (or relative to) the folder")


def _scan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scan", choices=["auto", "full", "header"],
                   help="decode every image (full), read headers only (header: files that fail later are skipped "
                        "and recorded during training), or full below 100,000 files (auto, the default)")


def _train_args(p: argparse.ArgumentParser) -> None:
    """The options of a training run, shared by ``train`` and ``plan`` (which previews that exact run)."""
    _recipe_args(p)
    p.add_argument("--backbone", "-b", help="any timm model name (default: tf_efficientnet_lite0)")
    p.add_argument("--weights", help="a local weights file (timm checkpoint or state dict)")
    p.add_argument("--epochs", "-e", type=int, help="training epochs (default: the recipe's train.epochs)")
    p.add_argument("--batch-size", type=int, help="images per step and device (default: the recipe's)")
    p.add_argument("--lr", type=float, help="the head's learning rate (the backbone gets a fraction)")
    p.add_argument("--image-size", type=int, help="side of the square input in pixels (default: the recipe's)")
    p.add_argument("--precision", choices=["32-true", "16-mixed", "bf16-mixed"],
                   help="float precision; the mixed ones need a GPU to be faster (default: the recipe's)")
    p.add_argument("--devices", help="devices per node (auto, 1, 2, ...)")
    p.add_argument("--num-nodes", type=int, help="machines to train on, with --devices each (default: 1)")
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--accelerator", help="auto (default), cpu, gpu")
    p.add_argument("--deterministic", action="store_true", help="reproducible to the bit (slower)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    _scan_arg(p)
    p.add_argument("--allow-outside", action="store_true",
                   help="allow relative CSV paths and symlinks that lead out of the data folder")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finetune", epilog=EPILOG, description="Fine-tune pretrained ImageNet backbones "
                                 "(timm) on your own images; a freeze policy decides what to fix from your data.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a backbone on an image folder or CSV", epilog=EPILOG,
                       description="Fine-tune a backbone; writes a new run folder (never overwrites one).")
    _data_args(p, required=False)
    _train_args(p)
    p.add_argument("--out", "-o", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--name", help="run folder name (default: <data>-<backbone>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run from its last checkpoint (with --epochs "
                                                   "N: extend a finished run to N epochs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("quickstart", help="make an example folder from scikit-image's images and train on it",
                       description="Writes a real example image folder (textures shipped with scikit-image: "
                                   "brick, grass, gravel), fine-tunes the default backbone on it, prints metrics.")
    p.add_argument("--folder", default="examples/textures", help="where to write the example images")
    p.add_argument("--out", "-o", default="runs", help="where the run folder goes (default: runs)")
    p.add_argument("--epochs", "-e", type=int, default=3, help="training epochs (default: 3)")

    p = sub.add_parser("evaluate", help="metrics, plots and a report of a trained run on a data folder")
    p.add_argument("run", help="a run folder made by 'finetune train'")
    _data_args(p, required=False)
    p.add_argument("--split", help="which split of DATA to use when it has train/val/test (default: test if present, "
                                   "else val, else all)")
    p.add_argument("--checkpoint", default="final", choices=["final", "best", "last"], help="final: the refit model "
                   "after a refit, else the best epoch's weights; best; last (default: final)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, help="processes that read the images (default: 0 on 2 CPU cores or fewer, "
                                               "1 on more; with a GPU every core but one, at most 8)")

    p = sub.add_parser("predict", help="predict labels of images with a run or an export")
    p.add_argument("run", help="a run folder or an exported model folder")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", "-k", type=int, default=1, help="the K likeliest classes per image (default: 1)")
    p.add_argument("--out", help="CSV to write (default: print)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--workers", type=int, help="processes that read the images (default as for evaluate)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it "
                                                         "(skipped files get their reason in the error column)")

    p = sub.add_parser("export", help="export a run to ONNX or TorchScript with its labels and preprocessing")
    p.add_argument("run", help="a run folder made by 'finetune train'")
    p.add_argument("--format", "-f", default="onnx", choices=["onnx", "torchscript"],
                   help="onnx or torchscript (default: onnx)")
    p.add_argument("--out", help="folder to write (default: RUN/export-FORMAT)")

    p = sub.add_parser("plan", help="print the freeze plan and why, without training",
                       description="The plan 'finetune train' would make with the same options, without training.")
    _data_args(p)
    _train_args(p)

    p = sub.add_parser("distance", help="measure how far a folder of images is from ImageNet (0..1)")
    _data_args(p)
    _recipe_args(p)
    p.add_argument("--backbone", "-b", help="a timm model with BatchNorm to measure with (default: the recipe's)")
    p.add_argument("--max-images", type=int, default=128, help="a seeded random sample of this many (default: 128)")

    p = sub.add_parser("inspect", help="units, weights, connections and training cost of a backbone")
    p.add_argument("backbone", help="timm model name, or lenet5 / alexnet")
    p.add_argument("--input-size", help="CxHxW, e.g. 3x224x224 (default: the model's own)")
    p.add_argument("--freeze", help="fixed leading groups: a number, 'probe', 'full'")
    _recipe_args(p)
    p.add_argument("--plot", help="write the per-stage picture to this PNG")
    p.add_argument("--csv", help="write the per-layer table to this CSV")
    p.add_argument("--n-train", type=int, default=1000, help="training images assumed by an automatic plan")
    p.add_argument("--n-classes", type=int, default=10, help="classes assumed by an automatic plan")
    p.add_argument("--layers", action="store_true",
                   help="print every layer, not only stages and totals (always for lenet5/alexnet)")

    p = sub.add_parser("check", help="scan a data folder and report bad files, without training")
    _data_args(p, required=False)
    p.add_argument("--channels", type=int, default=3,
                   help="channels the recipe reads: files with others are reported (default: 3)")
    _scan_arg(p)
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of listing them all")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow relative CSV paths and symlinks that lead out of the data folder")

    p = sub.add_parser("pack", help="write checked images and labels as a streamable dataset (litdata) to train from",
                       description="Scan and split DATA as 'finetune train' would with the recipe, then write each "
                                   "split in litdata's optimized format to --out (a local folder or s3://, gs://... "
                                   "URL); 'finetune train DEST' trains from it.")
    _data_args(p)
    _recipe_args(p)
    p.add_argument("--out", "-o", required=True, help="a new folder or an object-store URL")
    p.add_argument("--workers", type=int, help="processes writing the chunks (default: every core, at most 8)")
    _scan_arg(p)

    p = sub.add_parser("explain", help="where the model looked: class-activation maps over images (grad-cam)",
                       description="Writes, per image, the image as the model read it beside the map of its top "
                                   "answer (PNG), and explain.csv with the top-k answers. Needs finetune[explain].")
    p.add_argument("run", help="a run folder made by 'finetune train'")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--method", "-m", default="gradcam", help="gradcam (default), gradcam++, hirescam, xgradcam, "
                                                              "layercam, eigencam, eigengradcam, scorecam, ablationcam")
    p.add_argument("--top-k", "-k", type=int, default=3,
                   help="answers to show per image, each with its map (default: 3)")
    p.add_argument("--out", help="folder to write (default: RUN/explain-METHOD)")

    p = sub.add_parser("lr-find", help="Lightning's learning-rate finder on the freeze plan's groups, without training",
                       description="Sweeps the head's learning rate (the plan's multipliers kept), writes the curve "
                                   "(lr_find.png) and the chosen rate into a new run folder and prints it.")
    _data_args(p)
    _recipe_args(p)
    p.add_argument("--backbone", "-b", help="any timm model name (default: the recipe's)")
    p.add_argument("--out", "-o", default="runs", help="where the finder's run folder goes (default: runs)")

    p = sub.add_parser("serve", help="a web page on this computer: upload images, see the top-k answers and maps",
                       description="Serves a page on http://127.0.0.1:PORT/ (this computer only) for a run or an "
                                   "exported model folder; maps need a run and finetune[explain].")
    p.add_argument("run", help="a run folder or an exported model folder")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: 8000)")
    p.add_argument("--top-k", "-k", type=int, default=3, help="answers to show per image (default: 3)")

    p = sub.add_parser("recipes", help="list the shipped recipes, or show one")
    p.add_argument("name", nargs="?", help="a recipe to show with its comments (default: list them all)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        return int(globals()[f"_cmd_{args.command.replace('-', '_')}"](args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing: one clear line, the traceback only on request
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        print(f"finetune {args.command}: error: {_cli_words(str(e), args)}", file=sys.stderr)
        return 2


#: command-line flag (its argparse dest) -> the recipe key it sets (the last three are switches: key=true)
_FLAG_KEYS = {"backbone": "backbone.name", "weights": "backbone.weights", "epochs": "train.epochs",
              "batch_size": "train.batch_size", "lr": "optim.lr", "image_size": "image.size",
              "precision": "train.precision", "devices": "train.devices", "num_nodes": "train.num_nodes",
              "strategy": "train.strategy", "accelerator": "train.accelerator", "scan": "train.scan",
              "deterministic": "train.deterministic", "strict": "train.strict", "allow_outside": "train.allow_outside"}

#: what the library says in Python words -> the command-line words. A rule with a flag applies only where the
#: command has that flag; ``typed``: only where the user typed it. The tests hold each message to its CLI form.
_PY_TO_CLI = [
    (None, False, r"\bcsv= ", "--csv FILE "),
    ("allow_outside", False, r"\bset allow_outside=True\b", "pass --allow-outside"),
    ("strict", True, r"\bset strict=False\b", "leave out --strict"),
    (None, False, r"\bset strict=False\b", "set train.strict: false in the recipe"),
    ("weights", True, r"\bweights=('[^']*') contradicts pretrained=False",
     r"--weights \1 contradicts backbone.pretrained: false"),
    ("weights", False, r"\bcreate_backbone\('[^']*', \.\.\., weights='([^']*)'\)", r"--weights \1"),
    (None, False, r"\bpass pretrained=False\b", "pass --set backbone.pretrained=false"),
]


def _cli_words(message: str, args: argparse.Namespace) -> str:
    """``message`` with the Python and recipe words replaced by the flags the user typed or can type."""
    for dest, typed, pattern, words in _PY_TO_CLI:
        if dest is None or (getattr(args, dest, None) if typed else hasattr(args, dest)):
            message = re.sub(pattern, words, message)
    for dest, key in _FLAG_KEYS.items():
        if getattr(args, dest, None) is not None and getattr(args, dest) is not False:
            message = message.replace(f"'{key}'", f"'{key}' (--{dest.replace('_', '-')})")
    return message


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The --set values, then KEY=VALUE for each recipe flag typed (a switch: KEY=true)."""
    sets = list(args.overrides)
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            sets.append(f"{key}={'true' if value is True else value}")
    return sets


def _resolve_recipe(args: argparse.Namespace):
    """(recipe, why): the recipe the options name, or without --recipe the one chosen from DATA's images."""
    from .autorecipe import resolve
    return resolve(args.recipe, args.data, args.csv, _train_overrides(args))


def _print_summary(run) -> None:
    import pandas as pd
    from .data import bad_files_note
    s, listed = run.summary, run.path / "bad_files.csv"
    if listed.is_file() and (note := bad_files_note(pd.read_csv(listed, keep_default_na=False), listed)):
        print(note, file=sys.stderr)
    score = s.get("best_score")
    print(f"\nrun folder: {run.path}\nbest checkpoint: {s.get('best_checkpoint')}  ({s.get('best_metric')} = "
          f"{'-' if score is None else f'{score:.4f}'})")
    for k, v in sorted(s.get("final_metrics", {}).items()):
        print(f"  {k:<14} {v:.4f}")
    if "refit" in s:
        print("final model: {checkpoint}, refit on train + val ({images} images, {epochs} epochs, {wall_time_s} s); "
              "the scores above are the first fit's on the validation split".format(**s["refit"]))
    print(f"wall time: {s.get('wall_time_s')} s")


# -- the commands: each returns its exit status, None for 0 ----------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int | None:
    from .train import TrainingStopped, fit
    if not (args.resume or args.data or args.csv):
        raise ValueError("give an image folder (or --csv FILE), or --resume RUN")
    try:  # with --resume, fit continues that run and needs none of the new run's options
        run = fit(args.data, args.recipe, csv=args.csv, out=args.out, name=args.name, resume=args.resume or None,
                  overrides=_train_overrides(args), progress=not args.no_progress)
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return 130
    _print_summary(run)


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from .examples import texture_folder
    from .train import fit
    folder = texture_folder(args.folder)
    print(f"example images: {folder} (scikit-image's brick, grass and gravel textures, 64 patches each)")
    # no refit: the next steps evaluate on the example's val/ folder, which a refit would train on
    run = fit(folder, "natural", out=args.out, overrides=[f"train.epochs={args.epochs}", "train.refit=false"])
    _print_summary(run)
    print(f"\nnext: finetune evaluate {run.path}    finetune predict {run.path} {folder}/val --top-k 2")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    result = evaluate(args.run, args.data, csv=args.csv, split=args.split, checkpoint=args.checkpoint,
                      tta=args.tta, batch_size=args.batch_size, workers=args.workers)
    print(f"{result.to_string()}\n\nreport: {result.folder / 'report.html'}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .data import bad_files_note
    from .predict import Predictor
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} exists and is not overwritten; choose another --out")
    table = Predictor.load(args.run).predict_paths(args.paths, top_k=args.top_k, tta=args.tta,
                                                   batch_size=args.batch_size, workers=args.workers)
    bad = table[table["error"] != ""].rename(columns={"error": "reason"}) if "error" in table else table[:0]
    if args.strict and len(bad):
        raise ValueError(f"{bad['path'].iloc[0]}: {bad['reason'].iloc[0]} ({len(bad)} unreadable files; without "
                         f"--strict they are skipped and listed in the error column)")
    if args.out:
        table.to_csv(args.out, index=False)
    print(f"wrote {len(table)} predictions to {args.out}" if args.out else table.to_string(index=False))
    if note := bad_files_note(bad, f"the error column of {args.out or 'the table above'}"):
        print(note, file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export
    print(f"exported to {export(args.run, fmt=args.format, out=args.out)}")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .train import labels_kind, prepare, recipe_model, run_plan
    recipe, chosen = _resolve_recipe(args)
    items, classes, sc = prepare(args.data, recipe, csv=args.csv)
    recipe = labels_kind(recipe, sc)
    plan = run_plan(recipe_model(recipe, len(classes)), recipe, items, classes, chosen, data=args.data,
                    csv=args.csv, multi=sc.multilabel)
    print(f"{recipe.backbone.name} on {args.data or args.csv}: {(items['split'] == 'train').sum()} training images, "
          f"{len(classes)} classes, recipe '{recipe.name}', {recipe.train.epochs} epochs, batches of "
          f"{recipe.train.batch_size}\n\n{plan.explain()}")


def _cmd_distance(args: argparse.Namespace) -> None:
    from .domain import measure_folder
    report = measure_folder(args.data, _resolve_recipe(args)[0], csv=args.csv, max_images=args.max_images)
    print(report.to_string())


def _cmd_inspect(args: argparse.Namespace) -> None:
    from . import freeze
    from .reference_nets import reference_model
    from .size import inspect_model
    size = tuple(int(v) for v in args.input_size.lower().split("x")) if args.input_size else None
    reference = args.backbone in ("lenet5", "alexnet")
    if reference:
        model = reference_model(args.backbone)
    else:
        from .backbone import create_backbone
        from .recipe import load_recipe
        model = create_backbone(args.backbone, args.n_classes, pretrained=False, in_chans=size[0] if size else 3)
        f = args.freeze
        sets = [] if f is None else [f"freeze.mode={f}"] if f in ("probe", "full", "auto") else [
            "freeze.mode=fixed", f"freeze.depth={f}"]
        if sets or args.recipe or args.overrides:
            plan = freeze.plan_for(model, load_recipe(args.recipe, [*args.overrides, *sets]), args.n_train,
                                   args.n_classes)
            released = max(g.train_from or 0 for g in plan.groups)
            freeze.apply(model, plan, released)  # costs once every scheduled group trains
            print(plan.explain() + f"\n\ncounted at epoch {released}, once the schedule has released its groups\n")
    report = inspect_model(model, size)
    print(report.to_string(layers=args.layers or reference))
    if args.csv:
        report.layers.to_csv(args.csv, index=False)
    if args.plot:
        print(f"picture: {report.plot(args.plot)}")


def _cmd_check(args: argparse.Namespace) -> int:
    from .data import SCAN_MODES, DataError, scan
    if not args.data and not args.csv:
        raise ValueError("give an image folder, or --csv FILE (paths in it relative to the CSV's folder)")
    sc = scan(args.data, csv=args.csv, channels=args.channels, strict=args.strict, allow_outside=args.allow_outside,
              max_bad_fraction=1.0, decode=SCAN_MODES[args.scan or "auto"], progress=sys.stderr.isatty())
    print(_cli_words(sc.report(), args), end="")
    if len(sc.classes) < 2:
        raise DataError(f"{sc.source}: {len(sc.classes)} class ({', '.join(sc.classes)}); a classifier needs at "
                        f"least two: one sub-folder per class, or two labels in the CSV")
    return 1 if len(sc.bad) else 0


def _cmd_pack(args: argparse.Namespace) -> None:
    from .pack import pack
    packed = pack(args.data, _resolve_recipe(args)[0], args.out, csv=args.csv, workers=args.workers)
    counts = ", ".join(f"{s} {n}" for s, n in packed.meta["counts"].items() if n)
    print(f"packed {len(packed.items)} images in {len(packed.classes)} classes ({counts}; {len(packed.bad)} bad files "
          f"left out) to {packed.url}\nnext: finetune train {packed.url}")


def _cmd_explain(args: argparse.Namespace) -> None:
    from .explain import explain
    table = explain(args.run, args.paths, method=args.method, top_k=args.top_k, out=args.out)
    print(f"{table.to_string(index=False)}\n\noverlays and explain.csv in {Path(table['overlay'][0]).parent}")


def _cmd_lr_find(args: argparse.Namespace) -> None:
    from .train import find_only
    run, found = find_only(args.data, args.recipe, csv=args.csv, out=args.out, overrides=_train_overrides(args))
    print(f"{found['reason']}\ncurve: {run.path / 'lr_find.png'}\ntrain with it: --lr {found['lr']:.3g} "
          f"(or optim.lr: find in the recipe)")


def _cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve
    serve(args.run, port=args.port, top_k=args.top_k)


def _cmd_recipes(args: argparse.Namespace) -> None:
    from .recipe import list_recipes, resolve_path
    if args.name:
        print(resolve_path(args.name).read_text().rstrip("\n"))
        return
    for name, desc in list_recipes().items():
        print(f"{name:<14} {desc}")
    print("\nshow one: finetune recipes NAME; use one: finetune train DATA --recipe NAME (or a YAML path); without "
          "--recipe one is chosen from DATA's images (finetune plan DATA says which and why)")


if __name__ == "__main__":
    sys.exit(main())
