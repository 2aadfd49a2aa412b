//! The Alpaca and FRED producers against their APIs' responses served by a
//! loopback HTTP server (this machine has no internet): pagination, 429
//! with `Retry-After`, 5xx retried with backoff, errors that are not
//! retried and quote the API's error body, FRED's missing values, and the
//! messages that land on the bus (the embedded spool, read back with its
//! subscription).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use tickmesh_core::types::{topics, BarsMessage, MacroMessage};
use tickmesh_ingest::alpaca::{produce_alpaca, AlpacaClient};
use tickmesh_ingest::fred::{produce_fred, FredClient};
use tickmesh_ingest::http::RetryPolicy;
use tickmesh_io::bus::BusConfig;

const KEY: &str = "PKTEST";
const SECRET: &str = "sEcReT";
const FRED_KEY: &str = "abcdef0123456789abcdef0123456789";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the server saw and how it misbehaves.
#[derive(Default)]
struct Api {
    /// Every request: path and query.
    log: Vec<(String, HashMap<String, String>)>,
    /// Times each (path, page) was asked for.
    hits: HashMap<String, usize>,
    /// When the 429 was sent.
    throttled_at: Option<Instant>,
    /// When the request after the 429 came.
    after_throttle: Option<Instant>,
    /// Answer every request with 503.
    always_503: bool,
}

type Shared = Arc<Mutex<Api>>;

fn json(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

async fn alpaca_bars(
    State(api): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut api = api.lock().unwrap();
    api.log.push(("/v2/stocks/bars".into(), q.clone()));
    if api.always_503 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html>upstream unavailable</html>",
        )
            .into_response();
    }
    let key = headers.get("APCA-API-KEY-ID").and_then(|v| v.to_str().ok());
    let secret = headers
        .get("APCA-API-SECRET-KEY")
        .and_then(|v| v.to_str().ok());
    if key != Some(KEY) || secret != Some(SECRET) {
        return json(StatusCode::FORBIDDEN, fixture("alpaca_403.json"));
    }
    let page = match q.get("page_token").map(String::as_str) {
        None => 1,
        Some("QUFQTHxNfDIwMjEtMDEtMDhUMTQ6MzE6MDAuMDAwMDAwMDAwWg==") => 2,
        Some("TVNGVHxNfDIwMjEtMDEtMDhUMTQ6MzA6MDAuMDAwMDAwMDAwWg==") => 3,
        Some(other) => {
            return json(
                StatusCode::BAD_REQUEST,
                format!(r#"{{"code":40010001,"message":"invalid page_token {other}"}}"#),
            )
        }
    };
    let hits = {
        let h = api.hits.entry(format!("alpaca{page}")).or_default();
        *h += 1;
        *h
    };
    match (page, hits) {
        // Page 2 is first refused for the rate limit, with Retry-After.
        (2, 1) => {
            api.throttled_at = Some(Instant::now());
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1"), ("content-type", "application/json")],
                fixture("alpaca_429.json"),
            )
                .into_response()
        }
        (2, _) => {
            api.after_throttle.get_or_insert(Instant::now());
            json(StatusCode::OK, fixture("alpaca_bars_2.json"))
        }
        // Page 3 first fails with a 502 from a proxy.
        (3, 1) => (StatusCode::BAD_GATEWAY, "<html>bad gateway</html>").into_response(),
        (p, _) => json(StatusCode::OK, fixture(&format!("alpaca_bars_{p}.json"))),
    }
}

async fn fred_observations(
    State(api): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut api = api.lock().unwrap();
    api.log
        .push(("/fred/series/observations".into(), q.clone()));
    if q.get("api_key").map(String::as_str) != Some(FRED_KEY) {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error_code":400,"error_message":"Bad Request.  The value for variable api_key is not registered."}"#.into(),
        );
    }
    let offset = q.get("offset").map(String::as_str).unwrap_or("0");
    let series = q.get("series_id").map(String::as_str).unwrap_or("");
    let hits = {
        let h = api.hits.entry(format!("fred{series}{offset}")).or_default();
        *h += 1;
        *h
    };
    match (series, offset, hits) {
        ("CPIAUCSL", "0", _) => json(StatusCode::OK, fixture("fred_cpiaucsl.json")),
        // DGS10's first page first fails with a 500.
        ("DGS10", "0", 1) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error_code":500,"error_message":"Internal Server Error"}"#.into(),
        ),
        ("DGS10", "0", _) => json(StatusCode::OK, fixture("fred_dgs10_1.json")),
        ("DGS10", "3", _) => json(StatusCode::OK, fixture("fred_dgs10_2.json")),
        _ => json(StatusCode::BAD_REQUEST, fixture("fred_400.json")),
    }
}

