"""How sure an accuracy gate is: confidence bounds, a three-way verdict, the images needed.

A reduced-precision candidate is judged on two rates measured on n evaluation images:

- **disagreement** with fp32's top-1 class: k of n. Its bounds are exact binomial
  (Clopper-Pearson) one-sided bounds at ``confidence``: the upper bound is the largest rate
  that could still give as few as k disagreements with probability 1 - confidence.
- **top-1 drop** (images with labels): paired, because both models see the same images.
  Of the images, b are right for fp32 and wrong for the candidate, c the reverse, a both
  right, d both wrong; the drop is (b - c) / n. Its bounds are Newcombe's hybrid score
  interval for a difference of paired proportions (Newcombe 1998, "Improved confidence
  intervals for the difference between binomial proportions based on paired data", method
  10), built from Wilson score bounds at ``confidence``.

Each end is a one-sided bound at ``confidence`` (together a two-sided interval at
2 x confidence - 1), because each end answers its own one-sided question:

- **pass**: the worst end of every bound is within its limit: the candidate is shown, at
  ``confidence``, to disagree no more than allowed and to drop no more than allowed;
- **fail**: the best end of some bound is outside its limit: it is shown to be worse;
- **inconclusive**: anything else. The same observed rates on more images would decide it;
  ``images_needed`` says how many (None when no number would: the rate sits on the limit).

A limit of 0 (``--min-agreement 1`` or ``--max-top1-drop 0``) cannot be shown by any sample:
it is judged on the counts themselves (pass only when none disagrees, or nothing dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class Counts:
    """One candidate against fp32 on n images. ``a``..``d`` only where the images have labels."""

    n: int
    disagree: int
    a: int | None = None  # both right
    b: int | None = None  # fp32 right, candidate wrong
    c: int | None = None  # fp32 wrong, candidate right
    d: int | None = None  # both wrong

    @property
    def labelled(self) -> bool:
        return self.b is not None

    def scaled(self, n: float) -> "Counts":
        """The same rates on ``n`` images (real-valued counts: the bounds accept them)."""
        f = n / self.n
        return Counts(n, self.disagree * f,  # type: ignore[arg-type]
                      *(None if x is None else x * f for x in (self.a, self.b, self.c, self.d)))


@dataclass(frozen=True)
class Judgement:
    verdict: str
    disagreement: tuple[float, float]  # bounds on the disagreement rate (a share)
    drop_points: tuple[float, float] | None  # bounds on the top-1 drop, in points
    images_needed: int | None  # for a conclusive verdict at the observed rates
    why: str  # one line: the deciding bound, or what is missing


def disagreement_bounds(k: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson one-sided bounds on a rate observed as k of n."""
    from scipy.stats import beta

    alpha = 1.0 - confidence
    low = 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1.0 - alpha, k + 1, n - k))
    return low, high


def wilson_bounds(x: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score bounds on a proportion x/n at normal quantile z."""
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def drop_bounds(counts: Counts, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score bounds on (b - c) / n, fp32's accuracy minus the candidate's."""
    from scipy.stats import norm

    a, b, c, d = (float(x or 0) for x in (counts.a, counts.b, counts.c, counts.d))
    n = a + b + c + d
    z = float(norm.ppf(confidence))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_bounds(a + b, n, z)
    l2, u2 = wilson_bounds(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        cross = a * d - b * c
        phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(margins)
    delta = p1 - p2
    low = delta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = delta + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return max(-1.0, low), min(1.0, high)


def _verdict(counts: Counts, max_disagreement: float, max_drop_points: float,
             confidence: float) -> tuple[str, tuple[float, float], tuple[float, float] | None]:
    dis = disagreement_bounds(counts.disagree, counts.n, confidence)
    passes, fails = [], []
    if max_disagreement <= 0:  # exact: any disagreement fails
        passes.append(counts.disagree == 0)
        fails.append(counts.disagree > 0)
    else:
        passes.append(dis[1] <= max_disagreement)
        fails.append(dis[0] > max_disagreement)
    drop = None
    if counts.labelled:
        low, high = drop_bounds(counts, confidence)
        drop = (100.0 * low, 100.0 * high)
        if max_drop_points <= 0:
            observed = 100.0 * ((counts.b or 0) - (counts.c or 0)) / counts.n
            passes.append(observed <= 0)
            fails.append(observed > 0)
        else:
            passes.append(drop[1] <= max_drop_points)
            fails.append(drop[0] > max_drop_points)
    if any(fails):
        return FAIL, dis, drop
    return (PASS if all(passes) else INCONCLUSIVE), dis, drop


def judge(counts: Counts, *, min_agreement: float, max_drop_points: float,
          confidence: float = CONFIDENCE, find_images_needed: bool = True) -> Judgement:
    """The three-way verdict for ``counts`` against the gate's limits (``find_images_needed``
    False skips that search, for simulations that only count verdicts)."""
    max_disagreement = 1.0 - min_agreement
    verdict, dis, drop = _verdict(counts, max_disagreement, max_drop_points, confidence)
    needed = None
    if verdict == INCONCLUSIVE and find_images_needed:
        needed = images_needed(counts, max_disagreement, max_drop_points, confidence)
    level = f"{100 * confidence:g}% confidence"
    agreement = (f"agreement {100 * (1 - dis[1]):.2f}% or more, {100 * (1 - dis[0]):.2f}% or less "
                 f"({counts.disagree} of {counts.n} disagree)")
    parts = [agreement]
    if drop is not None:
        parts.append(f"top-1 drop between {drop[0]:+.2f} and {drop[1]:+.2f} points")
    shown = f"at {level}: " + "; ".join(parts)
    if verdict == PASS:
        why = f"passed: {shown}"
    elif verdict == FAIL:
        why = f"failed: shown worse than allowed, {shown}"
    elif needed is None:
        why = (f"inconclusive: the observed rate sits on the limit, so no number of images "
               f"decides it; {shown}")
    else:
        drop_seen = (f" and the top-1 drop is "
                     f"{100 * ((counts.b or 0) - (counts.c or 0)) / counts.n:+.2f} points"
                     if counts.labelled else "")
        drop_limit = f" and a top-1 drop <= {max_drop_points:g} point" if counts.labelled else ""
        why = (f"inconclusive: {counts.disagree:g} of {counts.n} disagree{drop_seen}: at least "
               f"{needed} images are needed to show agreement >= {100 * min_agreement:g}%"
               f"{drop_limit}{'s' if drop_limit and max_drop_points != 1 else ''} at {level}, "
               f"at these rates")
    return Judgement(verdict, dis, drop, needed, why)


def images_needed(counts: Counts, max_disagreement: float, max_drop_points: float,
                  confidence: float = CONFIDENCE) -> int | None:
    """The fewest images on which the observed rates would give a conclusive verdict, or None
    when no number up to ``MAX_IMAGES`` would."""

    def conclusive(n: float) -> bool:
        return _verdict(counts.scaled(n), max_disagreement, max_drop_points, confidence)[0] != INCONCLUSIVE

    low, high = counts.n, counts.n
    while not conclusive(high):
        low, high = high, high * 2
        if high > MAX_IMAGES:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        if conclusive(middle):
            high = middle
        else:
            low = middle
    return high
