//! Data contracts: the messages on the bus and the domain types behind them.
//!
//! Messages are JSON and validated strictly: required fields must be present
//! and well typed, numbers finite, prices positive, `h >= l`. Extra fields are
//! allowed and ignored (the Alpaca and FMP payloads carry more than we use).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The largest message payload accepted from the bus (bytes). One ticker-week
/// of 1-minute bars is about 250 KB of JSON; anything far above this is not a
/// bar message.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Topic names of the contracts.
pub mod topics {
    pub const BARS: &str = "h_alpaca";
    pub const MACRO: &str = "h_macrodata";
    pub const COMPANY: &str = "h_company";
    pub const LIVE_BARS: &str = "live_bars";
    pub const START_MODEL: &str = "start_model";
    /// Every topic the pipeline uses, dead-letter topics included.
    pub const ALL: &[&str] = &[
        BARS,
        MACRO,
        COMPANY,
        LIVE_BARS,
        START_MODEL,
        "h_alpaca.dlq",
        "h_macrodata.dlq",
        "h_company.dlq",
        "live_bars.dlq",
        "start_model.dlq",
    ];

    /// The dead-letter topic of `topic`.
    pub fn dlq(topic: &str) -> String {
        format!("{topic}.dlq")
    }
}

/// A resampling interval of the aggregated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Interval {
    M1,
    M5,
    M15,
    M30,
    H1,
    D1,
}

impl Interval {
    pub const ALL: [Interval; 6] = [
        Interval::M1,
        Interval::M5,
        Interval::M15,
        Interval::M30,
        Interval::H1,
        Interval::D1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::M1 => "1m",
            Interval::M5 => "5m",
            Interval::M15 => "15m",
            Interval::M30 => "30m",
            Interval::H1 => "1h",
            Interval::D1 => "1d",
        }
    }

    /// Bucket width in minutes for intraday intervals; `None` for daily.
    /// Intraday buckets start at the regular session's open (09:30 New
    /// York): a 1h bar covers 09:30–10:30, …, 15:30–16:00.
    pub fn minutes(self) -> Option<i64> {
        match self {
            Interval::M1 => Some(1),
            Interval::M5 => Some(5),
            Interval::M15 => Some(15),
            Interval::M30 => Some(30),
            Interval::H1 => Some(60),
            Interval::D1 => None,
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interval {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Interval::ALL
            .into_iter()
            .find(|i| i.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "interval",
                    format!("`{s}` is not one of 1m, 5m, 15m, 30m, 1h, 1d"),
                )
            })
    }
}

impl TryFrom<String> for Interval {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Interval> for String {
    fn from(i: Interval) -> String {
        i.as_str().to_string()
    }
}

/// Checks a ticker symbol: 1–12 characters of `A-Z`, `0-9`, `.` and `-`,
/// starting with a letter.
pub fn validate_ticker(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 12
        && t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && t.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "ticker",
            format!("`{t}` must be 1-12 characters of A-Z 0-9 . - starting with a letter"),
        ))
    }
}

/// Bar times as they come on the bus. Alpaca and our producers write
/// `YYYY-MM-DDTHH:MM:SS[.f]Z`; that form is read directly, and anything else
/// goes to chrono's RFC 3339 parser, as serde's `DateTime<Utc>` does, so the
/// accepted inputs and the values are the same (a test compares the two).
pub mod utc_time {
    use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    fn digits(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    }

    /// The common form only; `None` means "ask chrono".
    pub fn parse_fast(s: &str) -> Option<DateTime<Utc>> {
        parse_fast_bytes(s.as_bytes())
    }

    /// [`parse_fast`] on the bytes of a string.
    pub fn parse_fast_bytes(b: &[u8]) -> Option<DateTime<Utc>> {
        if b.len() < 20 || b[b.len() - 1] != b'Z' {
            return None;
        }
        let sep = |i: usize, c: u8| b[i] == c;
        if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
            return None;
        }
        let (y, mo, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
        let (h, mi, sec) = (
            digits(&b[11..13])?,
            digits(&b[14..16])?,
            digits(&b[17..19])?,
        );
        // A leap second (:60) is chrono's to place.
        if h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        let nanos = match &b[19..b.len() - 1] {
            [] => 0,
            [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
                digits(frac)? * 10u32.pow(9 - frac.len() as u32)
            }
            _ => return None,
        };
        NaiveDate::from_ymd_opt(y as i32, mo, d)?
            .and_hms_nano_opt(h, mi, sec, nanos)
            .map(|t| t.and_utc())
    }

