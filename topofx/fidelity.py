"""Search fidelity: does the simplified supernet find architectures as good as the original's?

``topofx fidelity`` runs the same searches three ways -- on the original supernet (``none``), on the
exact simplification and on the TopoNAS (topo) one -- with the same seeds, for each algorithm and
dataset asked, on the NAS-Bench-201 space; then retrains every derived architecture from scratch
(:func:`topofx.evaluate.retrain`, several seeds) and tabulates, per dataset, algorithm and mode:

* search wall time, set-up (data, capture, simplification) included, and the time of the search
  loop alone, with the loop's speed-up against the original's,
* activation memory of the searched supernet (and its ratio to the original's),
* how many of the 6 edges of the derived cell agree with the original's choice, per seed,
* the derived architectures' retrained test accuracy, mean +- std over search seeds x retrain seeds.

The TopoNAS claim this measures: topo's architectures retrain within 1 point of the original's at
>= 2x less search time.  Exact mode computes what the original computes, so its genotypes should
equal the original's (floating-point differences can flip near-ties after many steps).
Everything is written to ``OUT/fidelity.json`` as it completes (a rerun with the same ``OUT``
resumes where it stopped) and the table to ``OUT/fidelity.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from . import data as datasets
from . import nb201
from .evaluate import child_network, retrain

__all__ = ["FidelityConfig", "run", "table", "main"]

MODES = ("none", "exact", "topo")


@dataclasses.dataclass
class FidelityConfig:
    algos: Sequence[str] = ("darts-v1", "gdas", "snas")
    data: Sequence[str] = ("digits", "mnist5k")
    seeds: Sequence[int] = (0, 1, 2)
    modes: Sequence[str] = MODES
    epochs: int = 10
    max_steps: int | None = None
    C: int = 8
    N: int = 1
    batch_size: int = 64
    retrain_epochs: int = 10
    retrain_seeds: int = 3
    threads: int | None = 1
    out: str = "fidelity"
    progress: bool = True


def _search(cfg: FidelityConfig, algo: str, data: str, seed: int, mode: str) -> dict[str, Any]:
    from .searching import SearchConfig, run_search

    result = run_search(SearchConfig(algo=algo, space="nb201", data=data, epochs=cfg.epochs, simplify=mode,
                                     seed=seed, C=cfg.C, N=cfg.N, batch_size=cfg.batch_size,
                                     max_steps=cfg.max_steps, threads=cfg.threads), progress=cfg.progress)
    return {"seconds": result.seconds, "loop_seconds": sum(r["epoch_time"] for r in result.log),
            "activation_bytes": result.log[-1]["activation_bytes"], "arch": result.arch}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"config": None, "searches": {}, "retrains": {}}


def run(cfg: FidelityConfig) -> dict[str, Any]:
    """Run (or finish) every search and retraining ``cfg`` asks for; returns the results dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fidelity.json"
    results = _load(path)
    fixed = ("epochs", "max_steps", "C", "N", "batch_size", "retrain_epochs")
    if results["config"] and any(results["config"][k] != getattr(cfg, k) for k in fixed):
        raise ValueError(f"{path} holds results of other settings ({', '.join(fixed)}): use another --out")
    results["config"] = dataclasses.asdict(cfg)

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))
        (out / "fidelity.md").write_text(table(results))

    for data in cfg.data:
        dataset = datasets.load(data)
        for algo in cfg.algos:
            for seed in cfg.seeds:
                for mode in cfg.modes:
                    key = f"{data}/{algo}/{seed}/{mode}"
                    if key not in results["searches"]:
                        results["searches"][key] = _search(cfg, algo, data, seed, mode)
                        save()
                    arch = results["searches"][key]["arch"]
                    for r in range(cfg.retrain_seeds):
                        rkey = f"{data}/{arch}/{r}"
                        if rkey not in results["retrains"]:
                            child = child_network(arch, "nb201", C=cfg.C, N=cfg.N, image_size=16, seed=r)
                            got = retrain(child, dataset, epochs=cfg.retrain_epochs, seed=r, progress=cfg.progress)
                            results["retrains"][rkey] = got.test_acc
                            save()
    save()
    return results


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _memory(runs: list[dict[str, Any]]) -> float | None:
    """Mean activation bytes (``None`` where the search could not estimate them: sampled forwards)."""
    known = [r["activation_bytes"] for r in runs if r["activation_bytes"] is not None]
    return statistics.mean(known) if known else None