async fn serve() -> (SocketAddr, Shared) {
    let api: Shared = Default::default();
    let app = Router::new()
        .route("/v2/stocks/bars", get(alpaca_bars))
        .route("/fred/series/observations", get(fred_observations))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, api)
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        base: Duration::from_millis(20),
        max_wait: Duration::from_secs(5),
    }
}

/// The messages of a spool topic, in publish order.
async fn published(bus: &BusConfig, topic: &str) -> Vec<Vec<u8>> {
    let mut sub = bus.subscribe(topic, "check").await.unwrap();
    let batch = sub
        .poll_batch(1000, Duration::from_millis(200))
        .await
        .unwrap();
    batch.into_iter().map(|r| r.payload).collect()
}

#[tokio::test]
async fn alpaca_pages_retries_and_ticker_weeks() {
    let (addr, api) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let bus = BusConfig::Spool {
        root: dir.path().to_path_buf(),
    };
    let publisher = bus.publisher().unwrap();
    let mut client = AlpacaClient::new(&format!("http://{addr}"), "sip", KEY, SECRET).unwrap();
    client.retry = fast();
    let start: DateTime<Utc> = "2021-01-04T00:00:00Z".parse().unwrap();
    let end: DateTime<Utc> = "2021-01-12T00:00:00Z".parse().unwrap();
    let tickers = vec!["AAPL".to_string(), "MSFT".to_string()];
    let mut seen = Vec::new();
    let report = produce_alpaca(&client, publisher.as_ref(), &tickers, start, end, |r| {
        seen.push(r.pages)
    })
    .await
    .unwrap();
    assert_eq!(
        (report.pages, report.bars, report.retries),
        (3, 7, 2),
        "{report:?}"
    );
    assert_eq!(seen, [1, 2, 3], "progress after every page");

    // The 429's Retry-After (1 s) was honoured, not the 20 ms backoff.
    {
        let api = api.lock().unwrap();
        let waited = api.after_throttle.unwrap() - api.throttled_at.unwrap();
        assert!(
            waited >= Duration::from_millis(950),
            "retried after {waited:?}"
        );
        // The query asks for what the producer needs.
        let (_, q) = &api.log[0];
        for (k, v) in [
            ("symbols", "AAPL,MSFT"),
            ("timeframe", "1Min"),
            ("limit", "10000"),
            ("adjustment", "all"),
            ("feed", "sip"),
            ("start", "2021-01-04T00:00:00Z"),
            ("end", "2021-01-12T00:00:00Z"),
        ] {
            assert_eq!(q.get(k).map(String::as_str), Some(v), "{k} in {q:?}");
        }
        assert_eq!(api.log.len(), 5, "3 pages, one 429 and one 502");
    }

    // One message per ticker-week; MSFT's first week spans two pages and
    // is still one message. The pre-market bar is kept (the aggregator
    // decides about sessions).
    let msgs: Vec<BarsMessage> = published(&bus, topics::BARS)
        .await
        .iter()
        .map(|p| BarsMessage::parse(p).unwrap())
        .collect();
    let summary: Vec<(String, usize, String)> = msgs
        .iter()
        .map(|m| (m.ticker.clone(), m.bars.len(), m.bars[0].t.to_rfc3339()))
        .collect();
    assert_eq!(
        summary,
        [
            ("AAPL".into(), 3, "2021-01-08T09:00:00+00:00".into()),
            ("AAPL".into(), 1, "2021-01-11T14:30:00+00:00".into()),
            ("MSFT".into(), 2, "2021-01-08T14:30:00+00:00".into()),
            ("MSFT".into(), 1, "2021-01-11T14:30:00+00:00".into()),
        ]
    );
    assert_eq!(report.messages, 4);
    assert_eq!(msgs[0].bars[1].v, 1_417_345);
    assert_eq!(msgs[0].bars[1].vw, 132.2147);
}

