//! The object store: where raw Parquet and model checkpoints live.
//!
//! [`ObjectStore`] has two adapters: [`LocalStore`] (a directory, the embedded
//! default) and [`S3Store`] (S3 / MinIO / s3s-fs through aws-sdk-s3). Buckets
//! are logical names ([`buckets`]); a configured prefix is put in front of
//! them. A `put` is atomic: readers see the old object or the new one, never
//! a part (a rename on disk, a single PUT or a completed multipart upload
//! on S3).
//!
//! Conditional writes ([`ObjectStore::put_if`]) let several writers merge
//! into one object without losing each other's updates: S3 checks
//! `If-Match` / `If-None-Match: *` against the ETag (atomic on AWS S3 and
//! MinIO; s3s-fs 0.14.1 checks before it writes, so two writes racing
//! inside that window can both pass there), and [`LocalStore`] checks its
//! file stamp under a process-wide lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use tickmesh_core::config::S3Config;
use tickmesh_core::{Error, Result};

/// Logical bucket names.
pub mod buckets {
    pub const STOCK_DATA: &str = "stock-data";
    pub const MACRO_DATA: &str = "macro-data";
    pub const COMPANY: &str = "company-fundamentals";
    pub const MODELS: &str = "models";
    pub const ALL: &[&str] = &[STOCK_DATA, MACRO_DATA, COMPANY, MODELS];
}

/// A minimal object store.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Writes the whole object atomically, replacing what was there.
    async fn put(&self, bucket: &str, key: &str, data: Bytes) -> Result<()>;
    /// Reads an object; `None` when it does not exist.
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>>;
    /// Reads an object with its version tag (the ETag on S3, a stamp of the
    /// file on disk), for a later [`ObjectStore::put_if`].
    async fn get_tagged(&self, bucket: &str, key: &str) -> Result<Option<(Bytes, String)>>;
    /// Writes the whole object only if it is still at version `expected`
    /// (`None`: only if it does not exist). `Ok(false)` when another writer
    /// got there first: nothing was written, read it again and merge.
    async fn put_if(
        &self,
        bucket: &str,
        key: &str,
        data: Bytes,
        expected: Option<&str>,
    ) -> Result<bool>;
    /// The keys under `prefix`, sorted.
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>>;
    /// Removes an object (absent is fine).
    async fn delete(&self, bucket: &str, key: &str) -> Result<()>;
    /// Copies an object inside a bucket, atomically at the destination (a
    /// rename on disk, a server-side CopyObject on S3): readers of `to` see
    /// the old object or the whole copy.
    async fn copy(&self, bucket: &str, from: &str, to: &str) -> Result<()>;
    /// A URI for an object, for logs and the model registry.
    fn uri(&self, bucket: &str, key: &str) -> String;
}

pub type SharedStore = Arc<dyn ObjectStore>;

/// Hex sha256 of some bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn check_key(bucket: &str, key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        return Err(Error::Store {
            op: "check",
            bucket: bucket.into(),
            key: key.into(),
            message: "keys are relative paths without empty, `.` or `..` segments".into(),
        });
    }
    Ok(())
}

/// Objects as files under `root/{bucket}/{key}`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (and creates) a store rooted at `root`, with every bucket.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for b in buckets::ALL {
            let p = root.join(b);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(LocalStore { root })
    }

    fn path(&self, bucket: &str, key: &str) -> Result<PathBuf> {
        check_key(bucket, key)?;
        Ok(self.root.join(bucket).join(key))
    }
}

