"""``python -m bench.decoding``: the daemon's decoding alone, in messages per second.

Builds ``--events`` realistic Kafka records in memory (the orders stream of
:mod:`bench.data`, encoded by the engine's codec, spread over partitions by
aggregate as the relay would) and decodes them with the daemon's
:class:`~engine.decoding.Decoder`, poll by poll, gap checks on. No broker, no
store: a run takes seconds, so a change to decoding can be measured before and
after. ``--profile`` prints cProfile's top functions by own time instead.

``--gc-threshold N`` sets the collector's first threshold (Python's default is
700) to show how much of decoding's CPU is the garbage collector walking the
objects of the batches in flight: about half, here.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from bench.data import EventStream
from engine import RunnerSettings, partition_for
from engine.codec import encode
from engine.decoding import Decoder
from projections.orders import APP

TOPIC = "bench-decoding"
Poll = Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]


def polls(events: int, batch: int, partitions: int = 12) -> list[Poll]:
    """The stream as the consumer would hand it over: polls of ``batch`` records."""
    offsets = [0] * partitions
    result: list[Poll] = []
    current: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
    size = 0
    for item in EventStream(events):
        record = encode(item.envelope)
        partition = partition_for(item.envelope.aggregate_id, partitions)
        message = ConsumerRecord(
            TOPIC,
            partition,
            offsets[partition],
            0,
            0,
            record.key,
            record.value,
            None,
            len(record.key),
            len(record.value),
            record.headers,
        )
        offsets[partition] += 1
        current.setdefault(TopicPartition(TOPIC, partition), []).append(message)
        size += 1
        if size == batch:
            result.append(current)
            current, size = {}, 0
    if current:
        result.append(current)
    return result


def decode_all(decoder: Decoder, stream: list[Poll]) -> int:
    decoded = 0
    for poll in stream:
        result = decoder.decode(poll, check_gaps=True)
        if result.poison:
            raise RuntimeError(f"a realistic message is poison: {result.poison[0].error}")
        decoded += len(result.batch)
    return decoded


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decoding", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many passes")
    parser.add_argument("--profile", action="store_true", help="cProfile one pass instead")
    parser.add_argument("--gc-threshold", type=int, help="gc.set_threshold(N) (default 700)")
    args = parser.parse_args(argv)
    if args.gc_threshold is not None:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])

    stream = polls(args.events, args.batch)
    dead_letters: Any = None  # decoding never records: that is the runner's next step

    def fresh() -> Decoder:
        return Decoder(APP.registry, dead_letters, RunnerSettings())

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(decode_all, fresh(), stream)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return
    best = float("inf")
    for _ in range(args.rounds):
        decoder = fresh()  # a fresh gap memory, as a daemon starting on the topic
        started = time.process_time()  # CPU, what issue 12 counts; less noisy than the wall
        decoded = decode_all(decoder, stream)
        best = min(best, time.process_time() - started)
    print(
        f"decoded {decoded:,} messages in {best:.3f} s of CPU (best of {args.rounds}): "
        f"{decoded / best:,.0f} messages/s, {best / decoded * 1e6:.1f} us each"
    )


if __name__ == "__main__":
    main()
