"""What every entry point in bin/ does before its tool runs (one copy, not one per tool).

    launch("pipeline.bench.cli")   runs that module's main() and exits with its code

Run inside the project's .venv once `make` has finished it (its stamp, .installed), so a
checkout works without activating it; a .venv still being built is left alone. Outside a
set-up environment, say which of pyproject.toml's dependencies are missing (looked up, not
imported) and how to set up, instead of failing mid-run with a traceback.
"""
import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
NEEDS = ("torch", "safetensors", "numpy", "msgspec", "uvloop", "aiofiles", "tqdm")


def launch(module: str) -> None:
    script = os.path.realpath(sys.argv[0])
    venv = os.path.join(ROOT, ".venv")
    if os.path.exists(os.path.join(venv, ".installed")) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        python = os.path.join(venv, "bin", "python")
        os.execv(python, [python, script, *sys.argv[1:]])
    sys.path.insert(0, ROOT)
    missing = [n for n in NEEDS if importlib.util.find_spec(n) is None]
    if missing:
        sys.exit(f"{os.path.basename(script)}: needs the Python package(s) {', '.join(missing)}; run "
                 f"`make setup` in {ROOT} (or pip install -e . there)")
    sys.exit(importlib.import_module(module).main())
