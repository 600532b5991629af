"""Helpers shared by the checker tests (tests/test_checks.py for lab 01, tests/test_checks_labNN.py for the others),
and `CheckerSuite`: the tests every lab's exercise checkers get, which each of those modules subclasses once.

A plain module, not collected (its name does not start with test_). tests/ has no __init__.py, so pytest's default
"prepend" import mode puts tests/ on sys.path and the test files import it as `checker_testing`.
"""

import ast
from pathlib import Path

from compresslab import checks

# ----------------------------------------------------------------------------- the lab's own solutions


def lab_solutions(lab_path, names) -> dict[str, ast.FunctionDef]:
    """The lab source's top-level functions whose name is in `names`: name -> ast.FunctionDef."""
    tree = ast.parse(Path(lab_path).read_text())
    names = set(names)
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names}


def body_dump(fn_node: ast.FunctionDef, rename: dict[str, str]) -> str:
    """ast.dump of a function's body after renaming the names in `rename` (renames fn_node in place)."""

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            node.id = rename.get(node.id, node.id)
            return node

    body = [Rename().visit(stmt) for stmt in fn_node.body]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def assert_good_copies_match(test_file, lab_path, names) -> None:
    """The test file's good_<name> functions are the lab's <name> solutions (up to the good_ prefix of the names)."""
    lab = lab_solutions(lab_path, names)
    ours = {n.name: n for n in ast.parse(Path(test_file).read_text()).body if isinstance(n, ast.FunctionDef)}
    rename = {f"good_{name}": name for name in names}
    assert set(lab) == set(rename.values()), f"solution functions in the lab: {sorted(lab)}"
    for good, name in rename.items():
        assert body_dump(ours[good], rename) == body_dump(lab[name], {}), (
            f"{good} differs from the lab's {name}: copy the new solution into tests/{Path(test_file).name}")


def lab_function(lab_path, fn_node: ast.FunctionDef, namespace: dict):
    """Compile one lab function into `namespace` (tracebacks point at the lab file) and return it."""
    module = ast.Module(body=[fn_node], type_ignores=[])
    exec(compile(module, str(lab_path), "exec"), namespace)
    return namespace[fn_node.name]


# ----------------------------------------------------------------------------- passed


def assert_passed(checker, name, fn, capsys) -> None:
    """checker hands fn back, the table holds only `name`: "passed", and it printed PASSED, not FAILED."""
    assert checker(fn) is fn
    assert checks.STATUS == {name: "passed"}
    out = capsys.readouterr().out
    assert "PASSED" in out and "FAILED" not in out


def assert_accepted(checker, name, fn, capsys) -> None:
    """checker hands fn back (else the assertion shows what it printed) and records `name` as passed."""
    assert checker(fn) is fn, capsys.readouterr().out
    assert checks.STATUS[name] == "passed"


def assert_mutating_answer_passes(checker, name, fn, good, capsys) -> None:
    """A correct fn that mutates its inputs after computing passes twice (the checker clones its cases), and so
    does the good solution after it."""
    assert_accepted(checker, name, fn, capsys)
    assert checker(fn) is fn  # and again: the checker's own case tensors were not touched
    assert checker(good) is good


# ----------------------------------------------------------------------------- not done


def assert_not_done(checker, name, capsys):
    """A stub raising NotImplementedError is "not done", not failed; returns what the checker hands back instead."""

    def todo(*args):
        raise NotImplementedError("fill me in")

    got = checker(todo)
    assert got is not todo
    assert checks.STATUS == {name: "not done"}
    out = capsys.readouterr().out
    assert "NOT DONE" in out and "FAILED" not in out
    return got


# ----------------------------------------------------------------------------- failed


def assert_failed(checker, name, fn, capsys, message=None) -> str:
    """checker rejects fn: the table holds only `name`: "failed", the output says FAILED with a hint (and
    `message` if given), not PASSED or NOT DONE. Returns the output."""
    got = checker(fn)
    out = capsys.readouterr().out
    assert got is not fn, f"{fn.__name__} was accepted:\n{out}"
    assert checks.STATUS == {name: "failed"}
    assert "FAILED" in out and "hint" in out, out
    assert "PASSED" not in out and "NOT DONE" not in out
    if message:
        assert message in out, out
    return out


