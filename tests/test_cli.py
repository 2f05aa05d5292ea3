"""The command line as a shell sees it: what happens around a command's own work."""
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`minisft study softmax | head`: stdout's reader has gone before the first write; the command
    ends with no message, as git does, with the status of a process killed by SIGPIPE."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: every write meets a broken pipe
    try:
        r = subprocess.run([sys.executable, "-m", "minisft", "study", "softmax"], cwd=ROOT, stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert r.stderr == "" and r.returncode == 141
