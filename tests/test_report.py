"""`slidestream report`: one static HTML page of a real output root (an ingest with a broken slide and a
trained MIL run), read back with the standard library's HTML parser and in a real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tifffile
from PIL import Image

from slidestream.cli import main
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import filesystem, read_bytes, scrub_secrets
from slidestream.pipelines.ledger import Ledger
from slidestream.report import MAX_PICTURE_BYTES, ReportError
from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import make_config

CHROMIUM_HINT = "install it with `bash slidestream/testing/chromium.sh install` (`make test` does)"
RUN = "abmil-quick"
BIG_PICTURE = "notes/slide_000-level1.png"  # a picture a user keeps in the run folder, above the size cap
# A text file among the slides: its error quotes the file's first bytes (`header=b'<b>&'`), markup that the
# page must show as text; made the "secret", the page must show the placeholder instead.
NOT_A_SLIDE = "<b>&' is not a slide\n"
MARKUP = "<b>&"


# -- a small DOM from html.parser ------------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children).strip()

    def all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and all(
                    child.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()
                ):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def has_class(self, name: str) -> bool:
        return name in self.attrs.get("class", "").split()


class _Tree(HTMLParser):
    VOID: ClassVar[set[str]] = {"img", "br", "meta", "hr", "input", "link", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, [])
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, [])
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    return tree.root


# -- a real output root ---------------------------------------------------------------------------------


@dataclass
class Cohort:
    out: Path
    page: Path
    stdout: str


def _level_png(slide: Path, target: Path) -> None:
    """The second pyramid level of a real synthetic slide as a PNG (several MB of tissue)."""
    with tifffile.TiffFile(slide) as tif:
        pixels = tif.series[0].levels[1].asarray()
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels[..., :3])).save(target)


@pytest.fixture(scope="module")
def cohort(s3_server, slide_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Four tiny slides and a truncated one ingested, a 2-fold MIL run trained on feature bags; the report
    written by the command line into OUT/report.html."""
    ensure_ray(make_config().ray)  # the session's Ray (as the ray_local fixture starts it)
    root = tmp_path_factory.mktemp("report")
    slides, out = root / "slides", root / "out"
    shutil.copytree(slide_root, slides)
    data = (slide_root / "slide_001.svs").read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    (slides / "notes.svs").write_text(NOT_A_SLIDE)
    assert main(["ingest", "--slides", str(slides), "--out", str(out)]) == 0

    labels = write_bags(str(root / "bags"), n_slides=16, dim=16, n_instances=(8, 24), witness_frac=0.3)
    train = ["train", "mil", "--name", RUN, "--out", str(out), "--features", str(root / "bags" / "features")]
    settings = ("train.parallel_folds=1", "train.min_epochs=2", "train.lr=1e-3", "train.max_failures=0")
    flags = ["--labels", labels, "--folds", "2", "--epochs", "2", "--workers", "0"]
    assert main([*train, *flags, *(a for s in settings for a in ("--set", s))]) == 0
    _level_png(slide_root / "slide_000.svs", out / "runs" / RUN / BIG_PICTURE)
    assert (out / "runs" / RUN / BIG_PICTURE).stat().st_size > MAX_PICTURE_BYTES

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["report", "--out", str(out)]) == 0
    return Cohort(out, out / "report.html", printed.getvalue())


def _qc_pictures(out: Path, stage: str) -> set[str]:
    folder = out / "qc" / stage.removeprefix("tiles/")
    return {p.stem for p in folder.glob("*.png")} if folder.is_dir() else set()


