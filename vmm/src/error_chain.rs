//! Errors with their causes on one line, for log messages: the library's error types keep
//! their causes in `source()` rather than repeating them in their own message.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `error: cause: cause`.
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open disk")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn shows_each_cause_once() {
        let e = Outer(std::io::Error::other("no space"));
        assert_eq!(ErrorChain(&e).to_string(), "cannot open disk: no space");
    }
}
