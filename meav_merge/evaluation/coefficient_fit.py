"""Per-block coefficients fitted by gradient, the way aTLAS and AdaMerging learn task-vector weights.

A scalar λ per vector moves every layer of that vector together; its spill-over onto
other domains comes along. Here each vector gets one coefficient per *block* — one
module kind (attention, MLP, layer norms) of one layer, and the final norm — so the
fit can keep the parts of a vector that move its own domain and damp the parts that
move the others. θ = θ_target + Σ_v Σ_b c[v, b] · AV_v|_b.

The objective is a differentiable stand-in for preference accuracy on the validation
split: per query, the softmax (temperature ``tau``) over the levels' token-mean
log-probs, and the loss is −log p(target level), averaged per domain and summed over
domains, plus a small pull toward the starting point so that coefficients the data do
not constrain stay put. Only the top layers are differentiated: the frozen bottom
layers' states come from ``TopLayerScorer``'s cache, so a step costs a forward and a
backward pass through the changing layers and the LM head.

``lambda_settings`` writes the result the way mergekit recipes express per-layer values:
a list with one value per layer (mergekit interpolates a list across layers, so a list
as long as the model's layer count is exact) under ``filter:`` conditions per tensor kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from meav_merge.data.schema import PROFICIENCY_LEVELS
from meav_merge.evaluation.scoring import PreparedQuery
from meav_merge.evaluation.top_layer import LAYER_NAME

logger = logging.getLogger(__name__)

# Tensor kinds, in the order mergekit's filters are tried (the first substring match wins:
# "model.norm" must come after the per-layer kinds, whose names also contain "norm").
KINDS = ("self_attn", "mlp", "layernorm")


def block_of(name: str) -> str:
    """'layers.27.mlp', 'layers.27.self_attn', 'layers.27.layernorm', or the tensor name itself."""
    m = LAYER_NAME.match(name)
    if m:
        kind = next((k for k in KINDS if k in name), "other")
        return f"layers.{m.group(1)}.{kind}"
    return name


@dataclass
class FitConfig:
    steps: int = 30
    lr: float = 0.1
    tau: float = 0.05  # token-mean log-prob gaps between levels are O(0.1)
    pull: float = 1e-3  # weight of ‖c − c_start‖², keeps unconstrained blocks where they started
    clip: float = 6.0  # |c| bound: CPU-preset vectors reach their levels within |λ| ≤ 4


class BlockCoefficientFit:
    """Fits c[v, b] for a ``ReweightableModel`` whose scorer reuses the frozen bottom layers."""

    def __init__(self, rm):
        scorer = rm.scorer
        if scorer is None:
            raise ValueError("per-block fitting needs vectors that change only the top layers of a supported model")
        self.rm, self.scorer = rm, scorer
        self.blocks = sorted({block_of(n) for n in rm.changing})
        self.names = list(rm.changing)
        self.block_index = torch.tensor([self.blocks.index(block_of(n)) for n in self.names])
        self.deltas = [[v[n].to(torch.float32) for n in self.names] for v in rm.vectors]
        self.local = [scorer.local_name(n) for n in self.names]

    def expand(self, scalars: Sequence[float]) -> torch.Tensor:
        """c[v, b] with every block of vector v at its scalar λ_v."""
        return torch.tensor([[float(s)] * len(self.blocks) for s in scalars])

    def _params(self, coef: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for i, (name, local) in enumerate(zip(self.names, self.local)):
            w = self.rm._base[name].to(torch.float32)
            for v, deltas in enumerate(self.deltas):
                w = w + coef[v, self.block_index[i]] * deltas[i]
            out[local] = w
        return out

    def scores(self, coef: torch.Tensor, queries: Sequence[PreparedQuery]) -> torch.Tensor:
        """[queries, levels] token-mean log-probs at c, differentiable in c."""
        return self.scorer.scores_with(self._params(coef), queries)

    def loss(self, coef: torch.Tensor, prepared: Dict[str, Sequence[PreparedQuery]], target: Dict[str, str],
             tau: float) -> torch.Tensor:
        total = 0.0
        for d, level in target.items():
            s = self.scores(coef, prepared[d])
            t = PROFICIENCY_LEVELS.index(level)
            total = total - torch.log_softmax(s / tau, dim=-1)[:, t].mean()
        return total

    def fit(self, prepared: Dict[str, Sequence[PreparedQuery]], target: Dict[str, str],
            start: Optional[torch.Tensor] = None, config: FitConfig = FitConfig(),
            progress: bool = False) -> Tuple[torch.Tensor, List[float]]:
        """Coefficients [vectors, blocks] that lower the loss for ``target``; and the loss per step."""
        from tqdm.auto import tqdm

        c0 = (start if start is not None else torch.zeros(len(self.deltas), len(self.blocks))).clone().float()
        coef = c0.clone().requires_grad_(True)
        opt = torch.optim.Adam([coef], lr=config.lr)
        history = []
        for _ in tqdm(range(config.steps), desc="fit", disable=not progress):
            opt.zero_grad()
            loss = self.loss(coef, prepared, target, config.tau) + config.pull * ((coef - c0) ** 2).sum()
            loss.backward()
            opt.step()
            with torch.no_grad():
                coef.clamp_(-config.clip, config.clip)
            history.append(loss.item())
        logger.info("fit %s: loss %.4f -> %.4f", target, history[0], history[-1])
        return coef.detach(), history

    def apply(self, coef: torch.Tensor) -> None:
        """Write θ_target + Σ c·AV into the model in place (for exact scoring and generation)."""
        params = self._params(coef)
        state = dict(self.rm.model.named_parameters())
        with torch.no_grad():
            for name, local in zip(self.names, self.local):
                state[name].copy_(params[local].to(state[name].dtype))
        self.rm.coefficients = ("blocks",) + tuple(round(float(x), 6) for x in coef.flatten())

    def lambda_settings(self, coef: torch.Tensor) -> List[object]:
        """Per vector, the recipe's ``lambda``: filter conditions per tensor kind, each a per-layer list."""
        n_layers = self.rm.model.config.num_hidden_layers
        out = []
        for v in range(len(self.deltas)):
            conds = []
            for kind in KINDS:
                per_layer = {int(b.split(".")[1]): float(coef[v, i]) for i, b in enumerate(self.blocks)
                             if b.startswith("layers.") and b.endswith("." + kind)}
                if per_layer:
                    # layers a vector does not change take their nearest changed layer's value (no effect)
                    values = [per_layer[min(per_layer, key=lambda k: abs(k - i))] for i in range(n_layers)]
                    conds.append({"filter": kind, "value": [round(x, 4) for x in values]})
            rest = [float(coef[v, i]) for i, b in enumerate(self.blocks) if not b.startswith("layers.")]
            conds.append({"value": round(rest[0], 4) if rest else 0.0})
            out.append(conds)
        return out
