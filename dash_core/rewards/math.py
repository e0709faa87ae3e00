r"""Math reward: the last \boxed{} answer of a completion against a MATH (LaTeX) or GSM8K ("#### 72") reference.

Equivalence follows the field's graders (Hendrycks MATH `is_equiv`, PRM800K `grade_answer`, math-verify), cheapest
step first:
1. Both answers are normalised (spacing, \left/\right, \dfrac, \text{} and unit words, a leading "the answer is",
   degrees, percent, dollars, Unicode minus signs and dashes, a leading "x =" or "AB =", \frac12, .5, 1,000 and
   1 000). A box holds an answer, not a derivation or a hedge, so an answer with a relation, approximation, arrow
   or "or" sign of a kind the reference lacks is wrong, even a true "8/2 = 4" (math-verify would compare only the
   last side of "3 = 4", "x \approx 2" or "3 \to 4"), and so are digits set apart ("1 0" is not 10). The rest are
   compared as canonical strings. Most correct answers stop here.
2. A text reference ("\text{Monday}", "even") is compared as a string only, ignoring case: sympy would read
   "Monday" as a product of commuting symbols, equal to "yadnoM".
3. Two plain rational numbers (integers, decimals, fractions) are compared exactly, as MATH and PRM800K do:
   0.3333333 is not 1/3. Most wrong answers stop here.
4. Anything else goes to math-verify's symbolic check in a long-lived worker process that is killed when it
   overruns `timeout_s` or a batch's `deadline`: sympy can hang on answers like 10^{10^{10^{10}}}, math-verify's
   own timeouts use signals (main thread only), and a thread cannot be stopped. A check so cut off, or a crash,
   counts as wrong; `math_verdict` tells the cut-off ones apart. Answers longer than `_MAX_ANSWER_CHARS` skip all
   of this and only count when identical to the reference.
Equality is of values, so an unreduced \frac{2}{4} equals \frac{1}{2} (as in math-verify; PRM800K refuses it).
Workers are plain subprocesses, not multiprocessing children, so grading works from any thread, from daemonic
multiprocessing workers, and after a fork (a forked child starts its own workers).
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

_MAX_ANSWER_CHARS = 1000  # no real answer is longer; longer ones are only compared verbatim
_WORKER_STARTUP_S = 120.0  # importing sympy on a loaded machine; not part of any answer's time bound
_WORKER_MEMORY_BYTES = 2 << 30
_NO_DEADLINE = float("inf")

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_SPACING = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad(?![a-zA-Z])|~")
_FRAC_STYLE = re.compile(r"\\[dt](frac|binom)(?![a-zA-Z])")
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s+[A-Za-z][A-Za-z\s.]*\}(?:\^\{?[23]\}?)?\s*$")
_TEXT = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|textsf|texttt|textup|emph|underline|mathrm|mathbf|mathit|mathsf|mathtt"
    r"|mathnormal|boldsymbol|bm|ensuremath|mbox|hbox|operatorname)\{([^{}]*)\}"
)
# Markup that never changes a value: colours, display styles, labels. What it wraps stays, as a bare group.
_MARKUP = re.compile(
    r"\\(?:textcolor|colorbox)\{[^{}]*\}|\\color\{[^{}]*\}|\\label\{[^{}]*\}|\\(?:display|text|script)style(?![a-zA-Z])"
)
_BARE_GROUP = re.compile(r"(?<![\\\w^_}])\{([^{}]*)\}")  # {4}, not \frac{1}{2}, x^{2}, \{2, 4\}
# Answers that hedge: several values where one is asked, a negation, a bound or an estimate of the value. A box
# holding one is wrong unless the reference is written with it too ("(-\infty, 2) \cup (3, \infty)").
_HEDGE = re.compile(
    r"\\(?:cup|cap|setminus|neg|lnot)(?![a-zA-Z])|[∪∩¬]|\b(?:or|and|either|neither|nor|not|but|except|more|less|fewer"
    r"|least|most|than|over|under|up to|about|around|approximately|roughly|nearly|almost|maybe|perhaps|possibly"
    r"|probably)\b",
    re.IGNORECASE,
)
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)\\(?:times|cdot)10\^\{?(-?\d{1,4})\}?")
_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")  # 0.\overline{3}, 0.1\overline{6}
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")
_PERCENT_OR_DOLLAR = re.compile(r"\\?[%$]")
_UNIT_WORDS = (
    r"cm|mm|km|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|units?|degrees?"
    r"|dollars?|cents?|percent|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|grams?|kg"
    r"|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|cups?|points?|people|persons?|students?|ways"
)
_UNITS = re.compile(
    rf"(?<=[\d}}.])\s*(?:(?:square|sq\.?|cubic)\s*)?(?:{_UNIT_WORDS})(?:\s*\^\s*\{{?[23]\}}?)?\s*$", re.IGNORECASE
)
# Names on the left of a single "=" or \in: x, a_1, \theta, AB, f(x), P(A), \angle ABC, m\angle B, (x, y). A command
# is matched whole (the lookahead): "\alpha" read as "\al" + "p" + "ha" and every other split made a repeated
# piece backtrack exponentially ("\alpha" x 12 + "b": 204 s in the trainer's process, holding the GIL).
_NAME = r"(?:m?\\angle\s*)?(?:[a-zA-Z]|\\[a-zA-Z]+(?![a-zA-Z]))+(?:_\{?\w+\}?)?(?:\([a-zA-Z,\s]*\))?|\([a-zA-Z,\s]+\)"
_VARIABLE = re.compile(rf"^\s*(?:{_NAME})\s*(?:=|\\in(?![a-zA-Z]))\s*(?=\S)")
_PREAMBLE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*(?=\S)", re.IGNORECASE)
_MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2212\ufe63\uff0d", "-"))  # dashes too
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:\s+\d{3})+(?!\d)")
_SPLIT_DIGITS = re.compile(r"\d\s+\d")
_APPROXIMATE = re.compile(
    r"[≈∼≃≅≐]|\\(?:approx|approxeq|thickapprox|sim|simeq|thicksim|cong|doteq|lesssim|gtrsim)(?![a-zA-Z])"
)
_RELATION = re.compile(  # relations, arrows, "or" and "and", line breaks: whatever joins two answers into one
    rf"{_APPROXIMATE.pattern}|[=<>≠≤≥⩽⩾≡∝→⇒⟹↦∨∧|]|\\\\"
    r"|\\(?:ne|neq|le|leq|leqslant|lt|ll|ge|geq|geqslant|gt|gg|equiv|propto|in|notin|ni|subset|subseteq|supset"
    r"|supseteq|to|gets|mapsto|implies|impliedby|iff|(?:[lL]ong)?(?:[rR]ight|[lL]eft|[lL]eftright)arrow|lor|land"
    r"|vee|wedge|mid|vert|lvert|rvert|Vert|lVert|rVert)(?![a-zA-Z])"
)
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_FRAC_FIRST = re.compile(r"\\frac(\w)(?=\{)")
_FRAC_SECOND = re.compile(r"\\frac(\{[^{}]*\})(\w)")
_SQRT = re.compile(r"\\sqrt(\w)")
_SLASH = re.compile(r"(-?)(\d+)/(\d+)")
_BARE_POINT = re.compile(r"(?<!\d)\.(?=\d)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE = re.compile(r"\(([A-Za-z])\)")
_DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_WORD = re.compile(r"[A-Za-z]{2,}")
_ASKS_FOR_FORM = re.compile(
    r"\b(?:simplif(?:y|ied)|factor(?:ed|ize|ise)?|expand(?:ed)?|rationali[sz]e|compute|evaluate|calculate|express(?:ed)?"
    r"|write|convert)\b",
    re.IGNORECASE,
)
_FUNCTION = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|log|ln|exp|binom|lceil|lfloor)(?![a-zA-Z])")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_OPERATION = re.compile(r"(?<!^)-|[+*/^!]|\\(?:cdot|times|div|frac|sqrt|binom|log|ln|sin|cos|tan)(?![a-zA-Z])")
_RADICAND = re.compile(r"\\sqrt\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")  # \sqrt{...}, one level of braces inside
_ROOT_BELOW = re.compile(r"\\frac\{[^{}]*\}\{[^{}]*\\sqrt")
_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)  # $$..$$ $..$ \(..\) \[..\]
_DEPTH_CHANGE = {"{": 1, "}": -1}


def math_reward(completion: str, answer: str, timeout_s: float = 5.0) -> float:
    """1.0 when the completion's last boxed answer equals the reference `answer` (MATH or GSM8K), else 0.0."""
    verdict = math_verdict(completion, answer, timeout_s)
    return 0.0 if verdict is None else verdict


