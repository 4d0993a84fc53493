//! The Locus VM host agent (`locus-vmhost`): image cache, copy-on-write
//! clones, VM drivers, heartbeats and fencing.
//!
//! Built by the VM placement issue; until then this crate holds only this
//! description.