    /// What serde's `DateTime<Utc>` accepts, with [`parse_fast`] first.
    pub fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
        match parse_fast(s) {
            Some(t) => Ok(t),
            None => s
                .parse::<DateTime<FixedOffset>>()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        struct Rfc3339;
        impl Visitor<'_> for Rfc3339 {
            type Value = DateTime<Utc>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 formatted date and time string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(Rfc3339)
    }
}

/// One bar with Alpaca's field names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    /// Bar open time, UTC.
    #[serde(deserialize_with = "utc_time::deserialize")]
    pub t: DateTime<Utc>,
    pub o: f64,
    pub h: f64,
    pub l: f64,
    pub c: f64,
    /// Volume.
    pub v: u64,
    /// Number of trades.
    #[serde(default)]
    pub n: u64,
    /// Volume-weighted average price.
    #[serde(default)]
    pub vw: f64,
}

/// The first day a bar may be on: the calendar's holiday rules hold from
/// 1998 (the first year the NYSE closed for Martin Luther King Jr. Day).
pub const FIRST_BAR_YEAR: i32 = 1998;

/// The times a bar may have, computed once per message, and the last UTC
/// hour looked up in the calendar.
struct TimeSpan {
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    memo: std::cell::Cell<Option<(i64, NaiveDate, bool)>>,
}

impl TimeSpan {
    fn now() -> Self {
        TimeSpan {
            first: Utc
                .with_ymd_and_hms(FIRST_BAR_YEAR, 1, 1, 0, 0, 0)
                .single()
                .expect("a valid date"),
            last: Utc::now() + chrono::Duration::days(1),
            memo: std::cell::Cell::new(None),
        }
    }
}

impl Bar {
    /// A bar's time must be on an NYSE trading day from [`FIRST_BAR_YEAR`]
    /// to tomorrow (UTC): anything else (a weekend, a holiday, year 0001 or
    /// 9999, a date chrono cannot place in a week) is refused, never stored.
    fn validate_time(&self, i: usize, span: &TimeSpan) -> Result<()> {
        let (first, last) = (span.first, span.last);
        if self.t < first || self.t > last {
            return Err(Error::invalid(
                "bar",
                format!(
                    "bars[{i}].t = {} is outside {FIRST_BAR_YEAR}-01-01 .. tomorrow",
                    self.t.to_rfc3339()
                ),
            ));
        }
        // New York's offsets are whole hours: one look-up per UTC hour.
        let hour = self.t.timestamp().div_euclid(3600);
        let (day, trading) = match span.memo.get() {
            Some((h, day, trading)) if h == hour => (day, trading),
            _ => {
                let day = crate::calendar::ny_date(self.t);
                let trading = crate::calendar::is_trading_day(day);
                span.memo.set(Some((hour, day, trading)));
                (day, trading)
            }
        };
        if !trading {
            return Err(Error::invalid(
                "bar",
                format!(
                    "bars[{i}].t = {} is on {day} ({}) in New York, not an NYSE trading day",
                    self.t.to_rfc3339(),
                    day.weekday()
                ),
            ));
        }
        Ok(())
    }

    fn validate(&self, i: usize, span: &TimeSpan) -> Result<()> {
        self.validate_time(i, span)?;
        let prices = [("o", self.o), ("h", self.h), ("l", self.l), ("c", self.c)];
        for (name, p) in prices {
            if !p.is_finite() || p <= 0.0 {
                return Err(Error::invalid(
                    "bar",
                    format!("bars[{i}].{name} = {p} must be a finite positive price"),
                ));
            }
        }
        if self.h < self.l {
            return Err(Error::invalid(
                "bar",
                format!("bars[{i}]: high {} is below low {}", self.h, self.l),
            ));
        }
        if !self.vw.is_finite() || self.vw < 0.0 {
            return Err(Error::invalid(
                "bar",
                format!("bars[{i}].vw = {} must be finite and >= 0", self.vw),
            ));
        }
        Ok(())
    }
}

