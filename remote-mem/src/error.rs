//! Errors the client library returns. Every variant that concerns a server names its address,
//! so a VMM that stops on one tells the operator which memory server failed.

use std::io;

use thiserror::Error;

use crate::protocol::{ErrorCode, ProtocolError};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("memory server {addr}: cannot connect")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("memory server {addr}: connection failed")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("memory server {addr}: connection closed by the server")]
    Closed { addr: String },
    #[error("memory server {addr}: no reply within the timeout")]
    Timeout { addr: String },
    #[error("memory server {addr}: connection unusable after an earlier failure")]
    Poisoned { addr: String },
    #[error("memory server {addr}: {code}: {msg}")]
    Refused {
        addr: String,
        code: ErrorCode,
        msg: String,
    },
    #[error("memory server {addr}: protocol violation")]
    Protocol {
        addr: String,
        #[source]
        source: ProtocolError,
    },
    #[error("memory server {addr}: unexpected reply: {what}")]
    UnexpectedReply { addr: String, what: String },
    #[error("memory server {addr}: bad request: {what}")]
    BadArgument { addr: String, what: &'static str },
    /// Both replicas of a region failed; each string is that failure with its causes.
    #[error("region {region}: both replicas failed: primary: {primary}; backup: {backup}")]
    BothFailed {
        region: u64,
        primary: String,
        backup: String,
    },
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the connection itself failed (as opposed to a refused request): the server
    /// is gone or not speaking the protocol, so a replica should be failed over.
    pub fn is_transport(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Io { .. }
            | ClientError::Closed { .. }
            | ClientError::Timeout { .. }
            | ClientError::Poisoned { .. }
            | ClientError::Protocol { .. }
            | ClientError::UnexpectedReply { .. } => true,
            ClientError::Refused { .. } | ClientError::BadArgument { .. } => false,
            ClientError::BothFailed { .. } => true,
        }
    }
}
