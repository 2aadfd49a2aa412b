//! Producers: turn a source of bars into `h_alpaca` messages, one per
//! ticker-week, keyed by ticker.
//!
//! - [`publish_synthetic`]: the deterministic synthetic market (1-minute bars).
//! - [`read_daily_csv`] / [`read_bar_dir`] + [`publish_bars`]: bars from CSV
//!   files (the committed sample `data/sample/stocks_daily.csv` is
//!   `Ticker,Date,Open,High,Low,Close,Volume,Adj Close`), prices and volume
//!   adjusted with `Adj Close / Close`.
//! - [`read_fundamentals`] + [`publish_fundamentals`]: fundamentals from a
//!   Parquet or CSV file, one `h_company` message per (symbol, calendarYear).
//! - [`read_macro_csv`] + [`crate::fred::publish_macro`]: macro series from a
//!   CSV file (the committed `data/sample/macrodata.csv`).
//! - [`crate::alpaca`] and [`crate::fred`]: the market-data APIs.
//! - [`replay`]: stored bars replayed into `live_bars` at a chosen speed, a
//!   live feed for demos and tests.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{
    topics, validate_ticker, Bar, BarsMessage, Fundamentals, IsoWeek, MacroMessage, Observation,
};
use tickmesh_core::{Error, Result};
use tickmesh_io::bus::Publisher;

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
    for t in tickers {
        validate_ticker(t)?;
    }
    let started = std::time::Instant::now();
    let (mut n, mut total) = (0, 0usize);
    for (i, t) in tickers.iter().enumerate() {
        let bars = tokio::task::block_in_place(|| SyntheticMarket.bars(t, from, to));
        n += publish_bars(publisher, t, &bars).await?;
        total += bars.len();
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            ticker = %t,
            done = i + 1,
            of = tickers.len(),
            bars = bars.len(),
            total_bars = total,
            bars_per_s = (total as f64 / secs.max(1e-9)) as u64,
            eta_s = (secs / (i + 1) as f64 * (tickers.len() - i - 1) as f64) as u64,
            "synthetic bars published"
        );
    }
    Ok(n)
}

/// Column names a bar file may use for each field (compared without case).
const TICKER_COLS: &[&str] = &["ticker", "symbol"];
const TIME_COLS: &[&str] = &["t", "timestamp", "datetime", "date"];
const OPEN_COLS: &[&str] = &["o", "open"];
const HIGH_COLS: &[&str] = &["h", "high"];
const LOW_COLS: &[&str] = &["l", "low"];
const CLOSE_COLS: &[&str] = &["c", "close"];
const VOLUME_COLS: &[&str] = &["v", "volume"];
const ADJ_CLOSE_COLS: &[&str] = &["adj close", "adj_close", "adjclose", "adjusted_close"];
const VWAP_COLS: &[&str] = &["vw", "vwap"];
const TRADES_COLS: &[&str] = &["n", "trade_count", "trades"];

/// Reads bars per ticker from a CSV file, parsed with a real CSV parser
/// (quoted fields, CRLF, a BOM). Columns are found by name, in any order
/// and letter case: a ticker (`Ticker`/`Symbol`; without one, the file's
/// stem is the ticker), a time (`t`/`timestamp`/`datetime`: RFC 3339; or
/// `Date`: the bar is stamped at that day's session open, 09:30 New York),
/// open, high, low, close, volume, and optionally `Adj Close`, `vwap`,
/// `trade_count`. With `Adj Close`, prices are multiplied and volume is
/// divided by `Adj Close / Close`, so split-adjusted volumes line up with
/// split-adjusted prices and the dollar volume of each bar is unchanged.
/// `only` (when not empty) keeps those tickers.
pub fn read_daily_csv(path: &Path, only: &[String]) -> Result<BTreeMap<String, Vec<Bar>>> {
    let mut out: BTreeMap<String, Vec<Bar>> = BTreeMap::new();
    read_bar_csv(path, only, &mut out)?;
    for (t, bars) in &mut out {
        validate_ticker(t)?;
        bars.sort_by_key(|b| b.t);
    }
    Ok(out)
}

