//! `lcache image import`: the file is checked whole first (`lcache_image::image_archive`),
//! then its layers are streamed to lcached from where they lie, and the image is named.

use std::path::Path;

use lcache_builder::build_control::BuildControl;
use lcache_builder::step_cache::{BlobSource, StepCache};
use lcache_image::image_archive::check_archive;
use lcache_proto::wire::ImageRecord;

use crate::errors::ClientError;

/// Imports `file` under `name` (or the name the file carries) into `cache`; returns the
/// stored record and the format that was recognised.
pub fn import_image<C: StepCache + BuildControl>(
    cache: &C,
    file: &Path,
    name: Option<&str>,
    platform: &str,
) -> Result<(ImageRecord, &'static str), ClientError> {
    let work = tempfile::tempdir().map_err(|e| lcache_image::image_archive::ArchiveError {
        file: file.to_path_buf(),
        reason: format!("cannot make a work directory: {e}"),
    })?;
    // Only once every layer checked out is anything stored.
    let checked = check_archive(file, name, platform, work.path())?;
    for b in &checked.layers {
        cache.put_blob(
            &b.digest,
            BlobSource::File {
                path: &b.path,
                offset: b.offset,
                len: b.len,
            },
        )?;
    }
    cache.put_blob(&checked.record.config_digest, BlobSource::Bytes(&checked.config))?;
    cache.put_blob(&checked.record.manifest_digest, BlobSource::Bytes(&checked.manifest))?;
    Ok((cache.put_image(&checked.record)?, checked.format))
}
