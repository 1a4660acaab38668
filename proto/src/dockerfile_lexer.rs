//! Dockerfile lexer: parser directives, logical lines (continuations, comments inside them,
//! blank lines) and heredocs, each instruction keeping its line range and text as written.
//!
//! We lex ourselves rather than through `parse-dockerfile` 0.1.9 because that crate only
//! understands one heredoc placed first in a RUN (`RUN python3 <<EOF` and several heredocs on
//! one line fail), which real Dockerfiles use and BuildKit accepts.

use crate::errors::DockerfileError;
use crate::instruction_names::{suggest_instruction, INSTRUCTIONS};

/// Parser directives found at the top of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Directives {
    /// `# syntax=` value, kept for information only.
    pub syntax: Option<String>,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// `# check=` value, kept for information only.
    pub check: Option<String>,
}

/// A heredoc attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Heredoc {
    /// The delimiter word (`EOF` in `<<EOF`), which also names the file it makes in COPY.
    pub delimiter: String,
    /// `<<-`: leading tabs were stripped from the body.
    pub strip_tabs: bool,
    /// False when the delimiter was quoted: no variable expansion in the body.
    pub expand: bool,
    /// The body, each line ending with a newline.
    pub body: String,
    /// 1-based line of the body's first line.
    pub line: usize,
}

/// One instruction as lexed: keyword, arguments with continuations joined, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RawInstruction {
    /// The keyword in upper case (`RUN`).
    pub keyword: String,
    /// Arguments after the keyword, continuations joined, trimmed.
    pub args: String,
    /// The instruction as written, continuations joined (heredoc bodies not included).
    pub written: String,
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// 1-based last line, heredoc bodies included.
    pub end_line: usize,
    /// 1-based column of the keyword.
    pub column: usize,
    /// Heredocs in the order their markers appear.
    pub heredocs: Vec<Heredoc>,
}

/// Lexes a whole Dockerfile. `file` names it in errors.
pub fn lex(file: &str, text: &str) -> Result<(Directives, Vec<RawInstruction>), DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let (directives, mut i) = lex_directives(file, &lines)?;
    let escape = directives.escape;
    let mut out = Vec::new();
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        let start = i;
        let column = line.chars().take_while(|c| c.is_whitespace()).count() + 1;
        let mut joined = String::new();
        let mut cur = trimmed;
        // The last line that holds part of the instruction (blank and comment lines a
        // continuation runs into at the end of the file are not part of it).
        let mut last = i;
        loop {
            let t = cur.trim_end_matches([' ', '\t']);
            // An escaped escape (`\\` at the end) is text, not a continuation, as in BuildKit.
            let trailing = t.chars().rev().take_while(|c| *c == escape).count();
            match t.strip_suffix(escape).filter(|_| trailing % 2 == 1) {
                Some(before) => {
                    joined.push_str(before);
                    i += 1;
                    // Blank and comment lines inside a continuation are dropped, as BuildKit does.
                    while i < lines.len() && is_blank_or_comment(lines[i]) {
                        i += 1;
                    }
                    if i >= lines.len() {
                        break;
                    }
                    cur = lines[i];
                    last = i;
                }
                None => {
                    joined.push_str(cur);
                    break;
                }
            }
        }
        let end = last;
        i = i.max(last + 1);
        let written = joined.trim().to_string();
        let (keyword_written, args) = split_keyword(&written);
        let keyword = keyword_written.to_ascii_uppercase();
        if !INSTRUCTIONS.contains(&keyword.as_str()) {
            let hint = match suggest_instruction(&keyword) {
                Some(s) => format!("did you mean {s}?"),
                None => format!("instructions are {}", INSTRUCTIONS.join(", ")),
            };
            return Err(DockerfileError::new(
                file,
                start + 1,
                column,
                format!("unknown instruction '{keyword_written}'"),
                hint,
            ));
        }
        let mut raw = RawInstruction {
            keyword,
            args: args.to_string(),
            written: written.clone(),
            line: start + 1,
            end_line: end + 1,
            column,
            heredocs: Vec::new(),
        };
        if takes_heredocs(&raw) {
            for marker in heredoc_markers(&raw.args, escape) {
                let (doc, next) = read_heredoc(file, &lines, i, &raw, marker)?;
                raw.heredocs.push(doc);
                raw.end_line = next;
                i = next;
            }
        }
        out.push(raw);
    }
    Ok((directives, out))
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// Splits `KEYWORD rest` at the first whitespace.
pub(crate) fn split_keyword(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(p) => (&s[..p], s[p..].trim_start()),
        None => (s, ""),
    }
}

