//! The lcache client library: reading build contexts, deriving keys offline, and the
//! commands the `lcache` binary runs.

pub mod cli;
pub mod commands;
pub mod keys_render;
pub mod offline_keys;
