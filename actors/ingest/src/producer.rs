//! Producers: turn a source of bars into `h_alpaca` messages, one per
//! ticker-week, keyed by ticker.
//!
//! - [`publish_synthetic`]: the deterministic synthetic market (1-minute bars).
//! - [`read_daily_csv`] + [`publish_bars`]: daily bars from a CSV in the
//!   `Ticker,Date,Open,High,Low,Close,Volume,Adj Close` layout (the committed
//!   sample in `data/sample/stocks_daily.csv`), split-adjusted with `Adj Close`.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{NaiveDate, TimeZone, Utc};
use tickmesh_core::bus::Publisher;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{topics, validate_ticker, Bar, BarsMessage, IsoWeek};
use tickmesh_core::{Error, Result};

/// Groups bars by ISO week into messages.
pub fn weekly_messages(ticker: &str, bars: &[Bar]) -> Vec<BarsMessage> {
    let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
    for b in bars {
        weeks.entry(IsoWeek::of(b.t)).or_default().push(*b);
    }
    weeks
        .into_values()
        .map(|bars| BarsMessage {
            ticker: ticker.to_string(),
            bars,
        })
        .collect()
}

/// Publishes one ticker's bars as ticker-week messages; returns how many.
pub async fn publish_bars(publisher: &dyn Publisher, ticker: &str, bars: &[Bar]) -> Result<usize> {
    let msgs = weekly_messages(ticker, bars);
    for m in &msgs {
        let payload =
            serde_json::to_vec(m).map_err(|e| Error::invalid("bars message", e.to_string()))?;
        publisher
            .publish(topics::BARS, ticker, &payload, &[])
            .await?;
    }
    Ok(msgs.len())
}

/// Publishes synthetic 1-minute bars for `tickers` on the trading days in
/// `[from, to]`; returns the number of messages.
pub async fn publish_synthetic(
    publisher: &dyn Publisher,
    tickers: &[String],
    from: NaiveDate,
    to: NaiveDate,
) -> Result<usize> {
    let mut n = 0;
    for t in tickers {
        validate_ticker(t)?;
        let bars = tokio::task::block_in_place(|| SyntheticMarket.bars(t, from, to));
        n += publish_bars(publisher, t, &bars).await?;
        tracing::info!(ticker = %t, bars = bars.len(), "synthetic bars published");
    }
    Ok(n)
}

/// Reads daily bars per ticker from a CSV with the columns
/// `Ticker,Date,Open,High,Low,Close,Volume,Adj Close`. Prices are adjusted
/// for splits and dividends with the `Adj Close / Close` factor. Each bar is
/// stamped at the session open (09:30 New York) of its date.
pub fn read_daily_csv(path: &Path, only: &[String]) -> Result<BTreeMap<String, Vec<Bar>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out: BTreeMap<String, Vec<Bar>> = BTreeMap::new();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let expected = "Ticker,Date,Open,High,Low,Close,Volume,Adj Close";
    if header.trim() != expected {
        return Err(Error::invalid(
            "daily csv",
            format!("{}: header `{header}` is not `{expected}`", path.display()),
        ));
    }
    for (i, line) in lines.enumerate() {
        let lineno = i + 2;
        let bad =
            |m: String| Error::invalid("daily csv", format!("{}:{lineno}: {m}", path.display()));
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 8 {
            return Err(bad(format!("{} fields, expected 8", f.len())));
        }
        let ticker = f[0].to_string();
        if !only.is_empty() && !only.contains(&ticker) {
            continue;
        }
        let date: NaiveDate = f[1]
            .parse()
            .map_err(|e| bad(format!("date `{}`: {e}", f[1])))?;
        let num = |j: usize| -> Result<f64> {
            f[j].parse::<f64>()
                .map_err(|e| bad(format!("field {} `{}`: {e}", j + 1, f[j])))
        };
        let (o, h, l, c, v, adj) = (num(2)?, num(3)?, num(4)?, num(5)?, num(6)?, num(7)?);
        let k = if c > 0.0 { adj / c } else { 1.0 };
        let open = tickmesh_core::calendar::session(date)
            .map(|(o, _)| o)
            .unwrap_or_else(|| {
                Utc.from_utc_datetime(&date.and_hms_opt(14, 30, 0).expect("valid time"))
            });
        let bar = Bar {
            t: open,
            o: o * k,
            h: h * k,
            l: l * k,
            c: c * k,
            v: v.max(0.0) as u64,
            n: 0,
            vw: (h + l + c) / 3.0 * k,
        };
        out.entry(ticker).or_default().push(bar);
    }
    for (t, bars) in &mut out {
        validate_ticker(t)?;
        bars.sort_by_key(|b| b.t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_split_messages() {
        let d = |s: &str| s.parse().unwrap();
        let bars = SyntheticMarket.bars("X", d("2024-01-08"), d("2024-01-19"));
        let msgs = weekly_messages("X", &bars);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].bars.len(), 5 * 390);
    }

    #[test]
    fn reads_the_committed_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/stocks_daily.csv");
        let data = read_daily_csv(&path, &["AAPL".into()]).unwrap();
        let aapl = &data["AAPL"];
        assert!(aapl.len() > 3000);
        // The 2:1 splits of 2000-06-21 and 2005-02-28 halve the raw close;
        // adjusted prices move by less than 10% across them.
        for (before, after) in [("2000-06-20", "2000-06-21"), ("2005-02-25", "2005-02-28")] {
            let close_on = |day: &str| {
                let day: NaiveDate = day.parse().unwrap();
                aapl.iter()
                    .find(|b| tickmesh_core::calendar::ny_date(b.t) == day)
                    .unwrap()
                    .c
            };
            let ratio = close_on(after) / close_on(before);
            assert!((ratio - 1.0).abs() < 0.1, "{before} -> {after}: {ratio}");
        }
    }
}
