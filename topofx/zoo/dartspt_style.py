"""A DARTS-PT search network: perturbation-based projection of a trained DARTS supernet.

Why this exists: DARTS-PT (Wang, Cheng, Chen, Tang & Hsieh, "Rethinking Architecture Selection in
Differentiable NAS", ICLR 2021) keeps training a DARTS supernet while it fixes ("projects") one edge
at a time to a single operation. Its search code (``sota/cnn/model_search_darts_proj.py``) has
idioms a capture must follow:

* **a join that skips zero weights**: ``sum(w * op(x) for w, op in zip(weights, self._ops) if w != 0)``
  -- the truth value of a 0-d tensor decides which candidates run. The weights depend only on
  architecture tensors (never on the data), but they change between epochs: a projected edge keeps a
  single term (it stops being a mixed edge), an edge whose node dropped it keeps none and the
  generator sums to the Python integer ``0``;
* **projection state in plain tensors held in dicts**: ``candidate_flags[cell_type]`` (a bool tensor,
  one entry per edge, ``True`` while the edge is still searched) and ``proj_weights[cell_type]`` (a
  float tensor shaped like the alphas, the one-hot rows of projected edges). ``project_op(eid, opid,
  cell_type)`` writes ``proj_weights[cell_type][eid][opid] = 1`` and ``candidate_flags[cell_type][eid]
  = False``; ``project_edge(nid, eids, cell_type)`` keeps two of a node's input edges and fills the
  others' projected rows with 0;
* **in-place ``.data`` writes into the softmax output**: ``get_projected_weights`` computes
  ``weights = F.softmax(alpha, -1)`` and then, in a Python loop over edges guarded by
  ``if not self.candidate_flags[cell_type][eid]:``, does ``weights[eid].data.copy_(proj_weights[eid])``
  -- the forward sees the one-hot row while autograd's softmax backward reads the overwritten output
  (so a projected row's alphas get exactly zero gradient);
* **an optional ``weights_dict`` argument to ``forward``**: the projection step evaluates the
  supernet with one candidate masked out, ``weights = model.get_projected_weights(t);
  weights[eid] = weights[eid] * proj_mask; model(x, weights_dict={t: weights})``; the cell type not in
  the dict falls back to the model's own projected weights;
* per-edge candidate lists (``primitives['primitives_normal'][edge]``), the DARTS skeleton and
  plain-tensor alphas (``Variable(1e-3 * torch.randn(k, n), requires_grad=True)``). (The code base
  publishes the per-edge lists by assigning the class attribute ``nn.Module.PRIMITIVES``, visible to
  every module in the process; here they are passed down explicitly.)

Sizes. DARTS-PT projects a supernet trained in the DARTS search setting: ``C=16``, 8 cells, 4 steps,
the 8 DARTS candidates; the zoo default. Written from scratch in those idioms; not a copy.
"""

from __future__ import annotations

from collections import namedtuple
from copy import deepcopy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operations import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN

__all__ = ["PRIMITIVES", "Genotype", "darts_space", "MixedOp", "Cell", "DartsNetworkProj"]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


