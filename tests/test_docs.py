"""The documentation site: it builds with `mkdocs build --strict` (no broken link or anchor,
no page left out of the navigation), its generated reference names every flag of `gradserve
serve --help` and every metric a real server exports, and every example marked runnable in
the README and the getting-started pages prints, against a real server, what the page says.

A runnable example is a fenced block right after `<!-- runnable -->` (python: run by this
interpreter; sh: by bash), and what it prints is the next fenced block after `<!-- output
-->`. In the output, `...` stands for anything (timings, the last digits of a float).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import GradientClient

ROOT = Path(__file__).resolve().parents[1]
DOCS_ENV = {"DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
RUNNABLE_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "getting-started").glob("*.md"))]
EXAMPLE_TIMEOUT = 90  # seconds per example, a server call or a few included
# Labels the exposition adds to a family's own: histogram buckets, and the process that
# exported a sample under --frontends N (the reference says so once for every metric).
ADDED_LABELS = {"le", "process"}


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=config.parent, env={**os.environ, **DOCS_ENV}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = build_site(ROOT / "mkdocs.yml", out)
    assert built.returncode == 0, built.stderr
    return out


def test_the_site_builds_strict_and_strict_refuses_a_broken_link(site, tmp_path):
    assert (site / "index.html").is_file()
    for page in ("flags", "metrics", "protocol", "rest", "sdk"):
        assert (site / "reference" / page / "index.html").is_file(), page
    for page in site.rglob("*.html"):  # scripts, styles and fonts come with the site
        remote = re.findall(
            r"<(?:script|link)[^>]*(?:src|href)=\"https?://[^\"]*", page.read_text()
        )
        assert not remote, (page, remote)
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs")
    for name in ("mkdocs.yml", "client", "wire", "protos"):
        source = ROOT / name
        target = copy / name
        target.symlink_to(source) if source.is_dir() else shutil.copy(source, target)
    (copy / "docs" / "stray.md").write_text("# Not in the navigation\n\n[gone](nowhere.md)\n")
    built = build_site(copy / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "stray.md" in built.stderr and "nowhere.md" in built.stderr, built.stderr


def table_rows(page: Path) -> list[list[str]]:
    """The cells of every table row of a built page, as text."""
    text = page.read_text()
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", text, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        rows.append([html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in cells])
    return [row for row in rows if row]


def test_every_serve_flag_is_in_the_reference_with_its_variable_and_default(site):
    environment = {key: value for key, value in os.environ.items() if "GRADSERVE_" not in key}
    help_text = subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**environment, "COLUMNS": "1000"},  # one line per flag's help
    ).stdout  # fmt: skip
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    defaults = dict(re.findall(r"\(env (GRADSERVE_\w+); default: ([^)]*)\)", help_text))
    assert len(flags) > 40 and len(defaults) > 40, help_text
    rows = {}
    for names_and_variable, default, what in table_rows(
        site / "reference" / "flags" / "index.html"
    ):
        variable = re.search(r"GRADSERVE_\w+", names_and_variable).group()
        for name in re.findall(r"--[a-z][a-z0-9-]+", names_and_variable):
            rows[name] = (variable, default, what)
    for flag in sorted(flags):
        assert flag in rows, f"{flag} is missing from the flag reference"
        variable, default, what = rows[flag]
        assert what, flag
        assert variable in defaults, f"{flag}: the reference's {variable} is not in --help"
        assert default == reference_default(defaults[variable]), (flag, default)
    loadtest = (site / "reference" / "flags" / "index.html").read_text()
    for flag in ("--concurrency", "--protocol", "--derivative"):
        assert flag in loadtest


def reference_default(help_default: str) -> str:
    """A default as --help prints it, as the reference shows it."""
    value = " ".join(help_default.split())
    return {"True": "on", "False": "off", "": "(empty)"}.get(value, value)


@dataclass(frozen=True)
class Documented:
    kind: str
    labels: frozenset[str]


def documented_metrics(site: Path) -> dict[str, Documented]:
    found = {}
    for name, kind, labels, _what in table_rows(site / "reference" / "metrics" / "index.html"):
        shown = {label.strip() for label in labels.split(",")} - {"—"}
        found[name] = Documented(kind, frozenset(shown))
    return found


def test_every_metric_a_server_exports_is_in_the_reference(site, frontends_server):
    """A server of 2 frontends and an engine process (every process's metrics, gathered),
    after unary, stream and REST calls of several kinds, so that every labelled family has
    samples."""
    server = frontends_server
    with GradientClient(server.target, timeout=60) as client:
        client.evaluate([0.2, 0.6])
        client.evaluate([0.3], "none")
        client.evaluate([0.3], "jvp", v=np.ones((1, 1)))
        list(client.stream([0.1, 0.2]))
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.4]}]}
    answer = httpx.post(f"http://127.0.0.1:{server.http_port}/v2/models/quadratic/infer",
                        json=body, timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    scraped = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=60).text
    documented = documented_metrics(site)
    families = list(text_string_to_metric_families(scraped))
    assert len(families) > 30
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        created_of = family.name.removesuffix("_created")
        if family.name != created_of and {created_of, created_of + "_total"} & set(documented):
            continue  # the creation time of a documented counter or histogram
        assert name in documented, f"{name} is exported but missing from the metric reference"
        assert family.type == documented[name].kind, name
        for sample in family.samples:
            labels = set(sample.labels) - ADDED_LABELS
            assert labels <= documented[name].labels, (name, sample.labels)
    exported = {family.name for family in families}
    assert {"gradserve_requests", "gradserve_deterministic_selfcheck"} <= exported


def test_every_endpoint_and_parameter_a_server_documents_is_in_the_rest_reference(
    site, frontends_server
):
    served = httpx.get(
        f"http://127.0.0.1:{frontends_server.http_port}/v2/openapi.json", timeout=60
    ).json()
    rows = table_rows(site / "reference" / "rest" / "index.html")
    listed = {(row[0], row[1]) for row in rows if len(row) == 4}
    for path, operations in served["paths"].items():
        for method in set(operations) - {"parameters"}:
            assert (method.upper(), path) in listed, f"{method.upper()} {path} is not listed"
    parameters = {row[0] for row in rows if len(row) == 3}
    assert set(served["components"]["schemas"]["Parameters"]["properties"]) == parameters


@dataclass(frozen=True)
class Example:
    page: str
    number: int
    language: str
    code: str
    output: str

    def __str__(self) -> str:
        return f"{self.page}#{self.number}"


RUNNABLE = re.compile(
    r"<!-- runnable -->\s*```(\w+)\n(.*?)\n```\s*"  # the example
    r"(?:\S[^\n]*\n\s*)?"  # a line such as "prints"
    r"<!-- output -->\s*```\w*\n(.*?)\n```",  # what it prints
    re.S,
)


def runnable_examples() -> list[Example]:
    found = []
    for page in RUNNABLE_PAGES:
        text = page.read_text()
        matches = RUNNABLE.findall(text)
        assert len(matches) == text.count("<!-- runnable -->"), (
            f"{page.name}: a runnable block without its <!-- output --> block"
        )
        for number, (language, code, output) in enumerate(matches, 1):
            assert language in ("python", "sh"), f"{page.name}: cannot run {language}"
            found.append(Example(page.relative_to(ROOT).as_posix(), number, language, code, output))
    return found


EXAMPLES = runnable_examples()


def test_the_front_pages_have_runnable_examples():
    pages = {example.page for example in EXAMPLES}
    assert pages == {page.relative_to(ROOT).as_posix() for page in RUNNABLE_PAGES} - {
        "docs/getting-started/your-model.md"
    }
    assert len(EXAMPLES) >= 7


def matches(expected: str, actual: str) -> bool:
    """`actual` is `expected`, where each `...` may stand for any text."""
    pattern = ".*?".join(re.escape(part) for part in expected.strip().split("..."))
    return re.fullmatch(pattern, actual.strip(), re.S) is not None


def test_matching_with_ellipses():
    assert matches("y: [0.36...]\n  ... µs", "y: [0.3645575]\n  1421 µs")
    assert not matches("dy/dx=-2.353", "dy/dx=-2.354")
    assert not matches("a ... c", "a b c d")


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_runnable_example_prints_what_its_page_says(example, frontends_server, tmp_path):
    ports = {"50051": str(frontends_server.port), "8000": str(frontends_server.http_port)}
    code = re.sub(r"(127\.0\.0\.1|localhost):(50051|8000)\b",
                  lambda m: f"{m.group(1)}:{ports[m.group(2)]}", example.code)  # fmt: skip
    command = [sys.executable, "-c", code] if example.language == "python" else ["bash", "-c", code]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                         timeout=EXAMPLE_TIMEOUT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert matches(example.output, run.stdout), (
        f"{example} printed:\n{run.stdout}\nits page says:\n{example.output}"
    )


# Units that only measurements carry: a page other than docs/benchmarks.md (and the design
# notes that cite it) links to the benchmark run instead of quoting such figures.
MEASURED = re.compile(r"\b\d[\d,.]*\s?(req/s|rows/s|µs per|us per)|\b\d+(\.\d+)?x (faster|slower)")
USER_PAGES = [
    ROOT / "README.md",
    *sorted(
        p
        for p in (ROOT / "docs").rglob("*.md")
        if p.name not in ("benchmarks.md", "architecture.md")
    ),
]


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_a_page_quotes_no_measured_figure_of_its_own(page):
    found = [line for line in page.read_text().splitlines() if MEASURED.search(line)]
    assert not found, f"{page.name}: link to docs/benchmarks.md instead of quoting: {found}"
