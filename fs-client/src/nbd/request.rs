//! Which requests are served: a pure decision per request header, made
//! before any payload is read and before the backend is touched.

use super::handshake::{Negotiated, MAX_BLOCK};
use super::wire::*;

/// Largest write payload that is read and dropped after refusing the
/// write; a bigger one closes the connection instead.
pub const MAX_DRAIN_BYTES: u32 = 2 * MAX_BLOCK;

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// What to do with a request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Serve(Command),
    /// Reply with `error`; first read and drop `drain` payload bytes.
    Refuse {
        error: u32,
        message: String,
        drain: u32,
    },
    /// A payload too big to drain: close the connection.
    Close(String),
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
}

fn refuse(error: u32, message: impl Into<String>, drain: u32) -> Decision {
    Decision::Refuse { error, message: message.into(), drain }
}

fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset <= size && u64::from(len) <= size - offset
}

/// Decides about one request to an export of `size` bytes.
pub fn decide(req: &Request, size: u64, read_only: bool, neg: &Negotiated) -> Decision {
    let Request { flags, kind, offset, len, .. } = *req;
    let fua = flags & CMD_FLAG_FUA != 0;
    // FUA is accepted everywhere: clients are known to set it on any command.
    let allowed = CMD_FLAG_FUA
        | match kind {
            CMD_READ if neg.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let bad_flags = flags & !allowed != 0;
    match kind {
        CMD_DISC => Decision::Disconnect,
        CMD_READ => {
            if len > MAX_BLOCK {
                refuse(EOVERFLOW, format!("read of {len} bytes exceeds the {MAX_BLOCK}-byte limit"), 0)
            } else if bad_flags {
                refuse(EINVAL, format!("flags {flags:#x} not valid on a read"), 0)
            } else if !in_range(offset, len, size) {
                refuse(EINVAL, format!("read past the end of the {size}-byte export"), 0)
            } else {
                Decision::Serve(Command::Read { offset, len, df: flags & CMD_FLAG_DF != 0 })
            }
        }
        CMD_WRITE => {
            let drain = len;
            if len > MAX_BLOCK {
                let msg = format!("write of {len} bytes exceeds the {MAX_BLOCK}-byte limit");
                if len > MAX_DRAIN_BYTES {
                    Decision::Close(msg)
                } else {
                    refuse(EOVERFLOW, msg, drain)
                }
            } else if bad_flags {
                refuse(EINVAL, format!("flags {flags:#x} not valid on a write"), drain)
            } else if read_only {
                refuse(EPERM, "the export is read-only", drain)
            } else if !in_range(offset, len, size) {
                refuse(ENOSPC, format!("write past the end of the {size}-byte export"), drain)
            } else {
                Decision::Serve(Command::Write { offset, len, fua })
            }
        }
        CMD_FLUSH => {
            if bad_flags {
                refuse(EINVAL, format!("flags {flags:#x} not valid on a flush"), 0)
            } else {
                Decision::Serve(Command::Flush)
            }
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let what = if kind == CMD_TRIM { "trim" } else { "write-zeroes" };
            if bad_flags {
                refuse(EINVAL, format!("flags {flags:#x} not valid on a {what}"), 0)
            } else if read_only {
                refuse(EPERM, "the export is read-only", 0)
            } else if !in_range(offset, len, size) {
                let error = if kind == CMD_TRIM { EINVAL } else { ENOSPC };
                refuse(error, format!("{what} past the end of the {size}-byte export"), 0)
            } else if kind == CMD_TRIM {
                Decision::Serve(Command::Trim { offset, len, fua })
            } else {
                Decision::Serve(Command::WriteZeroes { offset, len, fua, no_hole: flags & CMD_FLAG_NO_HOLE != 0 })
            }
        }
        CMD_BLOCK_STATUS => {
            if bad_flags {
                refuse(EINVAL, format!("flags {flags:#x} not valid on a block status"), 0)
            } else if neg.base_allocation.is_none() {
                refuse(EINVAL, "no metadata context was selected", 0)
            } else if len == 0 || !in_range(offset, len, size) {
                refuse(EINVAL, format!("block status outside the {size}-byte export"), 0)
            } else {
                Decision::Serve(Command::BlockStatus { offset, len, req_one: flags & CMD_FLAG_REQ_ONE != 0 })
            }
        }
        other => refuse(EINVAL, format!("unknown command {other}"), 0),
    }
}

/// Makes backend extents a valid reply for a request of `len` bytes:
/// no empty extents, no more than `len` in all, one with `req_one`, and at
/// least one (the whole range as allocated data when nothing is known).
pub fn clip_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut left = len;
    for e in extents {
        if left == 0 || (req_one && !out.is_empty()) {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let n = e.len.min(left);
        out.push(Extent { len: n, flags: e.flags });
        left -= n;
    }
    if out.is_empty() {
        out.push(Extent { len, flags: 0 });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn neg(structured: bool, base: bool) -> Negotiated {
        Negotiated { structured, base_allocation: base.then_some(1), flags: transmission_flags(false, structured) }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, cookie: 1, offset, len }
    }

    fn error_of(d: &Decision) -> Option<(u32, u32)> {
        match d {
            Decision::Refuse { error, drain, .. } => Some((*error, *drain)),
            _ => None,
        }
    }

    #[test]
    fn reads_and_writes_within_the_export_are_served() {
        let n = neg(true, true);
        assert_eq!(
            decide(&req(CMD_READ, CMD_FLAG_DF, 0, 4096), SIZE, false, &n),
            Decision::Serve(Command::Read { offset: 0, len: 4096, df: true })
        );
        assert_eq!(
            decide(&req(CMD_WRITE, CMD_FLAG_FUA, SIZE - 10, 10), SIZE, false, &n),
            Decision::Serve(Command::Write { offset: SIZE - 10, len: 10, fua: true })
        );
        assert_eq!(
            decide(&req(CMD_READ, 0, SIZE, 0), SIZE, false, &n),
            Decision::Serve(Command::Read { offset: SIZE, len: 0, df: false })
        );
    }

    #[test]
    fn out_of_range_requests_get_the_errors_the_spec_names() {
        let n = neg(true, true);
        assert_eq!(error_of(&decide(&req(CMD_READ, 0, SIZE - 1, 2), SIZE, false, &n)), Some((EINVAL, 0)));
        assert_eq!(error_of(&decide(&req(CMD_READ, 0, u64::MAX, 1), SIZE, false, &n)), Some((EINVAL, 0)));
        assert_eq!(error_of(&decide(&req(CMD_WRITE, 0, SIZE, 512), SIZE, false, &n)), Some((ENOSPC, 512)));
        assert_eq!(error_of(&decide(&req(CMD_WRITE, 0, u64::MAX - 1, 512), SIZE, false, &n)), Some((ENOSPC, 512)));
        assert_eq!(error_of(&decide(&req(CMD_WRITE_ZEROES, 0, SIZE, 1), SIZE, false, &n)), Some((ENOSPC, 0)));
        assert_eq!(error_of(&decide(&req(CMD_TRIM, 0, SIZE, 1), SIZE, false, &n)), Some((EINVAL, 0)));
        assert_eq!(error_of(&decide(&req(CMD_BLOCK_STATUS, 0, SIZE, 1), SIZE, false, &n)), Some((EINVAL, 0)));
        assert_eq!(error_of(&decide(&req(CMD_BLOCK_STATUS, 0, 0, 0), SIZE, false, &n)), Some((EINVAL, 0)));
    }

    #[test]
    fn oversize_requests_are_refused_and_huge_writes_close() {
        let n = neg(false, false);
        let big = MAX_BLOCK + 1;
        assert_eq!(error_of(&decide(&req(CMD_READ, 0, 0, big), SIZE, false, &n)), Some((EOVERFLOW, 0)));
        assert_eq!(error_of(&decide(&req(CMD_WRITE, 0, 0, big), SIZE, false, &n)), Some((EOVERFLOW, big)));
        assert!(matches!(decide(&req(CMD_WRITE, 0, 0, MAX_DRAIN_BYTES + 1), SIZE, false, &n), Decision::Close(_)));
        // Trims and zeroes carry no payload: any length within the export.
        let n = neg(false, false);
        let huge = SIZE as u32;
        assert!(matches!(decide(&req(CMD_TRIM, 0, 0, huge), SIZE, false, &n), Decision::Serve(_)));
    }

    #[test]
    fn read_only_exports_refuse_every_write_with_eperm() {
        let n = neg(true, true);
        assert_eq!(error_of(&decide(&req(CMD_WRITE, 0, 0, 4096), SIZE, true, &n)), Some((EPERM, 4096)));
        assert_eq!(error_of(&decide(&req(CMD_TRIM, 0, 0, 4096), SIZE, true, &n)), Some((EPERM, 0)));
        assert_eq!(error_of(&decide(&req(CMD_WRITE_ZEROES, 0, 0, 4096), SIZE, true, &n)), Some((EPERM, 0)));
        assert!(matches!(decide(&req(CMD_READ, 0, 0, 4096), SIZE, true, &n), Decision::Serve(_)));
        assert!(matches!(decide(&req(CMD_FLUSH, 0, 0, 0), SIZE, true, &n), Decision::Serve(_)));
    }

    #[test]
    fn flags_must_fit_the_command_and_the_negotiation() {
        assert_eq!(
            error_of(&decide(&req(CMD_READ, CMD_FLAG_DF, 0, 1), SIZE, false, &neg(false, false))),
            Some((EINVAL, 0)),
            "DF needs structured replies"
        );
        assert_eq!(
            error_of(&decide(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 8), SIZE, false, &neg(true, true))),
            Some((EINVAL, 8)),
            "the payload is still drained"
        );
        assert_eq!(error_of(&decide(&req(CMD_FLUSH, 1 << 9, 0, 0), SIZE, false, &neg(true, true))), Some((EINVAL, 0)));
        assert!(matches!(
            decide(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 8), SIZE, false, &neg(true, true)),
            Decision::Serve(Command::WriteZeroes { no_hole: true, fua: true, .. })
        ));
        assert_eq!(
            error_of(&decide(&req(CMD_BLOCK_STATUS, 0, 0, 8), SIZE, false, &neg(true, false))),
            Some((EINVAL, 0)),
            "block status needs a selected context"
        );
        assert_eq!(error_of(&decide(&req(5, 0, 0, 8), SIZE, false, &neg(true, true))), Some((EINVAL, 0)));
        assert_eq!(decide(&req(CMD_DISC, 0xffff, 9, 9), SIZE, false, &neg(true, true)), Decision::Disconnect);
    }

    #[test]
    fn extents_are_clipped_to_a_valid_reply() {
        let e = |len, flags| Extent { len, flags };
        assert_eq!(clip_extents(&[e(10, 3), e(0, 0), e(10, 0)], 15, false), vec![e(10, 3), e(5, 0)]);
        assert_eq!(clip_extents(&[e(10, 3), e(10, 0)], 20, true), vec![e(10, 3)]);
        assert_eq!(clip_extents(&[], 7, false), vec![e(7, 0)]);
    }

    proptest! {
        /// Any header gets a decision without panicking, and a served
        /// request always lies inside the export and within the limits.
        #[test]
        fn any_header_is_decided_safely(flags: u16, kind in 0u16..10, offset: u64, len: u32, size in 0u64..(1 << 40),
                                        ro: bool, structured: bool, base: bool) {
            let n = neg(structured, base);
            match decide(&req(kind, flags, offset, len), size, ro, &n) {
                Decision::Serve(Command::Read { offset, len, .. }) | Decision::Serve(Command::Write { offset, len, .. }) => {
                    prop_assert!(len <= MAX_BLOCK);
                    prop_assert!(offset + u64::from(len) <= size);
                }
                Decision::Serve(Command::Trim { offset, len, .. })
                | Decision::Serve(Command::WriteZeroes { offset, len, .. })
                | Decision::Serve(Command::BlockStatus { offset, len, .. }) => {
                    prop_assert!(!ro || kind == CMD_BLOCK_STATUS);
                    prop_assert!(offset + u64::from(len) <= size);
                }
                Decision::Refuse { drain, .. } => prop_assert!(drain == 0 || (kind == CMD_WRITE && drain <= MAX_DRAIN_BYTES)),
                Decision::Close(_) => prop_assert!(kind == CMD_WRITE && len > MAX_DRAIN_BYTES),
                Decision::Serve(Command::Flush) | Decision::Disconnect => {}
            }
        }
    }
}