def assert_other_exception_fails(checker, name, capsys) -> None:
    """A TypeError raised by the participant's code is a failure that names it and shows the line, not a crash."""

    def typo(x, *args):
        return x.amin(axis=-1, keep_dim=True)  # numpy spelling: TypeError from torch

    out = assert_failed(checker, name, typo, capsys, "TypeError")
    assert "raised TypeError" in out
    assert "x.amin(axis=-1, keep_dim=True)" in out  # the offending line is shown


# ----------------------------------------------------------------------------- summary


def summary_lines(capsys) -> tuple[dict[str, str], list[str]]:
    """Discard the output so far, call checks.summary() -> (what it returns, the lines it printed)."""
    capsys.readouterr()
    result = checks.summary()
    return result, capsys.readouterr().out.strip().splitlines()


# ----------------------------------------------------------------------------- a lab's checkers as a whole


def assert_lab_solutions_pass(lab_path, good: dict, order, capsys, namespace: dict | None = None) -> None:
    """The lab's solution functions, compiled from its source, pass their checkers in `order` (the lab's order).
    good: {checker: (exercise name, good_fn, lab function name)}; namespace: the lab's imports the functions use
    (torch always)."""
    import torch

    namespace = {"torch": torch} | (namespace or {})
    lab = lab_solutions(lab_path, [fn_name for _, _, fn_name in good.values()])
    for checker in order:
        name, _, fn_name = good[checker]
        fn = lab_function(lab_path, lab[fn_name], namespace)
        assert checker(fn) is fn  # the lab rebinds the name to what the checker returns: the same function
        assert checks.STATUS[name] == "passed"
    assert "FAILED" not in capsys.readouterr().out
    assert len(checks.STATUS) == len(order)


def assert_lab_calls_its_checkers(lab_path, good: dict) -> None:
    """The lab source rebinds each solution function to what its checker returns."""
    src = Path(lab_path).read_text()
    for checker, (_, _, fn_name) in good.items():
        assert f"{fn_name} = cl.checks.{checker.__name__}({fn_name})" in src


def assert_same(result, expected) -> None:
    """A checker's reference output equals an independently computed one (tuples element-wise; ints exactly,
    bool masks exactly and as bool, floats to 1e-5)."""
    import torch

    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    assert len(results) == len(expecteds)
    for r, e in zip(results, expecteds):
        if isinstance(e, int):
            assert r == e
        elif e.dtype == torch.bool:
            assert r.dtype == torch.bool and torch.equal(r, e)
        else:
            torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the suite every lab's checkers get


