"""Run the command line in a subprocess that SIGKILLs itself once it has finished `after` units of work.

The hook lives here, not in the library: the child wraps a function that marks a unit finished and
kills itself right after it returns, as a killed run dies, with no cleanup. The units:
- "shard" (default): `OutputFolder._record`, called once a shard is complete and in the manifest;
- "folder": `output_folder._replace_folder`, called once an atomic folder (`atomic_folder`: a
  training checkpoint, for one) is complete and in place.

    python tests/killed_run.py AFTER UNIT qlora-compile-arguments...
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def killed_run(after: int, *args: str, unit: str = "shard") -> subprocess.CompletedProcess:
    """Run `qlora-compile *args`, killed after `after` units; asserts it died of SIGKILL."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, str(after), unit, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def _die_after(after: int, owner, name: str) -> None:
    """`owner.name` replaced by a wrapper that kills the process once it has returned `after` times."""
    original, done = getattr(owner, name), []

    def then_die(*args, **kwargs):
        result = original(*args, **kwargs)
        done.append(1)
        if len(done) >= after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, then_die)


def _main() -> int:
    from qlora_compile.checkpoint import output_folder
    from qlora_compile.tools import cli

    after, unit, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    owner, name = {
        "shard": (output_folder.OutputFolder, "_record"),
        "folder": (output_folder, "_replace_folder"),
    }[unit]
    _die_after(after, owner, name)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(_main())
