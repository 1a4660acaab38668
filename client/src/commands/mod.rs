//! One module per subcommand; each turns parsed arguments into output.

pub mod keys;
pub mod parse;
