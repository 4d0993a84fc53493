//! The key-value view the domain's state machine reads and writes.
//!
//! The domain never sees RocksDB: it gets a [`KvRead`] for queries and a
//! [`Txn`] while applying. A `Txn` buffers writes over a base view so later
//! commands in one apply batch see the effects of earlier ones; the storage
//! layer commits the buffered writes atomically together with the applied log
//! position.

use std::collections::BTreeMap;
use std::ops::Bound;

/// A failure of the storage below the key-value view. Always fatal for the
/// node: the state machine cannot continue on a store it cannot read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state machine store: {0}")]
pub struct KvError(pub String);

/// Ordered key-value reads.
pub trait KvRead {
    /// The value at `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Visits the pairs with `start <= key < end` in key order until `visit`
    /// returns `false`.
    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), KvError>;
}

/// Key-value pairs in key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Helpers on top of [`KvRead`].
pub trait KvReadExt: KvRead {
    /// Up to `limit` pairs with `start <= key < end`.
    fn scan_collect(&self, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, KvError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.scan(start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Whether any key lies in `[start, end)`.
    fn any_in(&self, start: &[u8], end: &[u8]) -> Result<bool, KvError> {
        let mut found = false;
        self.scan(start, end, &mut |_, _| {
            found = true;
            false
        })?;
        Ok(found)
    }
}

impl<T: KvRead + ?Sized> KvReadExt for T {}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when no such key exists (the prefix is all 0xFF).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One buffered mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes `[start, end)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Writes buffered over a base view; reads see the buffer first.
///
/// Only the final value of each key is kept, so a key written by every
/// operation of a batch (a directory's inode, a counter) costs one write.
pub struct Txn<'a> {
    base: &'a dyn KvRead,
    /// Final value of each key written; `None` marks a delete.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Range deletes in the order issued. They apply to the base before the
    /// overlay: keys in the overlay at the time of a range delete were
    /// marked deleted there, and later writes win over it.
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Txn<'a> {
    pub fn new(base: &'a dyn KvRead) -> Self {
        Txn { base, overlay: BTreeMap::new(), ranges: Vec::new() }
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.overlay.insert(key.into(), Some(value.into()));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.overlay.insert(key.into(), None);
    }

    /// Deletes every key in `[start, end)`, buffered ones included.
    pub fn delete_range(&mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        let (start, end) = (start.into(), end.into());
        if start >= end {
            return;
        }
        for (_, v) in self.overlay.range_mut::<[u8], _>((Bound::Included(&start[..]), Bound::Excluded(&end[..]))) {
            *v = None;
        }
        self.ranges.push((start, end));
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty() && self.ranges.is_empty()
    }

    /// The mutations that bring the base to this transaction's state: range
    /// deletes first, then the final value of every key written.
    pub fn into_mutations(self) -> Vec<Mutation> {
        let mut out: Vec<Mutation> = self.ranges.into_iter().map(|(s, e)| Mutation::DeleteRange(s, e)).collect();
        out.extend(self.overlay.into_iter().map(|(k, v)| match v {
            Some(v) => Mutation::Put(k, v),
            None => Mutation::Delete(k),
        }));
        out
    }

    fn range_deleted(&self, key: &[u8]) -> bool {
        self.ranges.iter().any(|(s, e)| s.as_slice() <= key && key < e.as_slice())
    }
}

impl KvRead for Txn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if self.range_deleted(key) {
            return Ok(None);
        }
        self.base.get(key)
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), KvError> {
        if start >= end {
            return Ok(());
        }
        let mut over = self.overlay.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))).peekable();
        let mut stopped = false;
        self.base.scan(start, end, &mut |k, v| {
            // Overlay keys before this base key come first.
            while let Some((ok, ov)) = over.peek() {
                if ok.as_slice() >= k {
                    break;
                }
                if let Some(ov) = ov {
                    if !visit(ok, ov) {
                        stopped = true;
                        return false;
                    }
                }
                over.next();
            }
            if let Some((ok, ov)) = over.peek() {
                if ok.as_slice() == k {
                    let keep_going = match ov {
                        Some(ov) => visit(ok, ov),
                        None => true,
                    };
                    over.next();
                    if !keep_going {
                        stopped = true;
                    }
                    return keep_going;
                }
            }
            if self.range_deleted(k) {
                return true;
            }
            if !visit(k, v) {
                stopped = true;
                return false;
            }
            true
        })?;
        if stopped {
            return Ok(());
        }
        for (ok, ov) in over {
            if let Some(ov) = ov {
                if !visit(ok, ov) {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// An in-memory store, for the domain's unit tests and tools.
#[derive(Debug, Clone, Default)]
pub struct MemKv {
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies mutations made by a [`Txn`] over this store.
    pub fn commit(&mut self, mutations: Vec<Mutation>) {
        for m in mutations {
            match m {
                Mutation::Put(k, v) => {
                    self.map.insert(k, v);
                }
                Mutation::Delete(k) => {
                    self.map.remove(&k);
                }
                Mutation::DeleteRange(s, e) => {
                    let doomed: Vec<Vec<u8>> = self
                        .map
                        .range::<[u8], _>((Bound::Included(&s[..]), Bound::Excluded(&e[..])))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        self.map.remove(&k);
                    }
                }
            }
        }
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.map.get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8], visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), KvError> {
        if start >= end {
            return Ok(());
        }
        for (k, v) in self.map.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end))) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(r: &dyn KvRead, s: &[u8], e: &[u8]) -> Vec<Vec<u8>> {
        r.scan_collect(s, e, usize::MAX).unwrap().into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn overlay_merges_with_base_in_order() {
        let mut base = MemKv::new();
        for k in [b"a", b"c", b"e", b"g"] {
            base.map.insert(k.to_vec(), b"base".to_vec());
        }
        let mut t = Txn::new(&base);
        t.put(b"b".to_vec(), b"new".to_vec());
        t.delete(b"c".to_vec());
        t.put(b"e".to_vec(), b"over".to_vec());
        t.put(b"z".to_vec(), b"tail".to_vec());
        assert_eq!(
            keys(&t, b"a", b"zz"),
            vec![b"a".to_vec(), b"b".to_vec(), b"e".to_vec(), b"g".to_vec(), b"z".to_vec()]
        );
        assert_eq!(t.get(b"e").unwrap(), Some(b"over".to_vec()));
        assert_eq!(t.get(b"c").unwrap(), None);
        // Stopping early is honoured across both sources.
        assert_eq!(t.scan_collect(b"a", b"zz", 2).unwrap().len(), 2);
    }

    #[test]
    fn range_delete_hides_base_and_earlier_puts_but_not_later_ones() {
        let mut base = MemKv::new();
        for k in [b"k1", b"k2", b"k3"] {
            base.map.insert(k.to_vec(), b"v".to_vec());
        }
        let mut t = Txn::new(&base);
        t.put(b"k25".to_vec(), b"v".to_vec());
        t.delete_range(b"k2".to_vec(), b"k3".to_vec());
        assert_eq!(keys(&t, b"k", b"l"), vec![b"k1".to_vec(), b"k3".to_vec()]);
        t.put(b"k2".to_vec(), b"again".to_vec());
        assert_eq!(t.get(b"k2").unwrap(), Some(b"again".to_vec()));
        let muts = t.into_mutations();
        assert_eq!(muts.iter().filter(|m| matches!(m, Mutation::Put(k, _) if k == b"k2")).count(), 1);
        base.commit(muts);
        assert_eq!(keys(&base, b"k", b"l"), vec![b"k1".to_vec(), b"k2".to_vec(), b"k3".to_vec()]);
    }

    #[test]
    fn repeated_writes_of_a_key_commit_once() {
        let base = MemKv::new();
        let mut t = Txn::new(&base);
        for i in 0..100u8 {
            t.put(b"hot".to_vec(), vec![i]);
        }
        t.put(b"gone".to_vec(), b"x".to_vec());
        t.delete(b"gone".to_vec());
        let muts = t.into_mutations();
        assert_eq!(muts, vec![Mutation::Delete(b"gone".to_vec()), Mutation::Put(b"hot".to_vec(), vec![99])]);
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    }
}
