"""PEDRO's vector generator: prompt boundary, pooling, rational activation, and the pure functions of DESIGN.md §3."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100

# GeLU initialisations of the rational activation `R(x) = P(x) / (1 + |B(x)|)`, `P(x) = Σ_{i≤m} a_i x^i`,
# `B(x) = Σ_{1≤j≤n} b_j x^j`, per degrees (m, n): `(a_0..a_m), (b_1..b_n)`. Fitted once offline in float64 by
# `benchmarks/fit_rational.py` (`xpeft.pedro.rational_fit`: linearised least squares, then L-BFGS on the root mean
# squared error against the exact GeLU on 8001 points of [-8, 8]), which records their max errors in
# `benchmarks/results/rational_fit.json`: 0.0039 (5, 4) and 0.0040 (6, 5), on [-3, 3] and on [-8, 8] alike (the largest
# error is at x = 0, the value of a_0).
GELU_RATIONAL_INIT: dict[tuple[int, int], tuple[tuple[float, ...], tuple[float, ...]]] = {
    (5, 4): (
        (-0.0038907410985748944, 0.49999999998658146, 0.42116165779203957, 0.1276487170301438, 0.016553541996743665,
         0.0007774615015768638),
        (-5.806902577505356e-10, 0.25529743454545856, -1.1286604132462675e-10, 0.0015549230107518132),
    ),
    (6, 5): (
        (-0.004024161754704575, 0.5000913338412222, 0.42149753039759746, 0.12827310659650717, 0.016855244091988277,
         0.0008304710927792665, 3.083514570018072e-06),
        (-0.00042446785138052553, 0.2570477238886455, -0.00017852136940665255, 0.0016867899278460463,
         -1.3188497777147681e-06),
    ),
}  # fmt: skip
GELU_NUMERATOR, GELU_DENOMINATOR = GELU_RATIONAL_INIT[(5, 4)]


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
    """Learnable rational activation (Molina et al., arXiv 1907.06732), initialised to GeLU:
    :math:`R(x) = (a_0 + a_1 x + \\dots + a_m x^m) / (1 + |b_1 x + \\dots + b_n x^n|)`, degrees `(m, n)` one of
    [`GELU_RATIONAL_INIT`]. `numerator` holds `a_0..a_m`, `denominator` `b_1..b_n`.
    """

    def __init__(self, degrees: tuple[int, int] = (6, 5)) -> None:
        super().__init__()
        numerator, denominator = GELU_RATIONAL_INIT[tuple(degrees)]
        self.numerator = nn.Parameter(torch.tensor(numerator))
        self.denominator = nn.Parameter(torch.tensor(denominator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator)


GENERATOR_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # "rational" is built with its degrees


class VectorGenerator(nn.Module):
    """Pool the prompt, then `z = act(down(pooled))`; each scaled projection applies its own row block of `up` to z.

    `up: r → d_q + d_v + d_ff` is stored as its three row blocks, one in each wrapped projection (`pedro_up`): the
    product is the same and each projection only reads its slice.
    """

    def __init__(
        self, hidden_size: int, rank: int, pooler: str, activation: str, rational_degrees: tuple[int, int] = (6, 5)
    ) -> None:
        super().__init__()
        self.pooler = pooler
        if pooler == "attention":
            # Zero scores: the attention pooler starts as the mean over the prompt.
            self.score = nn.Parameter(torch.zeros(hidden_size))
        self.down = nn.Linear(hidden_size, rank)
        if activation == "rational":
            self.act = RationalActivation(rational_degrees)
        else:
            self.act = GENERATOR_ACTIVATIONS[activation]()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden.to(self.down.weight.dtype)
        pooled = pool_prompt(hidden, mask, self.pooler, getattr(self, "score", None))
        return self.act(self.down(pooled))
