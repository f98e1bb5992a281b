"""One record of claims (SPEC §5 Evidence): every comparison a notebook states, with its estimate, 95% interval,
null, p-value and sample size, and one rule that decides whether the evidence supports it. The findings and
summary.md are written from these records (claims_table), so no sentence says more than its test.

Corrections for many tests live here too: Holm (family-wise) and Benjamini-Hochberg (false discovery rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

DIRECTIONS = ("greater", "less", "two-sided")
ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    """id: a fixed name (e.g. "selectivity"); statement: the sentence the claim makes; estimate: the measured
    value (e.g. an excess over the null); ci: its 95% interval; null: the value the claim is read against;
    p: the p-value (after correction, see `correction`) or None where the claim has no test; n: the units
    the interval rests on (documents, tasks, seeds); direction: the side of the null the statement claims."""
    id: str
    statement: str
    estimate: float
    ci: tuple[float, float]
    null: float
    p: float | None = None
    n: int | None = None
    direction: str = "greater"
    correction: str | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"claim {self.id!r}: direction must be one of {', '.join(DIRECTIONS)}, "
                             f"got {self.direction!r}")
        if len(self.ci) != 2:
            raise ValueError(f"claim {self.id!r}: ci must be [lo, hi], got {self.ci!r}")
        lo, hi = (float(x) for x in self.ci)
        if lo > hi:
            raise ValueError(f"claim {self.id!r}: interval [{lo}, {hi}] has lo > hi")
        object.__setattr__(self, "ci", (lo, hi))
        if self.p is not None and not (0.0 <= self.p <= 1.0 or math.isnan(self.p)):
            raise ValueError(f"claim {self.id!r}: p must lie in [0, 1], got {self.p}")

    @property
    def supported(self) -> bool:
        """The one rule: the 95% interval lies wholly on the claimed side of the null, and p < 0.05 where
        there is a p (already corrected for the claims tested together). NaN anywhere: not supported."""
        lo, hi = self.ci
        if any(math.isnan(x) for x in (lo, hi, float(self.null), float(self.estimate))):
            return False
        excludes = {"greater": lo > self.null, "less": hi < self.null,
                    "two-sided": lo > self.null or hi < self.null}[self.direction]
        if self.p is None:
            return bool(excludes)
        return bool(excludes) and not math.isnan(self.p) and self.p < ALPHA

    @property
    def undefined(self) -> bool:
        """The estimate, or the p of a tested claim, is NaN: there is nothing to read (never supported)."""
        return math.isnan(float(self.estimate)) or (self.p is not None and math.isnan(self.p))

    def as_dict(self) -> dict:
        return {"id": self.id, "statement": self.statement, "estimate": _num(self.estimate),
                "ci": [_num(self.ci[0]), _num(self.ci[1])], "null": _num(self.null),
                "p": None if self.p is None else _num(self.p), "n": self.n, "supported": self.supported,
                "direction": self.direction, "correction": self.correction}


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x


def claims_to_json(claims) -> list[dict]:
    """The `claims` list of a notebook's results JSON (NaN written as null)."""
    return [c.as_dict() for c in claims]


def claims_table(claims) -> str:
    """Markdown table: claim, estimate, 95% interval, null, p, verdict (for the findings cell and summary.md)."""
    rows = ["| claim | estimate | 95% interval | null | p | verdict |", "|---|---|---|---|---|---|"]
    for c in claims:
        p = "–" if c.p is None else f"{_fmt(c.p)}{' (' + c.correction + ')' if c.correction else ''}"
        verdict = "supported" if c.supported else "not supported (undefined)" if c.undefined else "not supported"
        rows.append(f"| {c.statement} (`{c.id}`) | {_fmt(c.estimate)} | [{_fmt(c.ci[0])}, {_fmt(c.ci[1])}] | "
                    f"{_fmt(c.null)} | {p} | {verdict} |")
    return "\n".join(rows)


def resample_p(values, extreme, observed: float = 0.0) -> float:
    """(1 + #extreme) / (1 + #values): the p of a claim from its resamples or permutations `values` [n], where
    `extreme` [n] marks those at least as extreme as `observed` (on the wrong side of the claim). An undefined
    (NaN) value counts as extreme, so it never makes p smaller; an undefined observed statistic gives NaN."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if math.isnan(float(observed)) or values.size == 0:
        return float("nan")
    return (1 + int(np.sum(np.asarray(extreme).ravel() | np.isnan(values)))) / (1 + values.size)


def _fmt(x) -> str:
    x = float(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


# -- multiple testing -------------------------------------------------------------------------------------
def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order. NaN entries stay NaN and
    do not count as tests: adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the m finite p-values."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def benjamini_hochberg(p) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) along the last axis.

    q_(i) = min_{j >= i} min(1, p_(j) * n / j) for the ascending order p_(1) <= ... <= p_(n)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    n = p.shape[-1]
    order = torch.argsort(p, dim=-1, stable=True)
    ranked = p.gather(-1, order) * n / torch.arange(1, n + 1, dtype=torch.float64)
    q_sorted = torch.flip(torch.cummin(torch.flip(ranked, [-1]), -1).values, [-1]).clamp(max=1.0)
    return torch.empty_like(p).scatter_(-1, order, q_sorted)


def correct(claims, method: str = "holm") -> list[Claim]:
    """The claims of one family with their p-values adjusted together ("holm" or "bh"); claims without a p
    are returned unchanged."""
    if method not in ("holm", "bh"):
        raise ValueError(f"unknown correction {method!r}: choose 'holm' or 'bh'")
    claims = list(claims)
    tested = [i for i, c in enumerate(claims) if c.p is not None]
    if not tested:
        return claims
    p = np.array([claims[i].p for i in tested])
    adjusted = holm(p) if method == "holm" else benjamini_hochberg(p).numpy()
    for i, q in zip(tested, adjusted):
        claims[i] = replace(claims[i], p=float(q), correction=method)
    return claims