/// `h_alpaca` / `live_bars`: one ticker-week of bars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BarsMessage {
    pub ticker: String,
    pub bars: Vec<Bar>,
}

/// `start_model`: the aggregated data of these tickers is ready up to `watermark`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartModel {
    pub interval: Interval,
    pub tickers: Vec<String>,
    pub watermark: DateTime<Utc>,
}

/// Parses a payload as JSON of type `T`, with the size limit and a readable
/// error naming what was expected.
fn parse_json<T: for<'de> Deserialize<'de>>(what: &'static str, payload: &[u8]) -> Result<T> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Error::invalid(
            what,
            format!(
                "payload of {} bytes exceeds the {} byte limit",
                payload.len(),
                MAX_MESSAGE_BYTES
            ),
        ));
    }
    // The fast path; a payload that fails is parsed again to say where.
    if let Ok(v) = serde_json::from_slice(payload) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(payload);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::invalid(what, inner.to_string())
        } else {
            Error::invalid(what, format!("at `{path}`: {inner}"))
        }
    })
}

impl BarsMessage {
    /// Parses and validates a bar message.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        // The usual form is read directly; anything else (and every error)
        // goes through serde, which names the path at fault.
        let direct = (payload.len() <= MAX_MESSAGE_BYTES)
            .then(|| crate::bars_json::read(payload))
            .flatten();
        let msg: BarsMessage = match direct {
            Some(msg) => msg,
            None => parse_json("bars message", payload)?,
        };
        msg.validate()?;
        Ok(msg)
    }

    pub fn validate(&self) -> Result<()> {
        validate_ticker(&self.ticker)?;
        if self.bars.is_empty() {
            return Err(Error::invalid("bars message", "`bars` is empty"));
        }
        let span = TimeSpan::now();
        for (i, b) in self.bars.iter().enumerate() {
            b.validate(i, &span)?;
        }
        Ok(())
    }
}

impl StartModel {
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let msg: StartModel = parse_json("start_model message", payload)?;
        if msg.tickers.is_empty() {
            return Err(Error::invalid("start_model message", "`tickers` is empty"));
        }
        for t in &msg.tickers {
            validate_ticker(t)?;
        }
        Ok(msg)
    }
}

/// The first year of a macro observation accepted (FRED's oldest series
/// start in the 18th century; nothing we use is older than this).
pub const FIRST_MACRO_YEAR: i32 = 1800;

/// The last date a message may carry: a year from now. Macro releases and
/// fiscal years are dated in the past; this only refuses absurd dates.
fn latest_date() -> NaiveDate {
    (Utc::now() + chrono::Duration::days(366)).date_naive()
}

/// A FRED series id: 1-32 characters of A-Z 0-9 `_`, like `CPIAUCSL`,
/// `DGS10`, `A191RL1Q225SBEA`.
pub fn validate_series(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "series",
            format!("`{s}` must be 1-32 characters of A-Z 0-9 _"),
        ))
    }
}

/// One observation of a macro series (FRED `series/observations`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// The observation's date (FRED's `date`: the start of the period it
    /// measures, not the day it was published).
    pub date: NaiveDate,
    pub value: f64,
}

/// `h_macrodata`: observations of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MacroMessage {
    pub series: String,
    pub observations: Vec<Observation>,
}

impl MacroMessage {
    /// Parses and validates a macro message.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let msg: MacroMessage = parse_json("macro message", payload)?;
        msg.validate()?;
        Ok(msg)
    }

    pub fn validate(&self) -> Result<()> {
        validate_series(&self.series)?;
        if self.observations.is_empty() {
            return Err(Error::invalid("macro message", "`observations` is empty"));
        }
        let (first, last) = (
            NaiveDate::from_ymd_opt(FIRST_MACRO_YEAR, 1, 1).expect("a valid date"),
            latest_date(),
        );
        for (i, o) in self.observations.iter().enumerate() {
            if o.date < first || o.date > last {
                return Err(Error::invalid(
                    "macro message",
                    format!(
                        "observations[{i}].date = {} is outside {first} .. {last}",
                        o.date
                    ),
                ));
            }
            if !o.value.is_finite() {
                return Err(Error::invalid(
                    "macro message",
                    format!("observations[{i}].value = {} must be finite", o.value),
                ));
            }
        }
        Ok(())
    }
}

