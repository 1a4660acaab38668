//! Reading build contexts from disk, shared by the client (offline keys) and the daemon
//! (its context index): one stat-only walk, parallel streamed hashing, and the
//! `StepSources` that key derivation reads context files through.

pub mod content_hash;
pub mod context_walk;
pub mod errors;
pub mod local_context;
pub mod synthetic_context;
