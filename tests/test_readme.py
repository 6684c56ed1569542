"""The README cannot drift from the code: its snippets run and its commands parse.

- Every ```python block of README.md runs as written, top to bottom in one namespace, in an empty folder.
  The only substitution is the model: the ``tiny_demo`` fixture below replaces
  ``optimum_mwanda.demo.load_demo_model`` (the README's loader of the embedded Gemma 3 270M) with a tiny
  Gemma 3 built from a config and an in-memory tokenizer, and ``HF_TOKEN`` points the push at the test
  suite's local fake Hub (tests/hub_server.py). The text itself is never edited.
- Every ```bash command is parsed by the parser of the program it calls (the CLI's, the example's), so a
  removed or renamed flag fails here; the set-up and test commands must match scripts/ and .ci/run.
- Relative links of README.md and docs/ point at files that exist; the README stays within 10,000
  characters and shows the main job's command on its first screen.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from repo_scripts import REPO, load_script
from tiny_models import make_model, make_tokenizer

README = REPO / "README.md"
MAIN_JOB = "python examples/prune_and_evaluate.py"
TEST_COMMAND = 'python -m pytest -m "not slow" -q'


def _blocks(language: str, text: str | None = None) -> list[str]:
    text = README.read_text() if text is None else text
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


@pytest.fixture
def tiny_demo(monkeypatch):
    """``load_demo_model`` returns a tiny Gemma 3 (3 layers, width 64) and a tiny byte-level tokenizer."""
    import optimum_mwanda.demo

    def load_tiny_demo_model(dtype=torch.float32, cache_dir=None, **kwargs):
        return make_model("gemma3").to(dtype), make_tokenizer()

    monkeypatch.setattr(optimum_mwanda.demo, "load_demo_model", load_tiny_demo_model)


def test_readme_python_runs_as_written(tiny_demo, hub, tmp_path, monkeypatch):
    from conftest import WRITE_TOKEN

    blocks = _blocks("python")
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # user "alice" on the fake Hub
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)

    # What the snippet promises: a pruned model saved, reloadable, pushed.
    saved = tmp_path / "gemma-3-270m-mwanda-50"
    config = json.loads((saved / "config.json").read_text())
    assert "sparsity_config" in config
    assert namespace["report"].achieved_sparsity == pytest.approx(0.5, abs=0.02)
    assert set(namespace["pruned"]) == {"en", "sw"}
    files = hub.files("alice/gemma-3-270m-mwanda-50")
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)


def _parse_cli(argv: list[str]) -> None:
    from optimum_mwanda.cli import build_parser

    build_parser().parse_args(argv)


def _parse_example(path: str, argv: list[str]) -> None:
    example = load_script(path, name=f"readme_{Path(path).stem}")
    args = example.build_parser().parse_args(argv)
    if hasattr(example, "check_arguments"):  # the example's own checks, which run before any model loads
        example.check_arguments(args)


def _check_command(command: str) -> None:
    if command == TEST_COMMAND:
        assert TEST_COMMAND in (REPO / ".ci" / "run").read_text(), (
            ".ci/run must run the README's test command"
        )
        return
    for part in (p.strip() for p in command.split("&&")):
        words = shlex.split(part)
        if words[:2] == ["bash", "scripts/setup_env.sh"]:
            assert (REPO / words[1]).is_file()
        elif words[:2] == [".", ".venv/bin/activate"]:
            assert 'VENV="${VENV:-.venv}"' in (REPO / "scripts" / "setup_env.sh").read_text()
        elif words[0] == "optimum-mwanda":
            _parse_cli(words[1:])
        elif words[:2] == ["optimum-cli", "prune"]:
            _parse_cli(["prune", *words[2:]])
        elif words[0] == "python" and words[1].startswith(("examples/", "benchmarks/", "research/")):
            _parse_example(words[1], words[2:])
        else:
            pytest.fail(f"README command not checked by tests/test_readme.py: {part!r}")


def test_readme_commands_parse():
    commands = [command for block in _blocks("bash") for command in _commands(block)]
    assert MAIN_JOB in commands and TEST_COMMAND in commands
    for command in commands:
        try:
            _check_command(command)
        except SystemExit as stop:  # argparse's exit on an unknown flag or a bad value
            pytest.fail(f"README command does not parse: {command!r} ({stop})")


def test_command_checker_catches_drift():
    with pytest.raises(SystemExit):
        _check_command("optimum-mwanda prune --no-such-flag")
    with pytest.raises(SystemExit):
        _check_command("python examples/prune_and_evaluate.py --languages en,jp")
    with pytest.raises(pytest.fail.Exception):
        _check_command("some-other-tool --flag")


def test_readme_shape():
    text = README.read_text()
    assert len(text) <= 10_000, f"README.md is {len(text)} characters; move details to docs/"
    first_screen = text.splitlines()[:25]
    assert MAIN_JOB in first_screen and TEST_COMMAND in text


_LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
# The repository's own pages: tool caches (.pytest_cache/README.md after a first run) are not ours.
PAGES = [
    README,
    *sorted((REPO / "docs").rglob("*.md")),
    *sorted(p for p in REPO.glob("*/README.md") if not p.parent.name.startswith(".")),
]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    missing = []
    for target in _LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (page.parent / target).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"
