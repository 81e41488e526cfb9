"""The search loop behind ``topofx search``: :class:`SearchConfig` in, :class:`SearchResult` out.

``run_search(config)`` builds the algorithm's supernet for the space (``topofx.zoo``), simplifies it
(``config.simplify``), and alternates the architecture and weight steps of :class:`~.step.SearchStep`
over the data's search split (:func:`topofx.data.search_split`: weights on one half, architecture on
the other; single-level SNAS trains both on the whole training split).  Per epoch it runs the
algorithm's hook (GDAS's tau, SNAS's temperature), evaluates on the test split, and, with
``config.out``, appends a line to ``log.jsonl`` and writes ``checkpoint.pt``; at the end
``genotype.json`` and ``alphas.png``.  Resuming from ``checkpoint.pt`` restores weights, alphas, both
optimizers, the scheduler, the RNG states (torch, ``random``, NumPy) and the data-order generators,
so that under ``deterministic=True`` a resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..distributed import World
from ..ir import seed_all
from .algorithms import SINGLE_LEVEL, SPACES, Algorithm, algorithm
from .records import alpha_entropy, alpha_probs, genotype_record, jsonable, op_names, plot_alphas
from .step import Batch, SearchStep, arch_parameters

__all__ = ["SearchConfig", "SearchResult", "Searcher", "run_search", "load_search", "build_supernet",
           "CHECKPOINT", "CONFIG", "LOG", "GENOTYPE", "PLOT", "TIMING_FIELDS"]

CONFIG, LOG, CHECKPOINT, GENOTYPE, PLOT = "config.json", "log.jsonl", "checkpoint.pt", "genotype.json", "alphas.png"
TIMING_FIELDS = ("step_time", "epoch_time")  # log fields that differ between otherwise identical runs
_FORMAT = "topofx-search-checkpoint"


@dataclasses.dataclass
class SearchConfig:
    """Every option of ``topofx search`` (``config.json`` of a run).  CPU-sized defaults."""

    algo: str = "darts-v1"  # darts-v1, darts-v2, gdas, snas, pcdarts
    space: str = "nb201"  # nb201 (NAS-Bench-201 cell) or darts (DARTS/NASNet cells)
    data: str = "digits"  # digits, mnist5k or cifar10:DIR (topofx.data)
    epochs: int = 10
    simplify: str = "topo"  # topo, exact or none
    seed: int = 0
    out: str | None = None  # output folder
    batch_size: int = 64
    image_size: int = 16  # digits and mnist5k are resized to it; CIFAR-10 stays 32
    C: int = 8  # channels of the first stage
    N: int = 1  # searchable cells per stage (NB201: 3N cells; DARTS space: 3N+2 cells, 2 of them reducing)
    nodes: int = 4  # intermediate nodes per DARTS-space cell (the DARTS space has 4)
    max_steps: int | None = None  # cap on the iterations of an epoch (and on evaluation batches)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    arch_warmup: int | None = None  # epochs with frozen alphas; None: the algorithm's (PC-DARTS 30%)
    w_lr: float | None = None  # weight learning rate; None: the paper's
    a_lr: float | None = None  # architecture learning rate; None: the paper's
    nb201_table: str | None = None  # NAS-Bench-201 table (topofx nb201 export) to look derived archs up
    threads: int | None = None  # torch intra-op threads

    def validate(self) -> "SearchConfig":
        algorithm(self.algo)
        if self.space not in SPACES:
            raise ValueError(f"unknown search space {self.space!r}: use one of {', '.join(SPACES)}")
        if self.simplify not in ("topo", "exact", "none"):
            raise ValueError(f"--simplify must be topo, exact or none, not {self.simplify!r}")
        for name in ("epochs", "batch_size", "image_size", "C", "N", "nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.nb201_table and self.space != "nb201":
            raise ValueError("--nb201 needs --space nb201")
        return self

    @property
    def supernet(self) -> str:
        return algorithm(self.algo).supernets[self.space]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown search options {unknown}")
        return cls(**values)


@dataclasses.dataclass
class SearchResult:
    config: SearchConfig
    model: nn.Module  # the original supernet, searched (weights and alphas)
    net: nn.Module  # what ran: the simplified module, or ``model`` with simplify="none"
    log: list[dict[str, Any]]  # one record per epoch (log.jsonl)
    genotype: Any  # JSON form of model.genotype()
    arch: str | None  # NAS-Bench-201 arch string (space nb201)
    seconds: float
    finished: bool  # False when stopped early (stop_after)
    out: Path | None = None


def build_supernet(config: SearchConfig) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The algorithm's supernet for the space at the config's sizes, and example inputs of one
    search batch (``topofx.zoo.build`` with the config's seed)."""
    from .. import zoo

    name = config.supernet
    allowed = zoo._entry(name).allowed()
    overrides: dict[str, Any] = {"C": config.C}
    if "layers" in allowed:
        overrides["layers"] = 3 * config.N + 2
    else:
        overrides["N"] = config.N
    if config.space == "darts":
        if "steps" not in allowed:
            raise ValueError(f"{name} cannot change its nodes per cell")
        overrides.update(steps=config.nodes, multiplier=config.nodes)
    return zoo.build(name, batch_size=config.batch_size, image_size=_image_size(config), seed=config.seed, **overrides)