def _agreement(a: str, b: str) -> int:
    return sum(x == y for x, y in zip(nb201.ops(a), nb201.ops(b)))


def table(results: dict[str, Any]) -> str:
    """The markdown table of ``results`` (what :func:`run` returns or wrote)."""
    cfg = results["config"]
    searches, retrains = results["searches"], results["retrains"]
    lines = [
        f"search: NAS-Bench-201 space, C={cfg['C']}, N={cfg['N']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs"
        + (f" of at most {cfg['max_steps']} steps" if cfg.get("max_steps") else "")
        + f"; retrain: {cfg['retrain_epochs']} epochs, {cfg['retrain_seeds']} seeds per architecture",
        "",
        "| data | algorithm | supernet | search s | loop s | loop speed-up | activation MB | memory ratio "
        "| edges agreeing with original (of 6, per seed) | retrained test acc % (mean ± std) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in cfg["data"]:
        for algo in cfg["algos"]:
            base = [searches.get(f"{data}/{algo}/{s}/none") for s in cfg["seeds"]]
            for mode in cfg["modes"]:
                runs = [searches.get(f"{data}/{algo}/{s}/{mode}") for s in cfg["seeds"]]
                done = [r for r in runs if r]
                if not done:
                    continue
                secs = statistics.mean(r["seconds"] for r in done)
                done_base = [b for b in base if b]
                loop = statistics.mean(r["loop_seconds"] for r in done)
                speed = f"{statistics.mean(b['loop_seconds'] for b in done_base) / loop:.2f}x" if done_base else "-"
                mem, ratio = _memory(done), _memory(done_base)
                ratio = f"{mem / ratio:.2f}" if mem and ratio else "-"
                agree = ", ".join(str(_agreement(r["arch"], b["arch"])) if r and b else "-" for r, b in zip(runs, base))
                accs = [100 * retrains[f"{data}/{r['arch']}/{k}"] for r in done for k in range(cfg["retrain_seeds"])
                        if f"{data}/{r['arch']}/{k}" in retrains]
                name = "original" if mode == "none" else mode
                mem = f"{mem / 1e6:.1f}" if mem else "not estimable"
                lines.append(f"| {data} | {algo} | {name} | {secs:.1f} | {loop:.1f} | {speed} | {mem} | {ratio} "
                             f"| {agree} | {_mean_std(accs)} |")
    lines += ["", "Derived architectures (arch strings), per seed:", ""]
    for key, r in searches.items():
        lines.append(f"- `{key}`: `{r['arch']}`")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, prog: str = "topofx fidelity") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    d = FidelityConfig()

    def listed(kind):  # noqa: ANN001
        return lambda text: [kind(t) for t in text.split(",") if t]

    parser.add_argument("--algos", type=listed(str), default=list(d.algos), help="default: darts-v1,gdas,snas")
    parser.add_argument("--data", type=listed(str), default=list(d.data), help="default: digits,mnist5k")
    parser.add_argument("--seeds", type=listed(int), default=list(d.seeds), help="search seeds (default 0,1,2)")
    parser.add_argument("--modes", type=listed(str), default=list(d.modes), help="default: none,exact,topo")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="search epochs (default 10)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on search steps per epoch")
    parser.add_argument("--C", type=int, default=d.C, help="channels (default 8)")
    parser.add_argument("--N", type=int, default=d.N, help="cells per stage (default 1)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs)
    parser.add_argument("--retrain-seeds", type=int, default=d.retrain_seeds)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (default 1)")
    parser.add_argument("--out", default=d.out, help="results directory (a rerun resumes from it)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}: use {', '.join(MODES)}")
    cfg = FidelityConfig(**vars(args))
    results = run(cfg)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
