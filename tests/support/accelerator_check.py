"""Running scripts/accelerator_check.sh from tests."""

import json
import os
import subprocess
import sys
from typing import NamedTuple

from tests.support import hangs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Check(NamedTuple):
    process: subprocess.CompletedProcess  # what it printed and its exit status
    steps: dict[str, dict]  # accelerator_check.json's steps by name
    results: dict  # the whole accelerator_check.json
    log: str  # accelerator_check.log: every attempt's own output
    out_dir: str


def run(out_dir: str, *args: str) -> Check:
    """``bash scripts/accelerator_check.sh --out OUT_DIR ARGS...`` with this interpreter."""
    process = subprocess.run(["bash", "scripts/accelerator_check.sh", "--out", str(out_dir), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=hangs.SUBPROCESS_S,
                             env={**os.environ, "PYTHON": sys.executable})
    with open(os.path.join(out_dir, "accelerator_check.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "accelerator_check.log")) as f:
        log = f.read()
    return Check(process, {step["name"]: step for step in results["steps"]}, results, log, str(out_dir))
