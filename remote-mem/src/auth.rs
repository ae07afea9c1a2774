//! The two ends of the memory handshake's challenge-response (see "Authentication" in
//! `protocol.rs`): what a client proves with ([`ClientAuth`]) and what a server checks with
//! ([`ServerKeys`]). The derivations themselves live in `vnode_common::cred`, where the manager
//! uses them too.

use vnode_common::cred::{self, Credential};
use vnode_common::secret::Secret;

use crate::protocol::{
    proof_parts, AuthRole, Hello, CLIENT_PROOF_LABEL, NONCE_LEN, PROOF_LEN, SERVER_PROOF_LABEL,
};

/// Who a client authenticates as, and the key it proves it holds.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    vnode_id: u64,
    role: AuthRole,
    /// `None`: an insecure client, for `--insecure` servers only (sends a zero proof and
    /// accepts a server that proves nothing).
    key: Option<Credential>,
}

impl ClientAuth {
    /// A vNode with its own credential (what the manager hands it).
    pub fn vnode(vnode_id: u64, credential: Credential) -> Self {
        ClientAuth {
            vnode_id,
            role: AuthRole::Vnode,
            key: Some(credential),
        }
    }

    /// A vNode that holds the cluster key and derives its credential itself (one machine, tests).
    pub fn from_cluster_key(vnode_id: u64, cluster_key: &Secret) -> Self {
        Self::vnode(vnode_id, cred::mem_credential(cluster_key, vnode_id))
    }

    /// A memory server acting for vNode `vnode_id` on another server (migration).
    pub fn server(vnode_id: u64, server_credential: Credential) -> Self {
        ClientAuth {
            vnode_id,
            role: AuthRole::Server,
            key: Some(server_credential),
        }
    }

    /// No key at all: only an `--insecure` server lets this in, and it is the only kind of
    /// client that accepts a server proving nothing.
    pub fn insecure(vnode_id: u64) -> Self {
        ClientAuth {
            vnode_id,
            role: AuthRole::Vnode,
            key: None,
        }
    }

    pub fn vnode_id(&self) -> u64 {
        self.vnode_id
    }

    /// The `Hello` answering `server_nonce`, with a fresh client nonce.
    pub fn hello(&self, server_nonce: &[u8; NONCE_LEN]) -> Result<Hello, cred::CredError> {
        let client_nonce = cred::nonce()?;
        let parts = proof_parts(server_nonce, &client_nonce, self.vnode_id, self.role);
        let proof = match &self.key {
            Some(k) => cred::proof(k, CLIENT_PROOF_LABEL, &[&parts]),
            None => [0; PROOF_LEN],
        };
        Ok(Hello {
            vnode_id: self.vnode_id,
            role: self.role,
            client_nonce,
            proof,
        })
    }

    /// Whether the server's `HelloOk` proof shows it holds this client's key.
    pub fn server_proved(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        hello: &Hello,
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        let Some(k) = &self.key else {
            return true;
        };
        let parts = proof_parts(server_nonce, &hello.client_nonce, self.vnode_id, self.role);
        cred::check_proof(k, SERVER_PROOF_LABEL, &[&parts], proof)
    }
}

/// What a vNode holds to authenticate: its own credential (bound to one vNode id), or, on one
/// machine, the cluster key to derive a credential for any id from.
#[derive(Clone, Debug)]
pub enum VnodeKey {
    Credential(Credential),
    ClusterKey(Secret),
}

impl VnodeKey {
    /// How vNode `vnode_id` authenticates with this key. A credential only works for the id it
    /// was derived for: the server refuses any other.
    pub fn auth(&self, vnode_id: u64) -> ClientAuth {
        match self {
            VnodeKey::Credential(c) => ClientAuth::vnode(vnode_id, c.clone()),
            VnodeKey::ClusterKey(k) => ClientAuth::from_cluster_key(vnode_id, k),
        }
    }
}

/// What a server checks proofs with: the cluster key, or nothing (`--insecure`).
pub struct ServerKeys {
    cluster: Option<(Secret, Credential)>,
}

impl ServerKeys {
    pub fn new(cluster_key: Option<Secret>) -> Self {
        ServerKeys {
            cluster: cluster_key.map(|k| {
                let server = cred::mem_server_credential(&k);
                (k, server)
            }),
        }
    }

    pub fn is_insecure(&self) -> bool {
        self.cluster.is_none()
    }

    /// How this server authenticates to another when it migrates a region of `vnode_id`.
    pub fn as_client(&self, vnode_id: u64) -> ClientAuth {
        match &self.cluster {
            Some((_, server)) => ClientAuth::server(vnode_id, server.clone()),
            None => ClientAuth::insecure(vnode_id),
        }
    }

    /// Checks a `Hello`; on success returns the server's proof for the `HelloOk`.
    pub fn check(&self, server_nonce: &[u8; NONCE_LEN], hello: &Hello) -> Option<[u8; PROOF_LEN]> {
        let Some((cluster, server)) = &self.cluster else {
            return Some([0; PROOF_LEN]);
        };
        let key = match hello.role {
            AuthRole::Vnode => cred::mem_credential(cluster, hello.vnode_id),
            AuthRole::Server => server.clone(),
        };
        let parts = proof_parts(
            server_nonce,
            &hello.client_nonce,
            hello.vnode_id,
            hello.role,
        );
        if !cred::check_proof(&key, CLIENT_PROOF_LABEL, &[&parts], &hello.proof) {
            return None;
        }
        Some(cred::proof(&key, SERVER_PROOF_LABEL, &[&parts]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Secret {
        Secret::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn both_sides_prove_and_nothing_else_passes() {
        let keys = ServerKeys::new(Some(key("cluster")));
        let sn = [7; NONCE_LEN];
        let c = ClientAuth::from_cluster_key(5, &key("cluster"));
        let h = c.hello(&sn).unwrap();
        let p = keys.check(&sn, &h).expect("own credential accepted");
        assert!(c.server_proved(&sn, &h, &p));
        // Replayed against another challenge.
        assert!(keys.check(&[8; NONCE_LEN], &h).is_none());
        // Another vNode's id with this vNode's proof.
        let mut other = h;
        other.vnode_id = 6;
        assert!(keys.check(&sn, &other).is_none());
        // Claiming the server role with a vNode credential.
        let mut srv = h;
        srv.role = AuthRole::Server;
        assert!(keys.check(&sn, &srv).is_none());
        // A server with another cluster key: the client detects it.
        let fake = ServerKeys::new(Some(key("other")));
        assert!(fake.check(&sn, &h).is_none());
        assert!(!c.server_proved(&sn, &h, &[0; PROOF_LEN]));
        // The servers' own role.
        let m = keys.as_client(5);
        let h = m.hello(&sn).unwrap();
        let p = keys.check(&sn, &h).expect("server role accepted");
        assert!(m.server_proved(&sn, &h, &p));
        // An insecure server lets anyone in but cannot prove itself to a real client.
        let open = ServerKeys::new(None);
        let h = c.hello(&sn).unwrap();
        let p = open.check(&sn, &h).expect("insecure accepts");
        assert!(!c.server_proved(&sn, &h, &p));
        assert!(ClientAuth::insecure(5).server_proved(&sn, &h, &p));
    }
}