def math_verdict(
    completion: str, answer: str, timeout_s: float = 5.0, deadline: float = _NO_DEADLINE, question: str = ""
) -> float | None:
    """math_reward's reward, or None when the symbolic check was cut off: it overran `timeout_s`, or `deadline` (in
    time.monotonic() seconds) passed first. A batch shares one deadline to bound its grading time, and counts the
    cut-off answers apart from the wrong ones because their rise means a policy drifting to pathological answers.
    With the problem's `question`, an answer that restates one of its expressions is wrong (see `_restates`)."""
    boxed, reference = extract_boxed(completion), reference_answer(answer)
    if boxed is None:
        return 0.0
    if max(len(boxed), len(reference)) > _MAX_ANSWER_CHARS:  # spares the regexes and sympy pathological input
        return float(boxed == reference)
    gold, pred = _clean(reference), _clean(boxed)
    gold_key, pred_key = _canonical(gold), _canonical(pred)
    if not pred_key or _refused(gold, pred) or _restates(pred_key, gold_key, question):
        return 0.0
    if pred_key != gold_key and _ASKS_FOR_FORM.search(question) and _outside_form(pred_key, gold_key, question):
        return 0.0
    if gold_key == pred_key:
        return 1.0
    if _WORD.fullmatch(gold_key):
        return float(gold_key.lower() == pred_key.lower())
    gold_value, pred_value = _rational(gold_key), _rational(pred_key)
    if gold_value is not None and pred_value is not None:
        return float(gold_value == pred_value)
    equal = _workers.equal(gold, pred, timeout_s, deadline)
    return None if equal is None else float(equal)


