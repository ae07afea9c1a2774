//! The credentials the manager hands out. It holds the cluster key and derives, for each vNode,
//! its own memory credential and, for each export, that export's credential
//! (`HMAC-SHA256(cluster_key, label || id)`, the derivation in `vnode_common::cred`); the cluster
//! key itself never leaves the manager and the servers.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use vnode_common::secret::Secret;

const MEM_LABEL: &[u8] = b"vnode-mem-v1";
const BLK_LABEL: &[u8] = b"vnode-blk-v1";

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

    fn derive(&self, label: &[u8], data: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(self.cluster.as_bytes())
            .expect("HMAC takes keys of any length");
        m.update(label);
        m.update(data);
        hex::encode(m.finalize().into_bytes())
    }

    /// vNode `id`'s memory credential, 64 hex digits.
    pub fn mem_credential(&self, id: u64) -> String {
        self.derive(MEM_LABEL, &id.to_le_bytes())
    }

    /// Export `name`'s credential, 64 hex digits.
    pub fn blk_credential(&self, name: &str) -> String {
        self.derive(BLK_LABEL, name.as_bytes())
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
        assert!(!k.mem_credential(1).contains("test-cluster-key"));
    }
}
