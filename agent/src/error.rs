//! The agent's request errors: each kind becomes the ttrpc status code the host sees, with a
//! message that says what was wrong.

use std::fmt::Display;

/// A request the agent could not carry out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or its OCI document is malformed or asks for something unsupported.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The container or process is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The guest failed to do what was asked.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An internal error: `what` failed because of `cause` (its whole source chain).
    pub fn internal(what: impl Display, cause: &(dyn std::error::Error + 'static)) -> Self {
        Self::Internal(format!("{what}: {}", chain(cause)))
    }

    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Self::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Self::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Self::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// An error and its sources, `: `-separated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_chains() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = Error::internal("mounting /dev/vdb", &io);
        assert_eq!(e.code(), ttrpc::Code::INTERNAL);
        assert!(e.to_string().starts_with("mounting /dev/vdb: No such file"), "{e}");
        match ttrpc::Error::from(Error::NotFound("no container c1".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "no container c1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
