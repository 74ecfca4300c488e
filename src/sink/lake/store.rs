//! The lake's object store: opening it (local directory or S3) and reading the manifest.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;

use super::manifest::{Commit, Layout};
use crate::config::LakeConfig;
use crate::domain::TopicPartition;
use crate::sink::SinkError;

/// Opens the configured store: S3 when `[lake.s3]` is set, else the local root directory.
/// Returns the store and a human-readable location for logs.
pub fn open_store(cfg: &LakeConfig) -> Result<(Arc<dyn ObjectStore>, String), SinkError> {
    let err = |path: String| move |source| SinkError::ObjectStore { path, source };
    match &cfg.s3 {
        Some(s3) => {
            // The pipeline retries failed writes with its own backoff and reports readiness, so
            // the client's internal retries stay short: an outage must surface, not hide.
            let retry = object_store::RetryConfig {
                max_retries: 1,
                retry_timeout: s3.request_timeout.0 * 2,
                ..Default::default()
            };
            // Client options first: allow_http lives in them, so setting them later resets it.
            let mut b = AmazonS3Builder::new()
                .with_client_options(
                    object_store::ClientOptions::new().with_timeout(s3.request_timeout.0),
                )
                .with_bucket_name(&s3.bucket)
                .with_region(&s3.region)
                .with_allow_http(s3.allow_http)
                .with_retry(retry);
            if let Some(endpoint) = &s3.endpoint {
                // MinIO and other S3-compatible servers want path-style requests.
                b = b
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                b = b
                    .with_access_key_id(id)
                    .with_secret_access_key(secret.expose());
            }
            let location = format!("s3://{}/{}", s3.bucket, cfg.prefix);
            let store = b.build().map_err(err(location.clone()))?;
            Ok((Arc::new(store), location))
        }
        None => {
            std::fs::create_dir_all(&cfg.root).map_err(|e| SinkError::ObjectStore {
                path: cfg.root.display().to_string(),
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                },
            })?;
            let root = std::fs::canonicalize(&cfg.root).unwrap_or_else(|_| cfg.root.clone());
            let location = root.join(&cfg.prefix).display().to_string();
            let store = LocalFileSystem::new_with_prefix(&root).map_err(err(location.clone()))?;
            Ok((Arc::new(store), location))
        }
    }
}

pub fn store_err(path: &Path) -> impl FnOnce(object_store::Error) -> SinkError + '_ {
    move |source| SinkError::ObjectStore {
        path: path.to_string(),
        source,
    }
}

/// The whole object at `path`.
pub async fn read_bytes(store: &dyn ObjectStore, path: &Path) -> Result<bytes::Bytes, SinkError> {
    store
        .get(path)
        .await
        .map_err(store_err(path))?
        .bytes()
        .await
        .map_err(store_err(path))
}

pub async fn read_json<T: serde::de::DeserializeOwned>(
    store: &dyn ObjectStore,
    path: &Path,
) -> Result<T, SinkError> {
    let bytes = read_bytes(store, path).await?;
    serde_json::from_slice(&bytes).map_err(|e| SinkError::Manifest {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// The commit entries of a listing of a partition's manifest directory (`dir`), in offset
/// order: `<first offset>.json`, not `_pending.json`.
pub(super) async fn commit_paths(
    listing: futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>,
    dir: &Path,
) -> Result<Vec<Path>, SinkError> {
    let mut paths: Vec<Path> = listing
        .map_ok(|m| m.location)
        .try_collect::<Vec<_>>()
        .await
        .map_err(store_err(dir))?
        .into_iter()
        .filter(|p| {
            p.filename()
                .is_some_and(|f| f.ends_with(".json") && !f.starts_with('_'))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Reads every manifest entry of a partition, in offset order.
pub async fn read_commits(
    store: &dyn ObjectStore,
    layout: &Layout,
    tp: &TopicPartition,
) -> Result<Vec<Commit>, SinkError> {
    let dir = layout.manifest_dir(tp);
    let paths = commit_paths(store.list(Some(&dir)), &dir).await?;
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        out.push(read_json(store, &p).await?);
    }
    Ok(out)
}

/// The topic-partitions the manifest has a directory for (`_manifest/<topic>/<partition>/`).
pub async fn lake_partitions(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<TopicPartition>, SinkError> {
    let prefix = prefix.trim_matches('/');
    let root = if prefix.is_empty() {
        Path::from("_manifest")
    } else {
        Path::from(format!("{prefix}/_manifest"))
    };
    let mut out = Vec::new();
    let topics = store
        .list_with_delimiter(Some(&root))
        .await
        .map_err(store_err(&root))?;
    for topic_dir in topics.common_prefixes {
        let Some(topic) = topic_dir.filename().map(str::to_string) else {
            continue;
        };
        let parts = store
            .list_with_delimiter(Some(&topic_dir))
            .await
            .map_err(store_err(&topic_dir))?;
        for p in parts.common_prefixes {
            if let Some(n) = p.filename().and_then(|f| f.parse::<i32>().ok()) {
                out.push(TopicPartition::new(topic.clone(), n));
            }
        }
    }
    out.sort();
    Ok(out)
}
