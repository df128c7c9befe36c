"""The README and docs/ cannot drift from the code.

(a) Every ``amedlab ...`` / ``python -m amedlab ...`` command in a fenced code block of README.md and
    docs/*.md is composed with ``--cfg job`` appended, in-process through the real entry point
    (``amedlab.cli.main`` with a patched ``sys.argv``): a key, group option or override that no longer
    exists fails here, and so does a ``stage=`` that is not a stage. Hydra refuses ``--cfg`` together
    with ``-m`` ("Only one of --run, --multirun, --cfg ..."), so a sweep is composed cell by cell: its
    first cell, then each other value of each swept key. Commands that are their own check (``--help``,
    ``--version``, ``-sc``, ``--info``) run as they are. Files the page itself defines (a fenced block
    whose first line is ``# <path>.py|.yaml``, as in docs/extending.md) are written into the working
    folder first, so ``--config-dir myconf`` finds them.
(b) Every ```python block of README.md runs, in a subprocess, in an empty folder, with its own cache.
(c) README.md has at most 250 lines.
(d) Every ``<!-- include: <path from the repository root> -->`` ... ``<!-- end include -->`` block
    equals its file byte for byte (README.md must include the digits Table 2 that stage=table wrote).
(e) Every relative link and image in README.md and docs/*.md points to a file of the repository, and
    an anchor to a heading that exists.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import textwrap
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TABLE2 = "experiments/results/table2_digits/table2.md"
MAX_README_LINES = 250


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- reading the pages ------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def code_blocks(text: str, langs=None) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, indented ones (inside a list item) dedented."""
    out = []
    for m in FENCE.finditer(text):
        indent = m.group("indent")
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in m.group("body").splitlines(keepends=True))
        if langs is None or m.group("lang") in langs:
            out.append((m.group("lang"), body))
    return out


def without_code(text: str) -> str:
    """The page without its fenced blocks and inline code (where links and headings are not)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
ONE_SHOT = {"--help", "-h", "--hydra-help", "--version", "-V", "--info", "-i", "-sc", "--shell-completion", "--cfg", "-c"}
PYTHONS = re.compile(r"(.*/)?python(3(\.\d+)?)?$")


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def amedlab_commands(block: str) -> list[list[str]]:
    """The arguments of every amedlab invocation in a shell block: continuation lines joined, comments
    dropped, ``&&`` / ``;`` / ``|`` chains split, ``$( ... )`` looked into; other commands skipped."""
    found = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            tokens = _tokens(line)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in SEPARATORS:
                segment.append(tok)
                continue
            while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):  # FOO=bar cmd
                segment.pop(0)
            for word in segment:  # eval "$(amedlab -sc install=bash)"
                if word.startswith("$(") and word.endswith(")"):
                    found += amedlab_commands(word[2:-1])
            if segment and Path(segment[0]).name == "amedlab":
                found.append(segment[1:])
            elif len(segment) >= 3 and PYTHONS.fullmatch(segment[0]) and segment[1:3] == ["-m", "amedlab"]:
                found.append(segment[3:])
            segment = []
    return [[a for a in args if a != "..."] for args in found]


def page_commands(path: Path) -> list[list[str]]:
    return [args for _, body in code_blocks(path.read_text(), {"bash", "sh", "shell", "console", ""})
            for args in amedlab_commands(body)]


def page_files(path: Path) -> dict[str, str]:
    """{path: content} of the page's blocks whose first line names a file (``# myconf/solver/x.yaml``)."""
    files = {}
    for _, body in code_blocks(path.read_text(), {"python", "yaml"}):
        m = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml))", body.splitlines()[0].strip()) if body.strip() else None
        if m:
            files[m.group(1)] = body
    return files


# --- composing a command in-process -----------------------------------------------------------------

