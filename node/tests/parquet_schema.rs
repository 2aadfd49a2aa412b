//! The Parquet objects of all three sources, written by the consumers'
//! write path from the committed real samples (bokeh's AAPL daily bars,
//! statsmodels' macrodata, SEC-derived fundamentals), read by pyarrow and
//! DuckDB (`scripts/setup.sh` installs both into the test venv) and
//! checked against the schema table in README.md.

mod common;

use common::*;
use tickmesh_ingest::bars_consumer::write_bars;
use tickmesh_ingest::company_consumer::Company;
use tickmesh_ingest::consumer::write_object;
use tickmesh_ingest::macro_consumer::Macro;
use tickmesh_ingest::producer::{
    read_daily_csv, read_fundamentals, read_macro_csv, weekly_messages,
};
use tickmesh_io::store::{buckets, LocalStore, ObjectStore};

#[tokio::test]
async fn parquet_of_every_source_reads_in_pyarrow_and_duckdb_as_the_readme_documents() {
    let py = python_with("pyarrow, duckdb");
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let sample = repo().join("data/sample");

    let bars = read_daily_csv(&sample.join("stocks_daily.csv"), &["AAPL".into()]).unwrap();
    let week = weekly_messages("AAPL", &bars["AAPL"]).remove(0);
    write_bars(&store, &week).await.unwrap();

    let cpi = read_macro_csv(&sample.join("macrodata.csv"))
        .unwrap()
        .into_iter()
        .find(|m| m.series == "CPI")
        .unwrap();
    let y2000: Vec<_> = cpi
        .observations
        .iter()
        .filter(|o| o.date.to_string().starts_with("2000"))
        .copied()
        .collect();
    write_object::<Macro>(&store, "CPI/2000/CPI_2000.parquet", &y2000)
        .await
        .unwrap();

    // A row with an empty metric (operatingCashFlow) and no dates: nulls.
    let rows = read_fundamentals(&sample.join("fundamentals.csv")).unwrap();
    let aapl = rows
        .into_iter()
        .find(|r| r.symbol == "AAPL" && r.calendar_year == 2021)
        .unwrap();
    write_object::<Company>(&store, "AAPL/2021/AAPL_2021.parquet", &[aapl])
        .await
        .unwrap();

    let mut files = Vec::new();
    for (bucket, prefix) in [
        (buckets::STOCK_DATA, "AAPL/"),
        (buckets::MACRO_DATA, "CPI/"),
        (buckets::COMPANY, "AAPL/"),
    ] {
        let keys = store.list(bucket, prefix).await.unwrap();
        assert_eq!(keys.len(), 1, "{bucket}/{prefix}: {keys:?}");
        files.push(dir.path().join(bucket).join(&keys[0]));
    }
    let [bars_file, macro_file, company_file] = &files[..] else {
        unreachable!()
    };
    let out = std::process::Command::new(&py)
        .arg(repo().join("scripts/py/check_parquet_schema.py"))
        .arg(repo().join("README.md"))
        .arg(format!("bars={}", bars_file.display()))
        .arg(format!("macro={}", macro_file.display()))
        .arg(format!("company={}", company_file.display()))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for source in ["bars", "macro", "company"] {
        assert!(text.contains(&format!("{source}: ")), "{text}");
    }
    println!("{text}");
}