/// [`read_daily_csv`] over every `*.csv` file of a folder, in name order.
pub fn read_bar_dir(dir: &Path, only: &[String]) -> Result<BTreeMap<String, Vec<Bar>>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::invalid(
            "bar files",
            format!("{} holds no .csv file", dir.display()),
        ));
    }
    let mut out: BTreeMap<String, Vec<Bar>> = BTreeMap::new();
    for f in &files {
        read_bar_csv(f, only, &mut out)?;
    }
    for (t, bars) in &mut out {
        validate_ticker(t)?;
        bars.sort_by_key(|b| b.t);
        bars.dedup_by_key(|b| b.t);
    }
    Ok(out)
}

/// A CSV reader of `path` (fields trimmed) and its header, without a
/// byte-order mark, lower-cased when `lower`. `what` names the file kind
/// in errors.
fn open_csv(
    path: &Path,
    what: &'static str,
    lower: bool,
) -> Result<(csv::Reader<std::fs::File>, Vec<String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(file);
    let header = rdr
        .headers()
        .map_err(|e| Error::invalid(what, format!("{}: {e}", path.display())))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}'))
        .map(|h| {
            if lower {
                h.to_ascii_lowercase()
            } else {
                h.to_string()
            }
        })
        .collect();
    Ok((rdr, header))
}

fn read_bar_csv(path: &Path, only: &[String], out: &mut BTreeMap<String, Vec<Bar>>) -> Result<()> {
    let (mut rdr, header) = open_csv(path, "bar file", true)?;
    let at = |m: String| Error::invalid("bar file", format!("{}: {m}", path.display()));
    let find = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let need = |names: &[&str]| {
        find(names).ok_or_else(|| {
            at(format!(
                "no `{}` column (the header is `{}`)",
                names.join("`/`"),
                header.join(",")
            ))
        })
    };
    let (o, h, l, c, v) = (
        need(OPEN_COLS)?,
        need(HIGH_COLS)?,
        need(LOW_COLS)?,
        need(CLOSE_COLS)?,
        need(VOLUME_COLS)?,
    );
    let time = need(TIME_COLS)?;
    let daily = header[time] == "date";
    let (ticker_col, adj, vw, trades) = (
        find(TICKER_COLS),
        find(ADJ_CLOSE_COLS),
        find(VWAP_COLS),
        find(TRADES_COLS),
    );
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_uppercase())
        .unwrap_or_default();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| at(e.to_string()))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let bad = |m: String| at(format!("line {line}: {m}"));
        let field = |i: usize| rec.get(i).unwrap_or("");
        let ticker = match ticker_col {
            Some(i) => field(i).to_string(),
            None => stem.clone(),
        };
        if !only.is_empty() && !only.contains(&ticker) {
            continue;
        }
        let num = |i: usize| -> Result<f64> {
            field(i)
                .parse::<f64>()
                .map_err(|e| bad(format!("{} `{}`: {e}", header[i], field(i))))
        };
        let t = if daily {
            let date: NaiveDate = field(time)
                .parse()
                .map_err(|e| bad(format!("date `{}`: {e}", field(time))))?;
            tickmesh_core::calendar::session(date)
                .map(|(o, _)| o)
                .ok_or_else(|| bad(format!("{date} is not an NYSE trading day")))?
        } else {
            chrono::DateTime::parse_from_rfc3339(field(time))
                .map_err(|e| bad(format!("{} `{}`: {e}", header[time], field(time))))?
                .with_timezone(&Utc)
        };
        let (open, high, low, close, volume) = (num(o)?, num(h)?, num(l)?, num(c)?, num(v)?);
        if !(volume.is_finite() && volume >= 0.0) {
            return Err(bad(format!("volume {volume} must be >= 0")));
        }
        let k = match adj {
            Some(i) if close > 0.0 => num(i)? / close,
            _ => 1.0,
        };
        if !(k.is_finite() && k > 0.0) {
            return Err(bad(format!(
                "adjustment factor {k} (Adj Close / Close) must be > 0"
            )));
        }
        let vwap = match vw {
            Some(i) if !field(i).is_empty() => num(i)?,
            _ => (high + low + close) / 3.0,
        };
        let n = match trades {
            Some(i) if !field(i).is_empty() => num(i)?.max(0.0) as u64,
            _ => 0,
        };
        out.entry(ticker).or_default().push(Bar {
            t,
            o: open * k,
            h: high * k,
            l: low * k,
            c: close * k,
            v: (volume / k).round() as u64,
            n,
            vw: vwap * k,
        });
    }
    Ok(())
}

