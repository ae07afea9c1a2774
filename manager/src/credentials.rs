//! The credentials the manager hands out. It holds the cluster key and derives, through
//! `vnode_common::cred` (the one derivation the servers use too), each vNode's own memory
//! credential and each export's credential; the cluster key itself never leaves the manager and
//! the servers.

use vnode_common::cred;
use vnode_common::secret::Secret;

/// The cluster key, and the derivations from it.
#[derive(Clone)]
pub struct Keys {
    cluster: Secret,
}

impl Keys {
    pub fn new(cluster: Secret) -> Keys {
        Keys { cluster }
    }

    #[cfg(test)]
    pub fn for_tests() -> Keys {
        Keys::new(Secret::from_bytes(b"test-cluster-key".to_vec()).expect("non-empty"))
    }

    /// vNode `id`'s memory credential, 64 hex digits.
    pub fn mem_credential(&self, id: u64) -> String {
        cred::mem_credential(&self.cluster, id).to_hex()
    }

    /// Export `name`'s credential, 64 hex digits.
    pub fn blk_credential(&self, name: &str) -> String {
        cred::blk_credential(&self.cluster, name).to_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vnode_and_export_has_its_own() {
        let k = Keys::for_tests();
        assert_eq!(k.mem_credential(1), k.mem_credential(1));
        assert_ne!(k.mem_credential(1), k.mem_credential(2));
        assert_ne!(k.blk_credential("a"), k.blk_credential("b"));
        assert_eq!(k.mem_credential(1).len(), 64);
        let key = Secret::from_bytes(b"test-cluster-key".to_vec()).unwrap();
        assert_eq!(k.mem_credential(7), cred::mem_credential(&key, 7).to_hex());
    }
}
