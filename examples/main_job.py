"""The main job: simplify the NAS-Bench-201 DARTS supernet, benchmark it, draw it, and search with it.

Offline, CPU only, about two minutes on a 2-core machine::

    python examples/main_job.py            # quick benchmark configuration (see below)
    python examples/main_job.py --full     # the reference configuration: C=16, N=5, batch 64, 5 steps

1. builds xautodl's ``TinyNetworkDarts`` on NAS-Bench-201 (zoo ``nb201-darts``: C=16, N=5) and
   simplifies it with ``mode="topo"`` (``mode="exact"`` where topo is not available), printing the report;
2. writes before/after pictures of its first cell to ``out/`` (``--out`` to change);
3. benchmarks step time and saved activation memory of the original against the simplified
   versions (``topofx.bench.run``).  A training step of the full supernet at batch 64 takes tens of
   seconds on 2 CPU cores, so by default the benchmark uses N=1 (3 searchable cells instead of 15)
   and batch 32; ``--full`` runs the reference configuration;
4. runs a short first-order DARTS search (``topofx.search.darts_search``: weights SGD, alphas Adam)
   with the *simplified* supernet (C=8, N=1) on scikit-learn's digits (8x8 images upsampled to 16x16,
   3 channels; half for the weights, half for the alphas) and prints the derived architecture in
   NAS-Bench-201 form, ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import topofx
from topofx import bench, zoo
from topofx.search import darts_search, digits
from topofx.visualize import visualize


def simplify_best(model, inputs):
    """``simplify(mode="topo")`` when it is available, else ``mode="exact"``."""
    try:
        return topofx.simplify(model, inputs, mode="topo"), "topo"
    except NotImplementedError as exc:
        print(f"note: mode='topo' not available ({str(exc).splitlines()[0]}); using mode='exact'")
        return topofx.simplify(model, inputs, mode="exact"), "exact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="benchmark the reference configuration (C=16, N=5, batch 64, 5 steps): many minutes on 2 cores")
    parser.add_argument("--out", default="out", help="folder for the before/after pictures (default: out)")
    parser.add_argument("--format", default="svg", help="picture format (svg, png, pdf; default svg)")
    parser.add_argument("--search-steps", type=int, default=30)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    def phase(title: str) -> None:
        print(f"\n=== {title}  [{time.perf_counter() - t_start:.0f}s]", flush=True)

    # 1. simplify the reference supernet --------------------------------------------------------
    phase("1. simplify the NAS-Bench-201 DARTS supernet (nb201-darts: C=16, N=5)")
    model, inputs = zoo.build("nb201-darts", batch_size=2, image_size=32)
    simplified, mode = simplify_best(model, inputs)
    print(simplified.report)

    # 2. pictures -------------------------------------------------------------------------------
    phase(f"2. before/after pictures -> {args.out}/")
    pictures = visualize(simplified, args.out, fmt=args.format, example_inputs=inputs)
    print(pictures.summary())

    # 3. benchmark ------------------------------------------------------------------------------
    if args.full:
        config = dict(batch_size=64, steps=5, warmup=1, overrides=None)
        phase("3. benchmark (reference configuration: C=16, N=5, batch 64, 32x32)")
    else:
        config = dict(batch_size=32, steps=2, warmup=1, overrides={"N": 1})
        phase("3. benchmark (quick configuration: C=16, N=1, batch 32, 32x32, 2 timed steps)")
        print("note: batch 32 and N=1 (3 searchable cells instead of 15) keep this job near 2 minutes on a "
              "2-core CPU; a full-size step at batch 64 takes tens of seconds there. "
              "`--full` runs the reference configuration.")
    modes = ("exact", "topo") if mode == "topo" else ("exact",)
    print(bench.run("nb201-darts", modes=modes, image_size=32, progress=not args.no_progress, **config))

    # 4. search with the simplified supernet ------------------------------------------------------
    phase(f"4. first-order DARTS search on digits with the simplified supernet (C=8, N=1, 16x16, {args.search_steps} steps)")
    train, val = digits(16)
    batch = 32
    search_model, _ = zoo.build("nb201-darts", C=8, N=1, batch_size=batch, image_size=16)
    search_simplified, search_mode = simplify_best(search_model, (train[0][:batch],))
    print(f"search supernet: {search_simplified!r}, nodes {search_simplified.report.before['nodes']} -> "
          f"{search_simplified.report.after['nodes']}; train/val {len(train[1])}/{len(val[1])} digits")
    print(f"architecture before the search (random alphas): {search_simplified.genotype().tostr()}")
    # DARTS's optimizers (weights: SGD 0.025 cosine, momentum 0.9; alphas: Adam, betas 0.5/0.999); the
    # alphas' learning rate is 10x DARTS's 3e-4 because this search is 30 steps, not 50 epochs
    print("weights: SGD lr 0.025 (cosine), momentum 0.9; alphas: Adam lr 3e-3 (10x DARTS: a 30-step search)")
    history = darts_search(search_simplified, train, val, steps=args.search_steps, batch_size=batch,
                           a_lr=3e-3, progress=not args.no_progress)
    print(history.summary())
    genotype = search_simplified.genotype()
    print(f"derived architecture (NAS-Bench-201): {genotype.tostr()}")

    total = time.perf_counter() - t_start
    print(f"\nmain job done in {total:.0f}s ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
