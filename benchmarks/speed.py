"""Speed benchmarks: what a frozen prefix costs, cached probe features, the toolkit's overhead, data loading.

    HF_HUB_OFFLINE=1 python benchmarks/speed.py freeze     # step time and saved activations per fixed depth
    HF_HUB_OFFLINE=1 python benchmarks/speed.py cache      # linear-probe epochs on cached features vs recomputed
    HF_HUB_OFFLINE=1 python benchmarks/speed.py overhead   # fit() epochs vs a bare PyTorch loop
    HF_HUB_OFFLINE=1 python benchmarks/speed.py loading    # decode+augment vs model throughput; loader workers

Every figure is a ratio of two measurements taken in the same process, interleaved over rounds, so load from
other jobs on a shared machine hits both sides; medians are reported. Each command appends its table and a
header (CPU model, cores, threads, load average) to benchmarks/results/speed.md and prints it. Results and the
commands that made them: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune import freeze  # noqa: E402

DATASETS = Path(os.environ.get("FINETUNE_DATASETS", "/work/shared/datasets"))
RESULTS = ROOT / "benchmarks" / "results" / "speed.md"


def header(a: argparse.Namespace) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, `{' '.join(sys.argv[1:])}`: {cpu}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} at the end")


def report(a: argparse.Namespace, text: str) -> None:
    out = f"### {a.command}\n\n{header(a)}\n\n{text}\n"
    print(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(out + "\n")


def median(xs) -> float:
    return float(statistics.median(xs))


def dataset(a: argparse.Namespace) -> Path:
    """--data, else hymenoptera from the shared datasets, else scikit-image's textures written to a temp folder."""
    if a.data:
        return Path(a.data)
    if (DATASETS / "hymenoptera").is_dir():
        return DATASETS / "hymenoptera"
    from finetune.examples import texture_folder
    return texture_folder(Path(tempfile.gettempdir()) / "finetune_bench_textures")


class EpochClock(pl.Callback):
    """Wall time of every epoch: training, validation, checkpoints and logging, start to start."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    @property
    def epochs(self) -> list[float]:
        return list(np.diff(self.marks))


def fit_timed(data: Path, overrides: list[str], out: Path, progress: bool = False):
    from finetune import fit
    clock = EpochClock()
    t0 = time.perf_counter()
    run = fit(data, "natural", out=out, overrides=overrides, progress=progress, callbacks=[clock])
    return run, clock.epochs, time.perf_counter() - t0


# -- 1. freeze: what a frozen prefix costs ----------------------------------------------------------------------
def _prefix_modules(model: torch.nn.Module, plan: freeze.Plan) -> list[torch.nn.Module]:
    mods = dict(model.named_modules())
    return [mods[m] for g in plan.groups[:plan.fixed_depth] for m in g.modules]


def _no_grad_hooks(model: torch.nn.Module, plan: freeze.Plan) -> list:
    """Run each outer module of the fixed prefix under torch.no_grad() (the variant the issue asks to check)."""
    def pre(mod, args):
        mod._grad_was = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def post(mod, args, out):
        torch.set_grad_enabled(mod._grad_was)

    return [h for m in _prefix_modules(model, plan)
            for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]


def saved_bytes(model: torch.nn.Module, plan: freeze.Plan, x, y) -> tuple[int, int]:
    """Bytes autograd keeps for the backward pass of one step (activations: parameters and repeats of the same
    storage not counted), and how many of them were saved inside the fixed prefix."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, inside, depth = set(), [0], [0], [0]

    def pack(t):
        s = t.untyped_storage()
        if depth[0]:
            inside[0] += s.nbytes()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total[0] += s.nbytes()
        return t

    def enter(m, args):
        depth[0] += 1

    def leave(m, args, out):
        depth[0] -= 1

    hooks = [h for m in _prefix_modules(model, plan)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return total[0], inside[0]


def step_times(model, x, y, steps: int, clock) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):  # the first step warms up
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i:
            times.append(clock() - t0)
    return times