def extract_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} or \fbox{...} (braces balanced), or of "\boxed 5"; None if there is none."""
    starts = [match.end() for match in _BOX.finditer(text)]
    if not starts:
        return None
    rest = text[starts[-1] :].lstrip()
    if not rest.startswith("{"):
        token = re.match(r"[^\s$]*", rest).group()
        return token or None
    depth, i = 0, 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2  # an escaped \{ or \} does not open or close a group
            continue
        depth += _DEPTH_CHANGE.get(char, 0)
        if depth == 0:
            content = rest[1:i].strip()
            return content or None
        i += 1
    return None


def reference_answer(text: str) -> str:
    """The answer part of a reference: after the last "####" for GSM8K (commas dropped), else the text itself."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text.strip()


def _clean(answer: str) -> str:
    """Drop what does not change the value, keeping valid LaTeX (this is what math-verify parses)."""
    s = re.sub(r"\s+", " ", answer.translate(_MINUS_SIGNS))  # newlines, no-break and thin spaces too
    s = _SPACING.sub(" ", s)
    s = _FRAC_STYLE.sub(r"\\\1", s)
    s = _SIZING.sub("", s)
    s = _MARKUP.sub("", s)
    s = _UNIT_TEXT.sub(lambda unit: unit.group() if _HEDGE.search(unit.group()) else "", s)  # not "\text{ or more}"
    for _ in range(3):  # \text{\textbf{...}}, \text{{4}}
        s = _TEXT.sub(r"\1", _BARE_GROUP.sub(r"\1", s))
    s = _PREAMBLE.sub("", s.strip())
    s = _DEGREES.sub("", s)
    s = _PERCENT_OR_DOLLAR.sub("", s)
    s = _UNITS.sub("", s.strip().rstrip("."))
    if s.count("=") <= 1:  # "x = 3" but not "x = 3, y = 4"
        s = _VARIABLE.sub("", s)
    s = _SPACED_THOUSANDS.sub(lambda match: re.sub(r"\s", "", match.group()), s)  # 1 000 and 1\,000
    return s.strip().rstrip(".").strip()


