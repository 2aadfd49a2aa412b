"""Reads every Parquet object of a bucket back through the S3 protocol with
pyarrow (independently of tickmesh's reader) and compares the bars' (ticker,
timestamp) rows with an expected set.

usage: readback_parquet.py ENDPOINT ACCESS_KEY SECRET_KEY BUCKET EXPECTED

EXPECTED holds one `ticker,t_microseconds` per line. Prints one JSON
object: files, rows, distinct, duplicates, missing, extra, schema.
"""
import json
import sys
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def main():
    endpoint, access, secret, bucket, expected_path = sys.argv[1:6]
    u = urlparse(endpoint)
    fs = pafs.S3FileSystem(
        access_key=access,
        secret_key=secret,
        endpoint_override=u.netloc,
        scheme=u.scheme,
        region="us-east-1",
    )
    infos = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    seen = set()
    rows = 0
    duplicates = 0
    schema = None
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=None)
        schema = schema or {f.name: str(f.type) for f in t.schema}
        tickers = t.column("ticker").to_pylist()
        ts = t.column("t").cast("int64").to_pylist()
        for k in zip(tickers, ts):
            rows += 1
            if k in seen:
                duplicates += 1
            seen.add(k)
    expected = set()
    with open(expected_path) as f:
        for line in f:
            ticker, t = line.strip().split(",")
            expected.add((ticker, int(t)))
    missing = expected - seen
    extra = seen - expected
    print(json.dumps({
        "files": len(files),
        "rows": rows,
        "distinct": len(seen),
        "duplicates": duplicates,
        "missing": len(missing),
        "extra": len(extra),
        "missing_sample": sorted(missing)[:5],
        "schema": schema,
    }))


if __name__ == "__main__":
    main()
