//! The lcache client library: the commands the `lcache` binary runs, the daemon client, and
//! deriving keys offline.

pub mod build_inputs;
pub mod cli;
pub mod commands;
pub mod daemon_choice;
pub mod daemon_client;
pub mod errors;
pub mod layer_diff;
pub mod layer_extract;
pub mod offline_keys;
pub mod render;
