"""GSM8K / MATH answer extraction on realistic completions."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "math"))
import answers


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\nThe answer is: 18", "18"),
        ("The total cost is 1,200 + 300 = 1,500 dollars.\nThe answer is: 1,500", "1500"),
        ("The answer is $1,234,567.", "1234567"),
        ("The temperature dropped to -12 degrees.\nThe answer is: -12", "-12"),
        ("He has 3/4 of the pizza left. The answer is 3/4", "0.75"),
        ("So she needs 2.50 per hour.\nThe answer is: 2.50", "2.5"),
        ("The final answer is 42.", "42"),
        ("the answer is:   7\n\nQuestion: next question has 99 apples", "7"),
        ("First 5 apples, then 10 more, so 15 apples in total.", "15"),  # no marker: last number
        ("The answer is: 12.0", "12"),
        ("No numbers here.", None),
    ],
)
def test_gsm8k_extraction(completion, expected):
    assert answers.extract_gsm8k(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"Thus the area is $\boxed{12\pi}$.", r"12\pi"),
        (r"We get $x = \boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (
            r"First $\boxed{1}$, but correcting: $\boxed{\left(2, \frac{1}{3}\right)}$",
            r"\left(2, \frac{1}{3}\right)",
        ),
        (r"so the answer is \fbox{5}", "5"),
        ("The answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        (r"The value is \boxed 7$.", "7"),
        ("no answer at all", None),
    ],
)
def test_math_extraction(completion, expected):
    assert answers.extract_math(completion) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
        (r"\frac12", r"\frac{1}{2}", True),
        ("0.5", r"\frac{1}{2}", True),
        (r"\left( 3, 4 \right)", "(3,4)", True),
        (r"90^\circ", "90", True),
        (r"10\%", "10", True),
        (r"\text{5 cm}", "5cm", True),
        ("x = 5", "5", True),
        ("5.00", "5", True),
        ("$12$", "12", True),
        (r"\frac{2}{3}", r"\frac{3}{2}", False),
        ("-3", "3", False),
        (None, "3", False),
    ],
)
def test_math_equivalence(prediction, reference, equal):
    assert answers.is_equiv(prediction, reference) is equal


def test_docstring_examples():
    assert doctest.testmod(answers).failed == 0
