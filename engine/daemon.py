"""Assembling a projection daemon from settings, an application and open resources."""

from __future__ import annotations

from engine.application import Application
from engine.generations import GenerationFence
from engine.lane import Lane
from engine.lane_state import LaneStateRecorder
from engine.postgres.checkpoints import CheckpointStore
from engine.postgres.deadletters import DeadLetterStore
from engine.projection import RebuildableStore
from engine.resources import Resources
from engine.runner import ProjectionRunner


def build_runner(
    application: Application,
    resources: Resources,
    *,
    dead_letters: DeadLetterStore | None = None,
) -> ProjectionRunner:
    """A runner with one lane per projection of ``application``.

    ``dead_letters`` defaults to the store in ``resources``' database (a test
    passes its own to inject faults). The runner records its lanes' state for
    ``engine status`` in that database too (:mod:`engine.lane_state`).
    """
    settings = resources.settings
    dead_letters = dead_letters or DeadLetterStore(resources.pool)
    checkpoints = CheckpointStore(resources.pool)
    lanes = [
        Lane(
            projection,
            store,
            settings=settings.runner,
            dead_letters=dead_letters,
            checkpoints=checkpoints,
            fence=GenerationFence(settings.postgres, projection.name)
            if isinstance(store, RebuildableStore)
            else None,
        )
        for projection, store in application.projections(resources)
    ]
    return ProjectionRunner(
        settings.kafka,
        settings.runner,
        application.registry,
        lanes,
        dead_letters=dead_letters,
        checkpoints=checkpoints,
        observer=LaneStateRecorder(resources.pool, settings.runner),
    )
