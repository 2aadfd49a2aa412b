//! `tickmesh produce fred`: observations of FRED series
//! (`GET /fred/series/observations`), one `h_macrodata` message per series
//! (split into messages of [`OBSERVATIONS_PER_MESSAGE`] when longer).
//!
//! - The key comes from `API_KEY_FRED`.
//! - Pages of up to 100,000 observations follow `offset` until `count` is
//!   reached.
//! - FRED marks a missing value with `"."`: those observations are skipped
//!   and counted in the report, never sent as numbers.
//! - 429 and 5xx are retried with backoff and jitter ([`crate::http`]).

use chrono::NaiveDate;
use serde::Deserialize;
use tickmesh_core::types::{topics, validate_series, MacroMessage, Observation};
use tickmesh_core::{Error, Result};
use tickmesh_io::bus::Publisher;

use crate::http::{client, get_retrying, secret, RetryPolicy};

pub const DEFAULT_BASE_URL: &str = "https://api.stlouisfed.org";

/// The series published when none are named: inflation, output,
/// unemployment, the policy rate and the 10-year yield.
pub const DEFAULT_SERIES: [&str; 5] = ["CPIAUCSL", "GDP", "UNRATE", "FEDFUNDS", "DGS10"];

/// The API's page size limit.
const PAGE_LIMIT: usize = 100_000;

/// The most observations per message (about 1 MB of JSON).
pub const OBSERVATIONS_PER_MESSAGE: usize = 20_000;

pub struct FredClient {
    http: reqwest::Client,
    base: String,
    key: String,
    pub retry: RetryPolicy,
}

#[derive(Debug, Deserialize)]
struct RawObservation {
    date: String,
    value: String,
}

#[derive(Debug, Deserialize)]
struct ObservationsPage {
    count: usize,
    offset: usize,
    observations: Vec<RawObservation>,
}

/// What a run fetched and published, per series.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FredReport {
    pub series: Vec<(String, usize)>,
    pub missing: usize,
    pub messages: usize,
    pub retries: u32,
}

impl FredClient {
    pub fn from_env(base: &str) -> Result<Self> {
        Self::new(base, &secret("API_KEY_FRED", "fred")?)
    }

    pub fn new(base: &str, key: &str) -> Result<Self> {
        Ok(FredClient {
            http: client()?,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            retry: RetryPolicy::default(),
        })
    }

    /// All observations of `series` in `[start, end]`, and how many were
    /// missing (`"."`) and how many retries it took.
    pub async fn observations(
        &self,
        series: &str,
        start: Option<NaiveDate>,
        end: Option<NaiveDate>,
    ) -> Result<(Vec<Observation>, usize, u32)> {
        validate_series(series)?;
        let url = format!("{}/fred/series/observations", self.base);
        let (mut out, mut missing, mut retries) = (Vec::new(), 0usize, 0u32);
        let mut offset = 0usize;
        loop {
            let mut query = vec![
                ("series_id", series.to_string()),
                ("api_key", self.key.clone()),
                ("file_type", "json".to_string()),
                ("limit", PAGE_LIMIT.to_string()),
                ("offset", offset.to_string()),
                ("sort_order", "asc".to_string()),
            ];
            if let Some(d) = start {
                query.push(("observation_start", d.to_string()));
            }
            if let Some(d) = end {
                query.push(("observation_end", d.to_string()));
            }
            let what = format!("observations of {series} from offset {offset}");
            let got = get_retrying("fred", &what, self.retry, || {
                self.http.get(&url).query(&query)
            })
            .await?;
            retries += got.retries;
            let page: ObservationsPage = serde_json::from_slice(&got.body).map_err(|e| {
                Error::invalid(
                    "fred",
                    format!("{what}: the answer is not an observations page: {e}"),
                )
            })?;
            if page.offset != offset {
                return Err(Error::invalid(
                    "fred",
                    format!("{what}: the answer is for offset {}", page.offset),
                ));
            }
            let n = page.observations.len();
            for (i, o) in page.observations.into_iter().enumerate() {
                let date: NaiveDate = o.date.parse().map_err(|e| {
                    Error::invalid(
                        "fred",
                        format!("{what}: observations[{i}].date `{}`: {e}", o.date),
                    )
                })?;
                if o.value.trim() == "." {
                    missing += 1;
                    continue;
                }
                let value: f64 = o.value.trim().parse().map_err(|e| {
                    Error::invalid(
                        "fred",
                        format!("{what}: observations[{i}].value `{}`: {e}", o.value),
                    )
                })?;
                out.push(Observation { date, value });
            }
            offset += n;
            if n == 0 || offset >= page.count {
                return Ok((out, missing, retries));
            }
        }
    }
}

/// Fetches each series and publishes it to `h_macrodata`.
pub async fn produce_fred(
    api: &FredClient,
    publisher: &dyn Publisher,
    series: &[String],
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
) -> Result<FredReport> {
    let mut report = FredReport::default();
    for s in series {
        let (obs, missing, retries) = api.observations(s, start, end).await?;
        report.missing += missing;
        report.retries += retries;
        report.series.push((s.clone(), obs.len()));
        report.messages += publish_macro(publisher, s, obs).await?;
        tracing::info!(series = %s, missing, "series published");
    }
    Ok(report)
}

/// Publishes a series' observations as `h_macrodata` messages of at most
/// [`OBSERVATIONS_PER_MESSAGE`]; returns how many.
pub async fn publish_macro(
    publisher: &dyn Publisher,
    series: &str,
    obs: Vec<Observation>,
) -> Result<usize> {
    let mut n = 0;
    for chunk in obs.chunks(OBSERVATIONS_PER_MESSAGE) {
        let msg = MacroMessage {
            series: series.to_string(),
            observations: chunk.to_vec(),
        };
        msg.validate()?;
        let payload =
            serde_json::to_vec(&msg).map_err(|e| Error::invalid("macro message", e.to_string()))?;
        publisher
            .publish(topics::MACRO, series, &payload, &[])
            .await?;
        n += 1;
    }
    Ok(n)
}
