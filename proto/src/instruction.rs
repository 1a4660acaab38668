//! Instructions with their arguments understood (flags, exec or shell form, pairs), before
//! variable substitution, each keeping where it stands and how it was written.

use serde::Serialize;

use crate::dockerfile_lexer::{split_keyword, Heredoc, RawInstruction};
use crate::errors::DockerfileError;
use crate::word_expansion::split_words;

/// A `--name[=value]` flag as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flag {
    /// Name without the dashes.
    pub name: String,
    /// Value after `=`, if any (unexpanded).
    pub value: Option<String>,
}

/// A command in exec form (JSON array) or shell form (text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum Command {
    /// `["prog", "arg"]`: run as is, no shell.
    Exec {
        /// The array.
        args: Vec<String>,
    },
    /// `prog arg`: wrapped by the SHELL in effect.
    Shell {
        /// The text, continuations joined.
        text: String,
    },
}

/// What an instruction says, per kind (values not yet substituted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "keyword", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstructionKind {
    /// `FROM image [AS name]`.
    From {
        /// Image reference, stage name or `scratch`.
        image: String,
        /// The stage name after AS.
        name: Option<String>,
    },
    /// `RUN`.
    Run {
        /// The command.
        command: Command,
    },
    /// `CMD`.
    Cmd {
        /// The command.
        command: Command,
    },
    /// `ENTRYPOINT`.
    Entrypoint {
        /// The command.
        command: Command,
    },
    /// `COPY`.
    Copy {
        /// Sources as written (`<<EOF` for a heredoc).
        sources: Vec<String>,
        /// Destination as written.
        dest: String,
    },
    /// `ADD`.
    Add {
        /// Sources as written.
        sources: Vec<String>,
        /// Destination as written.
        dest: String,
    },
    /// `ENV`, both forms.
    Env {
        /// Name and unexpanded value.
        pairs: Vec<(String, String)>,
    },
    /// `LABEL`.
    Label {
        /// Key and unexpanded value.
        pairs: Vec<(String, String)>,
    },
    /// `ARG NAME[=default]…`.
    Arg {
        /// Name and unexpanded default.
        args: Vec<(String, Option<String>)>,
    },
    /// `EXPOSE`.
    Expose {
        /// Ports as written.
        ports: Vec<String>,
    },
    /// `VOLUME`.
    Volume {
        /// Paths as written.
        paths: Vec<String>,
    },
    /// `USER`.
    User {
        /// `user[:group]` as written.
        user: String,
    },
    /// `WORKDIR`.
    Workdir {
        /// Path as written.
        path: String,
    },
    /// `STOPSIGNAL`.
    Stopsignal {
        /// Signal as written.
        signal: String,
    },
    /// `MAINTAINER` (deprecated; a label).
    Maintainer {
        /// Name as written.
        name: String,
    },
    /// `SHELL ["exe", "arg"]`.
    Shell {
        /// The shell array.
        args: Vec<String>,
    },
    /// `HEALTHCHECK [flags] CMD …` or `HEALTHCHECK NONE`.
    Healthcheck {
        /// The test command, or `None` for NONE.
        command: Option<Command>,
    },
    /// `ONBUILD INSTRUCTION`.
    Onbuild {
        /// The deferred instruction.
        instruction: Box<Instruction>,
    },
}

/// One parsed instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// What it says.
    #[serde(flatten)]
    pub kind: InstructionKind,
    /// Flags in the order written.
    pub flags: Vec<Flag>,
    /// 1-based first line.
    pub line: usize,
    /// 1-based last line (heredoc bodies included).
    pub end_line: usize,
    /// 1-based column of the keyword.
    pub column: usize,
    /// As written, continuations joined.
    pub written: String,
    /// Heredoc bodies, in order.
    pub heredocs: Vec<Heredoc>,
}

impl Instruction {
    /// Looks up the last value of flag `name` (`Some("")` for a bare `--name`).
    pub fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|f| f.name == name)
            .map(|f| f.value.as_deref().unwrap_or(""))
    }

    /// Every value of a repeatable flag (`--mount`, `--exclude`).
    pub fn flag_values(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|f| f.name == name)
            .map(|f| f.value.as_deref().unwrap_or(""))
            .collect()
    }
}

