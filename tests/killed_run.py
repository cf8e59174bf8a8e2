"""Run the command line in a subprocess that SIGKILLs itself once it has finished `after` shards.

The hook lives here, not in the library: the child wraps `OutputFolder._record` (called once a
shard is complete and in the manifest) and kills itself there, as a killed run dies, with no cleanup.

    python tests/killed_run.py AFTER qlora-compile-arguments...
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def killed_run(after: int, *args: str) -> subprocess.CompletedProcess:
    """Run `qlora-compile *args`, killed after `after` shards; asserts it died of SIGKILL."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, str(after), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def _main() -> int:
    from qlora_compile.checkpoint.output_folder import OutputFolder
    from qlora_compile.tools import cli

    after, args = int(sys.argv[1]), sys.argv[2:]
    record, done = OutputFolder._record, []

    def record_then_die(self, name, entry):
        record(self, name, entry)
        done.append(name)
        if len(done) >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    OutputFolder._record = record_then_die
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(_main())