def _run_pngs(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.png") if p.relative_to(run).parts[0] != "ray")


def _check_cohort_tables(doc: Node, out: Path) -> None:
    """Every ledger stage is a table whose rows say what the ledger says, with the QC pictures there are."""
    state = Ledger(str(out)).state()
    stages = {stage for stage, _ in state}
    tables = {t.attrs["data-stage"]: t for t in doc.all("table") if t.has_class("slides")}
    assert set(tables) == stages and any(s.startswith("tiles/") for s in stages)
    for stage, table in tables.items():
        rows = {r.attrs["data-slide"]: r for r in table.all("tr") if "data-slide" in r.attrs}
        entries = {sid: e for (s, sid), e in state.items() if s == stage}
        assert set(rows) == set(entries)
        qc = _qc_pictures(out, stage) & set(entries)
        for sid, entry in entries.items():
            cells = [c for c in rows[sid].children if isinstance(c, Node) and c.tag == "td"]
            assert [c.text() for c in cells[:5]] == [
                sid,
                entry.status,
                entry.backend or "–",
                str(entry.n_tiles),
                scrub_secrets(entry.error or ""),
            ]
            assert rows[sid].attrs["data-status"] == entry.status
            images = rows[sid].all("img")
            assert len(images) == (sid in qc), (stage, sid)
        assert len([i for i in table.all("img") if i.has_class("qc")]) == len(qc)
    tiles = next(s for s in stages if s.startswith("tiles/"))
    statuses = {sid: e.status for (s, sid), e in state.items() if s == tiles}
    assert statuses == {"slide_000": "ok", "slide_001": "ok", "slide_002": "ok", "slide_003": "ok",
                        "truncated": "failed", "notes": "failed"}  # fmt: skip
    assert all(state[(tiles, sid)].n_tiles > 0 for sid, status in statuses.items() if status == "ok")


def _check_run(doc: Node, out: Path) -> None:
    run_dir = out / "runs" / RUN
    (section,) = doc.all("section", data_run=RUN)
    assert "(mil)" in section.all("h3")[0].text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (table,) = [t for t in section.all("table") if t.has_class("metrics")]
    rows = {r.attrs["data-key"]: r for r in table.all("tr") if "data-key" in r.attrs}
    assert rows["kind"].all("td")[0].text() == "mil"
    scalars = {k: v for k, v in metrics["mean"].items() if isinstance(v, int | float)}
    assert scalars and {f"mean.{k}" for k in scalars} <= set(rows)
    for key, value in scalars.items():
        shown = rows[f"mean.{key}"].all("td")[0].text()
        assert float(shown) == pytest.approx(value, rel=1e-3, abs=1e-4), key
    (folds,) = rows["folds"].all("table")
    assert len(folds.all("tbody")[0].all("tr")) == len(metrics["folds"]) == 2
    captions = [f.text() for f in section.all("figcaption")]
    pngs = _run_pngs(run_dir)
    assert "curves.png" in pngs and BIG_PICTURE in pngs
    assert [c.split(" · ")[0] for c in captions] == pngs
    assert len([i for i in section.all("img") if i.has_class("picture")]) == len(pngs)
    assert any(c.startswith(BIG_PICTURE) and "downscaled" in c for c in captions)


def test_report_page_shows_the_ledger_the_run_and_its_pictures(cohort: Cohort):
    assert cohort.page.is_file()
    assert cohort.stdout.strip().splitlines()[-1] == str(cohort.page)
    page = cohort.page.read_text()
    doc = parse(page)
    _check_cohort_tables(doc, cohort.out)
    _check_run(doc, cohort.out)

    # Self-contained: no link, frame or remote anything; one inline script; pictures inline and capped.
    assert not doc.all("link") and not doc.all("iframe")
    (script,) = doc.all("script")
    assert "src" not in script.attrs
    images = doc.all("img")
    assert images and all(i.attrs["src"].startswith("data:image/") for i in images)
    for image in images:
        data = base64.b64decode(image.attrs["src"].split(",", 1)[1])
        assert len(data) <= MAX_PICTURE_BYTES
        Image.open(io.BytesIO(data)).verify()
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", page)
    assert "url(" not in page and "@import" not in page


def test_markup_in_data_is_text_and_secrets_are_scrubbed(cohort: Cohort, monkeypatch, tmp_path: Path):
    """The text file's error quotes its first bytes: markup, shown as text; then taken as the secret."""
    tiles = next(s for s, _ in Ledger(str(cohort.out)).state() if s.startswith("tiles/"))
    error = Ledger(str(cohort.out)).state()[(tiles, "notes")].error or ""
    assert f'starts with b"{MARKUP}' in error, error  # the premise: user bytes reach the error message
    page = cohort.page.read_text()
    assert MARKUP not in page and "&lt;b&gt;&amp;" in page
    (row,) = parse(page).all("tr", data_slide="notes")
    assert row.all("td")[4].text() == error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MARKUP)
    target = tmp_path / "elsewhere" / "page.html"
    assert main(["report", "--out", str(cohort.out), "--output", str(target)]) == 0
    page = target.read_text()
    assert MARKUP not in page and "&lt;b&gt;&amp;" not in page
    (row,) = parse(page).all("tr", data_slide="notes")
    assert row.all("td")[4].text() == error.replace(MARKUP, "<AWS_SECRET_ACCESS_KEY>")


