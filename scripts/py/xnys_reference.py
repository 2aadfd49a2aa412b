"""The NYSE calendar of the exchange-calendars package (XNYS), the reference
of actors/core/tests/xnys.rs.

usage: xnys_reference.py FIRST_YEAR LAST_YEAR

Prints JSON: {"closed": [weekdays without a session], "early": {date: "HH:MM"
close in New York, for sessions that close before 16:00}}.
"""

import json
import sys

import exchange_calendars as xc
import pandas as pd


def main():
    first, last = sys.argv[1], sys.argv[2]
    cal = xc.get_calendar("XNYS", start=f"{first}-01-01", end=f"{last}-12-31")
    sessions = set(cal.sessions.strftime("%Y-%m-%d"))
    weekdays = pd.date_range(f"{first}-01-01", f"{last}-12-31", freq="B")
    closed = [d for d in weekdays.strftime("%Y-%m-%d") if d not in sessions]
    early = {
        d.strftime("%Y-%m-%d"): cal.session_close(d).tz_convert("America/New_York").strftime("%H:%M")
        for d in cal.early_closes
    }
    json.dump({"closed": closed, "early": early}, sys.stdout)


if __name__ == "__main__":
    main()