/// Reads fundamentals from a Parquet or CSV file (by its extension), laid
/// out as the original's `df_company_fundamentals.parquet`: one row per
/// (symbol, calendarYear), columns named as the `h_company` contract
/// (`symbol`, `calendarYear`, optional `date`, `fillingDate` and the
/// metrics; other columns are ignored). Each row is validated as a
/// message would be; an error names the file and row.
pub fn read_fundamentals(path: &Path) -> Result<Vec<Fundamentals>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let rows = match ext.as_str() {
        "csv" => fundamentals_csv_rows(path)?,
        "parquet" | "pq" => fundamentals_parquet_rows(path)?,
        _ => {
            return Err(Error::invalid(
                "fundamentals file",
                format!("{}: expected a .parquet or .csv file", path.display()),
            ))
        }
    };
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let at = |m: String| {
                Error::invalid(
                    "fundamentals file",
                    format!("{} row {}: {m}", path.display(), i + 1),
                )
            };
            let f: Fundamentals = serde_json::from_value(serde_json::Value::Object(row))
                .map_err(|e| at(e.to_string()))?;
            f.validate().map_err(|e| at(e.to_string()))?;
            Ok(f)
        })
        .collect()
}

type JsonRow = serde_json::Map<String, serde_json::Value>;

/// CSV rows as JSON objects: an empty cell is absent, a number is a
/// number, anything else a string.
fn fundamentals_csv_rows(path: &Path) -> Result<Vec<JsonRow>> {
    let (mut rdr, header) = open_csv(path, "fundamentals file", false)?;
    let at = |m: String| Error::invalid("fundamentals file", format!("{}: {m}", path.display()));
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| at(e.to_string()))?;
        let mut row = JsonRow::new();
        for (name, cell) in header.iter().zip(rec.iter()) {
            if cell.is_empty() {
                continue;
            }
            let v = match (cell.parse::<i64>(), cell.parse::<f64>()) {
                _ if name == "symbol" => serde_json::Value::String(cell.to_string()),
                (Ok(n), _) => serde_json::json!(n),
                (_, Ok(x)) if x.is_finite() => serde_json::json!(x),
                _ => serde_json::Value::String(cell.to_string()),
            };
            row.insert(name.clone(), v);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Parquet rows as JSON objects (strings, integers, floats, dates and
/// timestamps; nulls are absent).
fn fundamentals_parquet_rows(path: &Path) -> Result<Vec<JsonRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Date32Type, Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
        TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
    };
    use arrow_array::Array;
    use arrow_schema::{DataType, TimeUnit};
    let what = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(data),
    )
    .and_then(|b| b.build())
    .map_err(|e| Error::parquet(what.clone(), e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::parquet(what.clone(), e))?;
        let schema = batch.schema();
        let mut out: Vec<JsonRow> = vec![JsonRow::new(); batch.num_rows()];
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            let day =
                |d: i64| DateTime::<Utc>::from_timestamp(d, 0).map(|t| t.date_naive().to_string());
            for (i, row) in out.iter_mut().enumerate() {
                if col.is_null(i) {
                    continue;
                }
                let v = match field.data_type() {
                    DataType::Utf8 => serde_json::json!(col.as_string::<i32>().value(i)),
                    DataType::LargeUtf8 => serde_json::json!(col.as_string::<i64>().value(i)),
                    DataType::Int32 => serde_json::json!(col.as_primitive::<Int32Type>().value(i)),
                    DataType::Int64 => serde_json::json!(col.as_primitive::<Int64Type>().value(i)),
                    DataType::Float32 => {
                        serde_json::json!(col.as_primitive::<Float32Type>().value(i) as f64)
                    }
                    DataType::Float64 => {
                        serde_json::json!(col.as_primitive::<Float64Type>().value(i))
                    }
                    DataType::Date32 => {
                        serde_json::json!(day(
                            col.as_primitive::<Date32Type>().value(i) as i64 * 86_400
                        ))
                    }
                    DataType::Timestamp(unit, _) => {
                        let secs = match unit {
                            TimeUnit::Second => col.as_primitive::<TimestampSecondType>().value(i),
                            TimeUnit::Millisecond => {
                                col.as_primitive::<TimestampMillisecondType>().value(i) / 1_000
                            }
                            TimeUnit::Microsecond => {
                                col.as_primitive::<TimestampMicrosecondType>().value(i) / 1_000_000
                            }
                            TimeUnit::Nanosecond => {
                                col.as_primitive::<TimestampNanosecondType>().value(i)
                                    / 1_000_000_000
                            }
                        };
                        serde_json::json!(day(secs))
                    }
                    // Columns of other types are not part of the contract.
                    _ => continue,
                };
                row.insert(field.name().clone(), v);
            }
        }
        rows.extend(out);
    }
    Ok(rows)
}

