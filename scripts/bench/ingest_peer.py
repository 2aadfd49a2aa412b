"""The Python peer of scripts/bench/ingest.sh: a consumer built the way the
original stack built `consumer_h_stockdata` (confluent-kafka + pandas +
pyarrow + boto3), on the same topic, broker and S3 server as tickmesh.

Each message (one ticker-week of 1-minute bars) is handled on its own: JSON
to a pandas DataFrame, GET the ticker-week's Parquet object if it exists,
concatenate and drop duplicate timestamps, write Parquet with pyarrow and
PUT it back. Offsets are auto-committed (confluent-kafka's default), as the
original did. The object keys are tickmesh's
(`{T}/{yyyy}/{mm}/{T}_{isoyear}-W{ww}.parquet`).

usage: ingest_peer.py BROKERS TOPIC GROUP ENDPOINT ACCESS_KEY SECRET_KEY BUCKET RECORDS

Prints one JSON line: records, bars, objects_written, seconds, bars_per_s,
peak_rss_bytes, and start_rss_bytes (the resident set once the modules are
imported, before the first message).
"""
import io
import json
import resource
import sys
import time

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config
from confluent_kafka import Consumer


def object_key(ticker, first):
    iso = first.isocalendar()
    monday = (first - pd.Timedelta(days=first.weekday())).normalize()
    return f"{ticker}/{monday.year:04d}/{monday.month:02d}/{ticker}_{iso[0]:04d}-W{iso[1]:02d}.parquet"


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    start_rss = rss_bytes()
    brokers, topic, group, endpoint, access, secret, bucket, records = sys.argv[1:9]
    records = int(records)
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 5}),
    )
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "fetch.message.max.bytes": 20000000,
            # As tickmesh's consumer: tansu 0.6.0 holds every fetch this long.
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.subscribe([topic])
    started = time.monotonic()
    seen = bars = objects = 0
    last_report = started
    while seen < records:
        msg = consumer.poll(1.0)
        if msg is None:
            if time.monotonic() - started > 3600:
                sys.exit(f"{seen} of {records} records after an hour")
            continue
        if msg.error():
            print(f"kafka: {msg.error()}", file=sys.stderr)
            continue
        seen += 1
        m = json.loads(msg.value())
        df = pd.DataFrame(m["bars"])
        if df.empty:
            continue
        df["t"] = pd.to_datetime(df["t"], utc=True)
        df.insert(0, "ticker", m["ticker"])
        key = object_key(m["ticker"], df["t"].iloc[0])
        try:
            old = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            df = pd.concat([pq.read_table(io.BytesIO(old)).to_pandas(), df])
            df = df.drop_duplicates(subset="t", keep="last").sort_values("t")
        except s3.exceptions.NoSuchKey:
            pass
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="snappy")
        s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        objects += 1
        bars += len(m["bars"])
        now = time.monotonic()
        if now - last_report >= 10:
            print(f"peer: {seen}/{records} records, {bars} bars, {bars / (now - started):.0f} bars/s", file=sys.stderr)
            last_report = now
    secs = time.monotonic() - started
    consumer.close()
    print(
        json.dumps(
            {
                "records": seen,
                "bars": bars,
                "objects_written": objects,
                "seconds": secs,
                "bars_per_s": bars / secs,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "start_rss_bytes": start_rss,
            }
        )
    )


if __name__ == "__main__":
    main()
