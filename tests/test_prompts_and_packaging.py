"""Prompt templates (sandboxed Jinja, errors naming file and line) and what the built wheel carries."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mergeit_hf import TemplateError
from mergeit_hf.endpoints.base import ChatReply
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.answer import MergeParseError, parse_merge_output

ROOT = Path(__file__).resolve().parent.parent

# Deita's quality prompt (hkust-nlp/deita, scorer quality_template), to the byte.
DEITA_QUALITY = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. "
    "\n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)


def test_deita_quality_prompt_is_exact():
    rendered = PromptTemplate.load("deita_quality.jinja").render(instruction="Name a colour.", output="Blue.")
    assert rendered == DEITA_QUALITY.format(instruction="Name a colour.", output="Blue.")


def test_merge_prompt_shows_both_sources():
    a = {"instruction": "Reverse a string in Python.", "input": "", "output": "s[::-1]"}
    b = {"instruction": "Reverse a list.", "input": "[1, 2]", "output": "[2, 1]"}
    template = PromptTemplate.load("merge.jinja")
    text = template.render(sources=[a, b], a=a, b=b)
    assert "Reverse a string in Python." in text and "Input: [1, 2]" in text and '"instruction"' in text
    assert text.startswith(
        "You are given two instruction-tuning examples on the same topic. Merge them into ONE new "
        "example that is richer than either: its instruction must ask for everything both "
    )
    assert "## Example A\nInstruction: Reverse a string in Python.\nOutput: s[::-1]\n\n## Example B\n" in text
    c = {"instruction": "Reverse words.", "input": "", "output": "' '.join(reversed(s.split()))"}
    group = template.render(sources=[a, b, c], a=a, b=b)
    assert (
        group.startswith("You are given three instruction-tuning examples")
        and "every constraint of every source" in group
    )
    assert "## Example C\nInstruction: Reverse words.\n" in group


def test_user_template_file_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "mine.jinja"
    good.write_text("Merge:\n{{ a.instruction }} / {{ b.instruction }}\n")
    assert PromptTemplate.load(good).render(a={"instruction": "x"}, b={"instruction": "y"}) == "Merge:\nx / y\n"
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\nline two {{ a.instruction \n")
    with pytest.raises(TemplateError, match=r"broken\.jinja, line 2"):
        PromptTemplate.load(broken)
    undefined = tmp_path / "undefined.jinja"
    undefined.write_text("one\ntwo\n{{ c.instruction }}\n")
    with pytest.raises(TemplateError, match=r"undefined\.jinja, line 3: 'c' is undefined"):
        PromptTemplate.load(undefined).render(a={}, b={})
    with pytest.raises(TemplateError, match="not found"):
        PromptTemplate.load("no-such-template.jinja")


def test_templates_render_in_a_sandbox(tmp_path):
    unsafe = tmp_path / "unsafe.jinja"
    unsafe.write_text("{{ a.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="unsafe"):
        PromptTemplate.load(unsafe).render(a={})


@pytest.mark.parametrize(
    ("content", "finish", "problem"),
    [
        ('{"instruction": "a", "input": "", "output": "b"', "length", "cut off"),
        ("not json", "stop", "not JSON"),
        ('["a"]', "stop", "expected an object"),
        ('{"instruction": "a", "input": "", "output": "b", "extra": 1}', "stop", "keys"),
        ('{"instruction": "a", "input": 3, "output": "b"}', "stop", "string"),
        ('{"instruction": " ", "input": "", "output": "b"}', "stop", "empty instruction"),
    ],
)
def test_merge_output_is_parsed_strictly(content, finish, problem):
    with pytest.raises(MergeParseError, match=problem):
        parse_merge_output(ChatReply(content, (), finish))


def test_raw_newlines_inside_strings_are_accepted():
    merged = parse_merge_output(ChatReply('{"instruction": "a\nb", "input": "", "output": "c"}', (), "stop"))
    assert merged["instruction"] == "a\nb"


def test_built_wheel_carries_templates_and_finds_them_when_installed(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("mergeit_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "mergeit_hf/prompts/merge.jinja",
        "mergeit_hf/prompts/deita_quality.jinja",
        "mergeit_hf/cards/dataset_card.md.jinja",
        "mergeit_hf/examples/mini_alpaca.jsonl",
    } <= names
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    code = (
        "from mergeit_hf.prompts import PromptTemplate; from mergeit_hf.resources import resource_dir; "
        "print(PromptTemplate.load('merge.jinja').path); print(resource_dir('cards'))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(installed)) for line in printed), printed