#[tokio::test]
async fn alpaca_errors_name_the_status_and_body() {
    let (addr, api) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let bus = BusConfig::Spool {
        root: dir.path().to_path_buf(),
    };
    let publisher = bus.publisher().unwrap();
    let start: DateTime<Utc> = "2021-01-04T00:00:00Z".parse().unwrap();
    let end: DateTime<Utc> = "2021-01-12T00:00:00Z".parse().unwrap();
    let tickers = vec!["AAPL".to_string()];

    // Wrong keys: a 403 is not retried, and the error quotes the body.
    let mut wrong = AlpacaClient::new(&format!("http://{addr}"), "sip", KEY, "nope").unwrap();
    wrong.retry = fast();
    let e = produce_alpaca(&wrong, publisher.as_ref(), &tickers, start, end, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") && e.contains("forbidden."), "{e}");
    assert!(!e.contains("nope"), "the secret leaked into the error: {e}");
    assert_eq!(api.lock().unwrap().log.len(), 1, "a 403 is not retried");

    // A server that keeps failing: retried, then a clear error.
    api.lock().unwrap().always_503 = true;
    let mut client = AlpacaClient::new(&format!("http://{addr}"), "sip", KEY, SECRET).unwrap();
    client.retry = RetryPolicy {
        attempts: 3,
        ..fast()
    };
    let e = produce_alpaca(&client, publisher.as_ref(), &tickers, start, end, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gave up after 3 attempts")
            && e.contains("503")
            && e.contains("upstream unavailable"),
        "{e}"
    );
    assert_eq!(api.lock().unwrap().log.len(), 4);

    // Nothing listening: a connection error, retried, named.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut client = AlpacaClient::new(&format!("http://{closed}"), "sip", KEY, SECRET).unwrap();
    client.retry = RetryPolicy {
        attempts: 2,
        ..fast()
    };
    let e = produce_alpaca(&client, publisher.as_ref(), &tickers, start, end, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("request failed") && e.contains("gave up after 2"),
        "{e}"
    );
    assert!(published(&bus, topics::BARS).await.is_empty());
}

#[tokio::test]
async fn fred_pages_missing_values_and_errors() {
    let (addr, api) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let bus = BusConfig::Spool {
        root: dir.path().to_path_buf(),
    };
    let publisher = bus.publisher().unwrap();
    let mut client = FredClient::new(&format!("http://{addr}"), FRED_KEY).unwrap();
    client.retry = fast();
    let series = vec!["CPIAUCSL".to_string(), "DGS10".to_string()];
    let report = produce_fred(&client, publisher.as_ref(), &series, None, None)
        .await
        .unwrap();
    assert_eq!(
        report.series,
        [("CPIAUCSL".to_string(), 5), ("DGS10".to_string(), 5)]
    );
    assert_eq!((report.missing, report.retries, report.messages), (1, 1, 2));
    {
        let api = api.lock().unwrap();
        let offsets: Vec<_> = api
            .log
            .iter()
            .map(|(_, q)| (q["series_id"].clone(), q["offset"].clone()))
            .collect();
        assert_eq!(
            offsets,
            [
                ("CPIAUCSL".to_string(), "0".to_string()),
                ("DGS10".into(), "0".into()),
                ("DGS10".into(), "0".into()),
                ("DGS10".into(), "3".into()),
            ]
        );
        assert_eq!(api.log[0].1["file_type"], "json");
    }
    let msgs: Vec<MacroMessage> = published(&bus, topics::MACRO)
        .await
        .iter()
        .map(|p| MacroMessage::parse(p).unwrap())
        .collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].series, "CPIAUCSL");
    assert_eq!(msgs[0].observations[2].value, 262.2);
    // DGS10's "." on 2021-01-01 is skipped, not sent as a number.
    let dates: Vec<String> = msgs[1]
        .observations
        .iter()
        .map(|o| o.date.to_string())
        .collect();
    assert_eq!(
        dates,
        [
            "2021-01-04",
            "2021-01-05",
            "2021-01-06",
            "2021-01-07",
            "2021-01-08"
        ]
    );

    // An unknown series: the API's message, without the key.
    let e = produce_fred(&client, publisher.as_ref(), &["NOPE".into()], None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("400") && e.contains("The series does not exist"),
        "{e}"
    );
    assert!(!e.contains(FRED_KEY), "the key leaked into the error: {e}");
    // A malformed series id is refused before any request.
    let before = api.lock().unwrap().log.len();
    let e = produce_fred(
        &client,
        publisher.as_ref(),
        &["cpi aucsl".into()],
        None,
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("A-Z 0-9 _"), "{e}");
    assert_eq!(api.lock().unwrap().log.len(), before);
}

#[test]
fn a_missing_key_names_its_variable() {
    let e = tickmesh_ingest::http::secret("TICKMESH_TEST_NEVER_SET", "fred")
        .unwrap_err()
        .to_string();
    assert!(e.contains("set TICKMESH_TEST_NEVER_SET"), "{e}");
}