/// Reads macro series from a CSV file, in one of two layouts:
/// - long: `series,date,value` (one observation per line);
/// - wide: a `date` column, or `year` and `quarter` columns (the quarter's
///   first day is the date, as in statsmodels' `macrodata.csv`), and one
///   column per series, named by the column in upper case (`cpi` → `CPI`).
///
/// Empty cells are skipped. Returns one message per series, validated.
pub fn read_macro_csv(path: &Path) -> Result<Vec<MacroMessage>> {
    let (mut rdr, header) = open_csv(path, "macro file", true)?;
    let at = |m: String| Error::invalid("macro file", format!("{}: {m}", path.display()));
    let col = |n: &str| header.iter().position(|h| h == n);
    let long = match (col("series"), col("date"), col("value")) {
        (Some(s), Some(d), Some(v)) => Some((s, d, v)),
        _ => None,
    };
    let when = match (col("date"), col("year"), col("quarter")) {
        (Some(d), _, _) => Ok(d),
        (None, Some(y), Some(q)) => Err((y, q)),
        _ => {
            return Err(at(format!(
                "expected `series,date,value`, a `date` column, or `year` and `quarter` (the header is `{}`)",
                header.join(",")
            )))
        }
    };
    let mut series: BTreeMap<String, Vec<Observation>> = BTreeMap::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| at(e.to_string()))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let bad = |m: String| at(format!("line {line}: {m}"));
        let field = |i: usize| rec.get(i).unwrap_or("");
        let num = |i: usize| -> Result<f64> {
            field(i)
                .parse::<f64>()
                .map_err(|e| bad(format!("{} `{}`: {e}", header[i], field(i))))
        };
        let date = match when {
            Ok(d) => field(d)
                .parse::<NaiveDate>()
                .map_err(|e| bad(format!("date `{}`: {e}", field(d))))?,
            Err((y, q)) => {
                let (year, quarter) = (num(y)?, num(q)?);
                if !(1.0..=4.0).contains(&quarter) || quarter.fract() != 0.0 || year.fract() != 0.0
                {
                    return Err(bad(format!("year {year} quarter {quarter}")));
                }
                NaiveDate::from_ymd_opt(year as i32, (quarter as u32 - 1) * 3 + 1, 1)
                    .ok_or_else(|| bad(format!("year {year}")))?
            }
        };
        if let Some((s, _, v)) = long {
            if field(v).is_empty() {
                continue;
            }
            series
                .entry(field(s).to_string())
                .or_default()
                .push(Observation {
                    date,
                    value: num(v)?,
                });
            continue;
        }
        for (i, name) in header.iter().enumerate() {
            let is_time = Ok(i) == when || matches!(when, Err((y, q)) if i == y || i == q);
            if is_time || field(i).is_empty() {
                continue;
            }
            let name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            series.entry(name).or_default().push(Observation {
                date,
                value: num(i)?,
            });
        }
    }
    series
        .into_iter()
        .map(|(series, mut observations)| {
            observations.sort_by_key(|o| o.date);
            let msg = MacroMessage {
                series,
                observations,
            };
            msg.validate().map_err(|e| at(e.to_string()))?;
            Ok(msg)
        })
        .collect()
}

