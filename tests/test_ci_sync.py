"""README command 2 and CI run the same test sequence: lint, quick tier, slow tier."""

from __future__ import annotations

import re

from bundle_utils import REPO


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    readme = _commands(blocks[1])  # the README opens with two commands; the second sets up and tests
    assert readme == ["bash scripts/setup.sh && bash scripts/test.sh"]
    assert _commands((REPO / ".ci" / "run").read_text())[-1] == readme[0]


def test_test_script_lints_then_runs_the_quick_then_the_slow_tier():
    script = (REPO / "scripts" / "test.sh").read_text()
    steps = ["python3 -m ruff check .", 'tier quick -m "not slow" tests', "tier slow -m slow --durations=20 tests"]
    at = [script.index("\n" + s + "\n") for s in steps]
    assert at == sorted(at)
    assert "-eq 5 ]" in script  # "no tests collected" is reported as an error
