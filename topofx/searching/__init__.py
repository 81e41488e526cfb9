"""``topofx search``: one-shot architecture search engines (DARTS-V1/V2, GDAS, SNAS, PC-DARTS).

* :mod:`.algorithms`: what each algorithm does (one table);
* :mod:`.step`: the architecture and weight steps (every gradient in one place);
* :mod:`.hypergradient`: DARTS-V2's unrolled hypergradient;
* :mod:`.engine`: :class:`SearchConfig`, :func:`run_search`, checkpoints, :func:`load_search`;
* :mod:`.records`: genotype, alpha entropy, the alpha-evolution picture.
"""
from .algorithms import ALGORITHMS, SPACES, Algorithm, Hyper, gdas_tau, snas_temperature
from .engine import SearchConfig, Searcher, SearchResult, build_supernet, load_search, run_search
from .hypergradient import unrolled_arch_gradients
from .step import SearchStep, arch_parameters, logits_of

__all__ = ["ALGORITHMS", "SPACES", "Algorithm", "Hyper", "gdas_tau", "snas_temperature", "SearchConfig",
           "Searcher", "SearchResult", "build_supernet", "load_search", "run_search", "unrolled_arch_gradients",
           "SearchStep", "arch_parameters", "logits_of"]
