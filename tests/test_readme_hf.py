"""The README's "Use with Hugging Face transformers" section runs as written (issue 9)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer snippet

from steadylm.cli import main as cli_main  # noqa: E402
from steadylm.data.tokenizer import train_tokenizer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use with Hugging Face transformers"


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_readme_hf_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    python, shell = _blocks("python"), _blocks("bash")
    assert len(python) >= 3 and len(shell) == 1
    namespace: dict = {}
    for code in python:  # one namespace, in order, as a reader would paste them
        exec(compile(code, str(README), "exec"), namespace)
    assert Path("nano-powlu-bhyt/config.json").is_file() and Path("llama-tiny/config.json").is_file()

    # What the commands expect beside them: a tokenizer in the checkpoint and a text file.
    text = "In the beginning God created the heaven and the earth. " * 40
    Path("corpus.txt").write_text(text, encoding="utf-8")
    train_tokenizer([text], 320).save("llama-tiny/tokenizer.json")
    commands = [line.split("#")[0].strip() for line in shell[0].splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["import", "export", "scan"]
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "steadylm"
        assert cli_main(argv[1:]) == 0, command
    assert Path("hf/llama-powlu/model.safetensors").is_file()
    assert Path("scan-report/report.html").is_file()
