"""PEDRO's vector generator: prompt boundary, pooling, rational activation, and the pure functions of DESIGN.md §3."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100

# Padé (5, 4) coefficients of GeLU: P(x) = Σ_{i≤5} a_i x^i, Q(x) = 1 + |Σ_{1≤j≤4} b_j x^j|. Fitted once offline in
# float64: linearised least squares (P - y·(Q - 1) = y) on 8001 points of [-8, 8] as the start, then L-BFGS on the mean
# squared error of P/Q against torch's exact GeLU on the same grid. Max error 0.0078 on [-3, 3] (tested).
GELU_NUMERATOR = (0.0054859826, 0.49999626, 0.40565782, 0.11853811, 0.014811942, 0.00067074730)
GELU_DENOMINATOR = (-0.000094716641, 0.23704453, 0.000021004393, 0.0013394460)


def prompt_mask_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The default prompt boundary (DESIGN.md §3): `labels == -100` before the first supervised token, not padding."""
    before_first_supervised = torch.cumsum(labels != IGNORE_INDEX, dim=1) == 0
    if attention_mask is None:
        return before_first_supervised
    return before_first_supervised & attention_mask.bool()


def prompt_mask_from_lengths(lengths: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first `lengths[i]` non-padding tokens of sample i are its prompt (left or right padding alike)."""
    real = attention_mask.bool()
    rank = torch.cumsum(real.long(), dim=1)  # 1-based position among the sample's real tokens
    return real & (rank <= torch.as_tensor(lengths, device=rank.device).view(-1, 1))


def pool_prompt(
    hidden: torch.Tensor, mask: torch.Tensor | None, pooler: str, score_weight: torch.Tensor | None
) -> torch.Tensor:
    """Pool `hidden` `[B, T, d]` over the prompt positions `mask` `[B, T]` into `[B, d]` (DESIGN.md §3, pooler).

    "attention": softmax over prompt positions of `hidden @ w`; "mean": their mean; "last": the last prompt token.
    A sample without prompt tokens pools to the zero vector. `mask=None` means every position is prompt.
    """
    batch, length, _ = hidden.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    weights = mask.to(hidden.dtype)
    if pooler == "mean":
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    elif pooler == "last":
        positions = torch.arange(1, length + 1, device=hidden.device)
        last = (mask * positions).argmax(dim=1, keepdim=True)  # index of the last prompt token (0 if none)
        weights = torch.zeros_like(weights).scatter_(1, last, 1.0) * mask.any(dim=1, keepdim=True)
    elif pooler == "attention":
        scores = (hidden @ score_weight).masked_fill(~mask, torch.finfo(hidden.dtype).min)
        weights = torch.softmax(scores, dim=1) * weights
    else:
        raise ValueError(f"Unknown pooler {pooler!r}; use 'attention', 'mean' or 'last'.")
    return torch.einsum("bt,btd->bd", weights, hidden)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Safe Padé activation `P(x) / (1 + |Σ_j b_j x^j|)`, with `P(x) = Σ_i a_i x^i` (Horner's scheme)."""
    p = numerator[-1] * torch.ones_like(x)
    for coefficient in numerator.flip(0)[1:]:
        p = p * x + coefficient
    q = denominator[-1] * torch.ones_like(x)
    for coefficient in denominator.flip(0)[1:]:
        q = q * x + coefficient
    return p / (1 + (q * x).abs())


def pedro_vectors(code: torch.Tensor, up: nn.Linear) -> torch.Tensor:
    """`l = 1 + up(z)` (DESIGN.md §3, init): the scaling vectors of one projection, `[B, n]`."""
    return 1 + up(code)


class RationalActivation(nn.Module):
    """Learnable rational activation (Molina et al., arXiv 1907.06732), initialised to GeLU."""

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(GELU_NUMERATOR))
        self.denominator = nn.Parameter(torch.tensor(GELU_DENOMINATOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator)


GENERATOR_ACTIVATIONS = {"rational": RationalActivation, "gelu": nn.GELU, "relu": nn.ReLU}


class VectorGenerator(nn.Module):
    """Pool the prompt, then `z = act(down(pooled))`; each scaled projection applies its own row block of `up` to z.

    `up: r → d_q + d_v + d_ff` is stored as its three row blocks, one in each wrapped projection (`pedro_up`): the
    product is the same and each projection only reads its slice.
    """

    def __init__(self, hidden_size: int, rank: int, pooler: str, activation: str) -> None:
        super().__init__()
        self.pooler = pooler
        if pooler == "attention":
            # Zero scores: the attention pooler starts as the mean over the prompt.
            self.score = nn.Parameter(torch.zeros(hidden_size))
        self.down = nn.Linear(hidden_size, rank)
        self.act = GENERATOR_ACTIVATIONS[activation]()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden.to(self.down.weight.dtype)
        pooled = pool_prompt(hidden, mask, self.pooler, getattr(self, "score", None))
        return self.act(self.down(pooled))
