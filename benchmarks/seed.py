"""The seed library's virtualenv (built on demand) and the subprocess that measures it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from benchmarks.seed_bench import RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
SEED_VENV = Path(__file__).resolve().parent / ".seed-venv"
#: hiredis too: celery_hilok's dev install has it, so both parse replies at the same speed.
REQUIREMENTS = ("redishilok==1.1.0", "hiredis")
_STAMP = SEED_VENV / ".bench-requirements"


class SeedUnavailable(RuntimeError):
    """The seed's virtualenv could not be built or its process failed."""


def _venv_python() -> Path:
    if os.name == "nt":
        return SEED_VENV / "Scripts" / "python.exe"
    return SEED_VENV / "bin" / "python"


def ensure_venv(say: Any = print) -> Path:
    """Python of ``benchmarks/.seed-venv`` with redishilok 1.1.0 installed; built if needed."""
    python = _venv_python()
    wanted = "\n".join(REQUIREMENTS)
    if python.exists() and _STAMP.exists() and _STAMP.read_text() == wanted:
        return python
    if tuple(sys.version_info)[:2] < (3, 11):
        raise SeedUnavailable("redishilok 1.1.0 needs Python >= 3.11")
    say(f"building the seed's virtualenv {SEED_VENV.relative_to(ROOT)} ({', '.join(REQUIREMENTS)})")
    steps = [
        [sys.executable, "-m", "venv", str(SEED_VENV)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
    ]
    for step in steps:
        if step[1:3] == ["-m", "venv"] and python.exists():
            continue
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SeedUnavailable(
                f"{' '.join(step)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
            )
    _STAMP.write_text(wanted)
    return python


class SeedProcess:
    """``benchmarks.seed_bench --serve`` in the seed's virtualenv, one request at a time."""

    def __init__(self, python: Path, url: str) -> None:
        self._proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.seed_bench", "--url", url, "--serve"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self._proc.stdout is not None
        threading.Thread(target=self._pump, args=(self._proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def request(self, request: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Send one request and return its result; raises :class:`SeedUnavailable`."""
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except OSError as exc:
            raise SeedUnavailable(f"the seed process is gone: {exc}") from exc
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise SeedUnavailable(f"no answer to {request} within {timeout}s") from None
            if line is None:
                raise SeedUnavailable(f"the seed process exited ({self._proc.wait()})")
            if not line.startswith(RESULT_PREFIX):
                print(f"[seed] {line.rstrip()}", file=sys.stderr)
                continue
            answer: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            if not answer["ok"]:
                raise SeedUnavailable(f"{request} failed: {answer['traceback']}")
            result: dict[str, Any] = answer["result"]
            return result

    def close(self) -> None:
        end_process(self._proc, 10)


def end_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """End a child that runs until its stdin closes: close it, wait, kill if it hangs."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