def darts_space(num_edges: int = 14, primitives: Sequence[str] = PRIMITIVES) -> Dict[str, list]:
    """The per-edge candidate lists of the DARTS space (every edge: all 8 primitives)."""
    return {"primitives_normal": [list(primitives) for _ in range(num_edges)],
            "primitives_reduct": [list(primitives) for _ in range(num_edges)]}


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: Sequence[str]):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in primitives:
            op = OPS[primitive](C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        ret = sum(w * op(x) for w, op in zip(weights, self._ops) if w != 0)
        return ret


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Dict[str, list]):
        super().__init__()
        self.reduction = reduction
        self.primitives = primitives["primitives_reduct" if reduction else "primitives_normal"]
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        edge_index = 0
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, self.primitives[edge_index]))
                edge_index += 1

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class DartsNetworkProj(nn.Module):
    """DARTS supernet with DARTS-PT's projection state; ``forward`` returns the logits."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8,
                 criterion: Optional[nn.Module] = None,
                 primitives: Optional[Dict[str, list]] = None, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3):
        super().__init__()
        num_edges = sum(1 for i in range(steps) for n in range(2 + i))
        self.PRIMITIVES = primitives if primitives is not None else darts_space(num_edges)
        self.op_names = self.PRIMITIVES
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                        self.PRIMITIVES)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self._initialize_alphas()
        self._initialize_flags()
        self._initialize_proj_weights()
        self._initialize_topology_dicts()

    # ---- DARTS part ------------------------------------------------------------------------------
    def _initialize_alphas(self) -> None:
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        num_ops = len(self.PRIMITIVES["primitives_normal"][0])
        self.num_edges = k
        self.num_ops = num_ops
        self.alphas_normal = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def get_softmax(self) -> Dict[str, torch.Tensor]:
        return {"normal": F.softmax(self.alphas_normal, dim=-1),
                "reduce": F.softmax(self.alphas_reduce, dim=-1)}

    # ---- projection state ------------------------------------------------------------------------
    def _initialize_topology_dicts(self) -> None:
        # input edges of the intermediate nodes that have more than two inputs
        self.nid2eids = {}
        start = 2
        for nid in range(self._steps - 1):
            n = 3 + nid
            self.nid2eids[nid] = list(range(start, start + n))
            start += n
        self.nid2selected_eids = {"normal": {n: [] for n in self.nid2eids},
                                  "reduce": {n: [] for n in self.nid2eids}}

    def _initialize_flags(self) -> None:
        self.candidate_flags = {
            "normal": torch.tensor(self.num_edges * [True], requires_grad=False, dtype=torch.bool),
            "reduce": torch.tensor(self.num_edges * [True], requires_grad=False, dtype=torch.bool),
        }
        self.candidate_flags_edge = {
            "normal": torch.tensor((self._steps - 1) * [True], requires_grad=False, dtype=torch.bool),
            "reduce": torch.tensor((self._steps - 1) * [True], requires_grad=False, dtype=torch.bool),
        }

    def _initialize_proj_weights(self) -> None:
        self.proj_weights = {"normal": torch.zeros_like(self.alphas_normal),
                             "reduce": torch.zeros_like(self.alphas_reduce)}

    def project_op(self, eid: int, opid: int, cell_type: str) -> None:
        self.proj_weights[cell_type][eid][opid] = 1  # hard projection
        self.candidate_flags[cell_type][eid] = False

    def project_edge(self, nid: int, eids: Sequence[int], cell_type: str) -> None:
        for eid in self.nid2eids[nid]:
            if eid not in eids:  # not in the top two
                self.proj_weights[cell_type][eid].data.fill_(0)
        self.nid2selected_eids[cell_type][nid] = deepcopy(list(eids))
        self.candidate_flags_edge[cell_type][nid] = False

    def get_projected_weights(self, cell_type: str) -> torch.Tensor:
        weights = self.get_softmax()[cell_type]
        for eid in range(self.num_edges):
            if not self.candidate_flags[cell_type][eid]:
                weights[eid].data.copy_(self.proj_weights[cell_type][eid])
        for nid in self.nid2eids:
            if not self.candidate_flags_edge[cell_type][nid]:
                for eid in self.nid2eids[nid]:
                    if eid not in self.nid2selected_eids[cell_type][nid]:
                        weights[eid].data.copy_(self.proj_weights[cell_type][eid])
        return weights

    def forward(self, input, weights_dict=None):
        if weights_dict is None or "normal" not in weights_dict:
            weights_normal = self.get_projected_weights("normal")
        else:
            weights_normal = weights_dict["normal"]
        if weights_dict is None or "reduce" not in weights_dict:
            weights_reduce = self.get_projected_weights("reduce")
        else:
            weights_reduce = weights_dict["reduce"]

        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target, return_logits: bool = False):
        logits = self(input)
        loss = self._criterion(logits, target)
        return (loss, logits) if return_logits else loss

    def genotype(self) -> Genotype:
        def _parse(weights, normal: bool):
            PRIMITIVES_ = self.PRIMITIVES["primitives_normal" if normal else "primitives_reduct"]
            gene, n, start = [], 2, 0
            for i in range(self._steps):
                end = start + n
                W = weights[start:end].copy()

                def strength(x):
                    ops = PRIMITIVES_[start + x]
                    return max(W[x][k] for k in range(len(W[x])) if ops[k] != "none")

                edges = sorted(range(i + 2), key=lambda x: -strength(x))[:2]
                for j in edges:
                    ops = PRIMITIVES_[start + j]
                    k_best = max((k for k in range(len(W[j])) if ops[k] != "none"),
                                 key=lambda k: W[j][k])
                    gene.append((ops[k_best], j))
                start = end
                n += 1
            return gene

        with torch.no_grad():
            weights_normal = self.get_projected_weights("normal")
            weights_reduce = self.get_projected_weights("reduce")
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=_parse(weights_normal.data.cpu().numpy(), True),
                        normal_concat=concat,
                        reduce=_parse(weights_reduce.data.cpu().numpy(), False),
                        reduce_concat=concat)
