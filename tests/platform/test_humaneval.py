"""HumanEval offline: the real 164 problems, scored in corral's sandbox, which contains what
model-written code may do (loop, fork, write elsewhere, open sockets) and counts it as failed."""

from __future__ import annotations

import os
import time

import pytest

from corral.humaneval import load_problems, pass_at_1, program, run_program


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


def test_the_canonical_solutions_pass_all_164_problems(problems):
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    started = time.time()
    assert pass_at_1(problems, [p["canonical_solution"] for p in problems]) == 1.0
    assert time.time() - started < 120  # in parallel sandboxes


def test_pass_as_every_completion_scores_zero(problems):
    assert pass_at_1(problems, ["    pass\n"] * len(problems)) == 0.0


def test_a_wrong_solution_fails_and_says_why(problems):
    add = next(p for p in problems if p["entry_point"] == "add")  # HumanEval/53: add(x, y)
    assert run_program(program(add, "    return x + y\n")).passed
    result = run_program(program(add, "    return x - y\n"))
    assert not result.passed and "AssertionError" in result.reason


def test_an_endless_loop_is_killed_at_the_timeout():
    started = time.time()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert not result.passed and result.reason == "timed out"
    assert time.time() - started < 10


def test_a_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(bomb, timeout=2.0)
    assert not result.passed
    via_subprocess = "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n"
    assert not run_program(via_subprocess, timeout=2.0).passed
    assert run_program("print('still working')\n").passed  # the machine still starts processes


def test_writes_outside_the_working_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even where the file system would allow it
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nos.mkdir({str(tmp_path / 'dir')!r})\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        result = run_program(code)
        assert not result.passed and "PermissionError" in result.reason, result
    assert not target.exists() and not (tmp_path / "dir").exists() and tmp_path.is_dir()
    assert run_program("open('scratch.txt', 'w').write('inside is fine')\n").passed


def test_no_network():
    code = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n"
    result = run_program(code)
    assert not result.passed and ("sandbox" in result.reason or "unreachable" in result.reason.lower()), result
