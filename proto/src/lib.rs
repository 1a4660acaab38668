//! What the lcache client and daemon share, with no I/O of its own: the Dockerfile front end,
//! context selection rules, cache-key derivation and the wire types.

pub mod build_plan;
pub mod byte_size;
pub mod cache_key;
pub mod digest;
pub mod dockerfile;
pub mod dockerfile_lexer;
pub mod dockerignore;
pub mod endpoint;
pub mod errors;
pub mod explain;
pub mod healthcheck;
pub mod image_reference;
pub mod instruction;
pub mod instruction_names;
pub mod key_encoding;
pub mod planned_build;
pub mod platform;
pub mod run_mount;
pub mod source_select;
pub mod sources_digest;
pub mod step_keys;
pub mod wire;
pub mod word_expansion;
