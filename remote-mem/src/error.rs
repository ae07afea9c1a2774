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
    #[error("memory server {addr}: no reply within its {after_ms} ms deadline: server failed")]
    Timeout { addr: String, after_ms: u64 },
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
    #[error("memory server {addr}: authentication failed: {what}")]
    Auth { addr: String, what: String },
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

    /// Where the region went, when the server refused because it was migrated away.
    pub fn moved_to(&self) -> Option<&str> {
        match self {
            // The server's message is "region N moved to ADDR" (StoreError::Moved).
            ClientError::Refused {
                code: ErrorCode::Moved,
                msg,
                ..
            } => msg.rsplit_once(" moved to ").map(|(_, target)| target),
            _ => None,
        }
    }

    /// True when a replica should be dropped: its connection failed, or its server could not
    /// do the request (an internal error, such as a page its memory log found damaged).
    pub fn replica_failed(&self) -> bool {
        self.is_transport() || self.code() == Some(ErrorCode::Internal)
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
            ClientError::Refused { .. }
            | ClientError::BadArgument { .. }
            | ClientError::Auth { .. } => false,
            ClientError::BothFailed { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::StoreError;

    #[test]
    fn moved_target_is_read_back_from_the_servers_message() {
        let server_msg = StoreError::Moved {
            region: 4,
            target: "10.0.0.2:7000".into(),
        }
        .to_string();
        let e = ClientError::Refused {
            addr: "10.0.0.1:7000".into(),
            code: ErrorCode::Moved,
            msg: server_msg,
        };
        assert_eq!(e.moved_to(), Some("10.0.0.2:7000"));
        assert!(e.to_string().contains("10.0.0.1:7000"));
        assert!(!e.is_transport());
    }
}
