"""Helpers shared by the checker tests (tests/test_checks.py for lab 01, tests/test_checks_lab02.py for lab 02).

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
