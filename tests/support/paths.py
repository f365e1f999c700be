"""Where things are in the repository, for tests at any depth of ``tests/``."""

from pathlib import Path

#: The repository root (``pyproject.toml``, ``docs/``, ``benchmarks/``).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Committed test data.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
