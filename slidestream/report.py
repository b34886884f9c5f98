"""`slidestream report`: one static HTML page of an output root, to open from disk, from S3 or an e-mail.

`gather(out)` reads what the pipelines and trainers left under OUT (the ledger's per-slide state of every
stage with the QC thumbnails under `qc/<tiling-key>/`, every run under `runs/`, every sweep under `tune/`)
and `render(report)` turns it into one self-contained page: pictures are embedded as data URIs (downscaled
above `MAX_PICTURE_BYTES`), there is no external CSS, script, font or link, and every text that comes from
data (slide ids, error messages, metric names) is HTML-escaped with secrets scrubbed from it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import (
    filesystem,
    full_uri,
    join,
    read_bytes,
    scrub_secrets,
    write_bytes_atomic,
)
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.trainers.methods import METHODS

MAX_PICTURE_BYTES = 300_000  # a picture above this is downscaled before it is embedded
MAX_TABLE_ROWS = 1000  # rows of a sweep's results.csv shown
REPORT_FILE = "report.html"
SKIPPED_RUN_DIRS = ("ray",)  # Ray Train's own storage (checkpoints) under a run: no pictures of ours


class ReportError(SlidestreamError):
    """Nothing to report: OUT does not exist, or holds no ledger entry, run or sweep."""


def status_payload(entries: list[LedgerEntry]) -> dict:
    """Per-slide state and totals of one ledger stage (`slidestream status` and the report)."""
    counts = Counter(e.status for e in entries)
    return {
        "slides": [
            {
                "slide_id": e.slide_id,
                "status": e.status,
                "backend": e.backend,
                "n_tiles": e.n_tiles,
                "error": e.error,
            }
            for e in entries
        ],
        "totals": {
            "slides": len(entries),
            "ok": counts["ok"],
            "failed": counts["failed"],
            "skipped": counts["skipped"],
            "tiles": sum(e.n_tiles for e in entries),
        },
    }


# -- what is there -------------------------------------------------------------------------------------------


@dataclass
class Picture:
    caption: str  # where it is, relative to its section
    src: str | None  # data URI; None when the file could not be read as a picture
    note: str = ""  # "downscaled …" or why it is missing


@dataclass
class StageSection:
    stage: str  # ledger stage, e.g. tiles/mpp0.50_px256
    payload: dict  # status_payload
    qc: dict[str, Picture] | None = None  # slide_id → QC thumbnail (tiles stages only)


@dataclass
class RunSection:
    name: str
    uri: str
    kind: str | None  # from run.json
    outputs: list[tuple[str, str, bool]] = field(default_factory=list)  # (what, file, present)
    metrics: Any = None  # metrics.json
    probe: Any = None  # probe.json (Giga-SSL linear probe)
    pictures: list[Picture] = field(default_factory=list)


@dataclass
class SweepSection:
    name: str
    uri: str
    header: list[str] = field(default_factory=list)  # results.csv
    rows: list[list[str]] = field(default_factory=list)
    more_rows: int = 0  # rows of results.csv not shown
    pictures: list[Picture] = field(default_factory=list)


@dataclass
class Report:
    out: str
    generated: str  # UTC time the page was made
    stages: list[StageSection]
    runs: list[RunSection]
    sweeps: list[SweepSection]

    @property
    def empty(self) -> bool:
        return not (self.stages or self.runs or self.sweeps)


def _children(fs: Any, path: str) -> list[dict]:
    """Entries directly under `path` (none when it does not exist), sorted by name."""
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted((e for e in found if e["name"].rstrip("/") != path.rstrip("/")), key=lambda e: e["name"])


def _base(entry: dict) -> str:
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]


def _pngs_under(fs: Any, path: str, skip: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Relative paths of the .png files under `path`, depth first in name order (folders in `skip` at the
    top level left out)."""
    found: list[str] = []
    for entry in _children(fs, path):
        name = _base(entry)
        if entry["type"] == "directory":
            if not (prefix == "" and name in skip):
                found += _pngs_under(fs, entry["name"], prefix=f"{prefix}{name}/")
        elif name.lower().endswith(".png"):
            found.append(prefix + name)
    return found


