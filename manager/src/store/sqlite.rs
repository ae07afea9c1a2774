//! The default store: one SQLite file (rusqlite, SQLite bundled so no system library is needed).
//! WAL journal with `synchronous=FULL`: a committed write survives the manager's `kill -9` and a
//! host crash.

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{decode, encode, Role, Snapshot, Store, StoreError};
use crate::registry::{HostRecord, VnodeRecord};

pub struct SqliteStore {
    db: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS hosts (id TEXT PRIMARY KEY, body BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS vnodes (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )?;
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let db = self.db();
        let mut snap = Snapshot::default();
        let mut q = db.prepare("SELECT id, body FROM hosts ORDER BY id")?;
        let rows = q.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (id, body) = row?;
            snap.hosts.push(decode(&format!("hosts/{id}"), &body)?);
        }
        let mut q = db.prepare("SELECT id, body FROM vnodes ORDER BY id")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (id, body) = row?;
            snap.vnodes.push(decode(&format!("vnodes/{id}"), &body)?);
        }
        Ok(snap)
    }

    async fn put_host(&self, h: &HostRecord) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT OR REPLACE INTO hosts (id, body) VALUES (?1, ?2)",
            params![h.id, encode(h)],
        )?;
        Ok(())
    }

    async fn put_vnode(&self, v: &VnodeRecord) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT OR REPLACE INTO vnodes (id, body) VALUES (?1, ?2)",
            params![v.id as i64, encode(v)],
        )?;
        Ok(())
    }

    async fn delete_vnode(&self, id: u64) -> Result<(), StoreError> {
        self.db()
            .execute("DELETE FROM vnodes WHERE id = ?1", params![id as i64])?;
        Ok(())
    }

    async fn next_id(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let id: i64 = db.query_row(
            "INSERT INTO meta (key, value) VALUES ('next_id', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1 RETURNING value",
            [],
            |r| r.get(0),
        )?;
        Ok(id as u64)
    }

    fn role(&self) -> Role {
        Role::Leader { term: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = SqliteStore::open(&path).unwrap();
        super::super::suite::run(s, |s| async move {
            drop(s);
            SqliteStore::open(&path).unwrap()
        })
        .await;
    }
}