class CheckerSuite:
    """The tests every lab's checkers must pass. A checker test module defines its lab's solutions (good_*), correct
    alternatives, wrong answers and mutating answers, then subclasses this once:

        class TestEveryChecker(CheckerSuite):
            TEST_FILE, LAB, GOOD, CORRECT_ALTERNATIVES, WRONG, MUTATING = (__file__, LAB, GOOD, CORRECT_ALTERNATIVES,
                                                                           WRONG, MUTATING)
            sample_calls = staticmethod(_sample_calls)

    Tests that only one lab needs stay plain functions in its module. Parametrization comes from the class attributes
    (pytest_generate_tests below, by argument name); a method that carries its own @pytest.mark.parametrize keeps it.
    """

    TEST_FILE: str  # the module's __file__: its good_<name> functions are copies of the lab's <name> solutions
    LAB: Path  # the lab's single source, solutions/NN_*.py
    GOOD: dict  # checker -> (exercise name, the lab's solution copied as good_*, the lab's function name)
    CORRECT_ALTERNATIVES: list  # (checker, exercise name, a correct function written another way): must pass
    WRONG: list  # (checker, exercise name, a wrong function, a fragment of the failure message or None): must fail
    MUTATING: list  # (checker, exercise name, a correct function that mutates its inputs after computing): must pass
    ORDER: list | None = None  # the order in which the lab checks its exercises; None: GOOD's order
    NAMESPACE: dict | None = None  # what the lab's solutions use besides torch (the lab's imports)
    TENSOR_CHECKERS: list | None = None  # checkers whose cases take tensors (a numpy-style typo raises); None: all

    @staticmethod
    def sample_calls() -> dict:
        """checker -> (args of one sample call, an independent computation of what the reference must return)."""
        raise NotImplementedError

    def assert_sample(self, checker, got) -> None:
        """What a checker handed back (the reference) computes the sample call's expected result."""
        args, expected = self.sample_calls()[checker]
        assert_same(got(*args), expected)

    def pytest_generate_tests(self, metafunc):
        if metafunc.definition.get_closest_marker("parametrize"):
            return  # the method parametrizes itself
        values = {
            "checker": (list(self.GOOD), lambda c: c.__name__),
            "tensor_checker": (self.TENSOR_CHECKERS or list(self.GOOD), lambda c: c.__name__),
            "alternative": (self.CORRECT_ALTERNATIVES, lambda a: f"{a[0].__name__}-{a[2].__name__}"),
            "wrong": (self.WRONG, lambda w: w[2].__name__),
            "mutating": (self.MUTATING, lambda m: f"{m[0].__name__}-{m[2].__name__}"),
        }
        for arg, (params, ids) in values.items():
            if arg in metafunc.fixturenames:
                metafunc.parametrize(arg, params, ids=ids)

    # ------------------------------------------------------------------------- the lab's own solutions

    def test_good_copies_match_the_lab_solutions(self):
        assert_good_copies_match(self.TEST_FILE, self.LAB, [fn_name for _, _, fn_name in self.GOOD.values()])

    def test_the_lab_solution_code_passes_every_checker(self, capsys):
        """Compiled straight from the lab source, checked in the order the lab checks them."""
        assert_lab_solutions_pass(self.LAB, self.GOOD, self.ORDER or list(self.GOOD), capsys, self.NAMESPACE)

    def test_lab_checks_each_exercise_with_its_checker(self):
        assert_lab_calls_its_checkers(self.LAB, self.GOOD)

    # ------------------------------------------------------------------------- passed

    def test_solution_passes(self, checker, capsys):
        name, good, _ = self.GOOD[checker]
        assert_passed(checker, name, good, capsys)

    def test_correct_alternatives_pass(self, alternative, capsys):
        assert_accepted(*alternative, capsys)

    def test_correct_answer_that_mutates_its_inputs_afterwards_passes(self, mutating, capsys):
        checker, name, fn = mutating
        assert_mutating_answer_passes(checker, name, fn, self.GOOD[checker][1], capsys)

    # ------------------------------------------------------------------------- not done

    def test_not_implemented_is_not_done(self, checker, capsys):
        """A stub is "not done", and the checker hands back the reference, which computes the right thing."""
        got = assert_not_done(checker, self.GOOD[checker][0], capsys)
        self.assert_sample(checker, got)

    # ------------------------------------------------------------------------- failed

    def test_wrong_answer_is_rejected(self, wrong, capsys):
        checker, name, fn, message = wrong
        assert_failed(checker, name, fn, capsys, message)

    def test_at_least_four_wrong_answers_per_checker(self, checker):
        assert sum(c is checker for c, _, _, _ in self.WRONG) >= 4

    def test_the_reference_is_handed_back_after_a_failure(self, checker, capsys):
        wrong = next(fn for c, _, fn, _ in self.WRONG if c is checker)
        got = checker(wrong)
        capsys.readouterr()
        self.assert_sample(checker, got)

    def test_other_exceptions_are_failures_not_crashes(self, tensor_checker, capsys):
        assert_other_exception_fails(tensor_checker, self.GOOD[tensor_checker][0], capsys)