def _shrink(data: bytes, limit: int) -> tuple[bytes, str]:
    """The picture re-encoded smaller than `limit` bytes: downscaled PNG, else JPEG (alpha on white)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        alpha = "A" in image.getbands() or "transparency" in image.info
        rgb = image.convert("RGBA" if alpha else "RGB")
    scale = min(1.0, math.sqrt(limit / len(data)))
    encoded, mime = data, "image/png"
    for _ in range(12):
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        small = rgb.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        encoded, mime = buffer.getvalue(), "image/png"
        if len(encoded) <= limit:
            break
        if alpha:
            flat = Image.new("RGB", small.size, "white")
            flat.paste(small, mask=small.getchannel("A"))
            small = flat
        buffer = io.BytesIO()
        small.convert("RGB").save(buffer, format="JPEG", quality=85)
        encoded, mime = buffer.getvalue(), "image/jpeg"
        if len(encoded) <= limit:
            break
        scale *= 0.7
    return encoded, mime


def load_picture(uri: str, caption: str, limit: int = MAX_PICTURE_BYTES) -> Picture:
    """A picture file as a data URI: checked to be a picture, downscaled when it is larger than `limit`."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_bytes(uri)
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "png").lower()
            image.verify()
        note = ""
        mime = f"image/{'jpeg' if fmt == 'jpeg' else fmt}"
        if len(data) > limit:
            size = len(data)
            data, mime = _shrink(data, limit)
            note = f"downscaled from {size / 1e3:.0f} kB"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return Picture(caption, None, f"not shown: {type(exc).__name__}: {exc}")
    return Picture(caption, f"data:{mime};base64,{base64.b64encode(data).decode()}", note)


def _read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def _stage_order(stage: str) -> tuple[int, str]:
    head = stage.split("/", 1)[0]
    return ({"tiles": 0, "features": 1, "gigassl": 2}.get(head, 3), stage)


def gather_stages(out: str) -> list[StageSection]:
    """Every ledger stage: the per-slide state (as `slidestream status`) and, for a tiles stage, the QC
    thumbnails `qc/<tiling-key>/<slide_id>.png` that exist."""
    by_stage: dict[str, list[LedgerEntry]] = defaultdict(list)
    for (stage, _), entry in Ledger(out).state().items():
        by_stage[stage].append(entry)
    fs, _ = filesystem(out)
    sections = []
    for stage in sorted(by_stage, key=_stage_order):
        entries = sorted(by_stage[stage], key=lambda e: e.slide_id)
        section = StageSection(stage, status_payload(entries))
        if stage.startswith("tiles/"):
            qc_dir = join(out, "qc", stage.removeprefix("tiles/"))
            pictures = {
                _base(e)[: -len(".png")]: full_uri(fs, e["name"])
                for e in _children(fs, filesystem(qc_dir)[1])
                if e["type"] == "file" and _base(e).endswith(".png")
            }
            section.qc = {
                e.slide_id: load_picture(pictures[e.slide_id], f"{e.slide_id}.png")
                for e in entries
                if e.slide_id in pictures
            }
        sections.append(section)
    return sections


def gather_run(fs: Any, uri: str) -> RunSection:
    """One run directory: its kind, the method's outputs, metrics.json, probe.json and every picture."""
    from slidestream.trainers.fit import RUN_FILE  # here: the trainers' module imports torch

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    plan = _read_json(join(uri, RUN_FILE))
    kind = plan.get("kind") if isinstance(plan, dict) else None
    run = RunSection(name, uri, kind if isinstance(kind, str) else None)
    present = {_base(e) for e in _children(fs, filesystem(uri)[1])}
    if run.kind in METHODS:
        run.outputs = [(what, file, file in present) for what, file in METHODS[run.kind].outputs]
    if "metrics.json" in present:
        run.metrics = _read_json(join(uri, "metrics.json"))
    if "probe.json" in present:
        run.probe = _read_json(join(uri, "probe.json"))
    run.pictures = [
        load_picture(join(uri, *rel.split("/")), rel)
        for rel in _pngs_under(fs, filesystem(uri)[1], SKIPPED_RUN_DIRS)
    ]
    return run


def gather_sweep(fs: Any, uri: str) -> SweepSection:
    """One sweep directory: results.csv as a table and its pictures (results.png)."""
    sweep = SweepSection(uri.rstrip("/").rsplit("/", 1)[-1], uri)
    files = {_base(e): e for e in _children(fs, filesystem(uri)[1]) if e["type"] != "directory"}
    if "results.csv" in files:
        rows = list(csv.reader(io.StringIO(read_bytes(join(uri, "results.csv")).decode(errors="replace"))))
        if rows:
            sweep.header, body = rows[0], rows[1:]
            sweep.rows, sweep.more_rows = body[:MAX_TABLE_ROWS], max(0, len(body) - MAX_TABLE_ROWS)
    sweep.pictures = [load_picture(join(uri, n), n) for n in sorted(files) if n.lower().endswith(".png")]
    return sweep


