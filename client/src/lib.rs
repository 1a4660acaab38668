//! The lcache client library: reading build contexts, deriving keys offline, and the
//! commands the `lcache` binary runs.

pub mod cli;
pub mod commands;
pub mod content_hash;
pub mod context_walk;
pub mod errors;
pub mod keys_render;
pub mod local_context;
pub mod offline_keys;