fn lex_directives(file: &str, lines: &[&str]) -> Result<(Directives, usize), DockerfileError> {
    let mut d = Directives {
        syntax: None,
        escape: '\\',
        check: None,
    };
    let mut seen: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(body) = line.trim_start().strip_prefix('#') else {
            return Ok((d, i));
        };
        let Some((key, value)) = body.split_once('=') else {
            return Ok((d, i));
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Ok((d, i));
        }
        let key = key.to_ascii_lowercase();
        let value = value.trim().to_string();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            return Ok((d, i));
        }
        if seen.contains(&key) {
            return Err(DockerfileError::new(
                file,
                i + 1,
                1,
                format!("the '{key}' parser directive is given twice"),
                "keep only one of them",
            ));
        }
        seen.push(key.clone());
        match key.as_str() {
            "syntax" => d.syntax = Some(value),
            "check" => d.check = Some(value),
            _ => {
                d.escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(DockerfileError::new(
                            file,
                            i + 1,
                            1,
                            format!("invalid escape character '{value}'"),
                            "the escape directive takes \\ or ` only",
                        ))
                    }
                }
            }
        }
    }
    Ok((d, lines.len()))
}

fn takes_heredocs(raw: &RawInstruction) -> bool {
    matches!(raw.keyword.as_str(), "RUN" | "COPY" | "ADD") && !raw.args.trim_start().starts_with('[')
}

struct Marker {
    delimiter: String,
    strip_tabs: bool,
    expand: bool,
}

