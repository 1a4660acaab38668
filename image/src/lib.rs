//! The image layer of lcache: what OCI images are made of, with no daemon and no build in
//! sight. Layer tars are extracted beneath a root (`lcache_confine`) and made from a
//! directory deterministically; image configs and manifests are assembled here, and image
//! files (`docker save`, OCI layouts, rootfs tars) checked before anything is imported.

pub mod image_archive;
pub mod image_draft;
pub mod image_history;
pub mod layer_diff;
pub mod layer_extract;
pub mod layer_gzip;
pub mod layer_links;
pub mod layer_segments;
pub mod layer_zstd;
pub mod oci_image;
pub mod ordered_workers;
mod read_tee;
pub mod sha256_stream;
