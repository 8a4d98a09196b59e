"""Network size and training cost as the lecture counts them (units, weights, connections, operations), from one
hooked forward pass, split frozen/trainable by ``requires_grad``; the rules are in docs/size.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import timm
import torch
from torch import nn

from .reference_nets import REFERENCE_INPUT_SIZES, reference_model
from .stages import stages

__all__ = ["SizeReport", "inspect_model", "reference_model", "CONV", "LINEAR", "POOL", "NORM", "PARAM"]

CONV, LINEAR, POOL, NORM, PARAM = "convolution", "fully connected", "pooling", "normalization", "parameter"

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_POOL_TYPES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd,
               nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_STYLE = {CONV: ("conv", "tab:blue"), LINEAR: ("fc", "tab:orange"), POOL: ("pool", "tab:green"),
          NORM: ("norm", "tab:purple"), PARAM: ("other", "tab:gray")}  # short name, colour
_PARAM_COLS = ["weights", "biases_bn", "other_params"]
_OP_COLS = ["fwd_ops", "bwd_ops", "train_ops", "saved_units"]
_TOTAL_COLS = ["units", "connections", *_PARAM_COLS, "params", *_OP_COLS]


@dataclass
class SizeReport:
    """Per-layer, per-stage and total counts of one model at one input size (all counts are per example)."""

    model_name: str
    input_size: tuple[int, ...]
    layers: pd.DataFrame  # one row per layer, in execution order
    stages: pd.DataFrame  # layers summed per stage
    totals: pd.DataFrame  # index frozen / trainable / total

    def to_string(self, layers: bool = True) -> str:
        """The tables as text, with thousands separators (``layers=False``: stages and totals only)."""
        parts = [f"{self.model_name} at input {'x'.join(map(str, self.input_size))}"]
        if layers:
            parts += ["Layers", _fmt(self.layers)]
        return "\n\n".join(parts + ["Stages", _fmt(self.stages), "Totals", _fmt(self.totals)])

    def plot(self, path: str | Path, log: bool = False) -> Path:
        """Write a PNG with units, parameters and connections per stage, stacked by layer type (linear scale by
        default, so that bar heights show the shares the lecture's rule of thumb is about)."""
        from .plots import figure

        df = self.layers.assign(parameters=self.layers[_PARAM_COLS].sum(axis=1))
        order, labels = self.stages["stage"].tolist(), self.stages["stage_name"].tolist()
        fig = figure(max(10.0, 0.5 * len(order) * 3), 4.5)
        for ax, col in zip(fig.subplots(1, 3), ["units", "parameters", "connections"]):
            table = df.pivot_table(index="stage", columns="type", values=col, aggfunc="sum", fill_value=0)
            table = table.reindex(order, fill_value=0)
            table = table[[t for t in _STYLE if t in table.columns and table[t].sum() > 0]]
            bottom = table.cumsum(axis=1).shift(axis=1, fill_value=0)
            for t in table.columns:
                ax.bar(range(len(order)), table[t], bottom=bottom[t], color=_STYLE[t][1], label=t)
            share = table.sum() / max(table.to_numpy().sum(), 1)
            shares = ", ".join(f"{_STYLE[t][0]} {v:.0%}" for t, v in share.sort_values(ascending=False).items()
                               if v >= 0.005)
            ax.set_title(f"{col}\n{shares}", fontsize=9)
            ax.set_xticks(range(len(order)), labels, rotation=60, ha="right", fontsize=8)
            if log:
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        handles = {h.get_label(): h for ax in fig.axes for h in ax.get_legend_handles_labels()[0]}
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), fontsize=8)
        fig.suptitle(f"{self.model_name} ({'x'.join(map(str, self.input_size))}): per stage, stacked by layer type")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def inspect_model(model: nn.Module | str, input_size: tuple[int, ...] | None = None) -> SizeReport:
    """Count units, weights, connections and training operations of ``model`` (a module, a reference net name
    'lenet5'/'alexnet', or a timm name built with pretrained=False) for one example of shape ``input_size``."""
    if isinstance(model, str):
        model = reference_model(model) if model in REFERENCE_INPUT_SIZES else timm.create_model(model, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", None) or {}  # timm's, or the one reference_model sets
    name = cfg.get("architecture", type(model).__name__)
    input_size = tuple(input_size or cfg.get("input_size", (3, 224, 224)))
    rows = _probe(model, input_size)
    layers = _assign_stages(model, _costs(rows))
    params = [(col, t.numel(), t.requires_grad) for r in rows for col, t in r["params"]]
    return SizeReport(name, input_size, layers, _stage_table(layers), _totals(layers, params))


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(mod, nn.Linear):
        return LINEAR
    if isinstance(mod, _NORM_TYPES):
        return NORM
    if isinstance(mod, _POOL_TYPES) or ("Pool" in type(mod).__name__ and not any(mod.children())):
        return POOL  # the second test catches timm's own leaf pools (FastAdaptiveAvgPool, ...)
    return None


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else next(t for t in x if isinstance(t, torch.Tensor))


def _count(row: dict, mod: nn.Module, args, out) -> None:
    """Forward hook: add one call's output units and connections (batch 1) to the layer's row."""
    inp, out, kind = _tensor(args), _tensor(out), row["type"]
    if kind == CONV:  # weight[0] holds K^2 I / groups entries: one output unit's connections
        conns = out.numel() * mod.weight[0].numel()
    elif kind == LINEAR:  # applied to every token/position: out.numel() = positions x N
        conns = out.numel() * mod.in_features
    elif kind == POOL and (k := getattr(mod, "kernel_size", None)) is not None:
        conns = out.numel() * math.prod(k if isinstance(k, tuple) else (k,) * (inp.dim() - 2))
    elif kind == POOL:  # adaptive/global pools: every input unit feeds one window (exact for global pooling)
        conns = inp.numel()
    else:  # normalization rescales the units of the layer before it: no new units, no connections
        return
    row["units"] += out.numel()
    row["connections"] += conns


def _probe(model: nn.Module, input_size: tuple[int, ...]) -> list[dict]:
    """One row per counted module (and one per parameter owned by no counted module), in execution order."""
    rows, called, hooks, seen = [], [], [], set()
    for mname, mod in model.named_modules():
        kind = _kind(mod)
        own = [(p, t) for p, t in mod.named_parameters(recurse=False) if id(t) not in seen]
        seen.update(id(t) for _, t in own)
        if kind is not None:
            params = [("weights" if p == "weight" and kind in (CONV, LINEAR) else "biases_bn", t) for p, t in own]
            rows.append(dict(name=mname, type=kind, key=mname, params=params, units=0, connections=0))
            hooks.append(mod.register_forward_hook(partial(_count, rows[-1])))
        else:
            rows += [dict(name=f"{mname}.{p}" if mname else p, type=PARAM, key=mname,
                          params=[("other_params", t)], units=0, connections=0) for p, t in own]
        if kind is not None or own:
            hooks.append(mod.register_forward_pre_hook(lambda m, args, key=mname: called.append(key)))
    first = next(model.parameters(), torch.empty(0))
    x = torch.randn(1, *input_size, device=first.device, dtype=first.dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    order = {key: i for i, key in enumerate(dict.fromkeys(called))}
    never = len(order) + len(rows)  # modules the forward never called go last, in definition order
    return sorted(rows, key=lambda r: order.get(r["key"], never))


def _costs(rows: list[dict]) -> pd.DataFrame:
    """Layer table with freeze-aware operations: forward one per connection; backward one per connection for the
    input gradient if an earlier layer is trainable, one per connection for the weight gradient if trainable."""
    trains = [any(t.requires_grad for _, t in r["params"]) for r in rows]
    first = trains.index(True) if True in trains else len(rows) + 1  # the first trainable layer
    out, part = [], False
    for i, r in enumerate(rows):
        sums = {c: sum(t.numel() for cat, t in r["params"] if cat == c) for c in _PARAM_COLS}
        wgrad = any(cat == "weights" and t.requires_grad for cat, t in r["params"])
        conns = r["connections"]
        bwd = conns * (int(first < i) + int(wgrad))
        part = trains[i] if r["params"] else part  # parameter-free layers join the part of the layer before them
        out.append(dict(name=r["name"], type=r["type"], units=r["units"], **sums, connections=conns,
                        trainable=part, fwd_ops=conns, bwd_ops=bwd, train_ops=conns + bwd,
                        # kept for backward: the layer's output if gradient reaches it or the next layer needs it
                        saved_units=r["units"] if i + 1 >= first else 0))
    cols = ["name", "type", "units", *_PARAM_COLS, "connections", "trainable", *_OP_COLS]
    return pd.DataFrame(out, columns=cols).astype({c: "int64" for c in cols if c not in ("name", "type", "trainable")})


def _assign_stages(model: nn.Module, layers: pd.DataFrame) -> pd.DataFrame:
    """Stage of each layer: the lead's ``finetune.stages`` (timm's group_matcher, head split out) for timm models,
    one stage per top-level child otherwise (one per layer for the reference nets)."""
    if hasattr(model, "group_matcher"):
        groups = stages(model)
        by_param = {p: i for i, s in enumerate(groups) for p in s.params}
        by_module = [(m, i) for i, s in enumerate(groups) for m in s.modules]
        names = [s.name for s in groups]
        ids = []
        for n in layers["name"]:
            i = by_param.get(n, by_param.get(f"{n}.weight"))  # parameter rows by name, layers by their weight
            if i is None:  # parameter-free layer: the stage module containing it, else the stage before it
                i = next((j for m, j in by_module if n == m or n.startswith(m + ".")), ids[-1] if ids else 0)
            ids.append(i)
    else:
        tops = layers["name"].str.split(".").str[0]
        names = list(dict.fromkeys(tops))
        ids = [names.index(t) for t in tops]
    return layers.assign(stage=ids, stage_name=[names[i] for i in ids])[["stage", "stage_name", *layers.columns]]


def _stage_table(layers: pd.DataFrame) -> pd.DataFrame:
    g = layers.groupby(["stage", "stage_name"], sort=True)
    out = g[["units", *_PARAM_COLS, "connections", *_OP_COLS]].sum().reset_index()
    out.insert(2, "layers", g.size().to_numpy())
    out.insert(out.columns.get_loc("other_params") + 1, "params", out[_PARAM_COLS].sum(axis=1))
    out["trainable"] = g["trainable"].any().to_numpy()
    return out


def _totals(layers: pd.DataFrame, params: list[tuple[str, int, bool]]) -> pd.DataFrame:
    """Rows frozen / trainable / total. Parameter columns split each parameter by its own requires_grad; the other
    columns split layers by the part they are in (the ``trainable`` column)."""
    table = pd.DataFrame(0, index=["frozen", "trainable", "total"], columns=_TOTAL_COLS, dtype="int64")
    by_part = layers.groupby("trainable")[["units", "connections", *_OP_COLS]].sum()
    table.loc[by_part.index.map({False: "frozen", True: "trainable"}), by_part.columns] = by_part.to_numpy()
    for col, numel, grad in params:
        table.loc["trainable" if grad else "frozen", col] += numel
    table["params"] = table[_PARAM_COLS].sum(axis=1)
    table.loc["total"] = table.loc["frozen"] + table.loc["trainable"]
    return table


def _fmt(df: pd.DataFrame) -> str:
    ints = df.select_dtypes("integer").columns
    return df.to_string(formatters={c: "{:,}".format for c in ints})