def cmd_freeze(a: argparse.Namespace) -> None:
    import timm
    from finetune.size import inspect_model

    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    model = timm.create_model(a.model, pretrained=False, num_classes=10).train()
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 10, (a.batch,))
    n = freeze.n_body_groups(model)
    rows = []
    for depth in range(n + 1):
        plan = freeze.fixed(model, depth)
        freeze.apply(model, plan)
        model.train()
        total = inspect_model(model, (3, a.size, a.size)).totals.loc["total"]
        saved, inside = saved_bytes(model, plan, x, y)
        rows.append(dict(depth=depth, fixed=plan.groups[depth - 1].name if depth else "-",
                         ops=int(total["train_ops"]), units=int(total["saved_units"]), saved=saved, inside=inside,
                         times=[], plain=[], nograd=[]))
    for _ in range(a.rounds):  # depths interleaved: a load change on the shared machine hits every depth
        for r in rows:
            plan = freeze.fixed(model, r["depth"])
            freeze.apply(model, plan)
            model.train()
            r["times"] += step_times(model, x, y, a.steps, clock)
            if r["depth"] in (n // 2, n):  # explicit no_grad around the prefix, against requires_grad alone
                hooks = _no_grad_hooks(model, plan)
                r["nograd"] += step_times(model, x, y, a.steps, clock)
                for h in hooks:
                    h.remove()
                r["plain"] += step_times(model, x, y, a.steps, clock)
                if not r.get("checked"):
                    hooks = _no_grad_hooks(model, plan)
                    r["saved_nograd"] = saved_bytes(model, plan, x, y)[0]
                    for h in hooks:
                        h.remove()
                    r["checked"] = True
    model.train()  # every module follows train()/eval() again
    base = rows[0]
    t0 = median(base["times"])
    lines = ["| fixed depth | last fixed group | step ms | time vs full | predicted (train ops) | measured/predicted "
             "| saved for backward MB | predicted MB (saved units x 4 B) | memory vs full | predicted | measured/predicted "
             "| saved inside the prefix |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, m = median(r["times"]) / t0, r["saved"] / base["saved"]
        po, pm = r["ops"] / base["ops"], r["units"] / base["units"]
        lines.append(f"| {r['depth']} | {r['fixed']} | {1e3 * median(r['times']):.0f} | {t:.3f} | {po:.3f} | "
                     f"{t / po:.2f} | {r['saved'] / 1e6:.1f} | {4 * a.batch * r['units'] / 1e6:.1f} | {m:.3f} | {pm:.3f} | {m / pm:.2f} | {r['inside']} B |")
    lines.append("")
    lines.append("Explicit `torch.no_grad()` around the fixed prefix (forward pre/post hooks on its outer modules) "
                 "against `requires_grad=False` alone, same steps interleaved:")
    lines.append("")
    lines.append("| fixed depth | step ms, requires_grad only | step ms, + no_grad | ratio | saved MB, requires_grad only "
                 "| saved MB, + no_grad |")
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["nograd"]:
            p, g = median(r["plain"]), median(r["nograd"])
            lines.append(f"| {r['depth']} | {1e3 * p:.0f} | {1e3 * g:.0f} | {g / p:.3f} | {r['saved'] / 1e6:.1f} | "
                         f"{r['saved_nograd'] / 1e6:.1f} |")
    report(a, f"{a.model}, batch {a.batch}, {a.size}px, {a.clock} clock, median of {a.rounds} rounds x {a.steps} "
              f"steps per depth.\n\n" + "\n".join(lines))


# -- 2. cache: linear probe on cached features ------------------------------------------------------------------
def cmd_cache(a: argparse.Namespace) -> None:
    data = dataset(a)
    probe = ["freeze.mode=probe", "augment.crop=resize", "augment.eval_crop=resize", "augment.transforms=[]",
             f"train.epochs={a.epochs}", f"train.batch_size={a.batch}"] + (
                [f"image.size={a.size}"] if a.size else [])
    plain, cached, setup = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            _, ep, _ = fit_timed(data, probe + ["train.cache_features=false"], Path(tmp) / f"plain{i}")
            plain.append(ep)
            for j in range(2):  # one run finds the cache cold, the other warm
                run, ep, total = fit_timed(data, probe, Path(tmp) / f"cached{i}-{j}")
                if not (run.path / "features.json").exists():
                    raise SystemExit("the run did not train on cached features: check train.cache_features")
                info = run.read_json("features.json")
                cached.append(ep)
                setup.append((total - sum(ep), info["hit"]))
                if j == 0 and info["hit"]:
                    Path(info["path"]).unlink()
    later_plain = [e for ep in plain for e in ep[1:]]
    later_cached = [e for ep in cached for e in ep[1:]]
    factor = median(later_plain) / median(later_cached)
    first_plain = median([ep[0] for ep in plain])
    cold = [s for s, h in setup if not h]
    warm = [s for s, h in setup if h]
    lines = ["| measurement | seconds |", "|:---|---:|",
             f"| probe epoch, backbone recomputed (epochs 2+, median of {len(later_plain)}) | {median(later_plain):.2f} |",
             f"| probe epoch on cached features (epochs 2+, median of {len(later_cached)}) | {median(later_cached):.3f} |",
             f"| **factor** | **{factor:.0f}x** |",
             f"| first epoch, backbone recomputed | {first_plain:.2f} |"]
    if cold:
        lines.append(f"| fit() outside epochs, cache cold (scan, model, features computed) | {median(cold):.2f} |")
    if warm:
        lines.append(f"| fit() outside epochs, cache warm (scan, model, features loaded) | {median(warm):.2f} |")
    report(a, f"{data.name}, {a.epochs} epochs, batch {a.batch}, image size {a.size or 'the model default'}, "
              f"{a.rounds} round(s); each epoch includes validation and checkpoints.\n\n" + "\n".join(lines))


# -- 3. overhead: fit() against a bare PyTorch loop -------------------------------------------------------------
class BareLoop:
    """The same model, data, transforms, batch size, loader settings, optimizer and loss as a run, in a plain
    loop: an epoch trains, then computes the validation accuracy."""

    def __init__(self, run, workers: int):
        from torch.utils.data import DataLoader

        from finetune import augment
        from finetune.backbone import create_backbone
        from finetune.data import ImageDataset
        from finetune.preprocess import Pipeline, Preprocess

        recipe, items, classes = run.recipe, run.items, run.classes
        pre = Preprocess.from_dict(run.read_json("data.json")["preprocess"])
        cmap = {c: i for i, c in enumerate(classes)}

        def loader(split, tf, shuffle):
            ds = ImageDataset(items[items["split"] == split].reset_index(drop=True), cmap, channels=pre.channels,
                              transform=tf, intensity=pre.intensity_fn(), max_pixels=pre.max_pixels)
            return DataLoader(ds, batch_size=recipe.train.batch_size, shuffle=shuffle, num_workers=workers,
                              persistent_workers=workers > 0)

        self.train = loader("train", Pipeline(augment.build_transforms(recipe, pre.config, train=True)), True)
        self.val = loader("val", pre.eval_transform(), False)
        b = recipe.backbone
        self.model = create_backbone(b.name, len(classes), pretrained=b.pretrained, drop_rate=b.drop_rate)
        # the run's plan, done by hand: fixed parameters get no gradient, fixed layers and non-training BN
        # stay in eval mode (the toolkit holds them there with forward pre-hooks)
        plan, mods = run.plan, dict(self.model.named_modules())
        for g in plan.groups:
            for name, p in self.model.named_parameters():
                if name in g.params:
                    p.requires_grad_(g.train_from is not None)
        self.held = [m for g in plan.groups for name in g.modules for m in mods[name].modules()
                     if g.train_from is None or (isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                 and g.bn != "train")]
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=recipe.optim.lr,
                                     weight_decay=recipe.optim.weight_decay)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.loss.label_smoothing)

    def epoch(self) -> float:
        t0 = time.perf_counter()
        self.model.train()
        for m in self.held:
            m.eval()
        for x, y in self.train:
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(x), y).backward()
            self.opt.step()
        self.model.eval()
        correct = 0
        with torch.inference_mode():  # as Lightning validates
            for x, y in self.val:
                correct += int((self.model(x).argmax(1) == y).sum())
        return time.perf_counter() - t0


