//! The lcache client library: the commands the `lcache` binary runs, the daemon client, and
//! deriving keys offline.

pub mod build_inputs;
pub mod build_loop;
pub mod cache_dir;
pub mod cli;
pub mod commands;
pub mod copy_step;
pub mod daemon_choice;
pub mod daemon_client;
pub mod errors;
pub mod image_export;
pub mod image_import;
pub mod miss_causes;
pub mod offline_keys;
pub mod overlay_mount;
pub mod progress;
pub mod render;
pub mod run_step;
pub mod snapshots;
pub mod step_cache;
pub mod user_lookup;
