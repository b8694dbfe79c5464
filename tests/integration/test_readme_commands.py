"""The README's and docs/' commands and links, held to the code so that neither can drift.

Three checks over README.md and every docs/*.md:

- every `nestlm ...` command of a ```bash block (also `python -m nestlm ...` and `torchrun ... -m
  nestlm ...`) parses with the real command-line parser, without running it, and a `nestlm train`
  of a shipped recipe loads that recipe with the line's overrides;
- the blocks marked by a `<!-- test: run -->` line just above them run for real in a temporary
  directory (the README's quickstart), against a tiny trained model that stands in for the
  `nestlm-demo/elastic` that `nestlm demo` writes (the demo takes minutes, this seconds);
- every relative link resolves to a file, and a link to a heading of a markdown file to a heading
  there.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from nestlm.cli import build_parser, main
from nestlm.train.recipe import load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_MARK = "<!-- test: run -->"
FENCE = re.compile(r"^```(\S*)\s*$")
CHAINS = {"&&", "||", ";", "|", "&"}  # what separates two commands on one shell line
# Fewer commands parsed than this means the extraction broke, not that the pages lost them (49 now).
MIN_PARSED = 45
# The tiny recipe in seconds (as tests/integration/test_train_errors.py's FAST), on one thread.
TINY = ["data.max_bytes=60000", "stages.0.steps=3", "stages.1.steps=2", "train.threads=1"]


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    run: bool  # marked `<!-- test: run -->`


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, with their language and whether they are marked to run."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.name}:{i + 1}: a fenced block that never closes"
        run = i > 0 and lines[i - 1].strip() == RUN_MARK
        out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1 : end]) + "\n", run))
        i = end + 1
    return out


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: `\\` continuations joined, comments dropped, and chains
    (`&&`, `;`, `|`, ...) split; each command a list of words as the shell would pass them."""
    joined = re.sub(r"\\\n", " ", text)
    commands: list[list[str]] = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words: list[str] = []
        for tok in lex:
            if tok in CHAINS:
                commands.append(words)
                words = []
            else:
                words.append(tok)
        commands.append(words)
    return [c for c in commands if c]


def nestlm_argv(words: list[str]) -> list[str] | None:
    """The arguments nestlm's own parser gets from this command, or None when it is not a nestlm command."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return None
    if words[0] == "nestlm":
        return words[1:]
    if words[0] in ("python", "python3", "torchrun"):  # python -m nestlm, torchrun [its options] -m nestlm
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "nestlm":
                return words[i + 2 :]
    return None


@dataclass
class Parsed:
    parsed: list[str]  # "page:line: command" of each command parsed
    skipped: list[str]  # lines left out, with why: a literal `...` in the command, or `nestlm harness`
    failures: list[str]


def parse_all() -> Parsed:
    result = Parsed([], [], [])
    recipes = set(shipped_recipes())
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("bash", "sh"):
                continue
            for words in shell_commands(block.text):
                argv = nestlm_argv(words)
                if argv is None:
                    continue
                where = f"{page.relative_to(ROOT)}:{block.line}: nestlm {' '.join(argv)}"
                if any("..." in w for w in argv):  # `--out DIR ...`: the page leaves the rest to the reader
                    result.skipped.append(f"{where}  (a `...` placeholder)")
                    continue
                if argv[:1] == ["harness"]:  # lm-evaluation-harness's own parser takes every argument
                    result.skipped.append(f"{where}  (the harness's own command line)")
                    continue
                error = check_argv(argv, recipes)
                (result.failures if error else result.parsed).append(f"{where}  {error}" if error else where)
    return result


def check_argv(argv: list[str], recipes: set[str]) -> str:
    """Why nestlm would refuse these arguments before doing any work ('' when it would not)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:
        return f"the parser exits ({e.code}): {err.getvalue().strip().splitlines()[-1:]}"
    overrides = list(getattr(args, "overrides", []) or [])
    if extra:  # as cli.main: key=value overrides after the options, for train and demo only
        if args.command not in ("train", "demo") or not all("=" in e and not e.startswith("-") for e in extra):
            return f"unrecognized arguments: {extra}"
        overrides += extra
    recipe = {"train": getattr(args, "recipe", None), "demo": "demo"}.get(args.command)
    if recipe in recipes:
        try:
            load_recipe(recipe, overrides)
        except Exception as e:  # noqa: BLE001 - the message is the finding
            return f"recipe {recipe} refuses {overrides}: {e}"
    return ""