def test_report_of_an_s3_output_root_is_written_there(cohort: Cohort, s3_server, capsys):
    s3_server.make_bucket("report-data")
    fs, _ = filesystem("s3://report-data")
    for part in ("ledger", "qc", "runs"):
        if (cohort.out / part).is_dir():
            fs.put(str(cohort.out / part), f"report-data/out/{part}", recursive=True)
    assert main(["report", "--out", "s3://report-data/out"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "s3://report-data/out/report.html"
    doc = parse(read_bytes("s3://report-data/out/report.html").decode())
    _check_cohort_tables(doc, cohort.out)
    _check_run(doc, cohort.out)


def test_missing_or_empty_output_root_is_one_line_error(tmp_path: Path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["report", "--out", str(missing)]) == ReportError.exit_code == 2
    assert capsys.readouterr().err == f"slidestream report: nothing to report: {missing} does not exist\n"
    (tmp_path / "empty" / "ledger").mkdir(parents=True)
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slidestream report: nothing to report in {tmp_path / 'empty'}: ")
    assert err.count("\n") == 1
    assert not (tmp_path / "empty" / "report.html").exists()


# -- in a real browser ---------------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(f"chromium not found: {CHROMIUM_HINT}")
    return found


def _browse(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *flags,
        page.as_uri(),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _console_errors(log: str, page: Path) -> list[str]:
    """Uncaught exceptions and any console message of the page (it logs nothing of its own). Chromium logs
    them all as `INFO:CONSOLE…] "message", source: URL (line)`, whatever their level."""
    return [
        line
        for line in log.splitlines()
        if "Uncaught" in line or (":CONSOLE" in line and page.as_uri() in line)
    ]


def test_report_page_in_headless_chromium(cohort: Cohort, tmp_path: Path):
    dumped = _browse(cohort.page, tmp_path / "profile-dom", "--dump-dom")
    assert not _console_errors(dumped.stderr, cohort.page), dumped.stderr[-3000:]
    doc = parse(dumped.stdout)
    (body,) = doc.all("body")
    expected_images = len(parse(cohort.page.read_text()).all("img"))
    assert body.attrs.get("data-images") == str(expected_images), "the page's script ran after load"
    assert body.attrs.get("data-broken-images") == "0"
    _check_cohort_tables(doc, cohort.out)
    _check_run(doc, cohort.out)

    shot = tmp_path / "page.png"
    taken = _browse(cohort.page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000")
    assert not _console_errors(taken.stderr, cohort.page), taken.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1280)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    not_white = (pixels.min(axis=2) < 235).mean()
    # H&E pink and purple: colours the page's own CSS does not use
    tissue = int(((r - g > 40) & (b - g > 15) & (r > 100)).sum())
    assert not_white > 0.03, f"only {not_white:.1%} of the screenshot is not white"
    assert tissue > 5000, f"only {tissue} tissue-coloured pixels in the screenshot"