fn allowed_flags(keyword: &str) -> &'static [&'static str] {
    match keyword {
        "FROM" => &["platform"],
        "RUN" => &["mount", "network", "security"],
        "COPY" => &["from", "chown", "chmod", "link", "exclude", "parents"],
        "ADD" => &[
            "chown",
            "chmod",
            "link",
            "exclude",
            "checksum",
            "keep-git-dir",
            "unpack",
        ],
        "HEALTHCHECK" => &["interval", "timeout", "start-period", "start-interval", "retries"],
        _ => &[],
    }
}

/// Parses a lexed instruction's arguments. `escape` is the escape character in effect.
pub fn parse_instruction(file: &str, raw: &RawInstruction, escape: char) -> Result<Instruction, DockerfileError> {
    let err = |message: String, hint: &str| DockerfileError::new(file, raw.line, raw.column, message, hint);
    let (flags, rest) = take_flags(&raw.args, escape);
    let allowed = allowed_flags(&raw.keyword);
    for f in &flags {
        if !allowed.contains(&f.name.as_str()) {
            let hint = if allowed.is_empty() {
                format!("{} takes no flags; remove --{}", raw.keyword, f.name)
            } else {
                format!("{} accepts --{}", raw.keyword, allowed.join(", --"))
            };
            return Err(err(format!("unknown flag --{} for {}", f.name, raw.keyword), &hint));
        }
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return Err(err(
            format!("{} needs an argument", raw.keyword),
            &format!("see the Dockerfile reference for {}", raw.keyword),
        ));
    }
    let kind = match raw.keyword.as_str() {
        "FROM" => {
            let words = split_words(rest, escape);
            match words.as_slice() {
                [image] => InstructionKind::From {
                    image: image.clone(),
                    name: None,
                },
                [image, as_, name] if as_.eq_ignore_ascii_case("as") => {
                    let name = name.to_ascii_lowercase();
                    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                    if !valid {
                        return Err(err(
                            format!("invalid stage name '{name}'"),
                            "a stage name starts with a letter and holds letters, digits, '-', '_' or '.'",
                        ));
                    }
                    InstructionKind::From {
                        image: image.clone(),
                        name: Some(name),
                    }
                }
                _ => {
                    return Err(err(
                        "FROM takes an image and an optional AS name".into(),
                        "write FROM image[:tag] [AS name]",
                    ))
                }
            }
        }
        "RUN" => InstructionKind::Run { command: command(rest) },
        "CMD" => InstructionKind::Cmd {
            command: config_command(rest),
        },
        "ENTRYPOINT" => InstructionKind::Entrypoint {
            command: config_command(rest),
        },
        "COPY" | "ADD" => {
            let words = match json_array(rest) {
                Some(a) => a,
                None => split_words(rest, escape),
            };
            if words.len() < 2 {
                return Err(err(
                    format!("{} needs at least one source and a destination", raw.keyword),
                    &format!("write {} <src>… <dest>", raw.keyword),
                ));
            }
            let (dest, sources) = words
                .split_last()
                .map(|(d, s)| (d.clone(), s.to_vec()))
                .unwrap_or_default();
            if raw.keyword == "COPY" {
                InstructionKind::Copy { sources, dest }
            } else {
                InstructionKind::Add { sources, dest }
            }
        }
        "ENV" | "LABEL" => {
            // Both take the old `NAME value with spaces` form, as Docker does.
            let pairs =
                pairs(rest, escape, true).map_err(|m| err(m, "write NAME=value (quote values that hold spaces)"))?;
            if raw.keyword == "ENV" {
                InstructionKind::Env { pairs }
            } else {
                InstructionKind::Label { pairs }
            }
        }
        "ARG" => {
            let mut args = Vec::new();
            for w in split_words(rest, escape) {
                let (name, default) = match w.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (w.clone(), None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(err(
                        format!("invalid ARG name '{name}'"),
                        "an ARG name holds letters, digits and '_'",
                    ));
                }
                args.push((name, default));
            }
            InstructionKind::Arg { args }
        }
        "EXPOSE" => InstructionKind::Expose {
            ports: split_words(rest, escape),
        },
        "VOLUME" => InstructionKind::Volume {
            paths: json_array(rest).unwrap_or_else(|| split_words(rest, escape)),
        },
        "USER" => InstructionKind::User { user: rest.to_string() },
        "WORKDIR" => InstructionKind::Workdir { path: rest.to_string() },
        "STOPSIGNAL" => InstructionKind::Stopsignal {
            signal: rest.to_string(),
        },
        "MAINTAINER" => InstructionKind::Maintainer { name: rest.to_string() },
        "SHELL" => match json_array(rest) {
            Some(args) if !args.is_empty() => InstructionKind::Shell { args },
            _ => {
                return Err(err(
                    "SHELL must be a JSON array".into(),
                    "write SHELL [\"/bin/sh\", \"-c\"]",
                ))
            }
        },
        "HEALTHCHECK" => {
            let (word, cmd) = split_keyword(rest);
            match word.to_ascii_uppercase().as_str() {
                "NONE" => InstructionKind::Healthcheck { command: None },
                "CMD" if !cmd.is_empty() => InstructionKind::Healthcheck {
                    command: Some(command(cmd)),
                },
                _ => {
                    return Err(err(
                        "HEALTHCHECK takes CMD <command> or NONE".into(),
                        "write HEALTHCHECK CMD curl -f http://localhost/",
                    ))
                }
            }
        }
        "ONBUILD" => {
            let (kw, args) = split_keyword(rest);
            let keyword = kw.to_ascii_uppercase();
            if matches!(keyword.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(err(
                    format!("ONBUILD cannot trigger {keyword}"),
                    "ONBUILD takes any other instruction",
                ));
            }
            if !crate::instruction_names::INSTRUCTIONS.contains(&keyword.as_str()) {
                return Err(err(
                    format!("unknown instruction '{kw}' after ONBUILD"),
                    "write ONBUILD followed by an instruction",
                ));
            }
            let inner = RawInstruction {
                keyword,
                args: args.to_string(),
                written: rest.to_string(),
                heredocs: Vec::new(),
                ..raw.clone()
            };
            InstructionKind::Onbuild {
                instruction: Box::new(parse_instruction(file, &inner, escape)?),
            }
        }
        other => return Err(err(format!("unknown instruction '{other}'"), "check the spelling")),
    };
    Ok(Instruction {
        kind,
        flags,
        line: raw.line,
        end_line: raw.end_line,
        column: raw.column,
        written: raw.written.clone(),
        heredocs: raw.heredocs.clone(),
    })
}

