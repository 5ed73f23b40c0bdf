"""Synthetic pairs whose preference is objectively checkable: Chinese arithmetic.

The chosen answer states the right result, the rejected one a near miss (off by a small
amount, as a careless model would be). Used by tests and quality checks, where "did the
model learn to prefer the correct answer" has a definite answer.

    pairs = arithmetic_pairs(200, seed=0)
"""

from __future__ import annotations

import random

from .formats import PreferencePair

_OPS = {"+": ("加", lambda a, b: a + b), "-": ("减", lambda a, b: a - b), "×": ("乘以", lambda a, b: a * b)}
_TEMPLATES = ("计算：{a} {op} {b} 等于多少？", "{a}{word}{b}是多少？", "请算一下 {a} {op} {b}。")


def arithmetic_pairs(n: int, seed: int = 0, max_value: int = 99) -> list[PreferencePair]:
    """`n` distinct pairs: prompt asks for a {+,-,×} result; chosen is correct, rejected is off by 1-10."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        op = rng.choice(tuple(_OPS))
        word, fn = _OPS[op]
        hi = 12 if op == "×" else max_value
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        right = fn(a, b)
        wrong = right + rng.choice([-1, 1]) * rng.randint(1, 10)
        prompt = rng.choice(_TEMPLATES).format(a=a, b=b, op=op, word=word)
        pairs.append(PreferencePair(
            prompt=[{"role": "user", "content": prompt}],
            chosen=f"{a} {op} {b} = {right}。答案是 {right}。",
            rejected=f"{a} {op} {b} = {wrong}。答案是 {wrong}。",
            row=len(pairs) + 1, source="synthetic:arithmetic",
            meta={"answer": right},
        ))
    return pairs
