"""`math` domain: generated word problems with worked, step-by-step solutions.

Twelve problem kinds, drawn with a seeded `random.Random` so the build is reproducible.
Every answer is computed exactly (int, Fraction or Decimal); the last line of each solution is
"The answer is <answer>." and each record's `source` is `generated:math/<kind>` so tests can
re-derive the answer from the question text independently. Licence: generated here (Apache-2.0
with the project).
"""

from __future__ import annotations

import itertools
import math
import random
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

TARGET = 1500
CENT = Decimal("0.01")
_NUM_WORDS = {2: "Two", 3: "Three"}


def fmt_frac(x: Fraction) -> str:
    """Exact number as text: integer, terminating decimal, or reduced fraction p/q."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # denominator only has factors 2 and 5: the decimal expansion terminates
        return format(Decimal(x.numerator) / Decimal(x.denominator), "f").rstrip("0").rstrip(".")
    return f"{x.numerator}/{x.denominator}"


def _signed(c: int, var: str = "", first: bool = False) -> str:
    """A polynomial term with its sign: ' + 3x', ' - 5', or '3x' / '-3x' when first."""
    coef = "" if abs(c) == 1 and var else str(abs(c))
    if first:
        return f"{'-' if c < 0 else ''}{coef}{var}"
    return f" {'-' if c < 0 else '+'} {coef}{var}"


def _paren(v: int) -> str:
    """Negative numbers in parentheses when they follow an operator: 3 × (-4)."""
    return f"({v})" if v < 0 else str(v)


def arithmetic_series(rng: random.Random) -> tuple[str, list[str], str]:
    a, d, n = rng.randint(-20, 50), rng.randint(2, 15), rng.randint(8, 60)
    last = a + (n - 1) * d
    total = n * (a + last) // 2  # n(a + l) is always even for an arithmetic series of integers
    q = (f"An arithmetic sequence starts with {a}, and each term is {d} more than the one before it. "
         f"What is the sum of its first {n} terms?")
    steps = [
        f"The first term is a = {a} and the common difference is d = {d}.",
        f"The {n}th term is a + (n - 1)d = {a} + {n - 1} × {d} = {last}.",
        f"The sum of the first n terms is n(a + l)/2 = {n} × ({a} + {last}) / 2 = {n} × {a + last} / 2 = {total}.",
    ]
    return q, steps, str(total)


def linear_equation(rng: random.Random) -> tuple[str, list[str], str]:
    a = rng.choice([x for x in range(-12, 13) if x not in (0, 1)])
    x = rng.randint(-30, 30)
    b = rng.choice([v for v in range(-80, 81) if v != 0])
    c = a * x + b
    q = f"Solve for x: {_signed(a, 'x', first=True)}{_signed(b)} = {c}."
    steps = [
        f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: "
        f"{a}x = {c}{_signed(-b)} = {c - b}.",
        f"Divide both sides by {a}: x = {c - b} / {_paren(a)} = {x}.",
        f"Check: {a} × {_paren(x)}{_signed(b)} = {a * x}{_signed(b)} = {c}. ✓",
    ]
    return q, steps, f"x = {x}"


def percent_discount(rng: random.Random) -> tuple[str, list[str], str]:
    item = rng.choice(["jacket", "bicycle", "laptop", "pair of shoes", "lamp", "backpack", "watch", "tent"])
    price, r = rng.randint(12, 900), rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75])
    off = (Decimal(price) * r / 100).quantize(CENT)
    sale = Decimal(price) - off
    q = f"A {item} costs ${price}. During a sale its price is reduced by {r}%. What is the sale price?"
    steps = [
        f"The discount is {r}% of ${price} = {r}/100 × {price} = ${off}.",
        f"The sale price is ${price} - ${off} = ${sale:.2f}.",
    ]
    return q, steps, f"${sale:.2f}"


def percent_of(rng: random.Random) -> tuple[str, list[str], str]:
    r, n = rng.randint(1, 99), rng.randint(20, 5000)
    val = Fraction(r * n, 100)
    q = f"What is {r}% of {n}?"
    steps = [
        f"{r}% means {r}/100.",
        f"{r}/100 × {n} = {r * n}/100 = {fmt_frac(val)}.",
    ]
    return q, steps, fmt_frac(val)


def gcd_lcm(rng: random.Random) -> tuple[str, list[str], str]:
    g = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 18, 21, 24])
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if a == b:
        b += g
    q = f"Find the greatest common divisor (GCD) and the least common multiple (LCM) of {a} and {b}."
    steps = ["Use the Euclidean algorithm:"]
    x, y = max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    gcd = x
    lcm = a * b // gcd
    steps.append(f"The last non-zero remainder is {gcd}, so GCD({a}, {b}) = {gcd}.")
    steps.append(f"LCM = a × b / GCD = {a} × {b} / {gcd} = {a * b} / {gcd} = {lcm}.")
    return q, steps, f"GCD = {gcd}, LCM = {lcm}"


# (from, to, exact factor) — all are exact by definition of the units
UNITS = [
    ("inches", "centimetres", "inch", Decimal("2.54")),
    ("feet", "metres", "foot", Decimal("0.3048")),
    ("miles", "kilometres", "mile", Decimal("1.609344")),
    ("pounds", "kilograms", "pound", Decimal("0.45359237")),
    ("US gallons", "litres", "US gallon", Decimal("3.785411784")),
    ("yards", "metres", "yard", Decimal("0.9144")),
    ("ounces", "grams", "ounce", Decimal("28.349523125")),
]


def unit_conversion(rng: random.Random) -> tuple[str, list[str], str]:
    src, dst, one, factor = rng.choice(UNITS)
    x = Decimal(rng.randint(2, 2000)) / (10 if rng.random() < 0.5 else 1)
    exact = x * factor
    rounded = exact.quantize(CENT, rounding=ROUND_HALF_UP)
    q = f"Convert {x} {src} to {dst}, given that 1 {one} = {factor} {dst}. Round to two decimal places."
    steps = [
        f"Multiply the number of {src} by the conversion factor: {x} × {factor} = {exact.normalize():f} {dst}.",
        f"Rounded to two decimal places, that is {rounded} {dst}.",
    ]
    return q, steps, f"{rounded} {dst}"


def quadratic(rng: random.Random) -> tuple[str, list[str], str]:
    while True:
        r1, r2 = sorted(rng.sample([v for v in range(-12, 13) if v != 0], 2))
        a = rng.choice([1, 1, 2, 3])
        b, c = -a * (r1 + r2), a * r1 * r2
        if b != 0:
            break
    q = f"Solve the quadratic equation {_signed(a, 'x^2', first=True)}{_signed(b, 'x')}{_signed(c)} = 0."
    disc = b * b - 4 * a * c
    root = math.isqrt(disc)
    steps = [
        f"Here a = {a}, b = {b}, c = {c}.",
        f"The discriminant is b^2 - 4ac = {b * b} - {_paren(4 * a * c)} = {disc}, and √{disc} = {root}.",
        f"x = (-b ± √D) / 2a = ({-b} ± {root}) / {2 * a}.",
        f"So x = ({-b} - {root}) / {2 * a} = {r1} or x = ({-b} + {root}) / {2 * a} = {r2}.",
    ]
    return q, steps, f"x = {r1} or x = {r2}"


def dice(rng: random.Random) -> tuple[str, list[str], str]:
    k, sides = rng.choice([2, 2, 3]), rng.choice([4, 6, 6, 8, 10, 12])
    t = rng.randint(k, k * sides)
    cond = rng.choice(["exactly", "at least", "at most"])
    outcomes = list(itertools.product(range(1, sides + 1), repeat=k))
    test = {"exactly": lambda v: v == t, "at least": lambda v: v >= t, "at most": lambda v: v <= t}[cond]
    fav = [o for o in outcomes if test(sum(o))]
    p = Fraction(len(fav), len(outcomes))
    q = (f"{_NUM_WORDS[k]} fair {sides}-sided dice are rolled. "
         f"What is the probability that their sum is {cond} {t}?")
    steps = [f"There are {' × '.join([str(sides)] * k)} = {len(outcomes)} equally likely outcomes."]
    if cond == "exactly" and len(fav) <= 12:
        listed = ", ".join("(" + ",".join(map(str, o)) + ")" for o in fav) or "none"
        steps.append(f"The outcomes with sum {t} are: {listed}.")
    else:
        sums = [v for v in range(k, k * sides + 1) if test(v)]
        per = {v: sum(1 for o in outcomes if sum(o) == v) for v in sums}
        steps.append("Count the outcomes for each qualifying sum: " + ", ".join(f"{v}: {c}" for v, c in per.items()) + ".")
    reduced = "" if p.denominator == len(outcomes) else f" = {p.numerator}/{p.denominator}"
    steps.append(f"That is {len(fav)} favourable outcome{'s' if len(fav) != 1 else ''}, "
                 f"so the probability is {len(fav)}/{len(outcomes)}{reduced}.")
    return q, steps, f"{p.numerator}/{p.denominator}"


def compound_interest(rng: random.Random) -> tuple[str, list[str], str]:
    principal = rng.choice([500, 800, 1000, 1200, 1500, 2000, 2500, 3000, 5000, 10000])
    r, n = rng.choice([2, 3, 4, 5, 6, 7, 8]), rng.randint(2, 10)
    growth = (1 + Decimal(r) / 100) ** n  # exact: finite decimals raised to an integer power
    value = (principal * growth).quantize(CENT, rounding=ROUND_HALF_UP)
    q = (f"${principal} is invested at {r}% annual interest, compounded yearly. "
         f"How much is the investment worth after {n} years? Round to the nearest cent.")
    steps = [
        f"Each year the amount is multiplied by 1 + {r}/100 = {1 + Decimal(r) / 100}.",
        f"After {n} years: {principal} × {1 + Decimal(r) / 100}^{n} = {principal} × {growth.normalize():f}.",
        f"That is ${(principal * growth).normalize():f}, which rounds to ${value}.",
    ]
    return q, steps, f"${value}"


def work_rate(rng: random.Random) -> tuple[str, list[str], str]:
    a, b = sorted(rng.sample(range(2, 41), 2))
    t = Fraction(a * b, a + b)
    q = (f"One pipe can fill a tank in {a} hours and another pipe can fill it in {b} hours. "
         f"How many hours do they take to fill the tank working together?")
    steps = [
        f"The first pipe fills 1/{a} of the tank per hour; the second fills 1/{b}.",
        f"Together they fill 1/{a} + 1/{b} = {b}/{a * b} + {a}/{a * b} = {a + b}/{a * b} of the tank per hour.",
        f"The time is the reciprocal: {a * b}/{a + b}"
        + (f" = {fmt_frac(t)} hours." if fmt_frac(t) != f"{a * b}/{a + b}" else f" hours (about {float(t):.2f} hours)."),
    ]
    return q, steps, f"{fmt_frac(t)} hours"


def mean_median(rng: random.Random) -> tuple[str, list[str], str]:
    nums = [rng.randint(1, 99) for _ in range(rng.randint(5, 9))]
    total = sum(nums)
    mean = Fraction(total, len(nums))
    srt = sorted(nums)
    k = len(srt)
    median = Fraction(srt[k // 2]) if k % 2 else Fraction(srt[k // 2 - 1] + srt[k // 2], 2)
    q = f"Find the mean and the median of these numbers: {', '.join(map(str, nums))}."
    steps = [
        f"Sum: {' + '.join(map(str, nums))} = {total}.",
        f"Mean: {total} / {k} = {fmt_frac(mean)}.",
        f"Sorted: {', '.join(map(str, srt))}.",
        (f"With {k} numbers the median is the middle one, the {k // 2 + 1}th: {fmt_frac(median)}." if k % 2 else
         f"With {k} numbers the median is the average of the {k // 2}th and {k // 2 + 1}th: "
         f"({srt[k // 2 - 1]} + {srt[k // 2]}) / 2 = {fmt_frac(median)}."),
    ]
    return q, steps, f"mean = {fmt_frac(mean)}, median = {fmt_frac(median)}"


def combinations(rng: random.Random) -> tuple[str, list[str], str]:
    n = rng.randint(5, 40)
    k = rng.randint(2, min(7, n - 1))
    num = math.prod(range(n - k + 1, n + 1))
    den = math.factorial(k)
    q = f"In how many ways can a committee of {k} people be chosen from a group of {n} people?"
    steps = [
        "Order does not matter, so count combinations: C(n, k) = n! / (k!(n - k)!).",
        f"C({n}, {k}) = ({' × '.join(map(str, range(n, n - k, -1)))}) / ({' × '.join(map(str, range(k, 0, -1)))}).",
        f"= {num} / {den} = {num // den}.",
    ]
    return q, steps, str(num // den)


def pythagoras(rng: random.Random) -> tuple[str, list[str], str]:
    # Euclid's formula: m > n > 0 gives the triple (m^2 - n^2, 2mn, m^2 + n^2).
    m = rng.randint(2, 9)
    n = rng.randint(1, m - 1)
    scale = rng.randint(1, 10)
    a, b, c = ((m * m - n * n) * scale, 2 * m * n * scale, (m * m + n * n) * scale)
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:
        q = f"A right triangle has legs of length {a} and {b}. How long is its hypotenuse?"
        steps = [
            "By the Pythagorean theorem, c^2 = a^2 + b^2.",
            f"c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}.",
            f"c = √{c * c} = {c}.",
        ]
        return q, steps, str(c)
    q = f"A right triangle has a hypotenuse of length {c} and one leg of length {a}. How long is the other leg?"
    steps = [
        "By the Pythagorean theorem, b^2 = c^2 - a^2.",
        f"b^2 = {c}^2 - {a}^2 = {c * c} - {a * a} = {b * b}.",
        f"b = √{b * b} = {b}.",
    ]
    return q, steps, str(b)


KINDS = {
    f.__name__: f
    for f in (arithmetic_series, linear_equation, percent_discount, percent_of, gcd_lcm, unit_conversion,
              quadratic, dice, compound_interest, work_rate, mean_median, combinations, pythagoras)
}


def records(rng: random.Random, target: int = TARGET) -> list[dict]:
    """`target` distinct problems, cycling through KINDS so every kind is equally represented."""
    out, seen = [], set()
    names = sorted(KINDS)
    i = 0
    while len(out) < target:
        kind = names[i % len(names)]
        i += 1
        q, steps, answer = KINDS[kind](rng)
        if q in seen:
            continue  # small problem spaces repeat; the corpus wants distinct questions
        seen.add(q)
        solution = "\n".join(steps) + f"\nThe answer is {answer}."
        out.append({
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": solution}],
            "domain": "math",
            "source": f"generated:math/{kind}",
        })
    return out
