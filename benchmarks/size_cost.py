"""Predicted against measured training cost across freeze depths.

For each fixed depth (0 = full fine-tuning, n = linear probe) the plan from ``finetune.freeze.fixed`` is applied,
the size report predicts the training add-multiplies per example (forward per connection, backward as in
docs/size.md), and a training step is timed. Both are normalised to full fine-tuning; the ratio
measured/predicted is 1 where connections explain the time. Prints a markdown table.

    HF_HUB_OFFLINE=1 python benchmarks/size_cost.py --model tf_efficientnet_lite0 --batch 16 --size 128
    # on a shared CPU: --clock cpu --threads 1 (CPU time of this process, insensitive to other load)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import freeze  # noqa: E402
from finetune.size import inspect_model  # noqa: E402


def _step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
               clock=time.perf_counter) -> float:
    """Fastest of ``steps`` timed training steps, in seconds of ``clock``: forward, loss, backward, SGD update."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    times = []
    for i in range(warmup + steps):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(clock() - t0)
    return min(times)  # on a shared CPU the fastest step is the least disturbed estimate


def run(model_name: str, batch: int, size: int, steps: int, warmup: int, rounds: int, device: str,
        clock=time.perf_counter) -> list[dict]:
    """One row per fixed depth: predicted and measured cost, both relative to full fine-tuning."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device).train()
    n = freeze.n_body_groups(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for depth in range(n + 1):
        plan = freeze.fixed(model, depth)
        freeze.apply(model, plan)
        totals = inspect_model(model, (3, size, size)).totals
        t = totals.loc["total"]
        rows.append(dict(depth=depth, fixed=plan.groups[depth - 1].name if depth else "-",
                         trainable=int(totals.loc["trainable", "params"]), fwd=int(t["fwd_ops"]),
                         train=int(t["train_ops"]), times=[]))
    for _ in range(rounds):  # rounds interleave the depths, so drifting load on a shared machine hits them all
        for r in rows:
            freeze.apply(model, freeze.fixed(model, r["depth"]))
            r["times"].append(_step_time(model, x, y, steps, warmup, clock))
    model.train()  # every module follows train()/eval() again
    base_ops, base_t = rows[0]["train"], min(rows[0]["times"])
    for r in rows:
        r["ms"] = 1e3 * min(r["times"])
        r["predicted"] = r["train"] / base_ops
        r["measured"] = r["ms"] / 1e3 / base_t
        r["ratio"] = r["measured"] / r["predicted"]
    return rows


def markdown(rows: list[dict]) -> str:
    """The result as a markdown table."""
    out = ["| fixed depth | last fixed group | trainable params | train Mops/example (fwd) | predicted | "
           "ms/step | measured | measured/predicted |",
           "|---:|:---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['depth']} | {r['fixed']} | {r['trainable']:,} | {r['train'] / 1e6:,.1f} "
                   f"({r['fwd'] / 1e6:,.1f}) | {r['predicted']:.3f} | {r['ms']:.1f} | {r['measured']:.3f} "
                   f"| {r['ratio']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per depth and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time, robust to other load on a shared machine (use --threads 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    rows = run(a.model, a.batch, a.size, a.steps, a.warmup, a.rounds, a.device, clock)
    print(f"{a.model}, pretrained=False, batch {a.batch}, {a.size}px, {a.device}, torch {torch.__version__}, "
          f"{a.threads} threads, {a.clock} clock; fastest of {a.rounds} rounds x {a.steps} steps, "
          f"each after {a.warmup} warm-up\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
