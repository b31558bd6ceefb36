"""adapters.child.start_child: what every worker process does first (run in a child here,
since it changes the process's signal handling)."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import os, signal
from adapters.child import start_child
print(start_child(os.getppid()), start_child(os.getppid() + 1000000), signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


def test_start_child_knows_its_parent_and_leaves_ctrl_c_to_it(bin_env):
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=bin_env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"]


def test_a_worker_target_must_name_module_and_function():
    import pytest

    from adapters.worker_process import WorkerProcess

    with pytest.raises(ValueError, match=r"WorkerProcess target 'reader_main': write it as 'package.module:function'"):
        WorkerProcess("reader_main")
