//! The `OPT_VNODE_AUTH` challenge-response (see "Access control" in `protocol.rs`): its
//! messages and the proofs both ends compute. Plain code: the server, the client and the fuzz
//! target use it.

use vnode_common::cred::{self, Credential};

use super::protocol::{
    ProtocolError, AUTH_CLIENT_LABEL, AUTH_NONCE_LEN, AUTH_SERVER_LABEL, MAX_NAME_LEN,
};

type Nonce = [u8; AUTH_NONCE_LEN];

/// One `OPT_VNODE_AUTH` message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Step 1: the client's nonce and the export it wants.
    Start {
        client_nonce: Nonce,
        export: Vec<u8>,
    },
    /// Step 2: the client's proof.
    Prove { proof: Nonce },
}

fn array(b: &[u8]) -> Nonce {
    let mut a = [0u8; AUTH_NONCE_LEN];
    a.copy_from_slice(b);
    a
}

fn exact(data: &[u8], n: usize) -> Result<(), ProtocolError> {
    match data.len() {
        l if l < n => Err(ProtocolError::Truncated { need: n, have: l }),
        l if l > n => Err(ProtocolError::TrailingBytes(l - n)),
        _ => Ok(()),
    }
}

impl AuthStep {
    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        match data.first() {
            Some(1) => {
                let fixed = 1 + AUTH_NONCE_LEN + 2;
                if data.len() < fixed {
                    return Err(ProtocolError::Truncated {
                        need: fixed,
                        have: data.len(),
                    });
                }
                let n = u16::from_be_bytes([data[fixed - 2], data[fixed - 1]]) as usize;
                if n > MAX_NAME_LEN {
                    return Err(ProtocolError::NameTooLong(n));
                }
                exact(data, fixed + n)?;
                Ok(AuthStep::Start {
                    client_nonce: array(&data[1..1 + AUTH_NONCE_LEN]),
                    export: data[fixed..].to_vec(),
                })
            }
            Some(2) => {
                exact(data, 1 + AUTH_NONCE_LEN)?;
                Ok(AuthStep::Prove {
                    proof: array(&data[1..]),
                })
            }
            _ => Err(ProtocolError::Truncated {
                need: 1,
                have: data.len(),
            }),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            AuthStep::Start {
                client_nonce,
                export,
            } => {
                let mut b = vec![1];
                b.extend_from_slice(client_nonce);
                b.extend_from_slice(&(export.len() as u16).to_be_bytes());
                b.extend_from_slice(export);
                b
            }
            AuthStep::Prove { proof } => {
                let mut b = vec![2];
                b.extend_from_slice(proof);
                b
            }
        }
    }
}

/// The server's step-1 reply: its nonce and its proof.
pub fn encode_challenge(server_nonce: &Nonce, server_proof: &Nonce) -> Vec<u8> {
    let mut b = server_nonce.to_vec();
    b.extend_from_slice(server_proof);
    b
}

pub fn decode_challenge(data: &[u8]) -> Result<(Nonce, Nonce), ProtocolError> {
    exact(data, 2 * AUTH_NONCE_LEN)?;
    Ok((
        array(&data[..AUTH_NONCE_LEN]),
        array(&data[AUTH_NONCE_LEN..]),
    ))
}

/// What the server proves with the export's credential.
pub fn server_proof(
    c: &Credential,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    export: &[u8],
) -> Nonce {
    cred::proof(c, AUTH_SERVER_LABEL, &[client_nonce, server_nonce, export])
}

/// What the client proves with the export's credential.
pub fn client_proof(
    c: &Credential,
    server_nonce: &Nonce,
    client_nonce: &Nonce,
    export: &[u8],
) -> Nonce {
    cred::proof(c, AUTH_CLIENT_LABEL, &[server_nonce, client_nonce, export])
}

/// Checks the client's proof in constant time.
pub fn check_client_proof(
    c: &Credential,
    server_nonce: &Nonce,
    client_nonce: &Nonce,
    export: &[u8],
    got: &Nonce,
) -> bool {
    cred::check_proof(
        c,
        AUTH_CLIENT_LABEL,
        &[server_nonce, client_nonce, export],
        got,
    )
}

/// Checks the server's proof in constant time.
pub fn check_server_proof(
    c: &Credential,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    export: &[u8],
    got: &Nonce,
) -> bool {
    cred::check_proof(
        c,
        AUTH_SERVER_LABEL,
        &[client_nonce, server_nonce, export],
        got,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_bad_ones_are_refused() {
        let s = AuthStep::Start {
            client_nonce: [7; 32],
            export: b"disk0".to_vec(),
        };
        assert_eq!(AuthStep::decode(&s.encode()), Ok(s.clone()));
        let p = AuthStep::Prove { proof: [8; 32] };
        assert_eq!(AuthStep::decode(&p.encode()), Ok(p));
        let mut long = s.encode();
        long.push(0);
        assert!(AuthStep::decode(&long).is_err());
        assert!(AuthStep::decode(&[]).is_err());
        assert!(AuthStep::decode(&[3; 40]).is_err());
        assert!(AuthStep::decode(&[2; 10]).is_err());
        assert!(decode_challenge(&[0; 63]).is_err());
        assert_eq!(
            decode_challenge(&encode_challenge(&[1; 32], &[2; 32])),
            Ok(([1; 32], [2; 32]))
        );
    }

    #[test]
    fn proofs_are_directional() {
        let c = Credential::from_bytes([5; 32]);
        let (cn, sn) = ([1; 32], [2; 32]);
        let sp = server_proof(&c, &cn, &sn, b"d");
        assert!(check_server_proof(&c, &cn, &sn, b"d", &sp));
        assert!(!check_client_proof(&c, &sn, &cn, b"d", &sp));
        let cp = client_proof(&c, &sn, &cn, b"d");
        assert!(check_client_proof(&c, &sn, &cn, b"d", &cp));
        assert!(!check_client_proof(&c, &sn, &cn, b"e", &cp));
    }
}