/// Serialises the check-and-rename of [`LocalStore::put_if`] in this process.
static LOCAL_CAS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A file's version stamp: inode, size and modification time. Every put
/// renames a new file into place, so every write gets a new stamp.
fn file_tag(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{:x}-{:x}-{:x}.{:x}",
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

fn write_tmp(dir: &Path, data: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", rand::random::<u64>()));
    let mut f = std::fs::File::create(&tmp)?;
    let r = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let p = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        if entry.file_type()?.is_dir() {
            walk(&p, base, out)?;
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, bucket: &str, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(bucket, key)?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let dir = path.parent().expect("keys have a parent");
            let tmp = write_tmp(dir, &data).map_err(|e| Error::io(&path, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(&path, e)
            })
        })
        .await
        .expect("put task panicked")
    }

    async fn get_tagged(&self, bucket: &str, key: &str) -> Result<Option<(Bytes, String)>> {
        let path = self.path(bucket, key)?;
        tokio::task::spawn_blocking(move || -> Result<Option<(Bytes, String)>> {
            use std::io::Read;
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io(&path, e)),
            };
            // The stamp of the very file read (a rename replaces the inode).
            let meta = f.metadata().map_err(|e| Error::io(&path, e))?;
            let mut buf = Vec::with_capacity(meta.len() as usize);
            f.read_to_end(&mut buf).map_err(|e| Error::io(&path, e))?;
            Ok(Some((Bytes::from(buf), file_tag(&meta))))
        })
        .await
        .expect("get task panicked")
    }

    async fn put_if(
        &self,
        bucket: &str,
        key: &str,
        data: Bytes,
        expected: Option<&str>,
    ) -> Result<bool> {
        let path = self.path(bucket, key)?;
        let expected = expected.map(str::to_string);
        tokio::task::spawn_blocking(move || -> Result<bool> {
            let dir = path.parent().expect("keys have a parent");
            let tmp = write_tmp(dir, &data).map_err(|e| Error::io(&path, e))?;
            let _guard = LOCAL_CAS.lock().unwrap_or_else(|p| p.into_inner());
            let current = match std::fs::metadata(&path) {
                Ok(m) => Some(file_tag(&m)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(Error::io(&path, e));
                }
            };
            if current != expected {
                let _ = std::fs::remove_file(&tmp);
                return Ok(false);
            }
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(&path, e)
            })?;
            Ok(true)
        })
        .await
        .expect("put task panicked")
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(bucket, key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let base = self.root.join(bucket);
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Walk only the folder the prefix names (`AAPL/2024/` → that
            // folder; `AAPL/2024/AAPL_` → `AAPL/2024/`).
            let folder = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let start = if folder.is_empty() || check_key("", folder).is_err() {
                base.clone()
            } else {
                base.join(folder)
            };
            if start.exists() {
                walk(&start, &base, &mut out).map_err(|e| Error::io(&base, e))?;
            }
            out.retain(|k| k.starts_with(&prefix));
            out.sort();
            Ok(out)
        })
        .await
        .expect("list task panicked")
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<()> {
        let path = self.path(bucket, key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    async fn copy(&self, bucket: &str, from: &str, to: &str) -> Result<()> {
        let src = self.path(bucket, from)?;
        let data = tokio::fs::read(&src)
            .await
            .map_err(|e| Error::io(&src, e))?;
        self.put(bucket, to, Bytes::from(data)).await
    }

    fn uri(&self, bucket: &str, key: &str) -> String {
        format!("file://{}/{bucket}/{key}", self.root.display())
    }
}

/// Objects in S3 (or anything that speaks its protocol), path-style.
#[derive(Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    prefix: String,
    endpoint: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn s3_err(op: &'static str, bucket: &str, key: &str, e: impl std::fmt::Display) -> Error {
    Error::Store {
        op,
        bucket: bucket.into(),
        key: key.into(),
        message: e.to_string(),
    }
}

impl S3Store {
    pub fn new(cfg: &S3Config) -> Self {
        let creds = Credentials::new(&cfg.access_key, &cfg.secret_key, None, None, "tickmesh");
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&cfg.endpoint_url)
            .region(Region::new(cfg.region.clone()))
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        S3Store {
            client: aws_sdk_s3::Client::from_conf(conf),
            prefix: cfg.bucket_prefix.clone(),
            endpoint: cfg.endpoint_url.clone(),
        }
    }

    fn bucket(&self, b: &str) -> String {
        format!("{}{b}", self.prefix)
    }

    /// Fails, naming the bucket and the script that creates it, when a bucket
    /// the pipeline needs is missing or the server is unreachable.
    pub async fn check_buckets(&self) -> Result<()> {
        for b in buckets::ALL {
            let name = self.bucket(b);
            self.client
                .head_bucket()
                .bucket(&name)
                .send()
                .await
                .map_err(|e| {
                    s3_err(
                        "head_bucket",
                        &name,
                        "",
                        format!(
                            "{} at {} (scripts/services.sh up creates the buckets)",
                            aws_sdk_s3::error::DisplayErrorContext(&e),
                            self.endpoint
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// Creates every bucket of the pipeline (with the prefix). For tests and
    /// `tickmesh admin buckets create`; an existing bucket is fine.
    pub async fn create_buckets(&self) -> Result<()> {
        for b in buckets::ALL {
            let name = self.bucket(b);
            if self.client.head_bucket().bucket(&name).send().await.is_ok() {
                continue;
            }
            self.client
                .create_bucket()
                .bucket(&name)
                .send()
                .await
                .map_err(|e| {
                    s3_err(
                        "create_bucket",
                        &name,
                        "",
                        aws_sdk_s3::error::DisplayErrorContext(&e),
                    )
                })?;
        }
        Ok(())
    }
}

/// Objects above this size are written as multipart uploads.
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// The part size of a multipart upload.
pub const MULTIPART_PART: usize = 8 * 1024 * 1024;

/// A write condition: `If-Match: tag` or `If-None-Match: *`.
#[derive(Clone, Copy)]
enum Condition<'a> {
    Always,
    Match(&'a str),
    Absent,
}

impl Condition<'_> {
    /// Whether a failed request was refused by this condition (412
    /// PreconditionFailed, or 409 ConditionalRequestConflict on AWS).
    fn refused<E>(
        self,
        e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> bool {
        !matches!(self, Condition::Always)
            && e.raw_response()
                .is_some_and(|r| matches!(r.status().as_u16(), 412 | 409))
    }
}

/// Sets a request's `If-Match` / `If-None-Match` from a [`Condition`]
/// (PutObject and CompleteMultipartUpload both have them).
macro_rules! with_condition {
    ($req:expr, $cond:expr) => {
        match $cond {
            Condition::Always => $req,
            Condition::Match(t) => $req.if_match(t),
            Condition::Absent => $req.if_none_match("*"),
        }
    };
}

impl S3Store {
    /// GET: the body and the ETag; `None` when the object does not exist.
    async fn fetch(&self, bucket: &str, key: &str) -> Result<Option<(Bytes, Option<String>)>> {
        check_key(bucket, key)?;
        let b = self.bucket(bucket);
        match self.client.get_object().bucket(&b).key(key).send().await {
            Ok(out) => {
                let tag = out.e_tag().map(String::from);
                let data = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| s3_err("get", &b, key, error_chain(&e)))?;
                Ok(Some((data.into_bytes(), tag)))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(s3_err(
                "get",
                &b,
                key,
                aws_sdk_s3::error::DisplayErrorContext(&e),
            )),
        }
    }

    /// PUT (or multipart upload above [`MULTIPART_THRESHOLD`]) with a
    /// condition; `Ok(false)` when the condition refused it.
    async fn write(
        &self,
        bucket: &str,
        key: &str,
        data: Bytes,
        cond: Condition<'_>,
    ) -> Result<bool> {
        check_key(bucket, key)?;
        let b = self.bucket(bucket);
        if data.len() > MULTIPART_THRESHOLD {
            return self.write_multipart(&b, key, data, cond).await;
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&b)
            .key(key)
            .body(ByteStream::from(data));
        req = with_condition!(req, cond);
        // The body is not hashed into the signature (SHA-256 of every byte,
        // on both ends): its integrity rests on the CRC32 checksum the SDK
        // sends with it by default, which the server checks.
        match req.customize().disable_payload_signing().send().await {
            Ok(_) => Ok(true),
            Err(e) if cond.refused(&e) => Ok(false),
            Err(e) => Err(s3_err(
                "put",
                &b,
                key,
                aws_sdk_s3::error::DisplayErrorContext(&e),
            )),
        }
    }

    async fn write_multipart(
        &self,
        b: &str,
        key: &str,
        data: Bytes,
        cond: Condition<'_>,
    ) -> Result<bool> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        use futures::{StreamExt, TryStreamExt};
        let up = self
            .client
            .create_multipart_upload()
            .bucket(b)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "multipart create",
                    b,
                    key,
                    aws_sdk_s3::error::DisplayErrorContext(&e),
                )
            })?;
        let id = up
            .upload_id()
            .ok_or_else(|| s3_err("multipart create", b, key, "no upload id"))?
            .to_string();
        let chunks: Vec<(i32, Bytes)> = (0..data.len())
            .step_by(MULTIPART_PART)
            .enumerate()
            .map(|(i, at)| {
                (
                    i as i32 + 1,
                    data.slice(at..(at + MULTIPART_PART).min(data.len())),
                )
            })
            .collect();
        let parts: Result<Vec<CompletedPart>> = futures::stream::iter(chunks)
            .map(|(n, chunk)| {
                let id = id.clone();
                async move {
                    let out = self
                        .client
                        .upload_part()
                        .bucket(b)
                        .key(key)
                        .upload_id(&id)
                        .part_number(n)
                        .body(ByteStream::from(chunk))
                        .customize()
                        .disable_payload_signing()
                        .send()
                        .await
                        .map_err(|e| {
                            s3_err(
                                "multipart part",
                                b,
                                key,
                                aws_sdk_s3::error::DisplayErrorContext(&e),
                            )
                        })?;
                    Ok(CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(String::from))
                        .build())
                }
            })
            .buffered(4)
            .try_collect()
            .await;
        let abort = || async {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(b)
                .key(key)
                .upload_id(&id)
                .send()
                .await;
        };
        let parts = match parts {
            Ok(p) => p,
            Err(e) => {
                abort().await;
                return Err(e);
            }
        };
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(b)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        req = with_condition!(req, cond);
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                abort().await;
                if cond.refused(&e) {
                    Ok(false)
                } else {
                    Err(s3_err(
                        "multipart complete",
                        b,
                        key,
                        aws_sdk_s3::error::DisplayErrorContext(&e),
                    ))
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, bucket: &str, key: &str, data: Bytes) -> Result<()> {
        self.write(bucket, key, data, Condition::Always)
            .await
            .map(|_| ())
    }

    async fn put_if(
        &self,
        bucket: &str,
        key: &str,
        data: Bytes,
        expected: Option<&str>,
    ) -> Result<bool> {
        let cond = match expected {
            Some(t) => Condition::Match(t),
            None => Condition::Absent,
        };
        self.write(bucket, key, data, cond).await
    }

    async fn get_tagged(&self, bucket: &str, key: &str) -> Result<Option<(Bytes, String)>> {
        match self.fetch(bucket, key).await? {
            None => Ok(None),
            Some((data, Some(tag))) => Ok(Some((data, tag))),
            Some((_, None)) => Err(s3_err(
                "get",
                &self.bucket(bucket),
                key,
                "the server sent no ETag (conditional writes need one)",
            )),
        }
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>> {
        Ok(self.fetch(bucket, key).await?.map(|(data, _)| data))
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let b = self.bucket(bucket);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&b)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                s3_err(
                    "list",
                    &b,
                    prefix,
                    aws_sdk_s3::error::DisplayErrorContext(&e),
                )
            })?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<()> {
        check_key(bucket, key)?;
        let b = self.bucket(bucket);
        self.client
            .delete_object()
            .bucket(&b)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "delete",
                    &b,
                    key,
                    aws_sdk_s3::error::DisplayErrorContext(&e),
                )
            })?;
        Ok(())
    }

    async fn copy(&self, bucket: &str, from: &str, to: &str) -> Result<()> {
        check_key(bucket, from)?;
        check_key(bucket, to)?;
        let b = self.bucket(bucket);
        self.client
            .copy_object()
            .bucket(&b)
            .key(to)
            .copy_source(format!("{b}/{from}"))
            .send()
            .await
            .map_err(|e| s3_err("copy", &b, to, aws_sdk_s3::error::DisplayErrorContext(&e)))?;
        Ok(())
    }

    fn uri(&self, bucket: &str, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket(bucket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert!(s.get("models", "a/b").await.unwrap().is_none());
        s.put("models", "a/b", Bytes::from_static(b"x"))
            .await
            .unwrap();
        s.put("models", "a/c", Bytes::from_static(b"y"))
            .await
            .unwrap();
        s.put("models", "a/b", Bytes::from_static(b"z"))
            .await
            .unwrap();
        assert_eq!(&s.get("models", "a/b").await.unwrap().unwrap()[..], b"z");
        assert_eq!(s.list("models", "a/").await.unwrap(), vec!["a/b", "a/c"]);
        assert!(s.put("models", "../x", Bytes::new()).await.is_err());
        s.delete("models", "a/b").await.unwrap();
        assert_eq!(s.list("models", "").await.unwrap(), vec!["a/c"]);
        s.copy("models", "a/c", "b/c").await.unwrap();
        assert_eq!(&s.get("models", "b/c").await.unwrap().unwrap()[..], b"y");
        assert!(s.copy("models", "a/none", "b/d").await.is_err());
    }
}
