//! The object store: where raw Parquet and model checkpoints live.
//!
//! [`ObjectStore`] has two adapters: [`LocalStore`] (a directory, the embedded
//! default) and [`S3Store`] (S3 / MinIO / s3s-fs through aws-sdk-s3). Buckets
//! are logical names ([`buckets`]); a configured prefix is put in front of
//! them. A `put` is atomic: readers see the old object or the new one, never
//! a part (a rename on disk, a single PUT on S3).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::S3Config;
use crate::{Error, Result};

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

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
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
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let tmp = dir.join(format!(".tmp-{}", rand::random::<u64>()));
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::io(&path, e)
            })
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
            if base.exists() {
                walk(&base, &base, &mut out).map_err(|e| Error::io(&base, e))?;
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

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, bucket: &str, key: &str, data: Bytes) -> Result<()> {
        check_key(bucket, key)?;
        let b = self.bucket(bucket);
        self.client
            .put_object()
            .bucket(&b)
            .key(key)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s3_err("put", &b, key, aws_sdk_s3::error::DisplayErrorContext(&e)))?;
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>> {
        check_key(bucket, key)?;
        let b = self.bucket(bucket);
        match self.client.get_object().bucket(&b).key(key).send().await {
            Ok(out) => {
                let data = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| s3_err("get", &b, key, e))?;
                Ok(Some(data.into_bytes()))
            }
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    Ok(None)
                } else {
                    Err(s3_err(
                        "get",
                        &b,
                        key,
                        aws_sdk_s3::error::DisplayErrorContext(&e),
                    ))
                }
            }
        }
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
