//! The key cache's records: the `contacts` tree of the same database, one record per
//! contact under its name, encoded by [`crate::keycache`] (its `ContactRecord`). The store
//! writes them so that a contact's change and the events it logs are one atomic change
//! (a sled transaction over both trees), durable with the next [`Store::commit`].

use super::*;

/// The tree's name (also what releases 0.1.0 and format 2 used).
pub(super) const TREE: &str = "contacts";

impl Store {
    /// Every contact record: the name and the key cache's bytes.
    pub fn contact_records(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.inner.contacts.iter() {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Saves the record of the contact `name` and logs `events` in one atomic change; the
    /// events go out once committed ([`Store::commit`]).
    pub fn save_contact(
        &self,
        name: &str,
        record: Vec<u8>,
        events: Vec<EventKind>,
    ) -> StoreResult<()> {
        let mut c = self.change();
        let mut batch = sled::Batch::default();
        batch.insert(name.as_bytes(), record);
        c.contacts = Some(batch);
        for kind in events {
            c.event(kind);
        }
        c.apply()
    }
}