def gather(out: str) -> Report:
    """Everything the page shows, read from OUT (a directory or an s3:// prefix)."""
    fs, root = filesystem(out)
    if not fs.exists(root):
        raise ReportError(f"nothing to report: {out} does not exist")
    subdirs = {
        under: [
            join(out, under, _base(e))
            for e in _children(fs, filesystem(join(out, under))[1])
            if e["type"] == "directory"
        ]
        for under in ("runs", "tune")
    }
    report = Report(
        out,
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        gather_stages(out),
        [gather_run(fs, uri) for uri in subdirs["runs"]],
        [gather_sweep(fs, uri) for uri in subdirs["tune"]],
    )
    if report.empty:
        raise ReportError(f"nothing to report in {out}: no ledger entries, runs (runs/) or sweeps (tune/)")
    return report


# -- the page ------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Text from data, safe in HTML text and attribute values (secrets scrubbed first)."""
    return html.escape(scrub_secrets(str(value)), quote=True)


def format_value(value: Any) -> str:
    """A scalar as the page shows it: floats to 4 significant digits (1 decimal from 1000 on)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    """A CSV cell: a float is shortened like a JSON value, anything else is shown as it is."""
    try:
        number = float(text)
    except ValueError:
        return text
    return format_value(number) if any(c in text for c in ".eE") and math.isfinite(number) else text


def _value_html(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{esc(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_value_html(v.get(c))}</td>" for c in columns) + "</tr>" for v in value
        )
        return f'<table class="sub"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if isinstance(value, list):
        return esc(
            ", ".join(format_value(v) if not isinstance(v, dict | list) else json.dumps(v) for v in value)
        )
    if isinstance(value, dict):
        return esc(json.dumps(value))
    return esc(format_value(value))


def _json_rows(obj: dict, prefix: str = "", depth: int = 0) -> list[str]:
    """Key/value rows; a nested dict is a group row followed by its own rows, indented."""
    rows = []
    pad = f' style="padding-left:{0.4 + 1.2 * depth:.1f}em"'
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.append(f'<tr class="group" data-key="{esc(path)}"><th colspan="2"{pad}>{esc(key)}</th></tr>')
            rows += _json_rows(value, f"{path}.", depth + 1)
        else:
            rows.append(
                f'<tr data-key="{esc(path)}"><th{pad}>{esc(key)}</th><td>{_value_html(value)}</td></tr>'
            )
    return rows


def json_table(obj: Any, css_class: str) -> str:
    if not isinstance(obj, dict):
        obj = {"value": obj}
    return f'<table class="kv {css_class}"><tbody>{"".join(_json_rows(obj))}</tbody></table>'


def _img(picture: Picture, css_class: str) -> str:
    if picture.src is None:
        return f'<span class="note">{esc(picture.caption)}: {esc(picture.note)}</span>'
    title = f"{picture.caption} ({picture.note})" if picture.note else picture.caption
    return f'<img class="{css_class}" src="{picture.src}" alt="{esc(picture.caption)}" title="{esc(title)}">'


def _figures(pictures: list[Picture]) -> str:
    if not pictures:
        return ""
    figures = "".join(
        f"<figure>{_img(p, 'picture')}<figcaption>{esc(p.caption)}"
        f"{' · ' + esc(p.note) if p.note and p.src else ''}</figcaption></figure>"
        for p in pictures
    )
    return f'<div class="pictures">{figures}</div>'


def _stage_html(index: int, section: StageSection) -> str:
    totals = section.payload["totals"]
    qc = section.qc
    head = "<th>slide</th><th>status</th><th>reader</th><th>tiles</th><th>error</th>"
    head += "<th>QC</th>" if qc is not None else ""
    rows = []
    for slide in section.payload["slides"]:
        sid, status = slide["slide_id"], slide["status"]
        picture = "" if qc is None else f"<td>{_img(qc[sid], 'qc') if sid in qc else '–'}</td>"
        rows.append(
            f'<tr data-slide="{esc(sid)}" data-status="{esc(status)}"><td>{esc(sid)}</td>'
            f'<td class="status {esc(status)}">{esc(status)}</td><td>{esc(slide["backend"] or "–")}</td>'
            f'<td class="num">{slide["n_tiles"]}</td>'
            f'<td class="error">{esc(slide["error"] or "")}</td>{picture}</tr>'
        )
    shown = f", {len(qc)} QC thumbnails" if qc is not None else ""
    summary = (
        f"{totals['slides']} slides: {totals['ok']} ok, {totals['failed']} failed, "
        f"{totals['skipped']} skipped, {totals['tiles']} tiles{shown}"
    )
    return (
        f'<section class="stage" id="stage-{index}"><h3>{esc(section.stage)}</h3><p>{summary}</p>'
        f'<table class="slides" data-stage="{esc(section.stage)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _run_html(index: int, run: RunSection) -> str:
    kind = f" ({esc(run.kind)})" if run.kind else ""
    outputs = ", ".join(
        f'<span class="{"" if present else "missing"}">{esc(file)}{"" if present else " (missing)"}</span>'
        for _, file, present in run.outputs
    )
    parts = [f'<section class="run" id="run-{index}" data-run="{esc(run.name)}">']
    parts.append(f"<h3>{esc(run.name)}{kind}</h3>")
    parts.append(f'<p class="where">{esc(run.uri)}{"<br>outputs: " + outputs if outputs else ""}</p>')
    tables = []
    if run.metrics is not None:
        tables.append(f"<div><h4>metrics.json</h4>{json_table(run.metrics, 'metrics')}</div>")
    if run.probe is not None:
        tables.append(f"<div><h4>probe.json</h4>{json_table(run.probe, 'probe')}</div>")
    parts.append(f'<div class="side">{_figures(run.pictures)}{"".join(tables)}</div></section>')
    return "".join(parts)


def _sweep_html(index: int, sweep: SweepSection) -> str:
    parts = [f'<section class="sweep" id="sweep-{index}" data-sweep="{esc(sweep.name)}">']
    parts.append(f'<h3>{esc(sweep.name)}</h3><p class="where">{esc(sweep.uri)}</p><div class="side">')
    if sweep.header:
        head = "".join(f"<th>{esc(h)}</th>" for h in sweep.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(_cell(c))}</td>" for c in r) + "</tr>" for r in sweep.rows)
        more = f"<p>… {sweep.more_rows} more rows in results.csv</p>" if sweep.more_rows else ""
        parts.append(
            f'<div><h4>results.csv</h4><table class="results"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{more}</div>"
        )
    parts.append(f"{_figures(sweep.pictures)}</div></section>")
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em}h2{border-bottom:1px solid #ccc;margin-top:1.5em}h3{margin:.8em 0 .3em}
h4{margin:.4em 0}table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ddd;padding:.15em .5em;text-align:left;vertical-align:top}
thead th{background:#f2f2f2}td.num{text-align:right}.kv tr.group th{background:#f7f7f7}
td.status.ok{color:#1a6e2e}td.status.failed{color:#b00020;font-weight:bold}
tr[data-status=failed]{background:#fff4f4}td.error{max-width:40em;word-break:break-word}
img.qc{max-height:120px;max-width:240px;display:block}
.side{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.pictures{display:flex;flex-wrap:wrap;gap:.8em}figure{margin:0}
img.picture{max-width:420px;max-height:420px;display:block;border:1px solid #eee}
figcaption,.where,.note{color:#666;font-size:.9em}.missing{color:#b00020}
table.sub th,table.sub td{font-size:.9em}nav a{margin-right:1em}
"""

