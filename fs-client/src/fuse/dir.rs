//! Directory streams: one per open directory handle.
//!
//! The listing is read from the metadata service page by page, by name,
//! as the kernel asks for it, and every entry keeps the position it was
//! first given for the life of the handle. The kernel's offsets are those
//! positions, so `telldir`/`seekdir` and a listing that changes meanwhile
//! never make an entry appear twice or vanish from one pass. Rewinding to
//! offset 0 starts a fresh listing, as POSIX asks of `rewinddir`.

use crate::proto::{DirEntry, Ino, MetaRead, MAX_READDIR_PAGE};

/// Entries one handle keeps at most; older ones are dropped as the kernel
/// moves on (a seek back before them fails with EINVAL).
pub const MAX_DIR_WINDOW: usize = 262_144;

/// What lies at one position of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Slot<'a> {
    Dot,
    DotDot,
    Entry(&'a DirEntry),
    /// The next page must be fetched first.
    NeedMore,
    End,
    /// Before the kept window.
    Gone,
}

#[derive(Debug)]
pub struct DirStream {
    pub ino: Ino,
    /// Parent directory, for `..` (the directory itself when unknown).
    pub parent: Ino,
    /// Position of `entries[0]`.
    base: u64,
    entries: Vec<DirEntry>,
    /// Last name fetched, where the next page starts.
    after: Option<Vec<u8>>,
    more: bool,
}

/// Positions 0 and 1 are `.` and `..`.
const FIRST_ENTRY: u64 = 2;

impl DirStream {
    pub fn new(ino: Ino, parent: Ino) -> Self {
        DirStream { ino, parent, base: FIRST_ENTRY, entries: Vec::new(), after: None, more: true }
    }

    /// Starts over (rewinddir).
    pub fn reset(&mut self) {
        *self = DirStream::new(self.ino, self.parent);
    }

    pub fn at(&self, pos: u64) -> Slot<'_> {
        match pos {
            0 => Slot::Dot,
            1 => Slot::DotDot,
            p if p < self.base => Slot::Gone,
            p => match self.entries.get((p - self.base) as usize) {
                Some(e) => Slot::Entry(e),
                None if self.more => Slot::NeedMore,
                None => Slot::End,
            },
        }
    }

    /// The read that fetches the next page.
    pub fn next_page(&self) -> MetaRead {
        MetaRead::ReadDir { ino: self.ino, after: self.after.clone(), limit: MAX_READDIR_PAGE }
    }

    /// Takes a fetched page.
    pub fn absorb(&mut self, page: Vec<DirEntry>, more: bool) {
        if let Some(last) = page.last() {
            self.after = Some(last.name.clone());
        }
        // An empty page with `more` set would loop forever; treat it as the end.
        self.more = more && !page.is_empty();
        self.entries.extend(page);
        if self.entries.len() > MAX_DIR_WINDOW {
            let drop = self.entries.len() - MAX_DIR_WINDOW / 2;
            self.entries.drain(..drop);
            self.base += drop as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FileKind;

    fn e(name: &str, ino: Ino) -> DirEntry {
        DirEntry { name: name.into(), ino, kind: FileKind::File }
    }

    #[test]
    fn positions_are_stable_across_pages() {
        let mut s = DirStream::new(5, 1);
        assert_eq!(s.at(0), Slot::Dot);
        assert_eq!(s.at(1), Slot::DotDot);
        assert_eq!(s.at(2), Slot::NeedMore);
        assert_eq!(s.next_page(), MetaRead::ReadDir { ino: 5, after: None, limit: MAX_READDIR_PAGE });
        s.absorb(vec![e("a", 10), e("b", 11)], true);
        assert_eq!(s.at(3), Slot::Entry(&e("b", 11)));
        assert_eq!(s.at(4), Slot::NeedMore);
        assert_eq!(s.next_page(), MetaRead::ReadDir { ino: 5, after: Some(b"b".to_vec()), limit: MAX_READDIR_PAGE });
        s.absorb(vec![e("c", 12)], false);
        assert_eq!(s.at(4), Slot::Entry(&e("c", 12)));
        assert_eq!(s.at(5), Slot::End);
        assert_eq!(s.at(2), Slot::Entry(&e("a", 10)), "earlier positions still answer");
        s.reset();
        assert_eq!(s.at(2), Slot::NeedMore, "rewind lists afresh");
    }

    #[test]
    fn empty_page_with_more_ends_the_stream() {
        let mut s = DirStream::new(5, 1);
        s.absorb(Vec::new(), true);
        assert_eq!(s.at(2), Slot::End);
    }

    #[test]
    fn window_drops_old_entries() {
        let mut s = DirStream::new(5, 1);
        let page: Vec<DirEntry> = (0..MAX_DIR_WINDOW as u64 + 10).map(|i| e(&format!("{i:08}"), i + 100)).collect();
        s.absorb(page, true);
        assert_eq!(s.at(2), Slot::Gone);
        let last = 2 + MAX_DIR_WINDOW as u64 + 9;
        assert_eq!(s.at(last), Slot::Entry(&e(&format!("{:08}", MAX_DIR_WINDOW + 9), MAX_DIR_WINDOW as u64 + 109)));
        assert_eq!(s.at(last + 1), Slot::NeedMore);
    }
}
