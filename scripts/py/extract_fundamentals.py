#!/usr/bin/env python3
"""Build data/sample/fundamentals.csv from the SEC company-facts fixtures shipped in the
edgar-ratios 2.0.0 source distribution on PyPI (tests/fixtures/{aapl,msft,googl}.json).

Standard library only. The fixtures are read straight out of the downloaded sdist tarball:

    python3 -m pip download --no-deps --no-binary :all: edgar-ratios==2.0.0 -d /tmp/fund_search
    python3 scripts/py/extract_fundamentals.py /tmp/fund_search/edgar_ratios-2.0.0.tar.gz \
        -o data/sample/fundamentals.csv

Rule (see data/sample/fundamentals.SOURCE.md): one row per fiscal year, every value in a row taken
from the company's original 10-K for that fiscal year ("as first reported"), never from a later
filing's comparative column and never estimated. A cell is left empty when that 10-K has no fact
for the column in the fixture.
"""

import argparse
import csv
import hashlib
import io
import json
import sys
import tarfile
from datetime import date
from decimal import Decimal
from pathlib import Path

PACKAGE = "edgar-ratios"
VERSION = "2.0.0"
SDIST_SHA256 = "d66d566a37c3898491e913bf5dc41904b98e0adfc07d208a5dcbd0359e932678"
PREFIX = f"edgar_ratios-{VERSION}/tests/fixtures/"
TICKERS_MEMBER = PREFIX + "company_tickers.json"

# Output symbol -> fixture file in the sdist. GOOG is Alphabet's class C ticker; the package's own
# company_tickers.json maps both GOOG and GOOGL to CIK 1652044, which is the CIK inside googl.json
# (checked below), so the company-level figures are the same for either ticker.
FIXTURES = {"AAPL": "aapl.json", "MSFT": "msft.json", "GOOG": "googl.json",
            "GOOGL": "googl.json", "NVDA": "nvda.json", "JPM": "jpm.json"}
DEFAULT_SYMBOLS = ["AAPL", "MSFT", "GOOG"]

HEADER = ["symbol", "calendarYear", "date", "fillingDate", "revenue", "netIncome", "eps", "totalAssets",
          "totalLiabilities", "totalEquity", "operatingCashFlow", "sharesOutstanding"]

FLOW, INSTANT = "flow", "instant"
# column -> (kind, unit, us-gaap concepts in order of preference); the first concept that the
# fiscal year's original 10-K reports wins (same preference order edgar-ratios itself uses).
CONCEPTS = {
    "revenue": (FLOW, "USD", ["Revenues", "RevenueFromContractWithCustomerExcludingAssessedTax",
                              "RevenueFromContractWithCustomerIncludingAssessedTax", "SalesRevenueNet"]),
    "netIncome": (FLOW, "USD", ["NetIncomeLoss"]),
    "eps": (FLOW, "USD/shares", ["EarningsPerShareDiluted"]),
    "totalAssets": (INSTANT, "USD", ["Assets"]),
    "totalLiabilities": (INSTANT, "USD", ["Liabilities"]),
    "totalEquity": (INSTANT, "USD", ["StockholdersEquity"]),
    "operatingCashFlow": (FLOW, "USD", ["NetCashProvidedByUsedInOperatingActivities"]),
    "sharesOutstanding": (INSTANT, "shares", ["CommonStockSharesOutstanding"]),
}
MIN_DAYS, MAX_DAYS = 350, 380  # an annual period (52/53-week years included)
YEAR_MIN, YEAR_MAX = 1995, 2025


def _annual(raw):
    if not raw.get("start"):
        return False
    days = (date.fromisoformat(raw["end"]) - date.fromisoformat(raw["start"])).days
    return MIN_DAYS <= days <= MAX_DAYS


