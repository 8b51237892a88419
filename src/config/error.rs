//! Configuration problems, each pointing at file:line and the option to fix.

use std::fmt;
use std::sync::Arc;

/// Where an option was written: the file and the 1-based line (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: usize,
}

impl Origin {
    /// The origin of byte offset `offset` in `src`.
    pub fn at(file: &Arc<str>, src: &str, offset: usize) -> Self {
        let offset = offset.min(src.len());
        let line = src.as_bytes()[..offset]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        Origin {
            file: file.clone(),
            line,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// One problem with a configuration: where, which option, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    /// The option's dotted name, e.g. `vhost[0].route[1].pool`.
    pub option: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.option, self.message)
    }
}

/// Every problem found in one configuration; the configuration is rejected whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        if let [one] = self.0.as_slice() {
            // one problem, one line
            return writeln!(f, "{one}");
        }
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    pub fn single(origin: Origin, option: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            origin,
            option: option.into(),
            message: message.into(),
        }])
    }
}
