"""Reads Parquet files of the three sources with pyarrow and DuckDB and
checks them against the schema table in README.md (between the
`<!-- parquet-schema:begin -->` and `<!-- parquet-schema:end -->` markers).

usage: check_parquet_schema.py README.md bars=FILE macro=FILE company=FILE

For each file: the column names, order and types as pyarrow and DuckDB see
them, pyarrow's nullability, and that both tools read the same number of
rows and the same values. Prints one line per source; exits 1 on the first
mismatch, naming it.
"""

import math
import re
import sys

import duckdb
import pyarrow.parquet as pq


def readme_schema(path):
    text = open(path, encoding="utf-8").read()
    m = re.search(r"<!-- parquet-schema:begin -->(.*?)<!-- parquet-schema:end -->", text, re.S)
    if not m:
        sys.exit(f"{path}: no parquet-schema table")
    schema = {}
    for line in m.group(1).splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("source", "") or set(cells[0]) <= set("-"):
            continue
        source, column, arrow, duck, nullable = cells
        schema.setdefault(source, []).append((column, arrow, duck, nullable == "yes"))
    return schema


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def check(source, path, expected):
    def fail(msg):
        sys.exit(f"{source} ({path}): {msg}")

    table = pq.read_table(path)
    got = [(f.name, str(f.type), f.nullable) for f in table.schema]
    want = [(c, a, n) for c, a, _, n in expected]
    if got != want:
        fail(f"pyarrow sees {got}, the README says {want}")
    con = duckdb.connect()
    desc = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()
    got = [(r[0], r[1]) for r in desc]
    want = [(c, d) for c, _, d, _ in expected]
    if got != want:
        fail(f"DuckDB sees {got}, the README says {want}")
    # Zoned timestamps as microseconds since the epoch (fetching them as
    # datetimes would need pytz).
    cols = ", ".join(
        f'epoch_us("{c}")' if d == "TIMESTAMP WITH TIME ZONE" else f'"{c}"' for c, _, d, _ in expected
    )
    rows = con.execute(f"SELECT {cols} FROM read_parquet('{path}')").fetchall()
    if len(rows) != table.num_rows or not rows:
        fail(f"DuckDB read {len(rows)} rows, pyarrow {table.num_rows}")
    py = table.to_pylist()
    for i, (a, b) in enumerate(zip(py, rows)):
        for j, (c, *_rest) in enumerate(expected):
            x, y = a[c], b[j]
            if expected[j][2] == "TIMESTAMP WITH TIME ZONE":
                x = round(x.timestamp() * 1_000_000)
            if not same(x, y):
                fail(f"row {i} column {c}: pyarrow {x!r}, DuckDB {y!r}")
    print(f"{source}: {len(expected)} columns as documented, {len(rows)} rows equal in pyarrow and DuckDB")


def main():
    readme = sys.argv[1]
    schema = readme_schema(readme)
    files = dict(a.split("=", 1) for a in sys.argv[2:])
    if set(files) != set(schema):
        sys.exit(f"files for {sorted(files)}, the README documents {sorted(schema)}")
    for source, path in files.items():
        check(source, path, schema[source])


if __name__ == "__main__":
    main()
