//! Two writers merging into the same ticker-week lose nothing, on the real
//! S3 server (`scripts/services.sh up`) and on the local store.
//!
//! - A write based on a version another writer has since replaced is
//!   refused by the server (`If-Match`), and a create of an object that
//!   exists meanwhile (`If-None-Match: *`) too.
//! - A writer whose read went stale while another wrote merges again.
//! - Two writers merge disjoint minutes of one week into one object at the
//!   same time, 20 rounds each: the object ends with every bar. Locally
//!   they race without the per-object lock a process's writers share (as
//!   writers in two processes would), and do lose races and merge again;
//!   on s3s-fs they share the lock (see the S3 test for why).
//! - An object another process wrote is merged into, though this process
//!   first tries to create it without reading.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{bars_object_key, IsoWeek};
use tickmesh_ingest::bars_consumer::Bars;
use tickmesh_ingest::consumer::{merge_into_object, write_object};
use tickmesh_io::parquet_io::decode_bars;
use tickmesh_io::store::{buckets, LocalStore, ObjectStore, S3Store};

async fn refuses_stale_versions(store: &dyn ObjectStore) {
    let key = "CAS/2024/01/CAS_2024-W02.parquet";
    assert!(store
        .put_if(buckets::STOCK_DATA, key, Bytes::from_static(b"one"), None)
        .await
        .unwrap());
    // A second create loses: the object exists.
    assert!(!store
        .put_if(buckets::STOCK_DATA, key, Bytes::from_static(b"two"), None)
        .await
        .unwrap());
    let (data, v1) = store
        .get_tagged(buckets::STOCK_DATA, key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&data[..], b"one");
    // Another writer replaces it ...
    assert!(store
        .put_if(
            buckets::STOCK_DATA,
            key,
            Bytes::from_static(b"three"),
            Some(&v1)
        )
        .await
        .unwrap());
    // ... so a write based on v1 is refused and changes nothing.
    assert!(!store
        .put_if(
            buckets::STOCK_DATA,
            key,
            Bytes::from_static(b"stale"),
            Some(&v1)
        )
        .await
        .unwrap());
    let (data, v3) = store
        .get_tagged(buckets::STOCK_DATA, key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&data[..], b"three");
    assert_ne!(v1, v3);
}

async fn two_writers_lose_nothing(a: Arc<dyn ObjectStore>, b: Arc<dyn ObjectStore>, locked: bool) {
    let bars = SyntheticMarket.bars(
        "TWOW",
        "2024-01-08".parse().unwrap(),
        "2024-01-12".parse().unwrap(),
    );
    let key = bars_object_key("TWOW", IsoWeek::of(bars[0].t));
    let rows = bars.clone();
    // Writer A takes the even minutes, B the odd ones, 20 slices each.
    let (even, odd): (Vec<_>, Vec<_>) = rows.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let slices =
        |v: Vec<(usize, &tickmesh_core::types::Bar)>| -> Vec<Vec<tickmesh_core::types::Bar>> {
            let v: Vec<_> = v.into_iter().map(|(_, r)| *r).collect();
            v.chunks(v.len().div_ceil(20)).map(|c| c.to_vec()).collect()
        };
    let run =
        |store: Arc<dyn ObjectStore>, parts: Vec<Vec<tickmesh_core::types::Bar>>, key: String| {
            tokio::spawn(async move {
                let mut conflicts = 0;
                for p in parts {
                    conflicts += if locked {
                        write_object::<Bars>(store.as_ref(), &key, &p)
                            .await
                            .unwrap()
                    } else {
                        merge_into_object::<Bars>(store.as_ref(), &key, &p)
                            .await
                            .unwrap()
                    };
                }
                conflicts
            })
        };
    let ta = run(a.clone(), slices(even), key.clone());
    let tb = run(b, slices(odd), key.clone());
    let (ca, cb) = (ta.await.unwrap(), tb.await.unwrap());
    let data = a.get(buckets::STOCK_DATA, &key).await.unwrap().unwrap();
    let back = decode_bars(data, &key).unwrap();
    assert_eq!(back, bars, "every bar of both writers is in the object");
    eprintln!("conflicts retried: {ca} + {cb}");
    if !locked {
        assert!(
            ca + cb > 0,
            "the writers never raced: the test lost its point"
        );
    }
}

