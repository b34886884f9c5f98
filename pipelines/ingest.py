"""`slidestream ingest`: slides → tissue → µm-exact tiles → WebDataset shards, committed per slide.

One Ray Data stream:

    slides to do ──flat_map(plan_slide)──▶ chunks of ≤ max_tiles tile positions per slide
                 ──map(read_chunk)──────▶ each chunk's tiles read once, encoded, written as shard tar(s)
                 ──driver──────────────▶ when all chunks of a slide are in: one ledger commit

Exactly-once at slide granularity: a slide's shards are visible only through its committed ledger entry;
shard names are deterministic, so retried tasks (lost worker or node, killed driver) overwrite rather
than duplicate, and files left by an interrupted run are collected by the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from slidestream.cluster.config import Config, ShardConfig, TilingConfig, TissueConfig
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import filesystem, join, scrub_secrets, write_bytes_atomic
from slidestream.pipelines.formats.choose import detect_backend
from slidestream.pipelines.formats.errors import SlideError, classify
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.reader import open_slide, read_tiles, resize_tile, slide_info
from slidestream.pipelines.shards import Tile, encode_image, shard_stem, write_shards
from slidestream.pipelines.slides import Discovery, SlideRef, discover_slides
from slidestream.pipelines.stream import IngestReport, SlideProgress, commit_slides, no_fusion, windows
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.pipelines.tiling import ReadPlan, grid_positions, read_plan

if TYPE_CHECKING:
    from slidestream.pipelines.embed import EmbedStage
    from slidestream.pipelines.formats.handle import SlideHandle
    from slidestream.pipelines.tissue import TissueMask

log = logging.getLogger(__name__)
INGEST_VERSION = "ingest-1"


# ---------------------------------------------------------------------------------------------- workers


def _chunk_row(slide: dict, chunk: int, n_chunks: int, **values: Any) -> dict:
    """Rows of one schema for good chunks and failed slides alike (Arrow needs consistent columns)."""
    row = {
        **slide,
        "chunk": chunk,
        "n_chunks": n_chunks,
        "xs": [],
        "ys": [],
        "fracs": [],
        "level": 0,
        "read_px": 0,
        "side0": 0.0,
        "mpp": 0.0,
        "width": 0,
        "height": 0,
        "error": "",
        "permanent": True,
        "backend": "",
    }
    row.update(values)
    return row


def plan_slide(
    slide: dict, tiling: TilingConfig, tissue: TissueConfig, shards: ShardConfig, qc_uri: str = ""
) -> list[dict]:
    """Open the slide, find its tissue, lay the tile grid; one row per chunk of tile positions.

    With `qc_uri`, the slide's QC picture (thumbnail, tissue outline, tiles taken; or why it failed) is
    written there as `<slide_id>.png`, drawn from the thumbnail the tissue was found on.
    """
    from slidestream.pipelines.tissue import (
        tissue_mask,  # here: scikit-image/SciPy cost every read worker ~0.5 s
    )

    handle: SlideHandle | None = None
    mask: TissueMask | None = None
    backend = ""
    try:
        try:
            backend = detect_backend(slide["uri"])
            handle = open_slide(slide["uri"], slide["fingerprint"], backend)
        except SlideError as exc:
            raise SlideError(f"cannot open as a slide: {exc.reason}", exc.permanent) from None
        except Exception as exc:
            raise classify(f"cannot open as a slide{f' with {backend}' if backend else ''}", exc) from None
        info = slide_info(handle, slide["mpp_override"] or tiling.mpp_override)
        if info.mpp is None:
            raise SlideError(
                f"no mpp (µm/px) in the slide metadata (vendor {info.vendor or 'unknown'}); "
                "give --mpp-override or an mpp column in the slide list",
            )
        try:
            plan = read_plan(info.mpp, info.level_downsamples, tiling)
        except ValueError as exc:
            raise SlideError(str(exc)) from None
        mask = tissue_mask(handle, info.mpp, tissue)
        xs, ys = grid_positions(info.width, info.height, plan, tiling)
        fracs = mask.fractions(xs, ys, plan.side0)
        keep = (fracs >= tiling.min_tissue_frac) & (fracs > 0)
        if not keep.any():
            raise SlideError(
                f"no tissue found (tissue covers {100 * mask.mask.mean():.2f}% of the thumbnail, "
                f"no tile reaches min_tissue_frac={tiling.min_tissue_frac})",
            )
        xs, ys, fracs = xs[keep], ys[keep], fracs[keep]
    except Exception as exc:  # one bad slide never stops the stream: it becomes a failed record
        error = classify("cannot plan tiles", exc)
        if qc_uri:
            _write_qc(qc_uri, slide["slide_id"], handle, mask, np.zeros((0, 4)), error.reason)
        return [_chunk_row(slide, -1, 0, error=error.reason, permanent=error.permanent, backend=backend)]
    if qc_uri:
        boxes0 = np.stack([xs, ys, xs + plan.side0, ys + plan.side0], axis=1)
        _write_qc(qc_uri, slide["slide_id"], handle, mask, boxes0, "")
    n_chunks = int(np.ceil(len(xs) / shards.max_tiles))
    rows = []
    for chunk in range(n_chunks):
        part = slice(chunk * shards.max_tiles, (chunk + 1) * shards.max_tiles)
        rows.append(
            _chunk_row(
                slide,
                chunk,
                n_chunks,
                xs=xs[part].tolist(),
                ys=ys[part].tolist(),
                fracs=np.round(fracs[part], 4).tolist(),
                level=plan.level,
                read_px=plan.read_px,
                side0=plan.side0,
                mpp=info.mpp,
                width=info.width,
                height=info.height,
                backend=backend,
            )
        )
    return rows


def _write_qc(
    qc_uri: str,
    slide_id: str,
    handle: SlideHandle | None,
    mask: TissueMask | None,
    boxes0: np.ndarray,
    error: str,
) -> None:
    """Write the slide's QC picture (`boxes0`: the tiles taken, (x0, y0, x1, y1) in level-0 pixels); a
    failure to draw or write it is logged and never fails the slide.

    With nothing to draw (the slide did not open), a picture of an earlier version of the slide is removed.
    """
    from slidestream.pipelines.qc import MAX_PX, render_qc
    from slidestream.pipelines.tissue import low_resolution_rgb

    uri = join(qc_uri, f"{slide_id}.png")
    try:
        if mask is not None and mask.rgb is not None:
            rgb, downsample = mask.rgb, mask.downsample
        elif handle is not None:  # failed before its tissue was looked for (e.g. no mpp): the slide as is
            # With mpp0 = 1 the "mask mpp" asked for is a plain level-0 downsample.
            rgb, downsample = low_resolution_rgb(handle, 1.0, max(handle.dimensions) / MAX_PX)
        else:
            fs, path = filesystem(uri)
            if fs.exists(path):
                fs.rm_file(path)
            return
        caption = f"{slide_id} · {len(boxes0)} tiles"
        if mask is not None:
            caption += f" · tissue {100 * mask.mask.mean():.1f}% of the thumbnail"
        if error:
            caption += f"\nfailed: {error}"
        info = {"slide_id": slide_id, "n_tiles": str(len(boxes0)), "status": "failed" if error else "ok"}
        png = render_qc(rgb, None if mask is None else mask.mask, boxes0 / downsample, caption, info)
        write_bytes_atomic(uri, png)
    except Exception as exc:
        log.warning("slide %s: QC picture not written: %s", slide_id, scrub_secrets(repr(exc)))


def _tiles_of_chunk(
    row: dict, tiling: TilingConfig, shards: ShardConfig, keep_px: int, kept: list[np.ndarray]
) -> Iterator[Tile]:
    """Tiles of a chunk, encoded for the shards; with `keep_px`, each is also kept (resized) in `kept`."""
    handle = open_slide(row["uri"], row["fingerprint"], row["backend"] or None)
    level = row["level"]
    plan = ReadPlan(
        level, float(handle.level_downsamples[level]), row["read_px"], tiling.tile_px, row["side0"]
    )
    pixels = read_tiles(handle, row["xs"], row["ys"], plan)
    for x, y, frac, tile in zip(row["xs"], row["ys"], row["fracs"], pixels, strict=True):
        if keep_px:
            kept.append(tile if keep_px == tile.shape[0] else resize_tile(tile, keep_px))
        meta = {
            "slide_id": row["slide_id"],
            "x": int(x),
            "y": int(y),
            "mpp": tiling.mpp,
            "tile_px": tiling.tile_px,
            "tissue_frac": float(frac),
        }
        yield Tile(row["slide_id"], int(x), int(y), encode_image(tile, shards), meta)


def read_chunk(
    row: dict, tiling: TilingConfig, shards: ShardConfig, stage_uri: str, keep_px: int = 0
) -> dict:
    """Read one chunk's tiles from the slide and write them as shard tar(s); returns what was written.

    With `keep_px` > 0 the row also carries the tiles as `pixels` (n, keep_px, keep_px, 3) uint8, so a
    later stage (the embedding actors) works from this same read.
    """
    result = {
        "slide_id": row["slide_id"],
        "fingerprint": row["fingerprint"],
        "chunk": row["chunk"],
        "n_chunks": row["n_chunks"],
        "xs": row["xs"],
        "ys": row["ys"],
        "shards": [],
        "shard_bytes": 0,
        "n_tiles": len(row["xs"]),
        "node_id": ray.get_runtime_context().get_node_id(),
        "error": row["error"],
        "permanent": row["permanent"],
        "mpp": row["mpp"],
        "width": row["width"],
        "height": row["height"],
        "level": row["level"],
        "backend": row["backend"],
    }
    kept: list[np.ndarray] = []
    if not row["error"]:
        try:
            stem = shard_stem(row["slide_id"], row["fingerprint"], row["chunk"])
            tiles = _tiles_of_chunk(row, tiling, shards, keep_px, kept)
            written = write_shards(tiles, stage_uri, stem, shards)
            result["shards"] = [name for name, _ in written]
            result["shard_bytes"] = sum(size for _, size in written)
        except Exception as exc:
            error = classify("cannot read tiles", exc)
            result.update(error=error.reason, permanent=error.permanent, n_tiles=0)
            kept = []
    if keep_px:
        result["pixels"] = np.stack(kept) if kept else np.zeros((0, keep_px, keep_px, 3), np.uint8)
    return result


# ----------------------------------------------------------------------------------------------- driver


def planned_chunks(slides: str, config: Config) -> Iterator[tuple[SlideRef, Any, dict, ReadPlan]]:
    """Serial planning in this process (baselines and checks): (slide, open handle, chunk, read plan)."""
    for slide in discover_slides(slides, config.ingest.slide_extensions).slides:
        item = {
            "slide_id": slide.slide_id,
            "uri": slide.uri,
            "fingerprint": slide.fingerprint,
            "mpp_override": slide.mpp_override or 0.0,
        }
        handle = open_slide(slide.uri, slide.fingerprint)
        for chunk in plan_slide(item, config.tiling, config.tissue, config.shards):
            level = chunk["level"]
            downsample = float(handle.level_downsamples[level])
            yield (
                slide,
                handle,
                chunk,
                ReadPlan(level, downsample, chunk["read_px"], config.tiling.tile_px, chunk["side0"]),
            )


def _entry(
    stage: str, slide: SlideRef, progress: SlideProgress | None, error: str = "", permanent: bool = True
) -> LedgerEntry:
    results = sorted(progress.results, key=lambda r: r["chunk"]) if progress else []
    errors = [r for r in results if r["error"]]
    if errors and not error:
        error, permanent = errors[0]["error"], all(r["permanent"] for r in errors)
    first = results[0] if results else {}
    return LedgerEntry(
        stage=stage,
        slide_id=slide.slide_id,
        uri=slide.uri,
        size=slide.size,
        etag_or_mtime=slide.fingerprint,
        status="failed" if error else "ok",
        error=scrub_secrets(error) if error else None,
        permanent=permanent,
        n_tiles=0 if error else sum(r["n_tiles"] for r in results),
        mpp=first.get("mpp") or None,
        backend=first.get("backend") or None,
        shards=[] if error else [name for r in results for name in r["shards"]],
        versions={"ingest": INGEST_VERSION},
        extra={
            "width": first.get("width"),
            "height": first.get("height"),
            "level": first.get("level"),
            "nodes": sorted({r["node_id"] for r in results}),
        },
    )


def _needs_work(slide: SlideRef, previous: LedgerEntry | None) -> bool:
    if previous is None or previous.etag_or_mtime != slide.fingerprint:
        return True
    return previous.status == "failed" and not previous.permanent


def slides_to_do(
    slides: list[SlideRef], state: dict[tuple[str, str], LedgerEntry], stages: list[str]
) -> list[SlideRef]:
    """The ledger diff: slides that are new, changed, or failed transiently in any of `stages`."""
    return [s for s in slides if any(_needs_work(s, state.get((st, s.slide_id))) for st in stages)]


def collect_garbage(ledger: Ledger, stage: str, stage_uri: str) -> int:
    """Delete shard files no committed entry references (left by interrupted runs or superseded slides)."""
    fs, root = filesystem(stage_uri)
    if not fs.exists(root):
        return 0
    referenced = {name for entry in ledger.entries(stage) for name in entry.shards}
    orphans = [
        p
        for p in fs.ls(root, detail=False)
        if p.rsplit("/", 1)[-1].startswith("shard-") and p.rsplit("/", 1)[-1] not in referenced
    ]
    for path in orphans:
        fs.rm_file(path)
    return len(orphans)


def run_ingest(
    slides: str,
    out: str,
    config: Config,
    embed: EmbedStage | None = None,
    progress_callback: Any = None,
    discovery: Discovery | None = None,
) -> IngestReport:
    """Ingest every new or changed slide under `slides` into `out`; returns what happened.

    With `embed`, the same stream also feeds the embedding actors: each tile is read once, and a slide's
    shards and feature bag are committed together. `discovery` replaces listing `slides` (a caller that
    has already chosen the slides, e.g. `watch`).
    """
    started = time.monotonic()
    stage = tiles_stage(config.tiling)
    stage_uri = join(out, stage)
    report = IngestReport(stage=stage, out=out)
    if discovery is None:
        discovery = discover_slides(slides, config.ingest.slide_extensions)
    report.discovered = len(discovery.slides) + len(discovery.missing)
    report.ignored_files = len(discovery.ignored)

    ledger = Ledger(out)
    state = ledger.state()
    write_bytes_atomic(join(stage_uri, "config.yaml"), config.to_yaml().encode())
    collect_garbage(ledger, stage, stage_uri)
    if embed is not None:
        embed.prepare(out, ledger)

    missing = [
        _entry(stage, SlideRef(sid, uri, -1, "missing"), None, f"slide not found: {uri}", permanent=False)
        for sid, uri in discovery.missing
        if (previous := state.get((stage, sid))) is None or previous.etag_or_mtime != "missing"
    ]
    ledger.commit(missing)
    report.failed.update({e.slide_id: e.error or "" for e in missing})

    stages = [stage] if embed is None else [stage, embed.stage]
    todo = slides_to_do(discovery.slides, state, stages)
    report.skipped_unchanged = len(discovery.slides) - len(todo)
    if todo:
        ensure_ray(config.ray)
        qc_uri = join(out, "qc", stage.rsplit("/", 1)[-1])
        _stream(todo, stage, stage_uri, qc_uri, config, ledger, report, embed, progress_callback)
        collect_garbage(ledger, stage, stage_uri)
        if embed is not None:
            embed.prepare(out, ledger)
    ledger.compact()
    report.seconds = time.monotonic() - started
    return report


def _stream(
    todo: list[SlideRef],
    stage: str,
    stage_uri: str,
    qc_uri: str,
    config: Config,
    ledger: Ledger,
    report: IngestReport,
    embed: EmbedStage | None,
    progress_callback: Any,
) -> None:
    read_kwargs = {"tiling": config.tiling, "shards": config.shards, "stage_uri": stage_uri}
    feeding = (lambda fn: fn) if embed is None else embed.feeding
    if embed is not None:
        read_kwargs["keep_px"] = embed.feed_px()

    def dataset_of(window: Sequence[SlideRef]) -> ray.data.Dataset:
        items = [
            {
                "slide_id": s.slide_id,
                "uri": s.uri,
                "fingerprint": s.fingerprint,
                "mpp_override": s.mpp_override or 0.0,
            }
            for s in window
        ]
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .flat_map(
                feeding(plan_slide),
                fn_kwargs={
                    "tiling": config.tiling,
                    "tissue": config.tissue,
                    "shards": config.shards,
                    "qc_uri": qc_uri,
                },
                num_cpus=config.ingest.plan_cpus,
            )
            .map(
                feeding(read_chunk),
                fn_kwargs=read_kwargs,
                num_cpus=config.ingest.read_cpus,
                ray_remote_args_fn=None if embed is None else no_fusion,
            )
        )
        if embed is not None:
            dataset = embed.attach(dataset)
        # One chunk per block: otherwise all chunks of a slide travel in one block and are read by one task.
        dataset.context.target_max_block_size = 1
        return dataset

    def entries_of(progress: SlideProgress) -> list[LedgerEntry]:
        entry = _entry(stage, progress.slide, progress)
        report.nodes.update(entry.extra["nodes"])
        if embed is None:
            return [entry]
        return [entry, embed.complete(progress.slide, progress.results, entry)]  # visible together

    by_id = {s.slide_id: SlideProgress(s) for s in todo}
    datasets = (dataset_of(window) for window in windows(todo, config.ingest.window_slides))
    commit_slides(datasets, by_id, ledger, report, entries_of, progress_callback)
    for progress in by_id.values():  # cannot happen unless Ray dropped rows: never commit a partial slide
        report.failed[progress.slide.slide_id] = "incomplete: not all chunks came back"
