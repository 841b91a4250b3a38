"""Every fenced Python block of README.md and docs/**/*.md runs, and the generated pages match the committed JSON.

The blocks of one page run in order in one namespace, in a temporary working directory (the snippets save adapters
to relative paths). A block that cannot run says why in its fence info: ```python skip="needs a GPU"```. The pages
use the bundled real models (`xpeft.datasets`); a missing asset skips its page with the install command, except in
CI (`CI` set), which installs them and must run every page.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {"python", "py"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    attrs: dict[str, str]
    code: str


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order (indented fences, e.g. in admonitions, included)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        words = shlex.split(info.replace("{", " ").replace("}", " ")) if info else []
        lang = words[0].lstrip(".").lower() if words else ""
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and set(lines[j].strip()) == {fence[0]}
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: the code fence {fence!r} is never closed")
        blocks.append(Block(i + 1, lang, attrs, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _python_pages():
    out = []
    for page in pages():
        if any(b.lang in PYTHON for b in parse_blocks(page.read_text())):
            out.append(pytest.param(page, id=str(page.relative_to(ROOT))))
    return out


def test_parser_reads_languages_skips_and_indented_fences():
    text = (
        "intro\n"
        "```python\nx = 1\n```\n"
        "```bash\nls\n```\n"
        '```python skip="needs a GPU"\nimport cuda_only\n```\n'
        "!!! note\n    ```py\n    y = x + 1\n    if y:\n        y += 1\n    ```\n"
        "````markdown\n```python\nnot a block\n```\n````\n"
    )
    blocks = parse_blocks(text)
    assert [(b.line, b.lang) for b in blocks] == [(2, "python"), (5, "bash"), (8, "python"), (12, "py"), (17, "markdown")]
    assert blocks[2].attrs == {"skip": "needs a GPU"} and blocks[0].attrs == {}
    assert blocks[3].code == "y = x + 1\nif y:\n    y += 1\n"
    assert "```python" in blocks[4].code  # a longer fence holds shorter ones
    with pytest.raises(ValueError, match="line 1: the code fence '```' is never closed"):
        parse_blocks("```python\nx = 1\n")


def test_every_page_with_code_is_collected_and_every_skip_says_why():
    collected = {p.values[0] for p in _python_pages()}
    assert ROOT / "README.md" in collected
    assert len(collected) >= 5  # README, the three method guides and at least one more page
    for page in pages():
        for block in parse_blocks(page.read_text()):
            if block.lang in PYTHON and "skip" in block.attrs:
                assert block.attrs["skip"].strip(), f"{page}:{block.line}: skip= needs a reason"


@pytest.mark.slow
@pytest.mark.parametrize("page", _python_pages())
def test_page_snippets_run(page, tmp_path, monkeypatch):
    import torch

    from xpeft.datasets import MissingAssetError

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the snippets' random initialisations (ETHER's u, X-PEFT's hard logits): same run every time
    namespace = {"__name__": "__docs__"}
    for block in parse_blocks(page.read_text()):
        if block.lang not in PYTHON or "skip" in block.attrs:
            continue
        # Line numbers in tracebacks point into the page: the code starts on the line after the fence.
        code = compile("\n" * block.line + block.code, f"{page.relative_to(ROOT)}", "exec")
        try:
            exec(code, namespace)
        except MissingAssetError as err:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(err))


# ------------------------------------------------------------------------------------------------ generated pages
def _results_script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "docs" / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_pages_and_readme_table_are_what_the_committed_json_renders_to():
    script = _results_script()
    pages_, blocks = script.render(ROOT)
    for path, text in pages_.items():
        assert (ROOT / path).read_text() == text, f"{path} is stale: run python docs/scripts/make_results.py"
    for path, name, text in blocks:
        current = (ROOT / path).read_text()
        assert script.fill_block(current, name, text) == current, (
            f"the {name} block of {path} is stale: run python docs/scripts/make_results.py"
        )


def test_results_tables_quote_the_json():
    """Spot checks against the JSON itself, independent of the script's formatting code."""
    import json

    ev = json.loads((ROOT / "benchmarks" / "results" / "eval.json").read_text())
    ether = next(r for r in ev["spam"]["rows"] if r["method"] == "ETHER")
    readme = (ROOT / "README.md").read_text()
    assert f"| ETHER | {ether['accuracy']:.3f} | {ether['trainable_params']:,} |" in readme
    serving = json.loads((ROOT / "benchmarks" / "results" / "serving.json").read_text())
    page = (ROOT / "docs" / "results" / "serving.md").read_text()
    assert f"{serving['results']['xpeft']['peak_rss_mb']:,.0f} MB" in page


class _CharTokenizer:
    """One id per character; the chat template wraps the user turn in <...>."""

    eos_token, pad_token_id = "$", 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "<" + messages[0]["content"] + ">"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_chat_batch_supervises_the_answers_only():
    from xpeft.datasets import chat_batch

    batch = chat_batch(_CharTokenizer(), [("ab", "c"), ("d", "efg")])
    ids = [[ord(c) for c in "<ab>c$"] + [0], [ord(c) for c in "<d>efg$"]]
    assert batch["input_ids"].tolist() == ids
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 7]
    assert batch["labels"].tolist() == [[-100] * 4 + [ord("c"), ord("$"), -100], [-100] * 3 + [ord(c) for c in "efg$"]]
    truncated = chat_batch(_CharTokenizer(), [("ab", "cde")], max_length=5)
    assert truncated["labels"].tolist() == [[-100] * 4 + [ord("c")]]


@pytest.mark.parametrize(
    ("page", "config_name"),
    [("docs/methods/ether.md", "EtherConfig"), ("docs/methods/x-peft.md", "XPeftConfig"), ("docs/methods/pedro.md", "PedroConfig")],
)
def test_guide_tables_list_every_config_field_with_its_default(page, config_name):
    """A field added to (or a default changed in) a config must show in its guide's table."""
    import dataclasses

    from peft.config import PeftConfig

    import xpeft

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    fields = {f.name: f.default for f in dataclasses.fields(getattr(xpeft, config_name)) if f.name not in inherited}
    documented = {}
    for line in (ROOT / page).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            for name in re.findall(r"`(\w+)`", cells[0]):
                documented[name] = cells[1].strip("`")
    assert set(documented) == set(fields), f"{page}: document {set(fields) - set(documented)}, drop {set(documented) - set(fields)}"
    for name, default in fields.items():
        expected = f'"{default}"' if isinstance(default, str) else str(default)
        assert documented[name] == expected, f"{page}: `{name}` defaults to {expected}, the table says {documented[name]}"


def test_datasets_imports_gguf_and_yaml_only_when_loading():
    """`import xpeft.datasets` must work without the `eval` extra: gguf and pyyaml are imported inside the loaders."""
    import ast

    tree = ast.parse((ROOT / "src" / "xpeft" / "datasets.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"gguf", "yaml", "transformers", "torch"}, top_level