/// Finds `<<WORD`, `<<-WORD`, `<<"WORD"` and `<<'WORD'` outside quotes, in order.
fn heredoc_markers(args: &str, escape: char) -> Vec<Marker> {
    let mut out = Vec::new();
    let chars: Vec<char> = args.chars().collect();
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else if c == escape && q == '"' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == escape {
            i += 2;
            continue;
        }
        if c == '"' || c == '\'' {
            quote = Some(c);
            i += 1;
            continue;
        }
        let at_word_start = i == 0 || chars[i - 1].is_whitespace();
        if at_word_start && c == '<' && chars.get(i + 1) == Some(&'<') && chars.get(i + 2) != Some(&'<') {
            let mut j = i + 2;
            let strip_tabs = chars.get(j) == Some(&'-');
            if strip_tabs {
                j += 1;
            }
            // The word may be quoted whole or in part (`"EOF"`, `'EOF'`, `E'O'F`): the
            // delimiter is the word without its quotes, and any quote turns expansion off.
            let mut word = String::new();
            let mut quoted = false;
            let mut closed = true;
            while j < chars.len() {
                match chars[j] {
                    q @ ('"' | '\'') => {
                        quoted = true;
                        match chars[j + 1..].iter().position(|c| *c == q) {
                            Some(k) => {
                                word.extend(&chars[j + 1..j + 1 + k]);
                                j += k + 2;
                            }
                            None => {
                                closed = false;
                                break;
                            }
                        }
                    }
                    c if c == escape && j + 1 < chars.len() => {
                        // `\'` is a literal quote, and quotes the word as a quote would.
                        quoted = true;
                        word.push(chars[j + 1]);
                        j += 2;
                    }
                    // `$` too: `<<$EOF` ends at a line `$EOF` (the word is never expanded).
                    c if c.is_alphanumeric() || "_.-$".contains(c) => {
                        word.push(c);
                        j += 1;
                    }
                    _ => break,
                }
            }
            if !word.is_empty() && closed {
                out.push(Marker {
                    delimiter: word,
                    strip_tabs,
                    expand: !quoted,
                });
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Reads a heredoc body starting at line index `from`; returns it and the index after it.
fn read_heredoc(
    file: &str,
    lines: &[&str],
    from: usize,
    raw: &RawInstruction,
    m: Marker,
) -> Result<(Heredoc, usize), DockerfileError> {
    let mut body = String::new();
    let mut j = from;
    while j < lines.len() {
        let l = if m.strip_tabs {
            lines[j].trim_start_matches('\t')
        } else {
            lines[j]
        };
        if l == m.delimiter {
            return Ok((
                Heredoc {
                    delimiter: m.delimiter,
                    strip_tabs: m.strip_tabs,
                    expand: m.expand,
                    body,
                    line: from + 1,
                },
                j + 1,
            ));
        }
        body.push_str(l);
        body.push('\n');
        j += 1;
    }
    Err(DockerfileError::new(
        file,
        raw.line,
        raw.column,
        format!("heredoc <<{} is never closed", m.delimiter),
        format!("end the heredoc with a line holding only {}", m.delimiter),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex_ok(s: &str) -> Vec<RawInstruction> {
        lex("Dockerfile", s).expect("lexes").1
    }

    #[test]
    fn continuation_joins_lines_and_drops_comments_inside() {
        let r = lex_ok("FROM a\nRUN echo a \\\n  # note\n\n    && echo b\nRUN x\n");
        assert_eq!(r[1].args, "echo a     && echo b");
        assert_eq!((r[1].line, r[1].end_line), (2, 5));
        assert_eq!(r[2].line, 6);
    }

    #[test]
    fn a_continuation_into_the_end_of_the_file_ends_on_its_last_line() {
        for text in ["FROM a\nRUN a \\\n  b \\\n", "FROM a\nRUN a \\\n  b \\\n\n# c\n"] {
            let df = crate::dockerfile::Dockerfile::parse("Dockerfile", text).unwrap();
            assert_eq!(
                (df.instructions[1].line, df.instructions[1].end_line),
                (2, 3),
                "{text:?}"
            );
        }
    }

    #[test]
    fn an_escaped_escape_at_the_end_is_not_a_continuation() {
        let df = crate::dockerfile::Dockerfile::parse("Dockerfile", "FROM a\nRUN echo a \\\\\nRUN echo b\n").unwrap();
        assert_eq!(df.instructions.len(), 3, "the next instruction is not swallowed");
        assert_eq!((df.instructions[1].line, df.instructions[1].end_line), (2, 2));
        let df = crate::dockerfile::Dockerfile::parse("Dockerfile", "FROM a\nRUN echo a \\\\\\\n  b\n").unwrap();
        assert_eq!(df.instructions.len(), 2, "an odd run still continues");
    }

    #[test]
    fn escape_directive_switches_continuation_character() {
        let (d, r) = lex("D", "# escape=`\nFROM a\nRUN dir c:\\ `\n  x\n").unwrap();
        assert_eq!(d.escape, '`');
        assert_eq!(r[1].args, "dir c:\\   x");
    }

    #[test]
    fn several_heredocs_on_one_line_are_read_in_order() {
        let r = lex_ok("FROM a\nRUN cat <<A <<-\"B\" > f\none\nA\n\ttwo\n\tB\nRUN y\n");
        let docs = &r[1].heredocs;
        assert_eq!(docs.len(), 2);
        assert_eq!(
            (docs[0].delimiter.as_str(), docs[0].body.as_str(), docs[0].expand),
            ("A", "one\n", true)
        );
        assert_eq!(
            (docs[1].body.as_str(), docs[1].strip_tabs, docs[1].expand),
            ("two\n", true, false)
        );
        assert_eq!(r[1].end_line, 6);
        assert_eq!(r[2].keyword, "RUN");
    }

    #[test]
    fn a_partly_quoted_heredoc_word_is_closed_by_the_word_without_quotes() {
        let r = lex_ok("FROM a\nRUN cat <<e'o'f > f\n$HOME\neof\nRUN y\n");
        assert_eq!(
            r.len(),
            3,
            "the heredoc closes at `eof` and the next instruction stands"
        );
        assert_eq!(r[1].heredocs[0].delimiter, "eof");
        assert!(
            !r[1].heredocs[0].expand,
            "a quote anywhere in the word turns expansion off"
        );
    }

    #[test]
    fn heredoc_marker_inside_quotes_is_not_a_heredoc() {
        let r = lex_ok("FROM a\nRUN echo '<<EOF'\n");
        assert!(r[1].heredocs.is_empty());
    }

    #[test]
    fn unclosed_heredoc_names_its_line() {
        let e = lex("Dockerfile", "FROM a\nRUN <<EOF\nx\n").unwrap_err();
        assert_eq!(e.location.line, 2);
        assert!(e.to_string().contains("never closed"), "{e}");
    }

    #[test]
    fn unknown_instruction_suggests_nearest() {
        let e = lex("Dockerfile", "FROM a\n  RUNN x\n").unwrap_err();
        assert_eq!((e.location.line, e.location.column), (2, 3));
        assert!(e.hint.contains("RUN"), "{e}");
    }

    #[test]
    fn directives_only_count_at_the_top() {
        let (d, _) = lex("D", "FROM a\n# escape=`\n").unwrap();
        assert_eq!(d.escape, '\\');
    }
}