/// Publishes fundamentals rows to `h_company`, keyed by symbol; returns how
/// many messages.
pub async fn publish_fundamentals(
    publisher: &dyn Publisher,
    rows: &[Fundamentals],
) -> Result<usize> {
    for r in rows {
        let payload =
            serde_json::to_vec(r).map_err(|e| Error::invalid("company message", e.to_string()))?;
        publisher
            .publish(topics::COMPANY, &r.symbol, &payload, &[])
            .await?;
    }
    Ok(rows.len())
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
        let all = read_daily_csv(&path, &[]).unwrap();
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["AAPL", "GOOG", "IBM", "MSFT"]
        );
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
        // Volume is divided by the factor prices are multiplied by: the
        // first row (2000-03-01: close 130.31, volume 9,616,100, adjusted
        // close 4.186662803811) keeps its dollar volume.
        let first = &aapl[0];
        let k: f64 = 4.186662803811 / 130.31;
        assert_eq!(first.v, (9_616_100.0 / k).round() as u64);
        assert!((first.c * first.v as f64 / (130.31 * 9_616_100.0) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn reads_the_committed_fundamentals() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/fundamentals.csv");
        let rows = read_fundamentals(&path).unwrap();
        let aapl_2021 = rows
            .iter()
            .find(|r| r.symbol == "AAPL" && r.calendar_year == 2021)
            .unwrap();
        assert_eq!(aapl_2021.revenue, Some(365_817_000_000.0));
        assert_eq!(aapl_2021.operating_cash_flow, None);
        assert_eq!(aapl_2021.period_end, Some("2021-09-25".parse().unwrap()));
        assert_eq!(aapl_2021.filling_date, Some("2021-10-29".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("f.csv");
        std::fs::write(&bad, "symbol,calendarYear,revenue\nAAPL,2021,-1\n").unwrap();
        let e = read_fundamentals(&bad).unwrap_err().to_string();
        assert!(e.contains("f.csv row 1") && e.contains("revenue"), "{e}");
    }

    #[test]
    fn reads_the_committed_macro_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/macrodata.csv");
        let msgs = read_macro_csv(&path).unwrap();
        let names: Vec<&str> = msgs.iter().map(|m| m.series.as_str()).collect();
        assert!(
            names.contains(&"CPI") && names.contains(&"UNEMP"),
            "{names:?}"
        );
        let cpi = msgs.iter().find(|m| m.series == "CPI").unwrap();
        // 1959 Q1 .. 2009 Q3, the quarter's first day.
        assert_eq!(cpi.observations.len(), 203);
        assert_eq!(cpi.observations[0].date.to_string(), "1959-01-01");
        assert_eq!(cpi.observations[0].value, 28.98);
    }

    #[test]
    fn bar_files_are_parsed_by_header() {
        let dir = tempfile::tempdir().unwrap();
        // Quoted fields, another column order, lower case, CRLF, a BOM, no
        // ticker column (the file name is the ticker), RFC 3339 times.
        std::fs::write(
            dir.path().join("msft.csv"),
            "\u{feff}timestamp,close,open,high,low,volume,vwap,\"note\"\r\n\
             2024-01-08T14:30:00Z,101.5,100,102,99.5,1200,101,\"a, quoted\"\r\n\
             2024-01-08T14:31:00Z,101.6,101.5,101.7,101.4,800,,x\r\n",
        )
        .unwrap();
        let data = read_bar_dir(dir.path(), &[]).unwrap();
        let bars = &data["MSFT"];
        assert_eq!(bars.len(), 2);
        assert_eq!(
            (bars[0].o, bars[0].c, bars[0].v, bars[0].vw),
            (100.0, 101.5, 1200, 101.0)
        );
        assert!((bars[1].vw - (101.7 + 101.4 + 101.6) / 3.0).abs() < 1e-12);
        std::fs::write(dir.path().join("bad.csv"), "Date,Open,High,Low,Close\n").unwrap();
        let e = read_bar_dir(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("bad.csv") && e.contains("`v`/`volume`"), "{e}");
    }
}

/// How fast [`replay`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// `N` times the market's own pace (`60x`: a minute bar a second).
    Times(f64),
    /// As fast as the bus takes it.
    Max,
}

