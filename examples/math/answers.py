"""Answer extraction and normalisation for GSM8K and MATH (importable, unit-tested).

GSM8K: the number after "The answer is" (the MetaMathQA answer format), else the last number in
the completion. MATH: the last ``\\boxed{...}`` (nested braces allowed), else "The answer is",
compared after the usual normalisation (Hendrycks et al.'s ``strip_string`` rules, in short).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\$?\s*\.\d+")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)


def _clean_number(text: str) -> str | None:
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not text or text in ("-", "."):
        return None
    if "/" in text:
        num, den = text.split("/", 1)
        try:
            value = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    else:
        try:
            value = float(text)
        except ValueError:
            return None
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def extract_gsm8k(completion: str) -> str | None:
    """The numeric answer of a GSM8K completion, normalised (``"1,234.00"`` -> ``"1234"``).

    >>> extract_gsm8k("She pays 3 * $4 = $12.\\nThe answer is: $1,234.")
    '1234'
    >>> extract_gsm8k("... so the total is -7.5 dollars")
    '-7.5'
    """
    tail = completion
    found = list(_ANSWER_IS.finditer(completion))
    if found:
        tail = completion[found[-1].end() :]
        match = _NUMBER.search(tail)
        if match:
            return _clean_number(match.group())
    numbers = _NUMBER.findall(completion)
    return _clean_number(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included.

    >>> last_boxed(r"so $x = \\boxed{\\frac{1}{2}}$ and \\boxed{\\sqrt{\\frac{a}{b}}}")
    '\\\\sqrt{\\\\frac{a}{b}}'
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        rest = text[start + len("\\boxed") :].strip()  # "\boxed 5"
        return rest.split("$")[0].split()[0] if rest else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_math(completion: str) -> str | None:
    """The answer of a MATH completion: the last boxed expression, else the text after "The answer is"."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    found = list(_ANSWER_IS.finditer(completion))
    if found:
        return completion[found[-1].end() :].strip().split("\n")[0].strip().rstrip(".").strip("$ ")
    return None


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
    out, parts = "", s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def normalize_math(answer: str) -> str:
    """Canonical text of a MATH answer, for exact comparison.

    >>> normalize_math(r"\\left( \\dfrac{1}{2}, 3 \\right)")
    '(\\\\frac{1}{2},3)'
    >>> normalize_math(r"10\\%") == normalize_math("10") == normalize_math(r"\\text{10 }")
    True
    """
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*?)\s*\}", r"\1", s)
    for old, new in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        (" .", " 0."),
        ("{.", "{0."),
    ]:
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    if s.startswith("."):
        s = "0" + s
    if re.fullmatch(r"[a-zA-Z]\s*=.+", s) and len(s.split("=")[0]) <= 2:
        s = s.split("=", 1)[1]  # "x=5" -> "5"
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def is_equiv(prediction: str | None, reference: str) -> bool:
    """Whether a MATH prediction matches the reference after normalisation (or numerically)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    if a == b:
        return True
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-9
    except ValueError:
        return False
