"""How distributed processes end: ``run_and_exit`` skips interpreter finalization (where a gloo worker
thread can abort the process, see ``mimscale.train.distributed.exit_process``) but keeps Python's exit
status, output and atexit handlers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BODIES = {
    "returns": "print('done')",
    "sys_exit_3": "print('done'); sys.exit(3)",
    "sys_exit_message": "print('done'); sys.exit('bad config value')",
    "failed_assert": "print('done'); assert 1 == 2, 'check failed'",
    "raises": "print('done'); raise RuntimeError('boom')",
}


def _run(body: str, tmp_path: Path) -> tuple[int, str, str]:
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import atexit, sys
            sys.path.insert(0, {str(REPO)!r})
            from mimscale.train.distributed import run_and_exit

            atexit.register(lambda: print('atexit ran'))

            def main():
                {body}

            run_and_exit(main)
            print('not reached')
            """
        )
    )
    # stdout goes to a file, not a pipe or a tty: buffered output must still be flushed by os._exit's caller
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as fo, err.open("w") as fe:
        code = subprocess.run([sys.executable, str(script)], stdout=fo, stderr=fe, timeout=120).returncode
    return code, out.read_text(), err.read_text()


@pytest.mark.parametrize(
    ("case", "status", "in_stderr"),
    [
        ("returns", 0, ""),
        ("sys_exit_3", 3, ""),
        ("sys_exit_message", 1, "bad config value"),
        ("failed_assert", 1, "AssertionError: check failed"),
        ("raises", 1, "RuntimeError: boom"),
    ],
)
def test_run_and_exit_keeps_pythons_status_output_and_atexit_handlers(
    tmp_path: Path, case: str, status: int, in_stderr: str
) -> None:
    code, out, err = _run(BODIES[case], tmp_path)
    assert code == status, (out, err)
    assert out.splitlines() == ["done", "atexit ran"]  # flushed, handlers run, nothing after the exit
    assert in_stderr in err