def _refused(gold: str, pred: str) -> bool:
    r"""Wrong answers that would pass for a part of them: math-verify reads just the last side of a relation ("3 = 4",
    "x \approx 2", "3 \to 4" as 4 or 2) and one value of a hedge ("2 \cup 4", "4 \text{ or more}", "\neg 4"), and the
    canonical key drops the space in "1 0"."""
    unclaimed = any(sign.search(pred) and not sign.search(gold) for sign in (_RELATION, _APPROXIMATE))
    hedges = {word.lower() for word in _HEDGE.findall(pred)} - {word.lower() for word in _HEDGE.findall(gold)}
    if "," in gold:
        hedges.discard("and")  # "2 and 3" lists the values "2, 3" lists
    return unclaimed or bool(hedges) or _SPLIT_DIGITS.search(pred) is not None


def _restates(pred_key: str, gold_key: str, question: str) -> bool:
    r"""The answer is one of the question's own expressions, written as the question writes it (normalised), and the
    reference is written otherwise: "Simplify $\sqrt{242}$" answered \sqrt{242}, "Compute $\arcsin(-\frac12)$"
    answered \arcsin(-\frac{1}{2}). Equal in value, so math-verify would credit them; they copy the question. A
    reference written as the question writes it (the value is the expression itself) stays right."""
    if not question or pred_key == gold_key:
        return False
    expressions = (next(group for group in match.groups() if group is not None) for match in _INLINE_MATH.finditer(question))
    return any(len(expression) <= _MAX_ANSWER_CHARS and _canonical(_clean(expression)) == pred_key for expression in expressions)


def _outside_form(pred_key: str, gold_key: str, question: str) -> bool:
    r"""For a problem that asks for a form (simplify, factor, expand, rationalise, compute, evaluate, express, write,
    convert), an answer equal in value but not in the reference's form class, whatever math-verify says:
    - a number is asked (the reference is one): the answer is not an operation left to do ("9900+1", "\log_2 2^6",
      "\binom{31}{28}"; "72 clips" is left to the rest of the grader);
    - no function left unevaluated at a constant that the reference does not apply ("-\arcsin(\frac{1}{2})");
    - no radical left unsimplified (a constant radicand that is not a square-free integer: "\sqrt{242}",
      "\sqrt{2\cdot121}", "\sqrt{\frac{1}{2}}") that the reference does not have;
    - no radical in a denominator where the reference has none;
    - factor: a product where the reference is one; expand: no parentheses where the reference has none."""
    if _rational(gold_key) is not None and _rational(pred_key) is None and _OPERATION.search(pred_key):
        return True
    functions = set(_FUNCTION.findall(pred_key)) - set(_FUNCTION.findall(gold_key))
    if functions and not re.search(r"[A-Za-z]", _COMMAND.sub("", pred_key)):
        return True
    radicands = {r for r in _RADICAND.findall(pred_key) if not _square_free_integer(r)} - set(_RADICAND.findall(gold_key))
    if radicands:
        return True
    if _ROOT_BELOW.search(pred_key) and not _ROOT_BELOW.search(gold_key):
        return True
    asked = question.lower()
    if "factor" in asked and "(" in gold_key and "(" not in pred_key:
        return True
    return "expand" in asked and "(" not in gold_key and "(" in pred_key


def _square_free_integer(radicand: str) -> bool:
    """A radicand that is simplified: a square-free integer, or one with variables (left to the reference's form)."""
    if re.search(r"[A-Za-z]", _COMMAND.sub("", radicand)):
        return True
    if not radicand.isdigit():
        return False
    n = int(radicand)
    return n < 10**12 and all(n % (k * k) for k in range(2, math.isqrt(n) + 1))


