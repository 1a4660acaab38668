//! The parsed Dockerfile: directives plus instructions, the entry point of the front end.

use serde::Serialize;

use crate::dockerfile_lexer::{lex, Directives};
use crate::errors::DockerfileError;
use crate::instruction::{parse_instruction, Instruction, InstructionKind};

/// A Dockerfile understood at the syntax level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// The file's name, used in messages.
    pub file: String,
    /// Parser directives.
    pub directives: Directives,
    /// Instructions in order.
    pub instructions: Vec<Instruction>,
}

impl Dockerfile {
    /// Parses `text`; `file` names it in errors (`Dockerfile:3:1: …`).
    pub fn parse(file: &str, text: &str) -> Result<Self, DockerfileError> {
        let (directives, raws) = lex(file, text)?;
        let mut instructions = Vec::with_capacity(raws.len());
        let mut seen_from = false;
        for raw in &raws {
            let ins = parse_instruction(file, raw, directives.escape)?;
            match ins.kind {
                InstructionKind::From { .. } => seen_from = true,
                InstructionKind::Arg { .. } => {}
                _ if !seen_from => {
                    return Err(DockerfileError::new(
                        file,
                        ins.line,
                        ins.column,
                        format!("{} comes before the first FROM", raw.keyword),
                        "only ARG may precede FROM; start the stage with FROM <image>",
                    ))
                }
                _ => {}
            }
            instructions.push(ins);
        }
        if !seen_from {
            return Err(DockerfileError::new(
                file,
                1,
                1,
                "no FROM instruction",
                "a Dockerfile starts a stage with FROM <image> (or FROM scratch)",
            ));
        }
        Ok(Self {
            file: file.to_string(),
            directives,
            instructions,
        })
    }
}