/// The object key of one series-year in the `macro-data` bucket:
/// `{series}/{yyyy}/{series}_{yyyy}.parquet`.
pub fn macro_object_key(series: &str, year: i32) -> String {
    format!("{series}/{year:04}/{series}_{year:04}.parquet")
}

/// The fundamentals columns after `symbol`, `calendarYear`, `date` and
/// `fillingDate`, in schema order (the names of the Financial Modeling Prep
/// statements the original's `df_company_fundamentals.parquet` came from).
pub const FUNDAMENTAL_METRICS: [&str; 8] = [
    "revenue",
    "netIncome",
    "eps",
    "totalAssets",
    "totalLiabilities",
    "totalEquity",
    "operatingCashFlow",
    "sharesOutstanding",
];

/// `h_company`: one (symbol, calendarYear) row of fundamentals. Every
/// metric is optional (`null` or absent when the source has none), but a
/// message carries at least one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fundamentals {
    pub symbol: String,
    /// The calendar year the fiscal year ends in. A number, or a string of
    /// digits as the FMP API sends it.
    #[serde(deserialize_with = "year_from_number_or_string")]
    pub calendar_year: i32,
    /// The end of the fiscal period (FMP's `date`).
    #[serde(default, rename = "date", skip_serializing_if = "Option::is_none")]
    pub period_end: Option<NaiveDate>,
    /// The day the statement was filed (FMP's `fillingDate`): when the values
    /// became public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filling_date: Option<NaiveDate>,
    #[serde(default)]
    pub revenue: Option<f64>,
    #[serde(default)]
    pub net_income: Option<f64>,
    #[serde(default)]
    pub eps: Option<f64>,
    #[serde(default)]
    pub total_assets: Option<f64>,
    #[serde(default)]
    pub total_liabilities: Option<f64>,
    #[serde(default)]
    pub total_equity: Option<f64>,
    #[serde(default)]
    pub operating_cash_flow: Option<f64>,
    #[serde(default)]
    pub shares_outstanding: Option<f64>,
}

fn year_from_number_or_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<i32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Year {
        Number(i64),
        // pandas stores an integer column with gaps as float64.
        Float(f64),
        Text(String),
    }
    let y = match Year::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a year as a number or a string of digits")
    })? {
        Year::Number(n) => n,
        Year::Float(f) if f.fract() == 0.0 && f.abs() < 1e9 => f as i64,
        Year::Float(f) => return Err(serde::de::Error::custom(format!("{f} is not a year"))),
        Year::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a year")))?,
    };
    i32::try_from(y).map_err(|_| serde::de::Error::custom(format!("{y} is not a year")))
}

