//! `tickmesh produce alpaca`: 1-minute bars from Alpaca's market-data v2
//! API (`GET /v2/stocks/bars`), one `h_alpaca` message per ticker-week.
//!
//! - Keys from `API_KEY_ALPACA` / `API_SECRET_ALPACA`, sent as the
//!   `APCA-API-KEY-ID` / `APCA-API-SECRET-KEY` headers.
//! - Pages of up to 10,000 bars follow `next_page_token` until it is null.
//!   The API sorts by symbol, then time, so a ticker-week is complete when
//!   the stream moves past it: it is published then, and memory holds one
//!   ticker-week, not the whole range.
//! - 429 and 5xx are retried with backoff and jitter ([`crate::http`]).
//! - Prices are adjusted for splits and dividends (`adjustment=all`); the
//!   feed is `sip` unless told otherwise.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use tickmesh_core::types::{topics, validate_ticker, Bar, BarsMessage, IsoWeek};
use tickmesh_core::{Error, Result};
use tickmesh_io::bus::Publisher;

use crate::http::{client, get_retrying, secret, RetryPolicy};

/// Where the API is (tests point this at a loopback server).
pub const DEFAULT_BASE_URL: &str = "https://data.alpaca.markets";

/// The most bars a page may hold (the API's maximum).
const PAGE_LIMIT: u32 = 10_000;

/// The most symbols per request (keeps the URL short).
const SYMBOLS_PER_REQUEST: usize = 100;

pub struct AlpacaClient {
    http: reqwest::Client,
    base: String,
    key: String,
    secret: String,
    feed: String,
    pub retry: RetryPolicy,
}

/// One page of `GET /v2/stocks/bars`.
#[derive(Debug, Deserialize)]
pub struct BarsPage {
    /// Bars per symbol; `null` or absent when the page is empty.
    #[serde(default)]
    pub bars: Option<BTreeMap<String, Vec<Bar>>>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

/// What a run fetched and published.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AlpacaReport {
    pub pages: usize,
    pub bars: usize,
    pub messages: usize,
    pub retries: u32,
}

impl AlpacaClient {
    /// A client with the keys from the environment.
    pub fn from_env(base: &str, feed: &str) -> Result<Self> {
        Self::new(
            base,
            feed,
            &secret("API_KEY_ALPACA", "alpaca")?,
            &secret("API_SECRET_ALPACA", "alpaca")?,
        )
    }

    pub fn new(base: &str, feed: &str, key: &str, secret: &str) -> Result<Self> {
        Ok(AlpacaClient {
            http: client()?,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            secret: secret.to_string(),
            feed: feed.to_string(),
            retry: RetryPolicy::default(),
        })
    }

    /// One page of 1-minute bars of `symbols` in `[start, end]`.
    pub async fn page(
        &self,
        symbols: &[String],
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        token: Option<&str>,
    ) -> Result<(BarsPage, u32)> {
        let url = format!("{}/v2/stocks/bars", self.base);
        let mut query = vec![
            ("symbols", symbols.join(",")),
            ("timeframe", "1Min".to_string()),
            ("start", start.to_rfc3339_opts(SecondsFormat::Secs, true)),
            ("end", end.to_rfc3339_opts(SecondsFormat::Secs, true)),
            ("limit", PAGE_LIMIT.to_string()),
            ("adjustment", "all".to_string()),
            ("feed", self.feed.clone()),
            ("sort", "asc".to_string()),
        ];
        if let Some(t) = token {
            query.push(("page_token", t.to_string()));
        }
        let what = format!(
            "bars of {} from {} to {}{}",
            symbols.join(","),
            start.to_rfc3339(),
            end.to_rfc3339(),
            if token.is_some() { " (next page)" } else { "" }
        );
        let got = get_retrying("alpaca", &what, self.retry, || {
            self.http
                .get(&url)
                .query(&query)
                .header("APCA-API-KEY-ID", &self.key)
                .header("APCA-API-SECRET-KEY", &self.secret)
        })
        .await?;
        let page: BarsPage = serde_json::from_slice(&got.body).map_err(|e| {
            Error::invalid(
                "alpaca",
                format!("{what}: the answer is not a bars page: {e}"),
            )
        })?;
        Ok((page, got.retries))
    }
}

/// The ticker-week being filled, published when the stream moves on.
struct WeekBuffer {
    current: Option<(String, IsoWeek)>,
    bars: Vec<Bar>,
}

impl WeekBuffer {
    async fn push(
        &mut self,
        publisher: &dyn Publisher,
        ticker: &str,
        bar: Bar,
        report: &mut AlpacaReport,
    ) -> Result<()> {
        let week = IsoWeek::of(bar.t);
        let same = matches!(&self.current, Some((t, w)) if t == ticker && *w == week);
        if !same {
            self.flush(publisher, report).await?;
            self.current = Some((ticker.to_string(), week));
        }
        self.bars.push(bar);
        Ok(())
    }

    async fn flush(&mut self, publisher: &dyn Publisher, report: &mut AlpacaReport) -> Result<()> {
        let Some((ticker, _)) = self.current.take() else {
            return Ok(());
        };
        let msg = BarsMessage {
            ticker,
            bars: std::mem::take(&mut self.bars),
        };
        let payload =
            serde_json::to_vec(&msg).map_err(|e| Error::invalid("bars message", e.to_string()))?;
        publisher
            .publish(topics::BARS, &msg.ticker, &payload, &[])
            .await?;
        report.messages += 1;
        Ok(())
    }
}

/// Fetches 1-minute bars of `tickers` in `[start, end]` page by page and
/// publishes each ticker-week as one `h_alpaca` message. `progress` is
/// called after every page.
pub async fn produce_alpaca(
    api: &AlpacaClient,
    publisher: &dyn Publisher,
    tickers: &[String],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    mut progress: impl FnMut(&AlpacaReport),
) -> Result<AlpacaReport> {
    if tickers.is_empty() {
        return Err(Error::invalid(
            "alpaca",
            "no tickers: companies_info has no active ticker and none was given with --tickers",
        ));
    }
    for t in tickers {
        validate_ticker(t)?;
    }
    let mut report = AlpacaReport::default();
    let mut buf = WeekBuffer {
        current: None,
        bars: Vec::new(),
    };
    for chunk in tickers.chunks(SYMBOLS_PER_REQUEST) {
        let mut token: Option<String> = None;
        loop {
            let (page, retries) = api.page(chunk, start, end, token.as_deref()).await?;
            report.pages += 1;
            report.retries += retries;
            for (ticker, bars) in page.bars.unwrap_or_default() {
                if !chunk.contains(&ticker) {
                    return Err(Error::invalid(
                        "alpaca",
                        format!("the answer has bars of {ticker}, which was not asked for"),
                    ));
                }
                for b in bars {
                    report.bars += 1;
                    buf.push(publisher, &ticker, b, &mut report).await?;
                }
            }
            progress(&report);
            match page.next_page_token {
                Some(t) if !t.is_empty() => {
                    if token.as_deref() == Some(t.as_str()) {
                        return Err(Error::invalid(
                            "alpaca",
                            format!("the API sent the same next_page_token twice ({t}); stopping rather than looping"),
                        ));
                    }
                    token = Some(t)
                }
                _ => break,
            }
        }
    }
    buf.flush(publisher, &mut report).await?;
    Ok(report)
}
