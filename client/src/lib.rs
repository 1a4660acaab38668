//! The lcache client library: the commands the `lcache` binary runs, lcached's client (the
//! builder's cache and control plane), and deriving keys offline.

pub mod analyze_view;
pub mod build_inputs;
pub mod cli;
pub mod commands;
pub mod daemon_cache;
pub mod daemon_choice;
pub mod daemon_client;
pub mod docker_credentials;
pub mod errors;
pub mod image_import;
pub mod image_views;
pub mod layer_analysis;
pub mod offline_keys;
pub mod progress;
pub mod registry_ops;
pub mod render;
