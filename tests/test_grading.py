from dash_core.data.problem import Problem
from dash_core.rewards.grading import Grades, extract_code, grade


def test_extract_code_takes_the_last_fenced_block():
    text = "First try:\n```python\ndef f(): return 1\n```\nBetter:\n```python\ndef f():\n    return 2\n```\nDone."
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("def f(): return 3") == "def f(): return 3"


def test_grade_dispatches_on_problem_kind():
    exact = Problem("e", "1+1=", answer="2")
    math = Problem("m", "?", answer="\\frac{1}{2}", kind="math")
    code = Problem("c", "write f", tests="assert f(2) == 4", kind="code")
    completions = ["2", "so \\boxed{0.5}", "```python\ndef f(x):\n    return x * x\n```", "3", "\\boxed{1/3}", "def f(x): return x"]
    assert grade([exact, math, code] * 2, completions) == Grades([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], cut_off=0)


def test_a_passed_deadline_cuts_off_only_the_symbolic_checks():
    problems = [Problem(f"m{i}", "?", answer=answer, kind="math") for i, answer in enumerate(["72", "72", "3\\sqrt2"])]
    grades = grade(problems, ["\\boxed{72}", "\\boxed{73}", "\\boxed{\\sqrt{18}}"], math_deadline_s=0.0)
    assert grades == Grades([1.0, 0.0, 0.0], cut_off=1)


def test_a_batch_of_power_towers_is_cut_off_and_scored_zero():
    """What a degenerate policy can produce: each tower would hold a worker for the whole per-answer limit."""
    towers = ["10^{10^{10}}", "9^{9^{9^9}}", "10^{10^{10^{10}}}", "2^{3^{4^{5}}}"]
    problems = [Problem(f"m{i}", "?", answer=str(i % 50 + 1), kind="math") for i in range(512)]
    completions = [f"So the answer is \\boxed{{{towers[i % 4]}}}." for i in range(512)]
    # answers settled without a symbolic check are graded even past the deadline
    plain = [Problem("p", "?", answer="72", kind="math")] * 2
    grades = grade(problems + plain, completions + ["\\boxed{72}", "\\boxed{73}"])
    assert grades == Grades([0.0] * 512 + [1.0, 0.0], cut_off=512)
