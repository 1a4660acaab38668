//! The lcache builder: executes the plan lcached derived the keys for, step by step, against
//! a [`step_cache::StepCache`] (a hit reuses the stored layer, a miss runs the step in an OCI
//! runtime or copies the sources, and stores its layer), keeps extracted layer snapshots,
//! and exports images. It talks to lcached only through the [`step_cache::StepCache`] and
//! [`build_control::BuildControl`] traits, and reports through [`build_events::BuildObserver`].

pub mod build_control;
pub mod build_events;
pub mod build_loop;
pub mod byte_channel;
pub mod cache_dir;
pub mod copy_changes;
pub mod copy_pack;
pub mod copy_seed;
pub mod copy_step;
pub mod entry_chunks;
pub mod errors;
pub mod image_export;
pub mod miss_causes;
pub mod overlay_mount;
pub mod provisional_snapshots;
pub mod run_mounts;
pub mod run_step;
pub mod snapshot_prune;
pub mod snapshots;
pub mod squash;
pub mod ssh_forward;
pub mod step_cache;
pub mod url_download;
pub mod user_lookup;