def fiscal_years(facts):
    """{fiscal-year end date: (accession, filing date) of the original 10-K for that year}.

    Each 10-K's latest annual (350-380 day) us-gaap period end is the fiscal year it reports; where
    two 10-Ks claim the same end (an amendment filed as a 10-K), the earliest filed one is kept.
    """
    by_accn = {}
    for body in facts.get("us-gaap", {}).values():
        for raws in body.get("units", {}).values():
            for raw in raws:
                if raw.get("form") == "10-K" and raw.get("fp") == "FY" and _annual(raw):
                    end, filed = date.fromisoformat(raw["end"]), raw["filed"]
                    prev = by_accn.get(raw["accn"])
                    by_accn[raw["accn"]] = (max(end, prev[0]) if prev else end,
                                            min(filed, prev[1]) if prev else filed)
    years = {}  # end -> (filed, accn)
    for accn, (end, filed) in by_accn.items():
        if end not in years or (filed, accn) < years[end]:
            years[end] = (filed, accn)
    return {end: (accn, filed) for end, (filed, accn) in years.items()}


def value_in_filing(facts, column, end, accn):
    """(value, concept) for the column as reported in accession accn for period ending end."""
    kind, unit, concepts = CONCEPTS[column]
    for concept in concepts:
        raws = facts.get("us-gaap", {}).get(concept, {}).get("units", {}).get(unit, [])
        hits = [r for r in raws
                if r.get("accn") == accn and r.get("form") == "10-K" and r["end"] == end.isoformat()
                and (_annual(r) if kind == FLOW else not r.get("start"))]
        values = {r["val"] for r in hits}
        if len(values) > 1:
            raise SystemExit(f"{accn} {concept} {end}: conflicting values {sorted(values)}")
        if values:
            return values.pop(), concept
    return None, None


def plain(v):
    if v is None:
        return ""
    return format(Decimal(str(v)), "f")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sdist", type=Path, help=f"path to the downloaded {PACKAGE}-{VERSION} sdist (.tar.gz)")
    ap.add_argument("-o", "--output", type=Path, default=Path("data/sample/fundamentals.csv"))
    ap.add_argument("--symbols", nargs="+", default=DEFAULT_SYMBOLS, choices=sorted(FIXTURES))
    ap.add_argument("--no-derive-liabilities", action="store_true",
                    help="leave totalLiabilities empty instead of deriving Assets - StockholdersEquity "
                         "when the fixture has no us-gaap Liabilities fact")
    args = ap.parse_args(argv)

    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        print(f"warning: sdist sha256 {digest} differs from the one documented ({SDIST_SHA256})",
              file=sys.stderr)

    def load(tar, member):
        return json.load(io.TextIOWrapper(tar.extractfile(member), encoding="utf-8"),
                         parse_float=Decimal)

    rows, log = [], []
    with tarfile.open(args.sdist, "r:gz") as tar:
        tickers = {e["ticker"]: e["cik_str"] for e in load(tar, TICKERS_MEMBER).values()}
        for symbol in args.symbols:
            data = load(tar, PREFIX + FIXTURES[symbol])
            if tickers.get(symbol) != data["cik"]:
                raise SystemExit(f"{symbol}: company_tickers.json CIK {tickers.get(symbol)} "
                                 f"!= fixture CIK {data['cik']}")
            facts = data["facts"]
            for end, (accn, filed) in sorted(fiscal_years(facts).items()):
                if not YEAR_MIN <= end.year <= YEAR_MAX:
                    continue
                row = {"symbol": symbol, "calendarYear": end.year, "date": end.isoformat(),
                       "fillingDate": filed}
                used = {}
                for column in CONCEPTS:
                    val, concept = value_in_filing(facts, column, end, accn)
                    row[column] = val
                    used[column] = concept
                if (row["totalLiabilities"] is None and not args.no_derive_liabilities
                        and row["totalAssets"] is not None and row["totalEquity"] is not None):
                    row["totalLiabilities"] = row["totalAssets"] - row["totalEquity"]
                    used["totalLiabilities"] = "Assets-StockholdersEquity"
                rows.append(row)
                log.append(f"{symbol} {end.year} (FY end {end}, 10-K {accn}): "
                           + ", ".join(f"{c}={used[c] or '-'}" for c in CONCEPTS))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(HEADER)
        for r in rows:
            w.writerow([r["symbol"], r["calendarYear"], r["date"], r["fillingDate"]]
                       + [plain(r[c]) for c in HEADER[4:]])
    for line in log:
        print(line, file=sys.stderr)
    print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