/// Takes the leading `--flag[=value]` words; returns them and the rest.
fn take_flags(args: &str, escape: char) -> (Vec<Flag>, &str) {
    let mut flags = Vec::new();
    let mut rest = args.trim_start();
    while let Some(body) = rest.strip_prefix("--") {
        let end = word_end(body, escape);
        let word = &body[..end];
        if word.is_empty() {
            break;
        }
        let (name, value) = match word.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (word.to_string(), None),
        };
        flags.push(Flag { name, value });
        rest = body[end..].trim_start();
    }
    (flags, rest)
}

/// Byte index where the word starting at `s` ends (unquoted whitespace).
fn word_end(s: &str, escape: char) -> usize {
    let mut quote: Option<char> = None;
    let mut skip = false;
    for (i, c) in s.char_indices() {
        if skip {
            skip = false;
            continue;
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c.is_whitespace() => return i,
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == escape => skip = true,
            None => {}
        }
    }
    s.len()
}

fn command(rest: &str) -> Command {
    match json_array(rest) {
        Some(args) if !args.is_empty() => Command::Exec { args },
        _ => Command::Shell { text: rest.to_string() },
    }
}

/// CMD's and ENTRYPOINT's command: as [`command`], but `[]` (or `[ ]`) is the empty list
/// Docker makes of it (clearing an inherited one), not the shell command `[]`.
fn config_command(rest: &str) -> Command {
    match json_array(rest) {
        Some(args) => Command::Exec { args },
        None => command(rest),
    }
}

/// A JSON array of strings, as exec form needs; anything else is shell form.
fn json_array(s: &str) -> Option<Vec<String>> {
    if !s.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(s).ok()
}