def _image_size(config: SearchConfig) -> int:
    return 32 if config.data.startswith("cifar10:") else config.image_size


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_numpy_state(state: list) -> None:
    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_random_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


class Searcher:
    """One search run.  ``Searcher(config).run()`` is :func:`run_search`.

    ``world`` (:class:`topofx.distributed.World`, one process by default; ``torchrun`` gives more):
    every rank draws the same batches and computes its shard (:meth:`batches`),
    :meth:`SearchStep.reduce_gradients` averages the gradients, rank 0's BN statistics are copied to
    all ranks after each epoch, and the ranks' genotypes are checked equal at the end.  Only rank 0
    prints and writes files.
    """

    def __init__(self, config: SearchConfig, *, resume: bool = False, stop_after: int | None = None,
                 progress: bool = True, echo: Callable[[str], None] | None = None,
                 world: World = World()):
        self.config = config.validate()
        self.algo: Algorithm = algorithm(config.algo)
        self.resume, self.stop_after, self.progress = resume, stop_after, progress
        self.world = world
        self.echo = echo if echo is not None and world.is_main else (lambda text: None)
        self.out = Path(config.out) if config.out else None
        if resume and (self.out is None or not (self.out / CHECKPOINT).is_file()):
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {self.out}")
        hyper = self.algo.hyper
        if config.w_lr is not None:
            hyper = dataclasses.replace(hyper, w_lr=config.w_lr)
        if config.a_lr is not None:
            hyper = dataclasses.replace(hyper, a_lr=config.a_lr)
        self.hyper = hyper
        self.log: list[dict[str, Any]] = []
        self.epoch = 0  # epochs done

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from .. import data as datasets

        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dataset = datasets.load(cfg.data, image_size=cfg.image_size, seed=cfg.seed)
        if self.dataset.num_classes != 10:
            raise ValueError(f"{cfg.data} has {self.dataset.num_classes} classes; the supernets have 10")
        if self.algo.arch_step == SINGLE_LEVEL:
            self.splits = {"train": self.dataset.train}
        else:
            w_split, a_split = datasets.search_split(self.dataset, cfg.seed)
            self.splits = {"train": w_split, "arch": a_split}
        self.model, self.example_inputs = build_supernet(cfg)
        checkpoint = read_checkpoint(self.out / CHECKPOINT) if self.resume else None
        # the first epoch's temperature before capturing (a float the graph reads as an input where it only
        # feeds tensor arithmetic; otherwise a simplified module captures anew when it changes)
        self.algo.epoch_hook(self.model, int(checkpoint["epoch"]) if checkpoint else 0, cfg.epochs)
        self.net = self.model if cfg.simplify == "none" else self._simplify()
        self.alphas = arch_parameters(self.model)
        ids = {id(a) for a in self.alphas}
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        self.step = SearchStep(self.net, self.alphas, weights, self.hyper, self.algo.arch_step,
                               world=self.world)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.step.w_opt, T_max=cfg.epochs,
                                                                    eta_min=self.hyper.w_lr_min)
        self.activation = self._activation_bytes()
        self.generators = {split: torch.Generator().manual_seed(cfg.seed + 1 + i) for i, split in enumerate(self.splits)}
        self.table = None
        if cfg.nb201_table:
            from .. import nb201

            self.table = nb201.Table.load(cfg.nb201_table)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        else:
            seed_all(cfg.seed)

    def _simplify(self) -> nn.Module:
        from ..simplifier import simplify

        start = time.perf_counter()
        # two examples suffice (the simplified module takes any batch size) and keep the self-check short
        examples = tuple(x[:2] for x in self.example_inputs)
        net = simplify(self.model, examples, mode=self.config.simplify)
        self.simplify_seconds = time.perf_counter() - start
        self.echo(f"simplified {self.config.supernet} ({self.config.simplify}) in {self.simplify_seconds:.1f}s: "
                  f"nodes {net.report.before.get('nodes')} -> {net.report.after.get('nodes')}")
        return net

    def _activation_bytes(self) -> dict[str, int | None]:
        """Bytes autograd saves in one training forward at the search batch (``topofx.estimate``'s
        counter, under FakeTensorMode: nothing runs): of the net that runs and of the original."""
        from ..estimate import _fake_saved_bytes

        out: dict[str, int | None] = {}
        with torch.random.fork_rng(devices=[]):
            for key, net in (("searched", self.net), ("original", self.model)):
                if key == "original" and net is self.net:
                    out[key] = out["searched"]
                    continue
                try:
                    out[key] = int(_fake_saved_bytes(net, self.model, self.example_inputs, 1))
                except Exception:  # noqa: BLE001 - sampled or value-dependent forwards (GDAS): not estimable
                    out[key] = None
        return out

    # -- data: the one place batches are drawn ---------------------------------------------------
    def batches(self, split: str) -> Iterator[Batch]:
        """One epoch of ``split`` in a fresh random order (its own generator), full batches only;
        each rank takes its shard of every batch."""
        x, y = self.splits[split]
        size = min(self.config.batch_size, len(y))
        order = torch.randperm(len(y), generator=self.generators[split])
        for i in range(0, len(y) - size + 1, size):
            idx = order[i:i + size]
            yield self.world.shard(x[idx], y[idx])

    def steps_per_epoch(self) -> int:
        size = min(self.config.batch_size, min(len(s[1]) for s in self.splits.values()))
        steps = min(len(s[1]) // size for s in self.splits.values())
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    # -- the loop --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, step = self.config, self.step
        hooked = dict(self.algo.epoch_hook(self.net, epoch, cfg.epochs))
        warmup = cfg.arch_warmup if cfg.arch_warmup is not None else self.algo.warmup_epochs(cfg.epochs)
        update_alphas = epoch >= warmup
        lr = step.lr
        self.net.train()
        sums = {"train_loss": 0.0, "train_acc": 0.0, "valid_loss": 0.0, "valid_acc": 0.0}
        arch_steps = 0
        steps = self.steps_per_epoch()
        train_it = self.batches("train")
        arch_it = self.batches("arch") if "arch" in self.splits else None
        bar = None
        if self.progress and self.world.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"{cfg.algo} {cfg.space} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        start = time.perf_counter()
        try:
            for i in range(steps):
                t0 = time.perf_counter()
                train_batch = next(train_it)
                if arch_it is None:
                    loss, acc = step.joint_step(train_batch, update_alphas)
                else:
                    arch_batch = next(arch_it)
                    if update_alphas and self.algo.arch_first:
                        v = step.arch_step(arch_batch, train_batch)
                    loss, acc = step.weight_step(train_batch)
                    if update_alphas and not self.algo.arch_first:
                        v = step.arch_step(arch_batch, train_batch)
                    if update_alphas:
                        arch_steps += 1
                        sums["valid_loss"] += v[0]
                        sums["valid_acc"] += v[1]
                sums["train_loss"] += loss
                sums["train_acc"] += acc
                if bar is not None:
                    post = {"loss": f"{sums['train_loss'] / (i + 1):.3f}", "acc": f"{sums['train_acc'] / (i + 1):.2f}"}
                    if arch_steps:
                        post.update(vloss=f"{sums['valid_loss'] / arch_steps:.3f}", vacc=f"{sums['valid_acc'] / arch_steps:.2f}")
                    post["s/step"] = f"{time.perf_counter() - t0:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        self.scheduler.step()
        self.world.broadcast_buffers(self.net)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **hooked,
                                  "train_loss": sums["train_loss"] / steps, "train_acc": sums["train_acc"] / steps}
        if arch_it is not None:
            record["valid_loss"] = sums["valid_loss"] / arch_steps if arch_steps else None
            record["valid_acc"] = sums["valid_acc"] / arch_steps if arch_steps else None
        record["arch_updates"] = arch_steps if arch_it is not None else (steps if update_alphas else 0)
        record.update(self.evaluate())
        record.update(genotype_record(self.model, cfg.space))
        if self.table is not None:
            rec = self.table.lookup(record["arch"])
            record["nb201"] = jsonable(dataclasses.asdict(rec))
        record["alpha_entropy"] = alpha_entropy(self.alphas)
        record["alphas"] = alpha_probs(self.alphas)
        record["activation_bytes"] = self.activation.get("searched")
        record["activation_bytes_original"] = self.activation.get("original")
        record["steps"] = steps
        record["step_time"] = seconds / steps
        record["epoch_time"] = seconds
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the test split (eval mode), at most ``max_steps`` batches."""
        x, y = self.dataset.test
        size = self.config.batch_size
        limit = self.config.max_steps
        self.net.eval()
        total_loss = correct = count = 0.0
        try:
            for n, i in enumerate(range(0, len(y), size)):
                if limit is not None and n >= limit:
                    break
                logits = self.step._forward((x[i:i + size], y[i:i + size]))[1]
                total_loss += float(nn.functional.cross_entropy(logits, y[i:i + size], reduction="sum"))
                correct += float((logits.argmax(1) == y[i:i + size]).sum())
                count += len(y[i:i + size])
        finally:
            self.net.train()
        return {"test_loss": total_loss / count, "test_acc": correct / count}

    def run(self) -> SearchResult:
        cfg = self.config
        previous = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        start = time.perf_counter()
        try:
            self.setup()
            if self.world.is_main and self.out is not None:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
                self._rewrite_log()
            finished = True
            while self.epoch < cfg.epochs:
                if self.stop_after is not None and self.epoch >= self.stop_after:
                    finished = False
                    break
                record = self.train_epoch(self.epoch)
                self.epoch += 1
                self.log.append(record)
                self.echo(self._summary(record))
                if self.world.is_main and self.out is not None:
                    with open(self.out / LOG, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    self.save_checkpoint(self.out / CHECKPOINT)
            genotype = genotype_record(self.model, cfg.space)
            if len({json.dumps(g, sort_keys=True) for g in self.world.gather(genotype)}) > 1:
                raise RuntimeError(f"the {self.world.size} ranks ended with different genotypes")
            if finished and self.world.is_main and self.out is not None:
                (self.out / GENOTYPE).write_text(json.dumps(
                    {"algo": cfg.algo, "space": cfg.space, "supernet": cfg.supernet, "epochs": self.epoch, **genotype},
                    indent=1) + "\n")
                if self.log:
                    plot_alphas([r["alphas"] for r in self.log], self.out / PLOT,
                                names=op_names(self.model, self.alphas[0].shape[-1]),
                                title=f"{cfg.algo} on {cfg.space} ({cfg.data}), simplify={cfg.simplify}")
        finally:
            torch.use_deterministic_algorithms(previous)
        return SearchResult(cfg, self.model, self.net, self.log, genotype["genotype"], genotype.get("arch"),
                            time.perf_counter() - start, finished, self.out)

    def _summary(self, r: dict[str, Any]) -> str:
        parts = [f"epoch {r['epoch']}/{self.config.epochs}", f"train {r['train_loss']:.3f}/{r['train_acc']:.2f}"]
        if r.get("valid_loss") is not None:
            parts.append(f"valid {r['valid_loss']:.3f}/{r['valid_acc']:.2f}")
        parts.append(f"test {r['test_loss']:.3f}/{r['test_acc']:.2f}")
        parts += [f"{k} {r[k]:.3g}" for k in ("tau", "temperature") if k in r]
        parts.append(f"entropy {r['alpha_entropy']:.3f}")
        parts.append(f"{r['step_time']:.2f}s/step")
        parts.append(r.get("arch") or json.dumps(r["genotype"])[:120])
        if "nb201" in r:
            acc = (r["nb201"].get("accuracy") or {}).get("cifar10", {}).get("test")
            parts.append(f"NB201 cifar10 test {acc}")
        return "  ".join(parts)

    # -- checkpoints -----------------------------------------------------------------------------
    def _rewrite_log(self) -> None:
        """``log.jsonl`` holds exactly the epochs done (a resumed run drops lines of a lost epoch)."""
        with open(self.out / LOG, "w") as f:
            for record in self.log:
                f.write(json.dumps(record) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "version": 1, "epoch": self.epoch, "config": self.config.to_dict(),
            "net": self.net.state_dict(), "alphas": [a.detach().clone() for a in self.alphas],
            "w_opt": self.step.w_opt.state_dict(), "a_opt": self.step.a_opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "random": _random_state(), "numpy": _numpy_state()},
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "log": self.log,
        }

    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, state: dict[str, Any] | str | Path) -> None:
        """Restore a :meth:`state_dict` (or the checkpoint file holding one)."""
        if not isinstance(state, dict):
            state = read_checkpoint(state)
        _load_weights(self.net, self.alphas, state)
        self.step.w_opt.load_state_dict(state["w_opt"])
        self.step.a_opt.load_state_dict(state["a_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_random_state(state["rng"]["random"])
        _set_numpy_state(state["rng"]["numpy"])
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        self.epoch = int(state["epoch"])
        self.log = list(state["log"])
        self.echo(f"resumed from {self.out / CHECKPOINT if self.out else 'a checkpoint'} after epoch {self.epoch}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A ``checkpoint.pt`` of a search (tensors, numbers, strings only: ``weights_only`` loading)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a topofx search checkpoint")
    return state


def _load_weights(net: nn.Module, alphas: list[torch.Tensor], state: dict[str, Any], strict: bool = True) -> None:
    result = net.load_state_dict(state["net"], strict=strict)
    if result.missing_keys:  # strict=False only tolerates the simplified module's extra (floated BN) keys
        raise ValueError(f"checkpoint lacks {len(result.missing_keys)} of the model's keys, e.g. {result.missing_keys[:3]}")
    with torch.no_grad():
        for a, saved in zip(alphas, state["alphas"], strict=True):
            a.copy_(saved)


def run_search(config: SearchConfig, **options: Any) -> SearchResult:
    """Run a search (``options``: :class:`Searcher`'s keyword arguments: ``resume``, ``stop_after``,
    ``progress``, ``echo``, ``world``)."""
    return Searcher(config, **options).run()


def load_search(out_dir: str | Path) -> tuple[nn.Module, SearchConfig, tuple[torch.Tensor, ...]]:
    """The searched supernet of a run folder: rebuilt from ``config.json``, weights and alphas from
    ``checkpoint.pt`` (the last epoch done); with its config and example inputs of one search batch
    (``topofx derive`` takes them).  The model is in train mode, as built."""
    out = Path(out_dir)
    for name in (CONFIG, CHECKPOINT):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out} has no {name}: not a topofx search folder")
    config = SearchConfig.from_dict(json.loads((out / CONFIG).read_text()))
    model, inputs = build_supernet(config)
    state = read_checkpoint(out / CHECKPOINT)
    _load_weights(model, arch_parameters(model), state, strict=False)  # floated BN statistics are the simplified module's
    return model, config, inputs
