//! Variable substitution in instruction arguments, as BuildKit's shell lexer does it:
//! `$V`, `${V}`, `${V:-w}`, `${V-w}`, `${V:+w}`, `${V+w}`, `${V:?msg}`, `${V#p}`, `${V##p}`,
//! `${V%p}`, `${V%%p}`, quotes and escapes.

/// Why a word could not be expanded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ExpandError(pub String);

/// Looks a variable up: `None` when it is not set (which differs from set but empty).
pub trait Vars {
    /// The variable's value, if set.
    fn get(&self, name: &str) -> Option<&str>;
}

impl<F: Fn(&str) -> Option<&'static str>> Vars for F {
    fn get(&self, name: &str) -> Option<&str> {
        self(name)
    }
}

/// Expands one word; quotes are removed, whitespace kept.
pub fn expand_word(s: &str, escape: char, vars: &dyn Vars) -> Result<String, ExpandError> {
    let mut words = Processor {
        chars: s.chars().collect(),
        pos: 0,
        escape,
        vars,
        split: false,
    }
    .run()?;
    Ok(words.pop().unwrap_or_default())
}

/// Expands and splits at unquoted whitespace (for ENV/LABEL pairs, COPY paths, EXPOSE).
pub fn expand_words(s: &str, escape: char, vars: &dyn Vars) -> Result<Vec<String>, ExpandError> {
    Processor {
        chars: s.chars().collect(),
        pos: 0,
        escape,
        vars,
        split: true,
    }
    .run()
}

/// Splits at unquoted whitespace without expanding or removing quotes.
pub fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == q {
                    quote = None;
                } else if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            None => {
                cur.push(c);
                if c == '"' || c == '\'' {
                    quote = Some(c);
                } else if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Processor<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    vars: &'a dyn Vars,
    split: bool,
}

impl Processor<'_> {
    fn run(mut self) -> Result<Vec<String>, ExpandError> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        while let Some(c) = self.next() {
            if self.split && c.is_whitespace() {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                continue;
            }
            in_word = true;
            if c == self.escape {
                match self.next() {
                    Some(n) => cur.push(n),
                    None => cur.push(c),
                }
            } else if c == '\'' {
                loop {
                    match self.next() {
                        Some('\'') => break,
                        Some(n) => cur.push(n),
                        None => return Err(ExpandError("unterminated single quote".into())),
                    }
                }
            } else if c == '"' {
                self.double_quoted(&mut cur)?;
            } else if c == '$' {
                cur.push_str(&self.dollar()?);
            } else {
                cur.push(c);
            }
        }
        if in_word || !self.split {
            words.push(cur);
        }
        Ok(words)
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        self.pos += usize::from(c.is_some());
        c
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn double_quoted(&mut self, cur: &mut String) -> Result<(), ExpandError> {
        loop {
            match self.next() {
                None => return Err(ExpandError("unterminated double quote".into())),
                Some('"') => return Ok(()),
                Some('$') => cur.push_str(&self.dollar()?),
                Some(c) if c == self.escape => match self.peek() {
                    Some(n) if n == '"' || n == '$' || n == self.escape => {
                        self.pos += 1;
                        cur.push(n);
                    }
                    _ => cur.push(c),
                },
                Some(c) => cur.push(c),
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    /// Expands what follows a `$`.
    fn dollar(&mut self) -> Result<String, ExpandError> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                self.braced()
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name = self.name();
                Ok(self.vars.get(&name).unwrap_or_default().to_string())
            }
            _ => Ok("$".to_string()),
        }
    }

    fn braced(&mut self) -> Result<String, ExpandError> {
        let name = self.name();
        if name.is_empty() {
            return Err(ExpandError(
                "bad substitution: expected a variable name after ${".into(),
            ));
        }
        let value = self.vars.get(&name);
        let modifier = match self.next() {
            Some('}') => return Ok(value.unwrap_or_default().to_string()),
            Some(':') => match self.next() {
                Some(m @ ('-' | '+' | '?')) => (true, m),
                _ => return Err(ExpandError(format!("bad substitution in ${{{name}:…}}: expected :- :+ or :?"))),
            },
            Some(m @ ('-' | '+' | '?')) => (false, m),
            Some(c @ ('#' | '%')) => {
                // `${V#p}` `${V##p}` strip the shortest/longest prefix matching the shell
                // pattern `p`; `%`/`%%` the suffix (BuildKit's Dockerfile 1.4+ front end).
                let longest = self.peek() == Some(c);
                if longest {
                    self.next();
                }
                let pattern = self.braced_word()?;
                let v = value.unwrap_or_default();
                return Ok(trim_pattern(v, &pattern, c == '#', longest).to_string());
            }
            Some(m) => {
                return Err(ExpandError(format!(
                    "unsupported substitution '{m}' in ${{{name}…}}: use ${{{name}}}, ${{{name}:-default}} or ${{{name}:+alternative}}"
                )))
            }
            None => return Err(ExpandError(format!("missing '}}' after ${{{name}"))),
        };
        let word = self.braced_word()?;
        let (colon, m) = modifier;
        let set = match value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        match m {
            '-' if set => Ok(value.unwrap_or_default().to_string()),
            '-' => Ok(word),
            '+' if set => Ok(word),
            '+' => Ok(String::new()),
            _ if set => Ok(value.unwrap_or_default().to_string()),
            _ => Err(ExpandError(format!(
                "{name}: {}",
                if word.is_empty() { "is not set" } else { word.as_str() }
            ))),
        }
    }

    /// The word inside `${V:-word}`, itself expanded, up to the matching `}`.
    /// (Also the pattern of `${V#pattern}`.)
    fn braced_word(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(ExpandError("missing '}' to close ${".into())),
                Some('}') => return Ok(out),
                Some('$') => out.push_str(&self.dollar()?),
                Some('\'') => loop {
                    match self.next() {
                        Some('\'') => break,
                        Some(n) => out.push(n),
                        None => return Err(ExpandError("unterminated single quote".into())),
                    }
                },
                Some('"') => self.double_quoted(&mut out)?,
                Some(c) if c == self.escape => match self.next() {
                    Some(n) => out.push(n),
                    None => out.push(c),
                },
                Some(c) => out.push(c),
            }
        }
    }
}

