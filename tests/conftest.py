"""Shared test set-up: the repository root is importable, whatever the cwd.

The package is not installed into the venv during development; tests import
``lbnode`` and ``lbshared`` from the checkout, and the integration tests
start ``python -m lbnode`` subprocesses with ``REPO_ROOT`` on PYTHONPATH.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