/// ENV/LABEL arguments: `K=V K2="v 2"`, or the legacy `K value with spaces`.
fn pairs(rest: &str, escape: char, legacy_allowed: bool) -> Result<Vec<(String, String)>, String> {
    let words = split_words(rest, escape);
    let first_has_eq = words.first().is_some_and(|w| w.contains('='));
    if !first_has_eq && legacy_allowed {
        let (name, value) = split_keyword(rest);
        if value.is_empty() {
            return Err(format!("ENV {name} has no value"));
        }
        return Ok(vec![(name.to_string(), value.to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some(("", _)) => Err(format!("'{w}' has an empty name")),
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!("'{w}' is not of the form NAME=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile_lexer::lex;

    fn parse(s: &str) -> Result<Vec<Instruction>, DockerfileError> {
        let (d, raws) = lex("Dockerfile", s)?;
        raws.iter()
            .map(|r| parse_instruction("Dockerfile", r, d.escape))
            .collect()
    }

    #[test]
    fn an_empty_cmd_or_entrypoint_is_an_empty_list() {
        let df = crate::dockerfile::Dockerfile::parse("Dockerfile", "FROM a\nCMD []\nENTRYPOINT [ ]\n").unwrap();
        for ins in &df.instructions[1..] {
            match &ins.kind {
                InstructionKind::Cmd { command } | InstructionKind::Entrypoint { command } => {
                    assert_eq!(command, &Command::Exec { args: vec![] })
                }
                k => panic!("{k:?}"),
            }
        }
    }

    #[test]
    fn label_takes_the_old_name_value_form_as_env_does() {
        let df = crate::dockerfile::Dockerfile::parse("Dockerfile", "FROM a\nLABEL key some value\n").unwrap();
        match &df.instructions[1].kind {
            InstructionKind::Label { pairs } => assert_eq!(pairs, &[("key".to_string(), "some value".to_string())]),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn flags_forms_and_pairs() {
        let p = parse(
            "FROM --platform=linux/amd64 alpine AS Build\nRUN --mount=type=cache,target=/c --network=none [\"a\", \"b c\"]\nCOPY --chmod=755 --link a b /d/\nENV A=1 B=\"x y\"\nENV C 3 4\nARG X Y=2\n",
        )
        .unwrap();
        assert_eq!(
            p[0].kind,
            InstructionKind::From {
                image: "alpine".into(),
                name: Some("build".into())
            }
        );
        assert_eq!(p[0].flag("platform"), Some("linux/amd64"));
        assert_eq!(
            p[1].kind,
            InstructionKind::Run {
                command: Command::Exec {
                    args: vec!["a".into(), "b c".into()]
                }
            }
        );
        assert_eq!(p[1].flag_values("mount"), ["type=cache,target=/c"]);
        assert_eq!(p[2].flag("link"), Some(""));
        assert_eq!(
            p[2].kind,
            InstructionKind::Copy {
                sources: vec!["a".into(), "b".into()],
                dest: "/d/".into()
            }
        );
        assert_eq!(
            p[3].kind,
            InstructionKind::Env {
                pairs: vec![("A".into(), "1".into()), ("B".into(), "\"x y\"".into())]
            }
        );
        assert_eq!(
            p[4].kind,
            InstructionKind::Env {
                pairs: vec![("C".into(), "3 4".into())]
            }
        );
        assert_eq!(
            p[5].kind,
            InstructionKind::Arg {
                args: vec![("X".into(), None), ("Y".into(), Some("2".into()))]
            }
        );
    }

    #[test]
    fn unknown_flag_names_the_accepted_ones() {
        let e = parse("FROM a\nCOPY --form=b x y\n").unwrap_err();
        assert_eq!(e.location.line, 2);
        assert!(e.hint.contains("--from"), "{e}");
    }

    #[test]
    fn copy_without_destination_is_an_error() {
        let e = parse("FROM a\nCOPY x\n").unwrap_err();
        assert!(e.message.contains("destination"), "{e}");
    }

    #[test]
    fn onbuild_parses_its_instruction_and_refuses_from() {
        let p = parse("FROM a\nONBUILD RUN make\n").unwrap();
        assert!(
            matches!(&p[1].kind, InstructionKind::Onbuild { instruction } if matches!(instruction.kind, InstructionKind::Run { .. }))
        );
        assert!(parse("FROM a\nONBUILD FROM b\n").is_err());
    }
}