# After load: how many pictures did not decode (the page's own check that it is whole).
SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (!images[i].complete || images[i].naturalWidth === 0) broken++;
  }
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken));
});
"""


def render(report: Report) -> str:
    """The page: one HTML document with everything inline."""
    counts = {"cohort": len(report.stages), "runs": len(report.runs), "sweeps": len(report.sweeps)}
    nav = [f'<a href="#{kind}">{kind} ({n})</a>' for kind, n in counts.items()]
    body = [
        f'<h1>slidestream report</h1><p class="where">{esc(report.out)} · {esc(report.generated)}</p>',
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="cohort">Cohort</h2>',
        *(_stage_html(i, s) for i, s in enumerate(report.stages)),
        *(["<p>no ledger entries</p>"] if not report.stages else []),
        '<h2 id="runs">Runs</h2>',
        *(_run_html(i, r) for i, r in enumerate(report.runs)),
        *(["<p>no runs</p>"] if not report.runs else []),
        '<h2 id="sweeps">Sweeps</h2>',
        *(_sweep_html(i, s) for i, s in enumerate(report.sweeps)),
        *(["<p>no sweeps</p>"] if not report.sweeps else []),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>slidestream report: {esc(report.out)}</title><style>{STYLE}</style>"
        f"<script>{SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(out: str, output: str | None = None) -> tuple[str, Report]:
    """Gathers OUT, renders the page and writes it to `output` (default OUT/report.html)."""
    report = gather(out)
    target = output or join(out, REPORT_FILE)
    write_bytes_atomic(target, render(report).encode())
    return target, report
