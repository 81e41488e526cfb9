"""The GPU check in one command: original eager and compiled, exact, topo, topo compiled, side by side.

    python scripts/gpu_bench.py                         # CUDA, the search sizes below; < 8 min on one H100/H200
    python scripts/gpu_bench.py --device cpu --small    # the same code on the CPU at toy sizes (tests run this)

Per configuration -- NAS-Bench-201 DARTS (xautodl ``TinyNetworkDarts``, C=16, N=5) at batch 64 and 256,
the DARTS space (``NASNetworkDARTS``, C=16, N=2: 8 cells) at batch 64, NAS-Bench-201 GDAS at batch 64 --
every variant trains from the same state in one process, round-robin (``topofx.bench.compare``):

* step time: median of ``--steps`` training steps after ``--warmup`` (compilation happens there), timed
  by CUDA events on a GPU;
* peak memory: ``torch.cuda.max_memory_allocated`` over one step minus what was allocated before it
  (activations, gradients, temporaries; the parameters all variants share are not counted), reset per
  variant; on the CPU, where there is no such counter, the column is empty;
* saved activations: bytes autograd keeps for backward (as ``topofx bench`` counts them);
* max. relative error of a compiled variant's training step (outputs, gradients at the largest
  gradient's scale, BN statistics) against its eager counterpart, and whether the step is equal
  within ``train_step_equivalence``'s tolerance;
* then the largest batch predicted (``topofx.estimate``) to fit ``--budget-gib`` for the original and
  topo, and on a GPU the peak measured at that batch.

Sampled supernets (GDAS) run sparsely; ``compile`` leaves their forward eager (``docs/compile.md``), so
their compiled rows are left out, and ``torch.compile`` of the original GDAS (a ``.item()`` per edge) too.
Each section that fails prints its error and the script goes on; ``--out FILE`` writes every number as
JSON as it goes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from typing import Any

import torch
from torch import nn

import topofx
from topofx import bench, zoo
from topofx.testing import train_step_equivalence

GIB = 2**30
# name -> (zoo model, batch, overrides at search size, overrides with --small)
CONFIGS: dict[str, tuple[str, int, dict, dict]] = {
    "nb201-darts b64": ("nb201-darts", 64, dict(C=16, N=5), dict(C=4, N=1)),
    "nb201-darts b256": ("nb201-darts", 256, dict(C=16, N=5), dict(C=4, N=1)),
    "darts-space b64": ("darts-space", 64, dict(C=16, N=2), dict(C=4, N=1)),
    "nb201-gdas b64": ("nb201-gdas", 64, dict(C=16, N=5), dict(C=4, N=1)),
}
SMALL_BATCH = {64: 4, 256: 8}


def variants(model: nn.Module, inputs: tuple, device: str, compile_options: dict) -> dict[str, nn.Module]:
    """The rows of one configuration, each sharing the original's parameters."""
    exact = topofx.simplify(model, inputs, mode="exact")
    sampled = exact.sparse is not None
    rows: dict[str, nn.Module] = {"original": model}
    if not sampled:
        rows["original compiled"] = torch.compile(model, **compile_options)
    rows["exact"] = exact
    rows["topo"] = topofx.simplify(model, inputs)
    if not sampled:
        rows["topo compiled"] = topofx.simplify(model, inputs, compile=compile_options)
        if device == "cuda":  # static shapes: CUDA graphs replay the whole step's kernels
            rows["topo compiled, CUDA graphs"] = topofx.simplify(
                model, inputs, compile={**compile_options, "mode": "reduce-overhead"})
    return rows


def step_peak(model: nn.Module, inputs: tuple, device: str) -> float:
    """Bytes allocated at the peak of one training step beyond those allocated before it (CUDA)."""
    if device != "cuda":
        return float("nan")
    trainer = bench._Trainer(model, inputs)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.step(record=False)
        return float(torch.cuda.max_memory_allocated() - before)
    finally:
        trainer.close()


def compiled_error(compiled: nn.Module, eager: nn.Module, inputs: tuple) -> tuple[float, bool]:
    """One training step, compiled against eager: the largest relative difference, and whether the
    step is equal within ``train_step_equivalence``'s tolerance.  Weight gradients count at the scale
    of the largest one, as that tolerance does: a conv bias before a train-mode BN has an analytically
    zero gradient whose float noise differs by 100% between any two kernels."""
    report = train_step_equivalence(eager, compiled, inputs)
    grads = [c for c in report.comparisons if c.category == "weight_grad"]
    scale = max((c.ref_max for c in grads), default=0.0)
    worst = [v for k, v in report.max_rel_error.items() if k != "weight_grad"]
    worst.append(max((c.abs_error for c in grads), default=0.0) / scale if scale else 0.0)
    return max(worst), report.ok


