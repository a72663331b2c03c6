"""Whether the outbox relay is stalled, from what the outbox records.

The relay is **stalled** when events wait in the outbox and it has published
nothing for ``relay.stalled_after_s``: precisely, when the oldest unpublished
event occurred longer ago than the limit *and* the newest ``published_at``
(the relay marks rows published as Kafka acknowledges them) is older than the
limit too, or there is none. Both are read in one cheap statement
(:func:`engine.postgres.outbox.pending_backlog`); the ages come from
Postgres' clock (the oldest event's ``occurred_at`` is the writer's clock,
which on one host or NTP-synced hosts is the same to within the precision
that matters against a limit of seconds).

Why it catches a stall: a relay that is frozen (SIGSTOP, a VM pause), hung,
cut off from Kafka, not running at all, or running but refusing to publish (a
topic with the wrong partition count) marks nothing, so once an event has
waited longer than the limit, the last publish is older than the limit too.

Why it does not fire on a healthy relay, busy or idle: a relay working through
a large backlog whose oldest event is minutes old marks rows every batch, so
its last publish is recent; an idle relay whose last publish was an hour ago
gets a new event and publishes it within milliseconds (NOTIFY), long before
that event has waited the limit. A relay that restarts publishes within its
start-up plus one batch. Two corners, both brief: an event whose command held
its transaction open a long time commits with an old ``occurred_at`` and is
counted as waiting from then until the relay publishes it (milliseconds); and
with ``relay.retention_hours`` at 0 a purge can delete every published row,
so "no publish kept" stands for "none since the purge", which is true.

The reason names the leader from ``engine_relay_lease`` and how long ago it
renewed: a lease renewed recently means a live relay that cannot publish
(Kafka?), an old one a relay that is gone or frozen (a standby takes over
after ``relay.leader_timeout_s``).
"""

from __future__ import annotations

from engine.postgres.outbox import Backlog


def relay_stall(backlog: Backlog, stalled_after_s: float) -> str | None:
    """Why the relay is stalled, or None when it is not (see the module docstring)."""
    waited = backlog.waited_s
    if backlog.count == 0 or waited is None or waited <= stalled_after_s:
        return None
    last = backlog.last_published_s
    if last is not None and last <= stalled_after_s:
        return None
    published = (
        "no publish is on record" if last is None else f"nothing was published for {last:.0f}s"
    )
    return (
        f"{backlog.count} events wait in the outbox (the oldest {waited:.0f}s) and {published}"
        f" (over {stalled_after_s:g}s); {_leader(backlog)}"
    )


def _leader(backlog: Backlog) -> str:
    if backlog.leader is None or backlog.lease_age_s is None:
        return "no relay has ever held the leader lease: is `engine relay` running?"
    return (
        f"the leader relay {backlog.leader} last renewed its lease {backlog.lease_age_s:.0f}s ago"
    )