def _canonical(clean: str) -> str:
    """A spacing-free string on which equal answers written in the usual different ways coincide."""
    s = re.sub(r"\s+", "", clean)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_FIRST.sub(r"\\frac{\1}", s)
    s = _FRAC_SECOND.sub(r"\\frac\1{\2}", s)
    s = _SQRT.sub(r"\\sqrt{\1}", s)
    if _SLASH.fullmatch(s):
        s = _SLASH.sub(r"\1\\frac{\2}{\3}", s)
    s = _BARE_POINT.sub("0.", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    choice = _CHOICE.fullmatch(s)
    return choice.group(1) if choice else s.rstrip(".")


def _rational(key: str) -> Fraction | None:
    """The exact value of a plain integer, decimal (repeating, or in scientific notation too) or integer fraction;
    None for anything else."""
    if _DECIMAL.fullmatch(key):
        return Fraction(key)
    if scientific := _SCIENTIFIC.fullmatch(key):  # 6.72\times10^{-5}
        return Fraction(scientific.group(1)) * Fraction(10) ** int(scientific.group(2))
    if repeating := _REPEATING.fullmatch(key):  # 0.1\overline{6} = 0.1 + 0.0\overline{6}
        sign, whole, fixed, period = repeating.groups()
        value = int(whole or 0) + Fraction(int(fixed or 0), 10 ** len(fixed))
        value += Fraction(int(period), 10 ** len(fixed) * (10 ** len(period) - 1))
        return -value if sign else value
    fraction = _FRACTION.fullmatch(key)
    if fraction is None or int(fraction.group(3)) == 0:
        return None
    value = Fraction(int(fraction.group(2)), int(fraction.group(3)))
    return -value if fraction.group(1) else value


def _read_line(stream, deadline: float) -> bytes | None:
    """One reply line from a worker, or None if it died or the deadline passed."""
    fd, line = stream.fileno(), b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        line += chunk
    return line


class _Worker:
    """One math-verify process, this very file run as a script, answering one comparison per line."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        if _read_line(self._proc.stdout, time.monotonic() + _WORKER_STARTUP_S) != b"ready\n":
            self.kill()
            raise RuntimeError("the math-verify worker did not start (is math-verify installed?)")

    def ask(self, gold: str, pred: str, until: float) -> bytes | None:
        """The reply line, or None when the worker died or did not answer by `until` (it must then be killed)."""
        try:
            self._proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:
            return None
        return _read_line(self._proc.stdout, until)

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()


class _Workers:
    """A few workers shared by all threads of this process, started on demand and replaced when killed."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: list[_Worker] = []
        self._running = 0
        self._changed = threading.Condition()

    def equal(self, gold: str, pred: str, timeout_s: float, deadline: float) -> bool | None:
        """The verdict, or None when the check overran `timeout_s` or `deadline`, waiting for a worker included.

        A worker that died counts as a wrong answer, not a cut-off one: a retry would only crash again."""
        worker = self._take(deadline)
        if worker is None:
            return None
        until = min(time.monotonic() + timeout_s, deadline)
        reply = None
        try:
            reply = worker.ask(gold, pred, until)
        finally:
            self._give_back(worker, healthy=reply is not None)
        if reply is None:
            return None if time.monotonic() >= until else False
        return reply == b"1\n"

    def _take(self, deadline: float) -> _Worker | None:
        """An idle or a new worker, or None once `deadline` has passed (starting a worker is not bounded by it)."""
        with self._changed:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._idle:
                    return self._idle.pop()
                if self._running < self._size:
                    self._running += 1
                    break
                self._changed.wait(min(left, threading.TIMEOUT_MAX))
        try:
            return _Worker()
        except BaseException:
            self._give_back(None, healthy=False)
            raise

    def _give_back(self, worker: _Worker | None, healthy: bool) -> None:
        if worker is not None and not healthy:
            worker.kill()
        with self._changed:
            if healthy:
                self._idle.append(worker)
            else:
                self._running -= 1
            self._changed.notify()


def _new_workers() -> None:
    """After a fork the parent's workers are not ours to use: start afresh."""
    global _workers
    _workers = _Workers(min(4, os.cpu_count() or 1))


_new_workers()
os.register_at_fork(after_in_child=_new_workers)


def _serve() -> None:
    """Worker loop: a JSON [gold, pred] per line in, "1" (equal) or "0" per line out."""
    import resource

    from math_verify import parse, verify

    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # whatever the libraries print must not corrupt the replies
    replies.write(b"ready\n")
    for line in sys.stdin.buffer:
        gold, pred = json.loads(line)
        try:
            # The prediction is wrapped alone: parsing a whole completion gives false positives.
            parsed_gold = parse(f"${gold}$", parsing_timeout=None)
            parsed_pred = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
            equal = bool(parsed_gold and parsed_pred and verify(parsed_gold, parsed_pred, timeout_seconds=None))
        except Exception:
            equal = False
        replies.write(b"1\n" if equal else b"0\n")


if __name__ == "__main__":
    _serve()
