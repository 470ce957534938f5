//! Configuration errors as editors, CI and operators read them: `FILE:LINE:COL: KEY: message`,
//! then the source line with a caret under the column; and [`ConfigErrors`], every error of
//! one file at once.

use std::fmt;
use std::ops::Range;

/// Where in the file an error points: 1-based line and column (in characters) and the text of
/// that line, for the snippet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub line: usize,
    pub column: usize,
    /// The whole source line, without its line break.
    pub source_line: String,
}

impl Location {
    /// The location of byte offset `at` of `text` (clamped to the text and to a character
    /// boundary).
    pub fn of(text: &str, at: usize) -> Location {
        let mut at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        let source_line = text[line_start..line_end].trim_end_matches('\r');
        Location {
            line: text[..line_start].matches('\n').count() + 1,
            column: text[line_start..at].chars().count() + 1,
            source_line: source_line.to_string(),
        }
    }

    /// The location of the start of `span`.
    pub fn of_span(text: &str, span: &Range<usize>) -> Location {
        Location::of(text, span.start)
    }
}

/// A refused configuration value: which file, where, which key (`peer "nas".endpoint`,
/// `host.address`; a peer without a valid name is `peer[2]`) and why, in plain words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub message: String,
    /// `None` when the error has no place in the file (a required table that is missing
    /// altogether).
    pub location: Option<Location>,
}

impl ConfigError {
    /// The first line alone, `FILE:LINE:COL: KEY: message` (`FILE: KEY: message` without a
    /// location): what machine consumers parse.
    pub fn one_line(&self) -> String {
        let mut s = self.file.clone();
        if let Some(l) = &self.location {
            s.push_str(&format!(":{}:{}", l.line, l.column));
        }
        if let Some(key) = &self.key {
            s.push_str(": ");
            s.push_str(key);
        }
        s.push_str(": ");
        s.push_str(&self.message);
        s
    }
}

/// The full form: [`ConfigError::one_line`], then the source line with a caret under the
/// column (like rustc's and the toml crate's own errors).
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())?;
        let Some(l) = &self.location else {
            return Ok(());
        };
        let number = l.line.to_string();
        let gutter = " ".repeat(number.len());
        // Tabs stay tabs so the caret lines up with the source line however it is shown.
        let pad: String = l
            .source_line
            .chars()
            .take(l.column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(
            f,
            "\n{gutter} |\n{number} | {}\n{gutter} | {pad}^",
            l.source_line
        )
    }
}

impl std::error::Error for ConfigError {}

/// Every error of one file, in file order (a syntax error is one error: the rest of the file
/// cannot be read). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// One error of `file`.
    pub fn one(error: ConfigError) -> ConfigErrors {
        ConfigErrors {
            file: error.file.clone(),
            errors: vec![error],
        }
    }

    /// The first error (in file order).
    pub fn first(&self) -> &ConfigError {
        // Built only with at least one error; an empty list would be a bug.
        &self.errors[0]
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.errors.iter()
    }

    /// The first line of each error, one a line (no snippets, no count).
    pub fn one_line(&self) -> String {
        let lines: Vec<String> = self.errors.iter().map(ConfigError::one_line).collect();
        lines.join("\n")
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Each error in full, a blank line between them; with more than one, a last line counts
/// them: `3 errors in /etc/meshd/meshd.toml`.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{e}")?;
        }
        if self.errors.len() > 1 {
            write!(f, "\n\n{} errors in {}", self.errors.len(), self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
