"""The ``finetune`` command: parses arguments, calls the Python API, prints. No logic of its own."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = "Docs: README.md and docs/ in the project. Every command takes --help."


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", help="shipped recipe name (natural, microscopy, ...) or a YAML file "
                                          "(default: natural)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=3e-4 (repeatable)")


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("data", nargs=None if required else "?",
                   help="image folder: one sub-folder per class (optionally under train/, val/, test/)")
    p.add_argument("--csv", help="a CSV of path,label[,split] instead of (or relative to) the folder")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finetune", epilog=EPILOG,
                                 description="Fine-tune pretrained ImageNet backbones (timm) on your own images; "
                                             "a freeze policy decides what to fix from your data.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a backbone on an image folder or CSV", epilog=EPILOG,
                       description="Fine-tune a backbone; writes a new run folder (never overwrites one).")
    _data_args(p, required=False)
    _recipe_args(p)
    p.add_argument("--backbone", "-b", help="any timm model name (default: tf_efficientnet_lite0)")
    p.add_argument("--weights", help="a local weights file (timm checkpoint or state dict)")
    p.add_argument("--epochs", "-e", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="the head's learning rate (the backbone gets a fraction)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--precision", choices=["32-true", "16-mixed", "bf16-mixed"])
    p.add_argument("--devices", help="devices per node (auto, 1, 2, ...)")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--accelerator", help="auto (default), cpu, gpu")
    p.add_argument("--deterministic", action="store_true", help="reproducible to the bit (slower)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    p.add_argument("--allow-outside", action="store_true", help="allow CSV paths outside the data folder")
    p.add_argument("--out", "-o", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--name", help="run folder name (default: <data>-<backbone>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("quickstart", help="make an example folder from scikit-image's images and train on it",
                       description="Writes a real example image folder (textures shipped with scikit-image: "
                                   "brick, grass, gravel), fine-tunes the default backbone on it, prints metrics.")
    p.add_argument("--folder", default="examples/textures", help="where to write the example images")
    p.add_argument("--out", "-o", default="runs")
    p.add_argument("--epochs", "-e", type=int, default=3)

    p = sub.add_parser("evaluate", help="metrics, plots and a report of a trained run on a data folder")
    p.add_argument("run", help="a run folder made by 'finetune train'")
    _data_args(p, required=False)
    p.add_argument("--split", default=None, help="which split of DATA to use when it has train/val/test (default: "
                                                  "test if present, else val, else all)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="processes that read the images (default: 0 on 2 CPU cores or fewer, "
                                               "1 on more; with a GPU every core but one, at most 8)")

    p = sub.add_parser("predict", help="predict labels of images with a run or an export")
    p.add_argument("run", help="a run folder or an exported model folder")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", "-k", type=int, default=1)
    p.add_argument("--out", help="CSV to write (default: print)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="processes that read the images (default as for evaluate)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it "
                                                         "(skipped files get their reason in the error column)")

    p = sub.add_parser("export", help="export a run to ONNX or TorchScript with its labels and preprocessing")
    p.add_argument("run")
    p.add_argument("--format", "-f", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", help="folder to write (default: RUN/export-FORMAT)")

    p = sub.add_parser("plan", help="print the freeze plan and why, without training")
    _data_args(p)
    _recipe_args(p)
    p.add_argument("--backbone", "-b")

    p = sub.add_parser("distance", help="measure how far a folder of images is from ImageNet (0..1)")
    _data_args(p)
    _recipe_args(p)
    p.add_argument("--backbone", "-b")
    p.add_argument("--max-images", type=int, default=128)

    p = sub.add_parser("inspect", help="units, weights, connections and training cost of a backbone")
    p.add_argument("backbone", help="timm model name, or lenet5 / alexnet")
    p.add_argument("--input-size", default=None, help="CxHxW, e.g. 3x224x224 (default: the model's own)")
    p.add_argument("--freeze", default=None, help="fixed leading groups: a number, 'probe', 'full'")
    _recipe_args(p)
    p.add_argument("--plot", help="write the per-stage picture to this PNG")
    p.add_argument("--csv", help="write the per-layer table to this CSV")
    p.add_argument("--n-train", type=int, default=1000, help="training images assumed by an automatic plan")
    p.add_argument("--n-classes", type=int, default=10, help="classes assumed by an automatic plan")
    p.add_argument("--layers", action="store_true", help="print every layer, not only stages and totals (always for lenet5/alexnet)")

    p = sub.add_parser("check", help="scan a data folder and report bad files, without training")
    _data_args(p)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--allow-outside", action="store_true")

    p = sub.add_parser("recipes", help="list the shipped recipes, or show one")
    p.add_argument("name", nargs="?")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        return int(globals()[f"_cmd_{args.command}"](args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing: one clear line, the traceback only on request
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        print(f"finetune {args.command}: error: {e}", file=sys.stderr)
        return 2


def _train_overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.overrides)
    for flag, key in [("backbone", "backbone.name"), ("weights", "backbone.weights"), ("epochs", "train.epochs"),
                      ("batch_size", "train.batch_size"), ("lr", "optim.lr"), ("image_size", "image.size"),
                      ("precision", "train.precision"), ("devices", "train.devices"),
                      ("num_nodes", "train.num_nodes"), ("strategy", "train.strategy"),
                      ("accelerator", "train.accelerator")]:
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    for flag, key in [("deterministic", "train.deterministic"), ("strict", "train.strict"),
                      ("allow_outside", "train.allow_outside")]:
        if getattr(args, flag, False):
            sets.append(f"{key}=true")
    return sets


def _print_summary(run) -> None:
    s = run.summary
    print(f"\nrun folder: {run.path}")
    print(f"best checkpoint: {s.get('best_checkpoint')}  ({s.get('best_metric')} = {s.get('best_score')})")
    for k, v in sorted(s.get("final_metrics", {}).items()):
        print(f"  {k:<14} {v:.4f}")
    print(f"wall time: {s.get('wall_time_s')} s")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import fit
    if args.resume:
        run = fit(resume=args.resume, progress=not args.no_progress)
    else:
        if not args.data and not args.csv:
            raise ValueError("give an image folder (or --csv FILE), or --resume RUN")
        run = fit(args.data, args.recipe, csv=args.csv, out=args.out, name=args.name,
                  overrides=_train_overrides(args), progress=not args.no_progress)
    _print_summary(run)
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .examples import texture_folder
    from .train import fit
    folder = texture_folder(args.folder)
    print(f"example images: {folder} (scikit-image's brick, grass and gravel textures, 64 patches each)")
    run = fit(folder, "natural", out=args.out, overrides=[f"train.epochs={args.epochs}"])
    _print_summary(run)
    print(f"\nnext: finetune evaluate {run.path}    finetune predict {run.path} {folder}/val --top-k 2")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    result = evaluate(args.run, args.data, csv=args.csv, split=args.split, checkpoint=args.checkpoint,
                      tta=args.tta, batch_size=args.batch_size, workers=args.workers)
    print(result.to_string())
    print(f"\nreport: {result.folder / 'report.html'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .data import bad_files_note
    from .predict import Predictor
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} exists and is not overwritten; choose another --out")
    table = Predictor.load(args.run).predict_paths(args.paths, top_k=args.top_k, tta=args.tta,
                                                   batch_size=args.batch_size, workers=args.workers)
    bad = table[table["error"] != ""].rename(columns={"error": "reason"})
    if args.strict and len(bad):
        raise ValueError(f"{bad['path'].iloc[0]}: {bad['reason'].iloc[0]} ({len(bad)} unreadable files; without "
                         f"--strict they are skipped and listed in the error column)")
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {len(table)} predictions to {args.out}")
    else:
        print(table.to_string(index=False))
    note = bad_files_note(bad, f"the error column of {args.out or 'the table above'}")
    if note:
        print(note, file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    path = export(args.run, fmt=args.format, out=args.out)
    print(f"exported to {path}")
    return 0


def _load_recipe(args: argparse.Namespace):
    from .recipe import load_recipe
    sets = list(args.overrides)
    if getattr(args, "backbone", None):
        sets.append(f"backbone.name={args.backbone}")
    return load_recipe(args.recipe, sets)


def _cmd_plan(args: argparse.Namespace) -> int:
    from . import augment
    from .backbone import create_backbone
    from .freeze import plan_for
    from .train import prepare
    recipe = _load_recipe(args)
    items, classes, sc = prepare(args.data, recipe, csv=args.csv)
    b = recipe.backbone
    model = create_backbone(b.name, len(classes), pretrained=b.pretrained, weights=b.weights,
                            in_chans=augment.model_channels(recipe))
    n_train = int((items["split"] == "train").sum())
    plan = plan_for(model, recipe, n_train, len(classes), data=args.data, csv=args.csv)
    print(f"{b.name} on {args.data or args.csv}: {n_train} training images, {len(classes)} classes, "
          f"recipe '{recipe.name}'\n")
    print(plan.explain())
    return 0


def _cmd_distance(args: argparse.Namespace) -> int:
    from .domain import measure_folder
    report = measure_folder(args.data, _load_recipe(args), csv=args.csv, max_images=args.max_images)
    print(report.to_string())
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import freeze
    from .reference_nets import reference_model
    from .size import inspect_model
    size = tuple(int(v) for v in args.input_size.lower().split("x")) if args.input_size else None
    if args.backbone in ("lenet5", "alexnet"):
        model = reference_model(args.backbone)
    else:
        from .backbone import create_backbone
        recipe = _load_recipe(args) if args.recipe or args.overrides else None
        model = create_backbone(args.backbone, args.n_classes, pretrained=False,
                                in_chans=size[0] if size else 3)
        plan = None
        if args.freeze is not None:
            f = args.freeze
            plan = (freeze.probe(model) if f == "probe" else freeze.full(model) if f == "full"
                    else freeze.auto(model, n_train=args.n_train, n_classes=args.n_classes, domain="natural")
                    if f == "auto" else freeze.fixed(model, int(f)))
        elif recipe is not None:
            plan = freeze.plan_for(model, recipe, args.n_train, args.n_classes)
        if plan is not None:
            released = max(g.train_from or 0 for g in plan.groups)
            freeze.apply(model, plan, released)  # costs once every scheduled group trains
            print(plan.explain() + f"\n\ncounted at epoch {released}, once the schedule has released its groups\n")
    report = inspect_model(model, size)
    print(report.to_string(layers=args.layers or args.backbone in ("lenet5", "alexnet")))
    if args.csv:
        report.layers.to_csv(args.csv, index=False)
    if args.plot:
        print(f"picture: {report.plot(args.plot)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .data import scan
    sc = scan(args.data, csv=args.csv, channels=args.channels, strict=args.strict,
              allow_outside=args.allow_outside, max_bad_fraction=1.0)
    print(sc.report())
    return 1 if len(sc.bad) else 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import list_recipes, resolve_path
    if args.name:
        print(resolve_path(args.name).read_text())
        return 0
    for name, desc in list_recipes().items():
        print(f"{name:<14} {desc}")
    print("\nshow one: finetune recipes NAME; use one: finetune train DATA --recipe NAME (or a YAML path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