class Interleaved(pl.Callback):
    """Runs one bare-loop epoch after each of fit()'s epochs (its training and validation done, its checkpoints
    not yet written), outside fit()'s timed span, so both loops meet the same load on a shared machine. fit()'s
    epoch i is timed from the end of bare epoch i-1 to the end of its own validation: checkpoints of epoch i-1,
    training and validation of epoch i. Wall time and this process's CPU time (loader workers not included)."""

    def __init__(self, workers: int):
        self.workers, self.kit, self.bare, self.mark = workers, [], [], (0.0, 0.0)

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_fit_start(self, trainer, pl_module):
        from finetune.run import Run
        self.loop = BareLoop(Run.open(trainer.default_root_dir), self.workers)
        self.mark = self.now()

    def on_train_epoch_end(self, trainer, pl_module):
        t = self.now()
        self.kit.append((t[0] - self.mark[0], t[1] - self.mark[1]))
        self.loop.epoch()
        self.mark = self.now()
        self.bare.append((self.mark[0] - t[0], self.mark[1] - t[1]))


def cmd_overhead(a: argparse.Namespace) -> None:
    from finetune import fit
    from finetune.datamodule import default_workers

    data = dataset(a)
    workers = default_workers()
    overrides = ["freeze.mode=full", f"train.epochs={a.epochs}", f"train.batch_size={a.batch}"] + (
        [f"image.size={a.size}"] if a.size else [])
    clock = Interleaved(workers)
    with tempfile.TemporaryDirectory() as tmp:
        run = fit(data, "natural", out=tmp, overrides=overrides, progress=a.progress, callbacks=[clock])
        backbone = run.recipe.backbone.name
    lines = ["| clock | fit() epoch s | bare loop epoch s | ratio, median over epoch pairs (range) | ratio of medians |",
             "|:---|---:|---:|---:|---:|"]
    for c, what in enumerate(["wall", "CPU (this process)"]):
        k, b = [e[c] for e in clock.kit[1:]], [e[c] for e in clock.bare[1:]]  # the first epochs start workers
        pairs = [x / y for x, y in zip(k, b)]
        lines.append(f"| {what} | {median(k):.2f} | {median(b):.2f} | **{median(pairs):.3f}** "
                     f"({min(pairs):.3f}-{max(pairs):.3f}) | {median(k) / median(b):.3f} |")
    report(a, f"{data.name}, {backbone} full fine-tuning, batch {a.batch}, image size {a.size or 'the model default'}, "
              f"{workers} loader worker(s) in both, {a.epochs} epochs of each loop, interleaved epoch by epoch "
              f"(the first not counted); an epoch is training plus validation; fit() with its progress bar "
              f"{'on' if a.progress else 'off'}, metrics, logs and checkpoints.\n\n" + "\n".join(lines))


