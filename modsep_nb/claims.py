"""One record of claims (docs/method.md §5.3): every comparison a notebook states, with its estimate, 95% interval,
null, p-value and sample size, and one rule that decides whether the evidence supports it. The findings and
summary.md are written from these records (claims_table), so no sentence says more than its test.

Corrections for many tests live here too: Holm (family-wise) and Benjamini-Hochberg (false discovery rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import numpy as np
import torch

DIRECTIONS = ("greater", "less", "two-sided")
ALPHA = 0.05
MIN_N = 20          # a claim resting on fewer independent units gets "insufficient data", not a verdict (#26 item 7)
POWER = 0.8         # the power at which `detectable` is the smallest effect the test would see


@dataclass(frozen=True)
class Claim:
    """id: a fixed name (e.g. "selectivity"); statement: the sentence the claim makes; estimate: the measured
    value (e.g. an excess over the null); ci: its 95% interval; null: the value the claim is read against;
    p: the raw p-value (already combined within the claim where `correction` says so, e.g. over seeds) or
    None where the claim has no test; n: the units the interval rests on (documents, tasks, seeds); direction:
    the side of the null the statement claims.
    p_floor, floor_n: the smallest p the test can give and what sets it (e.g. 1/21 and "20 null values": a
    resample count, or an exact enumeration such as "6 layers"). p_adjusted, family, p_reachable: set by
    `correct` for the claims of one notebook (its family): the Holm-adjusted p, which `supported` reads, and
    the smallest adjusted p the family's floors allow. observed, observed_ci, null_band: for a claim read
    against a null distribution, the statistic itself with its own bootstrap interval, and the null's 95% band.
    unit: what `n` counts (the claim's resampling unit, e.g. "evaluation documents"). bootstrap: the interval and p
    come from resampling those units with replacement; such a test over fewer than MIN_N of them gives the verdict
    "insufficient data" (never supported, outside the Holm family); exact tests (permutations, sign flips) are
    judged by their p-floor instead. A record without a unit (a builder whose n is not yet audited) is not judged on
    n. test: the test's name as printed beside p (e.g. "one-sided bootstrap p"). null_values / boot_se: what `detectable` (the smallest
    effect the test could have detected) is computed from: the null's values, else the bootstrap's SE."""
    id: str
    statement: str
    estimate: float
    ci: tuple[float, float]
    null: float
    p: float | None = None
    n: int | None = None
    direction: str = "greater"
    correction: str | None = None
    p_floor: float | None = None
    floor_n: str | None = None
    p_adjusted: float | None = None
    family: str | None = None
    family_size: int | None = None
    p_reachable: float | None = None
    observed: float | None = None
    observed_ci: tuple[float, float] | None = None
    null_band: tuple[float, float] | None = None
    per_task: dict | None = None      # a claim about all tasks: each task's own result ({task: {...}})
    unit: str | None = None
    test: str | None = None
    bootstrap: bool = False
    null_values: np.ndarray | None = field(default=None, repr=False, compare=False)
    boot_se: float | None = None

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
    def insufficient(self) -> bool:
        """A bootstrap over fewer than MIN_N independent units (its `unit`): too few for its interval to show the
        uncertainty, so no verdict is read from it. Exact tests (permutations, sign flips) over few units are valid
        and are judged by their p-floor instead."""
        return self.bootstrap and self.n is not None and self.unit is not None and self.n < MIN_N

    @property
    def supported(self) -> bool:
        """The one rule: the 95% interval lies wholly on the claimed side of the null, and p < 0.05 where
        there is a p (p_adjusted once the notebook's claims are corrected together). NaN anywhere, or a bootstrap
        over fewer than MIN_N units (insufficient): not supported."""
        if self.insufficient:
            return False
        lo, hi = self.ci
        if any(math.isnan(x) for x in (lo, hi, float(self.null), float(self.estimate))):
            return False
        excludes = {"greater": lo > self.null, "less": hi < self.null,
                    "two-sided": lo > self.null or hi < self.null}[self.direction]
        if self.p is None:
            return bool(excludes)
        p = self.p if self.p_adjusted is None else self.p_adjusted
        return bool(excludes) and not math.isnan(p) and p < ALPHA

    @property
    def verdict(self) -> str:
        """"supported", or why not: undefined, a test that can never reach p < 0.05 (its floor), one that cannot
        once the family is corrected, or plain "not supported" (a test that could have succeeded and did not)."""
        if self.insufficient:
            return f"insufficient data (n = {self.n} {self.unit or 'units'} < {MIN_N})"
        if self.supported:
            return "supported"
        if self.undefined:
            return "not supported (undefined)"
        if self.p_floor is not None and self.p_floor >= ALPHA:
            return f"cannot be tested with {self.floor_n} (smallest possible p {_fmt(self.p_floor)})"
        if self.p_reachable is not None and self.p_reachable >= ALPHA:
            return (f"cannot reach p < 0.05 with n = {self.floor_n} in a family of {self.family_size} claims "
                    f"(smallest possible adjusted p {_fmt(self.p_reachable)})")
        if self.detectable is not None:
            return f"not supported; could have detected ≥ {_fmt(self.detectable)}"
        return "not supported"

    @property
    def alpha_adjusted(self) -> float:
        """The level a claim's own p must beat whatever the others' p: Holm's first step, ALPHA / family size."""
        return ALPHA / (self.family_size or 1)

    @property
    def detectable(self) -> float | None:
        """The smallest effect (in the estimate's units, on the claimed side) this test would detect with 80% power at
        alpha_adjusted: with a null, its (1 − alpha) quantile minus its mean (the other tail for "less"); without,
        (z_(1−alpha) + z_0.8) × SE, SE the bootstrap's standard error (boot_se) or, where the record has neither,
        the 95% interval's width / (2 × 1.96). None for an undefined claim. detectable_method names which."""
        return self._power()[0]

    @property
    def detectable_method(self) -> str | None:
        return self._power()[1]

    def _power(self) -> tuple[float | None, str | None]:
        if self.undefined:
            return None, None
        alpha = self.alpha_adjusted / (2 if self.direction == "two-sided" else 1)
        z = NormalDist().inv_cdf
        if self.null_values is not None:
            null = np.asarray(self.null_values, dtype=np.float64)
            null = null[~np.isnan(null)]
            if null.size:
                if self.direction == "less":
                    found = float(null.mean() - np.quantile(null, alpha)), f"null's {alpha:.3g} quantile minus its mean"
                else:
                    found = (float(np.quantile(null, 1 - alpha) - null.mean()),
                             f"null's {1 - alpha:.3g} quantile minus its mean")
                if found[0] > 0:        # a null without spread (all equal) bounds nothing: the interval decides
                    return found
        se, method = self.boot_se, "bootstrap SE"
        if se is None:
            lo, hi = self.ci
            se, method = (hi - lo) / (2 * z(1 - (1 - 0.95) / 2)), "SE from the 95% interval's width"
        if math.isnan(se) or se <= 0:
            return None, None
        return float((z(1 - alpha) + z(POWER)) * se), f"(z_{1 - alpha:.3g} + z_{POWER}) x {method}"

    @property
    def undefined(self) -> bool:
        """The estimate, or the p of a tested claim, is NaN: there is nothing to read (never supported)."""
        return math.isnan(float(self.estimate)) or (self.p is not None and math.isnan(self.p))

    def as_dict(self) -> dict:
        return {"id": self.id, "statement": self.statement, "estimate": _num(self.estimate),
                "ci": [_num(self.ci[0]), _num(self.ci[1])], "null": _num(self.null),
                "p": None if self.p is None else _num(self.p), "n": self.n, "unit": self.unit, "test": self.test, "bootstrap": self.bootstrap,
                "supported": self.supported,
                "direction": self.direction, "correction": self.correction,
                "p_adjusted": None if self.p_adjusted is None else _num(self.p_adjusted),
                "family": self.family, "family_size": self.family_size, "p_floor": self.p_floor, "floor_n": self.floor_n,
                "verdict": self.verdict,
                "detectable": None if self.supported or self.detectable is None else _num(self.detectable),
                "detectable_method": None if self.supported else self.detectable_method,
                "observed": None if self.observed is None else _num(self.observed),
                "observed_ci": None if self.observed_ci is None else [_num(x) for x in self.observed_ci],
                "null_band": None if self.null_band is None else [_num(x) for x in self.null_band],
                "per_task": self.per_task}


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x


def claims_to_json(claims) -> list[dict]:
    """The `claims` list of a notebook's results JSON (NaN written as null)."""
    return [c.as_dict() for c in claims]


def claims_table(claims) -> str:
    """Markdown table: claim, estimate, 95% interval, null, p, adjusted p, verdict (for the findings cell and
    summary.md). Where a claim reports its statistic and the null separately, both follow the statement."""
    rows = ["| claim | estimate | 95% interval | null | p | adjusted p | verdict |", "|---|---|---|---|---|---|---|"]
    for c in claims:
        labels = ", ".join(x for x in (c.test, c.correction) if x)
        p = "–" if c.p is None else f"{_fmt(c.p)}{' (' + labels + ')' if labels else ''}"
        untestable = c.p_adjusted is None or (c.p_floor or 0.0) >= ALPHA      # outside the family: no adjusted p
        adjusted = "–" if untestable else f"{_fmt(c.p_adjusted)} (of {c.family_size})"
        parts = ""
        if c.observed_ci is not None and c.null_band is not None:
            parts = (f"; statistic {_fmt(c.observed)} [{_fmt(c.observed_ci[0])}, {_fmt(c.observed_ci[1])}], "
                     f"null 95% band [{_fmt(c.null_band[0])}, {_fmt(c.null_band[1])}]")
        rows.append(f"| {c.statement} (`{c.id}`){parts} | {_fmt(c.estimate)} | [{_fmt(c.ci[0])}, {_fmt(c.ci[1])}] | "
                    f"{_fmt(c.null)} | {p} | {adjusted} | {c.verdict} |")
    return "\n".join(rows)


def claim_line(c: Claim, width: int = 40) -> str:
    """One claim on one line (the notebooks' printout): estimate, interval, p, adjusted p and verdict."""
    p = "–" if c.p is None else format(c.p, ".3g") + (f" ({c.test})" if c.test else "")
    adjusted = "" if c.p_adjusted is None else f" (adjusted {c.p_adjusted:.3g} of {c.family_size})"
    return (f"{c.id:{width}s} estimate {c.estimate:+.3f}  95% CI [{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]  "
            f"p {p}{adjusted}  {c.verdict}")


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


def correct(claims, method: str = "holm", family: str = "claims") -> list[Claim]:
    """The claims of one family (one notebook's) with their p-values adjusted together ("holm" or "bh") into
    p_adjusted (p stays the raw p), each marked with the family's name and size, and p_reachable: the adjusted
    p the family would give if every test sat at its floor (both procedures are monotone, so no data can
    do better). A claim whose own test can never reach p < ALPHA (p_floor >= ALPHA, e.g. 6 layers), or that
    rests on fewer than MIN_N units (insufficient data), is left out of the family: it can never be supported,
    so counting it would only weaken the others (Tarone's argument). Claims without a p are returned unchanged."""
    if method not in ("holm", "bh"):
        raise ValueError(f"unknown correction {method!r}: choose 'holm' or 'bh'")
    adjust = holm if method == "holm" else (lambda x: benjamini_hochberg(x).numpy())
    claims = list(claims)
    for i, c in enumerate(claims):       # untestable or undefined: its raw p is all there is, outside the family
        if c.p is not None and (math.isnan(c.p) or (c.p_floor or 0.0) >= ALPHA or c.insufficient):
            claims[i] = replace(c, p_adjusted=c.p, family=family, family_size=1, p_reachable=c.p_floor)
    tested = [i for i, c in enumerate(claims) if c.p is not None and c.p_adjusted is None]
    if not tested:
        return claims
    p = np.array([claims[i].p for i in tested], dtype=np.float64)
    floors = np.array([claims[i].p_floor or 0.0 for i in tested], dtype=np.float64)
    for i, q, r in zip(tested, adjust(p), adjust(floors)):
        claims[i] = replace(claims[i], p_adjusted=float(q), family=family, family_size=len(tested),
                            p_reachable=None if claims[i].p_floor is None else float(r))
    return claims