/// Whether `s` matches the shell pattern `p` whole: `*` any run, `?` one character,
/// `\\x` a literal `x`.
fn glob_matches(p: &[char], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some(('*', rest)) => (0..=s.len()).any(|i| glob_matches(rest, &s[i..])),
        Some(('?', rest)) => !s.is_empty() && glob_matches(rest, &s[1..]),
        Some(('\\', rest)) if !rest.is_empty() => s.first() == Some(&rest[0]) && glob_matches(&rest[1..], &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && glob_matches(rest, &s[1..]),
    }
}

/// `v` without its shortest or longest prefix (or suffix) matching `pattern`.
fn trim_pattern<'a>(v: &'a str, pattern: &str, prefix: bool, longest: bool) -> &'a str {
    let p: Vec<char> = pattern.chars().collect();
    let cuts: Vec<usize> = v.char_indices().map(|(i, _)| i).chain([v.len()]).collect();
    let mut order: Vec<usize> = if prefix {
        cuts.clone()
    } else {
        cuts.iter().rev().copied().collect()
    };
    if longest {
        order.reverse();
    }
    for cut in order {
        let (part, rest) = if prefix {
            (&v[..cut], &v[cut..])
        } else {
            (&v[cut..], &v[..cut])
        };
        if glob_matches(&p, &part.chars().collect::<Vec<_>>()) {
            return rest;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<&'static str> {
        match name {
            "A" => Some("alpha"),
            "E" => Some(""),
            "SP" => Some("a b"),
            "P" => Some("src/lib/mod.tar.gz"),
            _ => None,
        }
    }

    fn w(s: &str) -> String {
        expand_word(s, '\\', &vars).unwrap()
    }

    #[test]
    fn plain_and_braced_variables_expand() {
        assert_eq!(w("$A/${A}x$NOPE."), "alpha/alphax.");
    }

    #[test]
    fn default_and_alternative_follow_set_versus_empty() {
        assert_eq!(w("${E:-d}|${E-d}|${NOPE-d}|${A:-d}"), "d||d|alpha");
        assert_eq!(w("${E:+x}|${E+x}|${NOPE+x}|${A:+x}"), "|x||x");
        assert_eq!(w("${NOPE:-${A}}"), "alpha");
        // Prefix and suffix removal, shortest and longest, as BuildKit's 1.4+ front end does.
        assert_eq!(
            w("${P#*/}|${P##*/}|${P%.*}|${P%%.*}"),
            "lib/mod.tar.gz|mod.tar.gz|src/lib/mod.tar|src/lib/mod"
        );
        assert_eq!(w("${A#al}|${A%?a}|${A#nomatch}|${NOPE#x}"), "pha|alp|alpha|");
    }

    #[test]
    fn required_variable_errors_with_message() {
        let e = expand_word("${NOPE:?give it}", '\\', &vars).unwrap_err();
        assert_eq!(e.0, "NOPE: give it");
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(w("'$A'\"$A\"\\$A"), "$Aalpha$A");
        assert_eq!(w("\"a \\\"q\\\" \\n\""), "a \"q\" \\n");
        assert_eq!(expand_word("`$A", '`', &vars).unwrap(), "$A");
    }

    #[test]
    fn words_split_on_unquoted_whitespace_only() {
        let v = expand_words("A=1  B=\"two words\" C='x y'", '\\', &vars).unwrap();
        assert_eq!(v, ["A=1", "B=two words", "C=x y"]);
        assert_eq!(split_words("a \"b c\" d\\ e", '\\'), ["a", "\"b c\"", "d\\ e"]);
    }

    #[test]
    fn unsupported_modifier_is_an_error_not_a_guess() {
        assert!(
            expand_word("${A/x/y}", '\\', &vars).is_err(),
            "replacement is not in the Dockerfile language"
        );
        assert!(expand_word("${A", '\\', &vars).is_err());
    }
}
