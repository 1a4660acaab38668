//! One module per subcommand; each turns parsed arguments into output text.

pub mod bucket;
pub mod build;
pub mod explain;
pub mod image;
pub mod keys;
pub mod parse;
pub mod plan;
pub mod status;
pub mod token;
