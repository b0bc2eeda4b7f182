"""The README stays true: its test command is the one .ci/run runs, and it opens with the two fresh-machine
commands. (Its Python examples, like every docs page's, run in tests/test_docs_examples.py.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(python -m pip install .*python -m pytest)\s*$", README, flags=re.M)
    assert len(commands) == 1, "the README should show exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"README_TEST_COMMAND='{commands[0]}'" in ci


def test_readme_opens_with_the_two_fresh_machine_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "python -m kbit demo" in first_block and "python -m pytest" in first_block

