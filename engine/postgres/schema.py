"""The engine's own tables, in the order they are created."""

from __future__ import annotations

from engine.generations import GENERATION_MIGRATIONS
from engine.lane_state import LANE_STATE_MIGRATIONS
from engine.postgres.checkpoints import PROGRESS_MIGRATIONS
from engine.postgres.deadletters import DEAD_LETTER_MIGRATIONS
from engine.postgres.outbox import OUTBOX_MIGRATIONS
from engine.stores.postgres import PROJECTION_MIGRATIONS

ENGINE_MIGRATIONS = (
    *OUTBOX_MIGRATIONS,
    *PROJECTION_MIGRATIONS,
    *DEAD_LETTER_MIGRATIONS,
    *GENERATION_MIGRATIONS,
    *PROGRESS_MIGRATIONS,
    *LANE_STATE_MIGRATIONS,
)