def test_every_documented_command_parses() -> None:
    """A renamed option or subcommand, or a recipe key that moved, fails here naming the page and line."""
    result = parse_all()
    assert not result.failures, "\n".join(result.failures)
    assert len(result.parsed) >= MIN_PARSED, (len(result.parsed), result.parsed)
    assert len(result.skipped) <= 10, result.skipped  # skipping is the exception, not how lines pass


def test_the_extraction_reads_the_shell_as_the_shell_does() -> None:
    """Continuations, comments, quotes and chains: a wrong split would pass broken lines or fail good ones."""
    text = (
        "nestlm eval --model m \\\n    --out 'a b'   # a comment: nestlm bogus --x\n"
        'cd d && nestlm generate --model m --prompt "x = # not a comment" | head -1; python -m nestlm demo\n'
        "NESTLM_API_KEY=k torchrun --nproc-per-node 8 -m nestlm train tiny x.y=1\n"
    )
    argvs = [a for a in map(nestlm_argv, shell_commands(text)) if a is not None]
    assert argvs == [
        ["eval", "--model", "m", "--out", "a b"],
        ["generate", "--model", "m", "--prompt", "x = # not a comment"],
        ["demo"],
        ["train", "tiny", "x.y=1"],
    ]
    recipes = set(shipped_recipes())
    assert check_argv(["generate", "--model", "m", "--bogus"], recipes)  # the check does refuse
    assert "x.y" in check_argv(["train", "tiny", "x.y=1"], recipes)
    assert check_argv(["train", "tiny", "--out", "r", "train.lr=1e-3"], recipes) == ""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A directory holding what the quickstart expects: `nestlm-demo/elastic`, here the tiny recipe's
    elastic model (three budgets named as the demo's: full, 75, 50) trained for a few steps."""
    d = tmp_path_factory.mktemp("readme")
    with warnings.catch_warnings():  # five steps leave the routers' choices outside the tolerance: expected
        warnings.simplefilter("ignore")
        assert main(["train", "tiny", "--out", str(d / "runs" / "tiny"), "--no-progress", *TINY]) == 0
    (d / "nestlm-demo").mkdir()
    (d / "nestlm-demo" / "elastic").symlink_to(d / "runs" / "tiny", target_is_directory=True)
    return d


def marked_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.run]


def test_the_marked_blocks_are_the_quickstart() -> None:
    """Unmarking a block (or breaking the marker) would quietly stop it from running."""
    marked = marked_blocks()
    assert {(b.page.name, b.lang) for b in marked} >= {("README.md", "python"), ("README.md", "bash")}
    assert all(b.lang in ("bash", "python") for b in marked), [(b.page.name, b.line, b.lang) for b in marked]


@pytest.mark.parametrize("block", marked_blocks(), ids=lambda b: f"{b.page.name}:{b.line}")
def test_marked_block_runs(block: Block, workdir: Path) -> None:
    """The block exactly as the page shows it, in a fresh shell (or Python) in the work directory:
    exit 0, and every `--out` directory it names written."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's `nestlm`
    cmd = ["bash", "-e", "-c", block.text] if block.lang == "bash" else [sys.executable, "-c", block.text]
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{block.page.name}:{block.line}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip(), "the block printed nothing"
    if block.lang == "bash":
        outs = [c[c.index("--out") + 1] for c in shell_commands(block.text) if "--out" in c]
        for out in outs:
            assert (workdir / out).is_dir() and any((workdir / out).iterdir()), out
    else:
        for out in re.findall(r'save_pretrained\("([^"]+)"\)', block.text):
            assert (workdir / out / "config.json").is_file(), out


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    in_fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = 0
            while slug in found:  # a repeated heading gets -1, -2, ...
                n += 1
                slug = f"{base}-{n}"
            found.add(slug)
    return found


def test_every_relative_link_resolves() -> None:
    """Pages moved out of the README and into docs/ must not point at where things used to be."""
    broken = []
    count = 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            count += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {file.name})")
    assert not broken, "\n".join(broken)
    assert count >= 20, count