/// Writer A reads the week and merges its rows; writer B writes its rows
/// meanwhile; A's write is refused, A merges again, and the object holds
/// both: the lost update of an unconditional read-modify-write, prevented.
async fn the_slower_writer_merges_again(store: &dyn ObjectStore) {
    let bars = SyntheticMarket.bars(
        "SLOW",
        "2024-01-08".parse().unwrap(),
        "2024-01-09".parse().unwrap(),
    );
    let key = bars_object_key("SLOW", IsoWeek::of(bars[0].t));
    let rows = bars.clone();
    let (a_rows, b_rows) = rows.split_at(rows.len() / 2);
    let seen = store.get_tagged(buckets::STOCK_DATA, &key).await.unwrap();
    assert!(seen.is_none());
    let a_bytes = <Bars as tickmesh_ingest::consumer::Source>::merge(&key, None, a_rows).unwrap();
    merge_into_object::<Bars>(store, &key, b_rows)
        .await
        .unwrap();
    assert!(
        !store
            .put_if(buckets::STOCK_DATA, &key, a_bytes, None)
            .await
            .unwrap(),
        "A's write, based on an object that did not exist, is refused"
    );
    merge_into_object::<Bars>(store, &key, a_rows)
        .await
        .unwrap();
    let data = store.get(buckets::STOCK_DATA, &key).await.unwrap().unwrap();
    assert_eq!(decode_bars(data, &key).unwrap(), bars);
}

/// An object that another process wrote, and this one has never seen, is
/// merged into, not replaced: the first write of an unseen object is a
/// create (`If-None-Match: *`) without a read, which the server refuses
/// here, and the read, merge and `If-Match` write follow. The refused
/// create is not a conflict between writers.
async fn an_unseen_object_is_merged_not_replaced(store: &dyn ObjectStore, ticker: &str) {
    let bars = SyntheticMarket.bars(
        ticker,
        "2024-01-08".parse().unwrap(),
        "2024-01-09".parse().unwrap(),
    );
    let key = bars_object_key(ticker, IsoWeek::of(bars[0].t));
    let (theirs, ours) = bars.split_at(bars.len() / 3);
    // Written by "another process": straight to the store.
    let data = <Bars as tickmesh_ingest::consumer::Source>::merge(&key, None, theirs).unwrap();
    assert!(store
        .put_if(buckets::STOCK_DATA, &key, data, None)
        .await
        .unwrap());
    let conflicts = merge_into_object::<Bars>(store, &key, ours).await.unwrap();
    assert_eq!(conflicts, 0, "a refused create is not a writers' conflict");
    let data = store.get(buckets::STOCK_DATA, &key).await.unwrap().unwrap();
    assert_eq!(decode_bars(data, &key).unwrap(), bars);
}

/// On the S3 server. Writers racing on one key at full speed without the
/// process's lock are run on the local store only: s3s-fs 0.14.1 checks a
/// condition before it writes and saves an object's checksum apart from its
/// content, so two PUTs of one key at the same instant can both pass and
/// leave the object unreadable (AWS S3 and MinIO check atomically).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_is_refused_and_two_writers_lose_nothing_on_s3() {
    let (cfg, _a) = common::distributed("cas").await;
    let s3 = S3Store::new(&cfg.s3);
    refuses_stale_versions(&s3).await;
    the_slower_writer_merges_again(&s3).await;
    an_unseen_object_is_merged_not_replaced(&s3, "UNSN").await;
    // Two consumers of one process share its per-object lock.
    two_writers_lose_nothing(
        Arc::new(S3Store::new(&cfg.s3)),
        Arc::new(S3Store::new(&cfg.s3)),
        true,
    )
    .await;
}

/// An object above the multipart threshold goes up in 8 MiB parts (s3s-fs
/// names a multipart object's ETag `{hash}-{parts}`), reads back whole, and
/// its completion obeys the write condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_goes_up_in_parts_under_its_write_condition() {
    use tickmesh_io::store::{MULTIPART_PART, MULTIPART_THRESHOLD};
    let (cfg, _a) = common::distributed("multipart").await;
    let s3 = S3Store::new(&cfg.s3);
    let key = "BIG/2024/01/BIG_2024-W02.parquet";
    let size = MULTIPART_THRESHOLD + 1;
    let data: Bytes = (0..size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    assert!(s3
        .put_if(buckets::STOCK_DATA, key, data.clone(), None)
        .await
        .unwrap());
    let (back, tag) = s3
        .get_tagged(buckets::STOCK_DATA, key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, data);
    let parts = size.div_ceil(MULTIPART_PART);
    assert!(
        tag.trim_matches('"').ends_with(&format!("-{parts}")),
        "ETag {tag}"
    );
    // A second create and a write from a stale version are refused.
    assert!(!s3
        .put_if(buckets::STOCK_DATA, key, data.clone(), None)
        .await
        .unwrap());
    // (An ETag follows the content: the replacement must differ.)
    let mut other = data.to_vec();
    other[0] ^= 1;
    assert!(s3
        .put_if(buckets::STOCK_DATA, key, other.into(), Some(&tag))
        .await
        .unwrap());
    assert!(!s3
        .put_if(buckets::STOCK_DATA, key, data, Some(&tag))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_is_refused_and_two_writers_lose_nothing_locally() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open(dir.path()).unwrap();
    refuses_stale_versions(&local).await;
    the_slower_writer_merges_again(&local).await;
    an_unseen_object_is_merged_not_replaced(&local, "UNSL").await;
    two_writers_lose_nothing(
        Arc::new(LocalStore::open(dir.path()).unwrap()),
        Arc::new(LocalStore::open(dir.path()).unwrap()),
        false,
    )
    .await;
}