def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``amedlab <args>`` through ``amedlab.cli.main``: (exit status, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from amedlab import cli

    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["amedlab", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code)
    except Exception as e:  # noqa: BLE001 - a traceback is a failure of the command, reported with it
        code = 1
        err.write(f"{type(e).__name__}: {e}")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        # Hydra keeps the job's config in a process-wide singleton: left set, later tests in this
        # process would read this composition's (output-less) hydra node as their run directory
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().cfg = None
    return code, out.getvalue(), err.getvalue()


FLAGS_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--experimental-rerun"}


def cells(args: list[str]) -> list[list[str]]:
    """The argument lists to compose for one command: itself, or for a sweep (``-m``) its first cell and
    each other value of each swept key (Hydra composes no ``-m`` with ``--cfg``)."""
    if not {"-m", "--multirun"} & set(args):
        return [args]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags, overrides, rest = [], [], iter(a for a in args if a not in ("-m", "--multirun"))
    for a in rest:
        if a in FLAGS_WITH_VALUE:
            flags += [a, next(rest)]
        elif a.startswith("-"):
            flags.append(a)
        else:
            overrides.append(a)
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[o.input_line] if not o.is_sweep_override()
               else [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    first = [c[0] for c in choices]
    out = [flags + first]
    for i, values in enumerate(choices):
        out += [flags + first[:i] + [v] + first[i + 1:] for v in values[1:]]
    return out


def check_command(args: list[str]) -> list[str]:
    """The problems of one documented command (empty: it composes, and names a real stage)."""
    from amedlab.cli import STAGES

    if ONE_SHOT & set(args):
        code, out, err = run_cli(args)
        return [] if code == 0 else [f"exit {code}: {(err or out).strip()[-600:]}"]
    try:
        variants = cells(args)
    except Exception as e:  # noqa: BLE001 - Hydra's override grammar: a malformed override
        return [f"cannot parse the overrides: {e}"]
    problems = []
    for cell in variants:
        code, out, err = run_cli([*cell, "--cfg", "job"])
        shown = " ".join(cell)
        if code != 0:
            problems.append(f"[{shown}] exit {code}: {(err or out).strip()[-600:]}")
            continue
        stage = re.search(r"^stage: (\S+)", out, re.M)
        if stage is None or stage.group(1) not in STAGES:
            problems.append(f"[{shown}] stage={stage.group(1) if stage else None} is not a stage; accepted: "
                            f"{', '.join(STAGES)}")
    return problems


@pytest.fixture
def docs_cwd(tmp_path, monkeypatch):
    """An empty working folder holding the files the pages define; no full Hydra tracebacks."""
    for page in PAGES:
        for name, text in page_files(page).items():
            target = tmp_path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("AMEDLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


# --- (a) the commands ---------------------------------------------------------------------------------

def test_the_command_extractor_finds_every_form_and_skips_the_rest():
    block = """\
# a comment: amedlab stage=nothing
amedlab stage=compare model=gaussian   # trailing comment
python -m amedlab -m stage=compare schedule.rho=3,5 \\
    compare.nfes=[5,7]
.venv/bin/python -m amedlab stage=table sweep_dir=outputs/x
cd /any/folder && amedlab stage=evaluate nfe=5 && make run
eval "$(amedlab -sc install=bash)"
AMEDLAB_CACHE=/tmp/c amedlab stage=cache
PYTHONPATH=src python benchmarks/amed_quality.py --model digits_unet
pip freeze | grep -E '^torch(vision)?==' > torch-pins.txt
make test
"""
    assert amedlab_commands(block) == [
        ["stage=compare", "model=gaussian"],
        ["-m", "stage=compare", "schedule.rho=3,5", "compare.nfes=[5,7]"],
        ["stage=table", "sweep_dir=outputs/x"],
        ["stage=evaluate", "nfe=5"],
        ["-sc", "install=bash"],
        ["stage=cache"],
    ]
    assert cells(["-m", "--config-dir", "mine", "solver=euler,ipndm", "nfe=3,5,7", "seed=1"]) == [
        ["--config-dir", "mine", "solver=euler", "nfe=3", "seed=1"],
        ["--config-dir", "mine", "solver=ipndm", "nfe=3", "seed=1"],
        ["--config-dir", "mine", "solver=euler", "nfe=5", "seed=1"],
        ["--config-dir", "mine", "solver=euler", "nfe=7", "seed=1"],
    ]


def test_an_invented_key_stage_or_option_fails_the_check(docs_cwd):
    fake = """\
amedlab stage=compare compare.no_such_key=1
python -m amedlab stage=no_such_stage
amedlab -m stage=compare solver=euler,no_such_solver
"""
    commands = amedlab_commands(fake)
    assert len(commands) == 3
    for args in commands:
        assert check_command(args), f"amedlab {' '.join(args)} passed the check"
    assert check_command(["stage=compare", "compare.solvers=[euler,heun]"]) == []  # and a real one passes


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_documented_command_composes(page, docs_cwd):
    commands = page_commands(page)
    problems = [f"amedlab {' '.join(args)}\n    {p}" for args in commands for p in check_command(args)]
    assert not problems, f"{_rel(page)}: {len(problems)} stale command(s):\n" + "\n".join(problems)


def test_the_pages_have_commands_to_check():
    counts = {_rel(p): len(page_commands(p)) for p in PAGES}
    assert counts["README.md"] >= 8, counts  # the quickstart, install, version, completion, cache
    assert sum(counts.values()) >= 60, counts


# --- (b) the Python blocks of the README ------------------------------------------------------------

#: a block that starts with "# after: <command>" runs after that command, on a small stand-in of what it
#: names, made here: a random-weight diffusers pipeline (3 x 32 x 32) and its learned solver exported by
#: the real stage=export (tiny training budget); the block also finds ``unet``, ``unet_eps`` (the UNet
#: as an epsilon function of (x, t)) and ``alphas_cumprod`` defined
AFTER_EXPORT = textwrap.dedent("""\
    import subprocess, sys
    import diffusers, torch
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    unet.save_pretrained("pipeline/unet")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ddpm.save_pretrained("pipeline/scheduler")
    alphas_cumprod = ddpm.alphas_cumprod
    class _Eps(torch.nn.Module):
        def forward(self, x, t):
            return unet(x, t).sample
    unet_eps = _Eps()
    subprocess.run([sys.executable, "-m", "amedlab", "stage=export", "model=diffusers", "model.path=pipeline",
                    "solver=learned", "nfe=5", "export.dir=exports/ddpm_nfe5", "solver.distill.num_trajectories=16",
                    "solver.distill.batch_size=8", "solver.distill.epochs=1", "eval.ode_reference.nfe=12",
                    "eval.seeds=0-15", "hydra.run.dir=export_run"], check=True)
    """)


@pytest.mark.parametrize("index", range(len(code_blocks(README.read_text(), {"python"}))))
def test_every_readme_python_block_runs(index, tmp_path):
    _, body = code_blocks(README.read_text(), {"python"})[index]
    script = tmp_path / f"readme_block_{index}.py"
    if body.startswith("# after: amedlab stage=export model=diffusers"):
        body = AFTER_EXPORT + body
    script.write_text(body)
    env = {**os.environ, "AMEDLAB_CACHE": str(tmp_path / "cache"), "AMEDLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README python block {index}:\n{body}\n--- stderr:\n{done.stderr[-3000:]}"


def test_the_readme_has_a_python_quickstart():
    blocks = code_blocks(README.read_text(), {"python"})
    assert blocks and "import" in blocks[0][1]


# --- (c) the README's length ------------------------------------------------------------------------

def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES} (move the rest to docs/)"


# --- (d) included generated files ---------------------------------------------------------------------

INCLUDE = re.compile(r"<!-- include: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end include -->", re.S)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_included_blocks_equal_their_generated_files(page):
    text = page.read_text()
    blocks = list(INCLUDE.finditer(text))
    assert len(blocks) == text.count("<!-- include:") == text.count("<!-- end include -->"), \
        f"{_rel(page)}: an include marker without its pair"
    for m in blocks:
        source = ROOT / m.group("path")
        assert source.is_file(), f"{_rel(page)}: included file {m.group('path')} does not exist"
        assert m.group("body") == source.read_text(), (
            f"{_rel(page)}: the block included from {m.group('path')} differs from the file; paste the file "
            "between the markers again (never edit the numbers by hand)")
    if page == README:
        assert TABLE2 in [m.group("path") for m in blocks], f"README.md must include {TABLE2}"


# --- (e) links ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slugs(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", path.read_text()), re.M):
        base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_points_into_the_repository(page):
    bad = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            bad.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: broken links:\n  " + "\n  ".join(bad)


def test_the_pages_name_no_path_of_this_machine():
    for page in PAGES:
        text = page.read_text()
        assert "/work/" not in text and "/tmp/" not in text, f"{_rel(page)} names a path outside the repository"
