//! Per-vNode credentials, derived from the cluster key, and the HMAC proofs the handshakes use.
//!
//! The cluster key is the shared secret every server holds (loaded by [`crate::secret::load`]).
//! From it the manager derives, for each vNode, credentials that open only that vNode's
//! resources, and hands the vNode those and nothing else:
//!
//! | credential | derivation |
//! |---|---|
//! | memory, vNode `id` | `HMAC-SHA256(cluster_key, "vnode-mem-v1" \|\| id as u64 LE)` |
//! | disk, export `name` | `HMAC-SHA256(cluster_key, "vnode-blk-v1" \|\| name bytes)` |
//! | memory server (migration) | `HMAC-SHA256(cluster_key, "vnode-mem-server-v1")` |
//!
//! A server holding the cluster key recomputes any of them locally: no round trip to anyone.
//! The server credential is never handed to a vNode; servers use it to authenticate to each
//! other when one migrates a region to another.
//!
//! Credentials never cross the wire: a handshake sends only nonces and
//! `HMAC-SHA256(credential, label || 0 || fields...)` proofs ([`proof`]), each direction with its
//! own label so a proof from one side is never valid for the other.
//!
//! On disk and in the environment a credential is 64 hex digits (what `vnode-cred` prints),
//! read through the one secret loader, so line endings are treated the same everywhere.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::secret::{self, Secret, SecretError};

type HmacSha256 = Hmac<Sha256>;

/// Bytes in a credential and in a proof.
pub const CRED_LEN: usize = 32;
/// Bytes in a handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Label of memory credentials.
pub const MEM_LABEL: &[u8] = b"vnode-mem-v1";
/// Label of disk (NBD export) credentials.
pub const BLK_LABEL: &[u8] = b"vnode-blk-v1";
/// Label of the memory servers' own credential.
pub const MEM_SERVER_LABEL: &[u8] = b"vnode-mem-server-v1";

/// A 32-byte key: a credential, or the result of a derivation. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; CRED_LEN]);

#[derive(Debug, Error)]
pub enum CredError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("a credential is 64 hex digits (what vnode-cred prints); got {0} bytes")]
    Format(usize),
    #[error("cannot read random bytes from the system")]
    Random(#[source] getrandom::Error),
}

impl Credential {
    pub fn from_bytes(b: [u8; CRED_LEN]) -> Self {
        Credential(b)
    }

    pub fn as_bytes(&self) -> &[u8; CRED_LEN] {
        &self.0
    }

    /// Parses the hex form (as written in a credential file).
    pub fn from_hex(s: &[u8]) -> Result<Self, CredError> {
        let mut b = [0u8; CRED_LEN];
        hex::decode_to_slice(s, &mut b).map_err(|_| CredError::Format(s.len()))?;
        Ok(Credential(b))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a credential from `file`, else from `$env`; `Ok(None)` if neither is given.
    pub fn load(file: Option<&Path>, env: &str) -> Result<Option<Self>, CredError> {
        match secret::load(file, env)? {
            Some(s) => Self::from_hex(s.as_bytes()).map(Some),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

fn derive(key: &[u8], label: &[u8], data: &[u8]) -> Credential {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(data);
    Credential(m.finalize().into_bytes().into())
}

/// The memory credential of vNode `vnode_id`.
pub fn mem_credential(cluster_key: &Secret, vnode_id: u64) -> Credential {
    derive(cluster_key.as_bytes(), MEM_LABEL, &vnode_id.to_le_bytes())
}

/// The credential of NBD export `export`.
pub fn blk_credential(cluster_key: &Secret, export: &str) -> Credential {
    derive(cluster_key.as_bytes(), BLK_LABEL, export.as_bytes())
}

/// The credential memory servers prove to each other (never given to a vNode).
pub fn mem_server_credential(cluster_key: &Secret) -> Credential {
    derive(cluster_key.as_bytes(), MEM_SERVER_LABEL, &[])
}

fn proof_mac(key: &Credential, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(&[0]);
    for p in parts {
        m.update(p);
    }
    m
}

/// `HMAC-SHA256(key, label || 0 || parts...)`: what one side of a handshake sends to show it
/// holds `key` without sending it.
pub fn proof(key: &Credential, label: &[u8], parts: &[&[u8]]) -> [u8; CRED_LEN] {
    proof_mac(key, label, parts).finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn check_proof(key: &Credential, label: &[u8], parts: &[&[u8]], got: &[u8]) -> bool {
    proof_mac(key, label, parts).verify_slice(got).is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN], CredError> {
    let mut b = [0u8; NONCE_LEN];
    getrandom::fill(&mut b).map_err(CredError::Random)?;
    Ok(b)
}

/// A random 64-bit id (vNode ids default to one), never 0.
pub fn random_id() -> Result<u64, CredError> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(CredError::Random)?;
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return Ok(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Secret {
        Secret::from_bytes(b"cluster".to_vec()).unwrap()
    }

    #[test]
    fn derivations_differ_by_id_kind_and_key() {
        let k = key();
        let a = mem_credential(&k, 1);
        assert_eq!(a, mem_credential(&k, 1));
        assert_ne!(a, mem_credential(&k, 2));
        assert_ne!(a, blk_credential(&k, "1"));
        assert_ne!(a, mem_server_credential(&k));
        let other = Secret::from_bytes(b"other".to_vec()).unwrap();
        assert_ne!(a, mem_credential(&other, 1));
        // The documented formula, computed independently of `derive`.
        let mut m = HmacSha256::new_from_slice(b"cluster").unwrap();
        m.update(b"vnode-mem-v1\x01\0\0\0\0\0\0\0");
        assert_eq!(a.as_bytes()[..], m.finalize().into_bytes()[..]);
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let c = blk_credential(&key(), "disk0");
        assert_eq!(Credential::from_hex(c.to_hex().as_bytes()).unwrap(), c);
        assert!(Credential::from_hex(b"abc").is_err());
        assert!(Credential::from_hex(&[b'z'; 64]).is_err());
        assert_eq!(format!("{c:?}"), "Credential(..)");
    }

    #[test]
    fn proofs_bind_label_key_and_fields() {
        let c = mem_credential(&key(), 7);
        let p = proof(&c, b"client", &[b"n1", b"n2"]);
        assert!(check_proof(&c, b"client", &[b"n1", b"n2"], &p));
        assert!(!check_proof(&c, b"server", &[b"n1", b"n2"], &p));
        assert!(!check_proof(&c, b"client", &[b"n1", b"n3"], &p));
        assert!(!check_proof(
            &mem_credential(&key(), 8),
            b"client",
            &[b"n1", b"n2"],
            &p
        ));
        assert!(!check_proof(&c, b"client", &[b"n1", b"n2"], &p[..31]));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        assert_ne!(random_id().unwrap(), 0);
    }
}
