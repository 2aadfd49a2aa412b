"""Publishes messages with confluent-kafka and its default batching (the way
the original stack's producers did), for the ingest crash and gap tests.

usage: kafka_produce.py BROKERS TOPIC FILE [--rate MSGS_PER_S] [--burst N] [--flush-every N]

--rate paces the messages in bursts of --burst (default 1): a burst goes
out back to back, so the producer batches it.

FILE holds one message per line: `key<TAB>payload`. Prints the number of
messages delivered, and exits non-zero if any delivery failed.
"""
import sys
import time

from confluent_kafka import Producer


def main():
    brokers, topic, path = sys.argv[1:4]
    rate = None
    flush_every = None
    burst = 1
    args = sys.argv[4:]
    while args:
        flag, value = args[0], args[1]
        args = args[2:]
        if flag == "--rate":
            rate = float(value)
        elif flag == "--burst":
            burst = int(value)
        elif flag == "--flush-every":
            flush_every = int(value)
        else:
            sys.exit(f"unknown flag {flag}")
    failed = []
    delivered = [0]

    def on_delivery(err, _msg):
        if err is not None:
            failed.append(str(err))
        else:
            delivered[0] += 1

    # Defaults otherwise: linger, batch.size and compression as shipped.
    p = Producer({"bootstrap.servers": brokers, "message.max.bytes": 10_000_000})
    start = time.monotonic()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            key, payload = line.rstrip(b"\n").split(b"\t", 1)
            while True:
                try:
                    p.produce(topic, key=key, value=payload, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.1)
            n += 1
            p.poll(0)
            if flush_every and n % flush_every == 0:
                p.flush()
            if rate and n % burst == 0:
                ahead = n / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    p.flush(60)
    if failed:
        sys.exit(f"{len(failed)} deliveries failed, first: {failed[0]}")
    print(delivered[0])


if __name__ == "__main__":
    main()