# -- 4. loading: does data loading keep up with the model? -------------------------------------------------------
def cmd_loading(a: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    from finetune import augment
    from finetune.backbone import create_backbone
    from finetune.data import ImageDataset
    from finetune.datamodule import EpochSampler, SeededDataset, default_workers
    from finetune.preprocess import Pipeline
    from finetune.recipe import load_recipe
    from finetune.train import _preprocess, prepare

    data = dataset(a)
    recipe = load_recipe("natural", [f"train.batch_size={a.batch}"] + ([f"image.size={a.size}"] if a.size else []))
    items, classes, _ = prepare(data, recipe)
    model = create_backbone(recipe.backbone.name, len(classes)).train()
    pre = _preprocess(recipe, model, items)
    tf = Pipeline(augment.build_transforms(recipe, pre.config, train=True))
    train = items[items["split"] == "train"].reset_index(drop=True)
    ds = SeededDataset(ImageDataset(train, {c: i for i, c in enumerate(classes)}, channels=pre.channels,
                                    transform=tf, intensity=pre.intensity_fn()), tf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def decode(n=a.batch * 2):
        t0 = time.perf_counter()
        for i in range(n):
            ds[(i % len(ds), i)]
        return n / (time.perf_counter() - t0)

    loads, epochs, steps = [], {w: [] for w in a.workers}, []
    loaders = {w: DataLoader(ds, batch_size=a.batch, sampler=EpochSampler(len(ds), 0), num_workers=w,
                             persistent_workers=w > 0) for w in a.workers}
    for r in range(a.rounds + 1):  # round 0 starts the workers and is not counted
        loads.append(decode())
        for w, dl in loaders.items():
            dl.sampler.set_epoch(r)
            t0, compute = time.perf_counter(), 0.0
            for x, y in dl:
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                compute += time.perf_counter() - t1
            if r:
                epochs[w].append(time.perf_counter() - t0)
                steps.append(len(ds) / compute)
    best = min(epochs, key=lambda w: median(epochs[w]))
    lines = ["| measurement | value |", "|:---|---:|",
             f"| decode + augment, one process | {median(loads):.0f} images/s |",
             f"| training steps (forward, backward, AdamW; data waits excluded) | {median(steps):.1f} images/s |",
             f"| **loading / model throughput** | **{median(loads) / median(steps):.1f}** |"]
    for w in a.workers:
        lines.append(f"| training epoch with {w} loader worker(s) | {median(epochs[w]):.2f} s "
                     f"({median(epochs[w]) / median(epochs[best]):.3f} of the best) |")
    lines.append(f"| fastest | {best} worker(s); `default_workers()` here = {default_workers()} |")
    report(a, f"{data.name} train split ({len(ds)} images), natural recipe's training pipeline, "
              f"{recipe.backbone.name} full fine-tuning, batch {a.batch}, image size {a.size or 'the model default'}, "
              f"median of {a.rounds} rounds.\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, batch, size, epochs, rounds in [("freeze", 16, 128, 0, 3), ("cache", 32, None, 4, 1),
                                              ("overhead", 32, None, 8, 1), ("loading", 32, None, 0, 3)]:
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
        s.add_argument("--batch", type=int, default=batch)
        s.add_argument("--size", type=int, default=size, help="image size (default: the model's)")
        s.add_argument("--rounds", type=int, default=rounds)
        s.add_argument("--data", help="an image folder (default: hymenoptera, else scikit-image textures)")
        if epochs:
            s.add_argument("--epochs", type=int, default=epochs)
    f = sub.choices["freeze"]
    f.add_argument("--model", default="tf_efficientnet_lite0")
    f.add_argument("--steps", type=int, default=2, help="timed steps per depth and round")
    f.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time, steadier on a loaded machine (use with --threads 1)")
    sub.choices["overhead"].add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                                         help="the progress bar, on by default as in 'finetune train'")
    sub.choices["loading"].add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    globals()[f"cmd_{a.command}"](a)


if __name__ == "__main__":
    main()