def run_config(name: str, args: argparse.Namespace, results: dict) -> None:
    model_name, batch, search, small = CONFIGS[name]
    batch = SMALL_BATCH[batch] if args.small else batch
    image = 8 if args.small else 32
    model, inputs = zoo.build(model_name, batch_size=batch, image_size=image, **(small if args.small else search))
    model, inputs = model.to(args.device), tuple(x.to(args.device) for x in inputs)
    start = time.perf_counter()
    rows = variants(model, inputs, args.device, dict(backend=args.compile_backend))
    rows_all = bench.compare(rows, inputs, steps=args.steps, warmup=args.warmup, baseline="original",
                             progress=None)
    peaks = {row: step_peak(m, inputs, args.device) for row, m in rows.items()}
    errors = {row: compiled_error(m, rows["original" if row.startswith("original") else "topo"], inputs)
              for row, m in rows.items() if "compiled" in row}  # (relative error, equal within tolerance)
    base_peak = peaks["original"]
    print(f"\n## {name}: {model_name} {small if args.small else search}, batch {batch}, {image}x{image}, "
          f"{args.device}, median of {args.steps} steps after {args.warmup} warm-up "
          f"({time.perf_counter() - start:.0f} s)")
    print("| variant | step (ms) | speed-up | step peak (MB) | peak ratio | saved act. (MB) | act. ratio | "
          "vs eager: rel. err (equal?) |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for row in rows_all:
        peak = peaks[row.name]
        entry = dict(variant=row.name, step_ms=row.step_time_s * 1e3, speedup=row.time_ratio,
                     peak_mb=peak / bench.MB, peak_ratio=peak / base_peak, act_mb=row.act_mb,
                     act_ratio=row.mem_ratio, rel_err=errors.get(row.name, (None,))[0],
                     equal=errors.get(row.name, (None, None))[1])
        table.append(entry)
        err = "" if entry["rel_err"] is None else f"{entry['rel_err']:.1e} ({'yes' if entry['equal'] else 'NO'})"
        peak_cells = ("", "") if peak != peak else (f"{entry['peak_mb']:.0f}", f"{entry['peak_ratio']:.2f}")
        print(f"| {row.name} | {entry['step_ms']:.1f} | {row.time_ratio:.2f}x | {peak_cells[0]} | {peak_cells[1]} | "
              f"{row.act_mb:.0f} | {row.mem_ratio:.2f} | {err} |")
    results[name] = dict(model=model_name, batch=batch, rows=table)
    if "topo compiled" in rows and not any(r.get("model") == model_name and "max_batch" in r
                                           for r in results.values() if isinstance(r, dict)):
        results[name]["max_batch"] = largest_batch(model, rows["topo"], inputs, args)  # once per supernet


def largest_batch(model: nn.Module, topo: nn.Module, inputs: tuple, args: argparse.Namespace) -> dict:
    """The largest batch ``topofx.estimate`` predicts to fit the budget, original and topo; on a GPU the
    peak one step measures there (parameters, gradients, optimizer state included)."""
    budget = args.budget_gib * GIB
    est = topofx.estimate(model, inputs, simplified=topo)
    found = {}
    for which, net in (("original", model), ("simplified", topo)):
        size = est.max_batch(budget, which)
        measured = float("nan")
        if args.device == "cuda" and size > 0:
            big = tuple(torch.randn(size, *x.shape[1:], device=x.device) for x in inputs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            trainer = bench._Trainer(net, big)
            try:
                trainer.step(record=False)
                measured = torch.cuda.max_memory_allocated() / GIB
            finally:
                trainer.close()
                del trainer, big
                torch.cuda.empty_cache()
        found[which] = dict(batch=size, predicted_gib=est.peak(which, size) / GIB, measured_gib=measured)
        print(f"largest batch within {args.budget_gib} GiB, {which}: {size} (predicted peak "
              f"{found[which]['predicted_gib']:.2f} GiB" + ("" if measured != measured else
                                                            f", measured {measured:.2f} GiB") + ")")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="toy sizes (C=4, N=1, batch 4/8, 8x8 images)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    parser.add_argument("--out", help="write the numbers as JSON to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; run with --device cpu --small to check the script on the CPU")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# topofx gpu_bench: torch {torch.__version__}, {where}")
    results: dict[str, Any] = {"device": where, "torch": torch.__version__}
    failed = 0
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="topofx: .* runs sparsely")
                run_config(name, args, results)
        except Exception:  # noqa: BLE001 -- one prepared call: report and go on to the next section
            failed += 1
            print(f"\n## {name}: FAILED\n{traceback.format_exc()}", file=sys.stdout)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1, default=float)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
