"""Scoring slides as `slidestream watch` commits them: every slide version once, crash or not.

Predictions are appended as one Parquet part per call, `OUTPUT/predictions/part-<ns>.parquet` with the
columns of `predict_table` plus `slide_version` (the slide fingerprint the bag was made from); heatmaps go
to `OUTPUT/heatmaps/<slide_id>.png`. What was scored is read back from the parts at start, so a watcher
killed between a commit and its scoring scores the slide after its restart, and a scored slide is not
scored again (a changed slide is: its version differs). Read all parts as one table:
`pyarrow.parquet.read_table(OUTPUT/predictions)`.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from slidestream.cluster.storage import filesystem, join
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.mil.predict import load_run_models, predict_table, write_table

VERSION_COLUMN = "slide_version"


class NewSlideScorer:
    """`scorer({slide_id: version})` scores the bags not scored yet; returns how many are scored in all."""

    def __init__(self, run_dir: str, features: str, output: str, dim: int | None = None) -> None:
        plan, _ = load_run_models(run_dir)  # a wrong or unfinished run is an error before watching starts
        if dim is not None and dim != plan["dim"]:
            raise TrainDataError(
                f"run {run_dir} was trained on {plan['dim']}-d features, but the bags in {features} "
                f"are {dim}-d (use the run's encoder)"
            )
        self.run_dir, self.features = run_dir, features
        self.predictions = join(output, "predictions")
        self.heatmaps = join(output, "heatmaps")
        self.done = self._scored()

    def _scored(self) -> set[tuple[str, str]]:
        fs, root = filesystem(self.predictions)
        if not fs.exists(root):
            return set()
        done: set[tuple[str, str]] = set()
        for path in fs.find(root):
            if path.rsplit("/", 1)[-1].startswith("part-") and path.endswith(".parquet"):
                with fs.open(path, "rb") as handle:
                    table = pq.read_table(handle, columns=["slide_id", VERSION_COLUMN])
                versions = table[VERSION_COLUMN].to_pylist()
                done.update(zip(table["slide_id"].to_pylist(), versions, strict=True))
        return done

    def __call__(self, bags: dict[str, str]) -> int:
        todo = sorted(slide_id for slide_id, version in bags.items() if (slide_id, version) not in self.done)
        if todo:
            table, _, _ = predict_table(
                self.run_dir, self.features, slide_ids=todo, heatmaps_dir=self.heatmaps
            )
            table = table.append_column(VERSION_COLUMN, pa.array([bags[s] for s in todo], pa.string()))
            write_table(join(self.predictions, f"part-{time.time_ns():020d}.parquet"), table)
            self.done.update((s, bags[s]) for s in todo)
        return len(self.done)
