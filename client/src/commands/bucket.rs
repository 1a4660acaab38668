//! `lcache cache prune --upstream s3://… --older-than AGE`: a bucket tier pruned by age,
//! without a daemon (a cron job, or a CI schedule), for buckets without lifecycle rules.

use anyhow::{Context, Result};
use lcache_bucket::{parse_age, Bucket};

/// Prunes the bucket `url` of what no build used for `older_than`.
pub fn prune(url: &str, older_than: &str, dry_run: bool) -> Result<String> {
    let age = parse_age(older_than)
        .with_context(|| format!("--older-than {older_than}: write a number and d, h, m or s (30d)"))?;
    // The bucket's HTTP client brings no TLS provider of its own.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let bucket = Bucket::from_url(url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt
        .block_on(bucket.prune(age, dry_run))
        .with_context(|| format!("cannot prune {url}"))?;
    let verb = if dry_run { "would remove" } else { "removed" };
    Ok(format!(
        "{url}: {verb} {} records, {} images and {} blobs ({} bytes) unused for {older_than}; kept {} records, {} images and {} blobs\n",
        r.records_removed, r.images_removed, r.blobs_removed, r.bytes_removed, r.records_kept, r.images_kept, r.blobs_kept
    ))
}
