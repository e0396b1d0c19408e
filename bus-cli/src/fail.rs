//! The command's errors and exit codes.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | an error (the message says what to do) |
//! | 2 | bad usage (unknown flag, missing argument, malformed value) |
//! | 3 | a timeout (`call`, `get`) |
//! | 4 | an unroutable message (a mandatory publish no queue took) |

use std::fmt;

/// Exit code of a success.
pub const OK: i32 = 0;
/// Exit code of an error.
pub const ERROR: i32 = 1;
/// Exit code of bad usage.
pub const USAGE: i32 = 2;
/// Exit code of a timeout.
pub const TIMEOUT: i32 = 3;
/// Exit code of an unroutable message.
pub const UNROUTABLE: i32 = 4;

/// A failure of the command: what to print and the exit code.
#[derive(Debug)]
pub struct Fail {
    /// The exit code (see the module docs).
    pub code: i32,
    /// The message, credentials already removed.
    pub message: String,
}

/// The result of a verb.
pub type CliResult<T = ()> = Result<T, Fail>;

impl Fail {
    /// A general error (exit 1).
    pub fn error(message: impl Into<String>) -> Self {
        Fail {
            code: ERROR,
            message: message.into(),
        }
    }

    /// Bad usage (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Fail {
            code: USAGE,
            message: message.into(),
        }
    }

    /// Prefixes the message with what was being done.
    #[must_use]
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<bus::Error> for Fail {
    fn from(e: bus::Error) -> Self {
        let code = match &e {
            bus::Error::Timeout(_) => TIMEOUT,
            bus::Error::Unroutable { .. } => UNROUTABLE,
            bus::Error::InvalidArgument(_) => USAGE,
            _ => ERROR,
        };
        let hint = match &e {
            bus::Error::Unroutable { exchange, .. } if exchange.is_empty() => {
                " (is the queue declared? `bus declare queue NAME`)"
            }
            bus::Error::Unroutable { .. } => {
                " (bind a queue to the exchange: `bus bind QUEUE EXCHANGE --routing-key KEY`)"
            }
            bus::Error::NotFound(_) => {
                " (declare it first: `bus declare ...` or `bus topology apply FILE`)"
            }
            _ => "",
        };
        Fail {
            code,
            message: format!("{e}{hint}"),
        }
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::error(e.to_string())
    }
}
