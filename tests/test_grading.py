from dash_core.data.problem import Problem
from dash_core.grading import extract_code, grade


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
    assert grade([exact, math, code] * 2, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