impl Fundamentals {
    /// Parses and validates a company message.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let msg: Fundamentals = parse_json("company message", payload)?;
        msg.validate()?;
        Ok(msg)
    }

    /// The metrics in [`FUNDAMENTAL_METRICS`] order.
    pub fn metrics(&self) -> [Option<f64>; 8] {
        [
            self.revenue,
            self.net_income,
            self.eps,
            self.total_assets,
            self.total_liabilities,
            self.total_equity,
            self.operating_cash_flow,
            self.shares_outstanding,
        ]
    }

    /// Sets the metric `i` of [`FUNDAMENTAL_METRICS`].
    pub fn set_metric(&mut self, i: usize, v: Option<f64>) {
        let slot = match i {
            0 => &mut self.revenue,
            1 => &mut self.net_income,
            2 => &mut self.eps,
            3 => &mut self.total_assets,
            4 => &mut self.total_liabilities,
            5 => &mut self.total_equity,
            6 => &mut self.operating_cash_flow,
            7 => &mut self.shares_outstanding,
            _ => return,
        };
        *slot = v;
    }

    pub fn validate(&self) -> Result<()> {
        validate_ticker(&self.symbol)?;
        let bad = |m: String| Error::invalid("company message", m);
        let last = latest_date();
        if self.calendar_year < 1900 || self.calendar_year > last.year() {
            return Err(bad(format!(
                "calendarYear = {} is outside 1900 .. {}",
                self.calendar_year,
                last.year()
            )));
        }
        if let Some(d) = self.period_end {
            if (d.year() - self.calendar_year).abs() > 1 {
                return Err(bad(format!(
                    "date = {d} is not near calendarYear {}",
                    self.calendar_year
                )));
            }
        }
        if let (Some(end), Some(filed)) = (self.period_end, self.filling_date) {
            if filed < end {
                return Err(bad(format!(
                    "fillingDate = {filed} is before the period's end {end}"
                )));
            }
        }
        if let Some(filed) = self.filling_date {
            if filed > last {
                return Err(bad(format!("fillingDate = {filed} is after {last}")));
            }
        }
        let metrics = self.metrics();
        if metrics.iter().all(Option::is_none) {
            return Err(bad(format!(
                "no metric: at least one of {} is required",
                FUNDAMENTAL_METRICS.join(", ")
            )));
        }
        for (name, v) in FUNDAMENTAL_METRICS.iter().zip(metrics) {
            let Some(v) = v else { continue };
            if !v.is_finite() {
                return Err(bad(format!("{name} = {v} must be finite")));
            }
            let never_negative = matches!(*name, "revenue" | "totalAssets" | "sharesOutstanding");
            if never_negative && v < 0.0 {
                return Err(bad(format!("{name} = {v} must be >= 0")));
            }
        }
        Ok(())
    }
}

/// The object key of one symbol-year in the `company-fundamentals` bucket:
/// `{symbol}/{yyyy}/{symbol}_{yyyy}.parquet`.
pub fn company_object_key(symbol: &str, year: i32) -> String {
    format!("{symbol}/{year:04}/{symbol}_{year:04}.parquet")
}

/// An ISO week: the unit of one bars object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IsoWeek {
    pub year: i32,
    pub week: u32,
}

impl IsoWeek {
    pub fn of(t: DateTime<Utc>) -> Self {
        let w = t.iso_week();
        IsoWeek {
            year: w.year(),
            week: w.week(),
        }
    }

    /// The Monday that starts this week.
    pub fn monday(self) -> NaiveDate {
        NaiveDate::from_isoywd_opt(self.year, self.week, chrono::Weekday::Mon)
            .expect("an IsoWeek is always built from a real date")
    }
}

/// The object key of one ticker-week of bars, in the `stock-data` bucket:
/// `{ticker}/{yyyy}/{mm}/{ticker}_{isoyear}-W{ww}.parquet`, where `yyyy/mm`
/// are those of the week's Monday. Deterministic from the data, so a
/// redelivered message rewrites the same object.
pub fn bars_object_key(ticker: &str, week: IsoWeek) -> String {
    let m = week.monday();
    format!(
        "{ticker}/{:04}/{:02}/{ticker}_{:04}-W{:02}.parquet",
        m.year(),
        m.month(),
        week.year,
        week.week
    )
}

/// Object key prefix of a checkpoint version in the `models` bucket.
pub fn model_prefix(ticker: &str, interval: Interval, version: i64) -> String {
    format!("{ticker}/{interval}/v{version}")
}

