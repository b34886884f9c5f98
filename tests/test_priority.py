"""`at_idle_priority`: the work runs at idle scheduling priority in its own thread; the caller's thread
keeps its priority (a Ray worker could not take it back), and results and errors come through."""

from __future__ import annotations

import os
import threading

import pytest

from slidestream.pipelines.priority import at_idle_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


def _where_it_ran(label: str) -> tuple[str, int, int]:
    return label, threading.get_native_id(), os.sched_getscheduler(0)


def test_the_work_runs_at_idle_priority_and_the_caller_keeps_its_own() -> None:
    before = os.sched_getscheduler(0)
    label, thread, policy = at_idle_priority(_where_it_ran)("chunk 3")
    assert label == "chunk 3"
    assert policy == os.SCHED_IDLE
    assert thread != threading.get_native_id()
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER


def _fails(name: str) -> None:
    raise ValueError(f"slide {name}: cannot read tile")


def test_errors_reach_the_caller_unchanged() -> None:
    with pytest.raises(ValueError, match="slide s1: cannot read tile"):
        at_idle_priority(_fails)("s1")


def test_the_wrapper_keeps_the_name_ray_data_shows() -> None:
    assert at_idle_priority(_where_it_ran).__name__ == "_where_it_ran"


def test_the_embedding_stage_feeds_its_actors_at_idle_priority_unless_configured_not_to() -> None:
    from slidestream.cluster.config import load_config
    from slidestream.pipelines.embed import EmbedStage

    def stage(*overrides: str) -> EmbedStage:
        config = load_config(None, list(overrides))
        return EmbedStage("resnet18_trunc", "random", config.tiling, config.embed)

    assert stage().feeding(_where_it_ran)("chunk 0")[2] == os.SCHED_IDLE
    assert stage("embed.feed_at_idle_priority=false").feeding(_where_it_ran) is _where_it_ran