impl std::str::FromStr for Speed {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.strip_suffix('x').unwrap_or(s).parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 => Ok(Speed::Times(n)),
            _ => Err(Error::invalid(
                "speed",
                format!(
                    "`{}` is not NUMBERx (60x: a minute bar a second) or max",
                    s.chars().take(20).collect::<String>()
                ),
            )),
        }
    }
}

/// What a replay sent so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub bars: usize,
    pub messages: usize,
    /// The market time of the last bar sent.
    pub through: Option<DateTime<Utc>>,
}

/// Bars waiting to be sent, at most this many (then they go at once).
const REPLAY_BATCH: usize = 5_000;

/// Replays `bars` (per ticker, in time order) into `live_bars` as a live
/// feed: in market-time order across tickers, paced at `speed`. The pace
/// counts each step between two bar times as its real length, except that
/// a step longer than the bars' interval (the smallest step in the data:
/// a night, a weekend, a holiday) counts as one interval, so closed
/// markets do not stall the feed. Bars due at the same moment go together,
/// one message per ticker-week as the contract wants; `progress` hears
/// after each send.
pub async fn replay(
    publisher: &dyn Publisher,
    bars: &BTreeMap<String, Vec<Bar>>,
    speed: Speed,
    mut progress: impl FnMut(&ReplayReport),
) -> Result<ReplayReport> {
    for t in bars.keys() {
        validate_ticker(t)?;
    }
    let mut events: Vec<(DateTime<Utc>, &str, Bar)> = bars
        .iter()
        .flat_map(|(t, bs)| bs.iter().map(move |b| (b.t, t.as_str(), *b)))
        .collect();
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
    let interval = events
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > chrono::Duration::zero())
        .min()
        .unwrap_or_else(|| chrono::Duration::minutes(1));
    let mut report = ReplayReport::default();
    let mut pending: BTreeMap<&str, Vec<Bar>> = BTreeMap::new();
    let mut waiting = 0usize;
    let started = tokio::time::Instant::now();
    let mut market = std::time::Duration::ZERO;
    let mut last: Option<DateTime<Utc>> = None;
    for (ts, ticker, bar) in events {
        if let (Some(prev), Speed::Times(x)) = (last, speed) {
            if ts > prev {
                let step = (ts - prev).min(interval);
                market += step.to_std().unwrap_or_default();
                let due = started + market.div_f64(x);
                if due > tokio::time::Instant::now() {
                    send_pending(publisher, &mut pending, &mut report).await?;
                    waiting = 0;
                    progress(&report);
                    tokio::time::sleep_until(due).await;
                }
            }
        }
        last = Some(ts);
        pending.entry(ticker).or_default().push(bar);
        report.through = Some(ts);
        waiting += 1;
        if waiting >= REPLAY_BATCH {
            send_pending(publisher, &mut pending, &mut report).await?;
            waiting = 0;
            progress(&report);
        }
    }
    send_pending(publisher, &mut pending, &mut report).await?;
    progress(&report);
    Ok(report)
}

async fn send_pending(
    publisher: &dyn Publisher,
    pending: &mut BTreeMap<&str, Vec<Bar>>,
    report: &mut ReplayReport,
) -> Result<()> {
    for (ticker, bars) in std::mem::take(pending) {
        for m in weekly_messages(ticker, &bars) {
            let payload = serde_json::to_vec(&m)
                .map_err(|e| Error::invalid("bars message", e.to_string()))?;
            publisher
                .publish(topics::LIVE_BARS, ticker, &payload, &[])
                .await?;
            report.messages += 1;
            report.bars += m.bars.len();
        }
    }
    Ok(())
}