/// One row of `aggregated_data`: a timestamp and one value per
/// [`crate::config::FeatureConfig::columns`] entry, `None` while an indicator warms up.
#[derive(Debug, Clone, PartialEq)]
pub struct AggRow {
    pub ts: DateTime<Utc>,
    pub values: Vec<Option<f64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let json = br#"{"ticker":"AAPL","bars":[{"t":"2021-01-04T14:30:00Z","o":133.52,"h":133.61,"l":132.96,"c":133.11,"v":1243556,"n":8451,"vw":133.27,"extra":1}]}"#;
        let m = BarsMessage::parse(json).unwrap();
        assert_eq!(m.ticker, "AAPL");
        assert_eq!(m.bars[0].v, 1243556);
    }

    #[test]
    fn bar_times_off_the_calendar_are_refused_without_panicking() {
        let bar = |t: &str| {
            format!(r#"{{"ticker":"AAPL","bars":[{{"t":"{t}","o":1,"h":1,"l":1,"c":1,"v":1}}]}}"#)
        };
        for (t, why) in [
            ("-262143-01-01T00:00:00Z", "outside"),
            ("0001-01-01T14:30:00Z", "outside"),
            ("9999-12-31T14:30:00Z", "outside"),
            ("1997-01-02T14:30:00Z", "outside"),
            ("2024-01-06T14:30:00Z", "Sat"),
            ("2024-12-25T14:30:00Z", "not an NYSE trading day"),
            // 01:00 UTC on a Monday is Sunday evening in New York.
            ("2024-01-08T01:00:00Z", "Sun"),
        ] {
            let e = BarsMessage::parse(bar(t).as_bytes())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains("bars[0].t") && e.contains(why), "{t}: {e}");
        }
        BarsMessage::parse(bar("2024-01-08T14:30:00Z").as_bytes()).unwrap();
        BarsMessage::parse(bar("1998-01-02T14:30:00Z").as_bytes()).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let json = br#"{"ticker":"AAPL","bars":[{"t":"2021-01-04T14:30:00Z","o":"x","h":1,"l":1,"c":1,"v":1}]}"#;
        let e = BarsMessage::parse(json).unwrap_err().to_string();
        assert!(e.contains("bars[0].o"), "{e}");
        let e = BarsMessage::parse(br#"{"ticker":"AAPL"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bars"), "{e}");
        let e = BarsMessage::parse(br#"{"ticker":"aapl","bars":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ticker"), "{e}");
        let json = br#"{"ticker":"AAPL","bars":[{"t":"2021-01-04T14:30:00Z","o":1,"h":1,"l":2,"c":1,"v":1}]}"#;
        assert!(BarsMessage::parse(json)
            .unwrap_err()
            .to_string()
            .contains("below low"));
    }

    #[test]
    fn huge_payload_is_refused() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(BarsMessage::parse(&big)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn object_keys_are_deterministic() {
        let t: DateTime<Utc> = "2021-01-04T14:30:00Z".parse().unwrap();
        assert_eq!(
            bars_object_key("AAPL", IsoWeek::of(t)),
            "AAPL/2021/01/AAPL_2021-W01.parquet"
        );
        // 2021-01-01 is a Friday in ISO week 53 of 2020, whose Monday is 2020-12-28.
        let t: DateTime<Utc> = "2021-01-01T15:00:00Z".parse().unwrap();
        assert_eq!(
            bars_object_key("AAPL", IsoWeek::of(t)),
            "AAPL/2020/12/AAPL_2020-W53.parquet"
        );
    }

    #[test]
    fn macro_messages_are_validated() {
        let m = MacroMessage::parse(
            br#"{"series":"CPIAUCSL","observations":[{"date":"2021-01-01","value":262.2}]}"#,
        )
        .unwrap();
        assert_eq!(m.observations[0].value, 262.2);
        assert_eq!(
            macro_object_key("CPIAUCSL", 2021),
            "CPIAUCSL/2021/CPIAUCSL_2021.parquet"
        );
        for (json, why) in [
            (
                r#"{"series":"cpi","observations":[{"date":"2021-01-01","value":1}]}"#,
                "series",
            ),
            (r#"{"series":"CPI","observations":[]}"#, "empty"),
            (r#"{"series":"CPI"}"#, "observations"),
            (
                r#"{"series":"CPI","observations":[{"date":"2021-01-01","value":"."}]}"#,
                "observations[0].value",
            ),
            (
                r#"{"series":"CPI","observations":[{"date":"1700-01-01","value":1}]}"#,
                "outside",
            ),
            (
                r#"{"series":"CPI","observations":[{"date":"+99999-01-01","value":1}]}"#,
                "observations[0].date",
            ),
            (
                r#"{"series":"CPI","observations":[{"date":"2021-02-30","value":1}]}"#,
                "observations[0].date",
            ),
        ] {
            let e = MacroMessage::parse(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn company_messages_are_validated() {
        let f = Fundamentals::parse(
            br#"{"symbol":"AAPL","calendarYear":"2021","date":"2021-09-25","fillingDate":"2021-10-29","revenue":365817000000,"netIncome":94680000000,"eps":5.67,"period":"FY"}"#,
        )
        .unwrap();
        assert_eq!(f.calendar_year, 2021);
        assert_eq!(f.eps, Some(5.67));
        assert_eq!(f.total_assets, None);
        let again: Fundamentals = serde_json::from_slice(&serde_json::to_vec(&f).unwrap()).unwrap();
        assert_eq!(again, f);
        assert_eq!(
            company_object_key("AAPL", 2021),
            "AAPL/2021/AAPL_2021.parquet"
        );
        for (json, why) in [
            (r#"{"symbol":"AAPL","revenue":1}"#, "calendarYear"),
            (
                r#"{"symbol":"AAPL","calendarYear":"twenty","revenue":1}"#,
                "calendarYear",
            ),
            (
                r#"{"symbol":"AAPL","calendarYear":1850,"revenue":1}"#,
                "outside",
            ),
            (r#"{"symbol":"AAPL","calendarYear":2021}"#, "no metric"),
            (
                r#"{"symbol":"AAPL","calendarYear":2021,"revenue":-5}"#,
                ">= 0",
            ),
            (
                r#"{"symbol":"AAPL","calendarYear":2021,"eps":"high"}"#,
                "eps",
            ),
            (
                r#"{"symbol":"AAPL","calendarYear":2021,"date":"2015-01-01","eps":1}"#,
                "near",
            ),
            (
                r#"{"symbol":"AAPL","calendarYear":2021,"date":"2021-09-25","fillingDate":"2021-01-01","eps":1}"#,
                "before",
            ),
            (r#"{"calendarYear":2021,"eps":1}"#, "symbol"),
        ] {
            let e = Fundamentals::parse(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn start_model_roundtrip() {
        let json =
            br#"{"interval":"1d","tickers":["AAPL","MSFT"],"watermark":"2025-06-30T20:00:00Z"}"#;
        let m = StartModel::parse(json).unwrap();
        assert_eq!(m.interval, Interval::D1);
        assert!(StartModel::parse(
            br#"{"interval":"2d","tickers":["A"],"watermark":"2025-06-30T20:00:00Z"}"#
        )
        .is_err());
    }

    /// The fast path agrees with chrono on every string it accepts, and
    /// leaves the rest to chrono: valid times at every resolution, and
    /// near misses (bad dates, leap seconds, offsets, lower case, spaces).
    #[test]
    fn fast_bar_times_equal_chrono() {
        let chrono_parse = |s: &str| {
            s.parse::<DateTime<chrono::FixedOffset>>()
                .map(|t| t.with_timezone(&Utc))
        };
        let mut cases: Vec<String> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            let (y, mo, d) = (next(10_000), next(14), next(33));
            let (h, mi, s) = (next(26), next(62), next(62));
            let base = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            let frac = match next(4) {
                0 => String::new(),
                1 => format!(".{:03}", next(1000)),
                2 => format!(".{:09}", next(1_000_000_000)),
                _ => format!(".{}", next(10)),
            };
            cases.push(format!("{base}{frac}Z"));
        }
        for s in [
            "2021-01-04T14:30:00Z",
            "2024-02-29T23:59:59.999999999Z",
            "2023-02-29T10:00:00Z",
            "2016-12-31T23:59:60Z",
            "2021-01-04T14:30:00+00:00",
            "2021-01-04T09:30:00-05:00",
            "2021-01-04t14:30:00z",
            "2021-01-04 14:30:00Z",
            "2021-01-04T14:30:00.Z",
            "2021-01-04T14:30:00.1234567890Z",
            "2021-01-04T14:30Z",
            "-262143-01-01T00:00:00Z",
            "+2021-01-04T14:30:00Z",
            "２021-01-04T14:30:00Z",
            "",
        ] {
            cases.push(s.to_string());
        }
        let mut fast = 0;
        for s in &cases {
            if let Some(t) = utc_time::parse_fast(s) {
                fast += 1;
                assert_eq!(Ok(t), chrono_parse(s), "{s}");
            }
            assert_eq!(utc_time::parse(s).ok(), chrono_parse(s).ok(), "{s}");
        }
        assert!(
            fast > 5_000,
            "the fast path took only {fast} of {}",
            cases.len()
        );
    }
}
