//! Option haggling as a pure state machine: an option in, the reply bytes
//! and the next step out. The connection loop does the reading and writing.

use super::wire::*;

/// Block sizes we announce: any alignment works, 4 KiB is best, one
/// request carries at most 32 MiB.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 << 20;
/// Context id of `base:allocation` once selected.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the server knows about the one export it serves.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

impl ExportInfo {
    /// The empty name is the default export, which is this one.
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What transmission runs with, once negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub structured: bool,
    /// The id of `base:allocation` when the client selected it.
    pub base_allocation: Option<u32>,
    pub flags: u16,
}

/// What follows an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More options.
    Continue,
    /// Send the replies, then close (abort, or an export we cannot give).
    Close,
    /// Send the replies, then transmission begins.
    Transmit(Negotiated),
}

/// The negotiation state of one connection.
#[derive(Debug)]
pub struct Negotiation<'a> {
    export: &'a ExportInfo,
    client: ClientFlags,
    structured: bool,
    /// Selected with `NBD_OPT_SET_META_CONTEXT`.
    base_allocation: bool,
}

impl<'a> Negotiation<'a> {
    pub fn new(export: &'a ExportInfo, client: ClientFlags) -> Self {
        Negotiation { export, client, structured: false, base_allocation: false }
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            base_allocation: (self.structured && self.base_allocation).then_some(BASE_ALLOCATION_ID),
            flags: transmission_flags(self.export.read_only, self.structured),
        }
    }

    /// Handles one option; the replies are appended to `out`.
    pub fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        match option {
            OPT_EXPORT_NAME => {
                if !self.export.matches(data) {
                    // This option cannot fail with a reply: close.
                    return Step::Close;
                }
                let n = self.negotiated();
                out.extend_from_slice(&self.export.size.to_be_bytes());
                out.extend_from_slice(&n.flags.to_be_bytes());
                if !self.client.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Step::Transmit(n)
            }
            OPT_ABORT => {
                put_option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return invalid(out, option, "NBD_OPT_LIST takes no data");
                }
                let name = self.export.name.as_bytes();
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                put_option_reply(out, option, REP_SERVER, &d);
                put_option_reply(out, option, REP_ACK, &[]);
                Step::Continue
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return invalid(out, option, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                put_option_reply(out, option, REP_ACK, &[]);
                Step::Continue
            }
            OPT_INFO | OPT_GO => {
                let Some(req) = parse_info_request(data) else {
                    return invalid(out, option, "malformed info request");
                };
                if !self.export.matches(&req.name) {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(&req.name));
                    put_option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                    return Step::Continue;
                }
                let n = self.negotiated();
                put_option_reply(out, option, REP_INFO, &info_export(self.export.size, n.flags));
                put_option_reply(out, option, REP_INFO, &info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK));
                if req.requests.contains(&INFO_NAME) {
                    put_option_reply(out, option, REP_INFO, &info_string(INFO_NAME, self.export.name.as_bytes()));
                }
                if req.requests.contains(&INFO_DESCRIPTION) && !self.export.description.is_empty() {
                    let d = info_string(INFO_DESCRIPTION, self.export.description.as_bytes());
                    put_option_reply(out, option, REP_INFO, &d);
                }
                put_option_reply(out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    Step::Transmit(n)
                } else {
                    Step::Continue
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            OPT_STARTTLS => {
                put_option_reply(out, option, REP_ERR_POLICY, b"TLS is not offered by this server");
                Step::Continue
            }
            _ => {
                put_option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
                Step::Continue
            }
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let set = option == OPT_SET_META_CONTEXT;
        if !self.structured {
            return invalid(out, option, "negotiate structured replies first");
        }
        let Some(req) = parse_meta_context_request(data) else {
            return invalid(out, option, "malformed meta context request");
        };
        if !self.export.matches(&req.name) {
            let msg = format!("no export named {:?}", String::from_utf8_lossy(&req.name));
            put_option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
            return Step::Continue;
        }
        if req.queries.iter().any(|q| std::str::from_utf8(q).is_err() || q.contains(&0)) {
            return invalid(out, option, "a query is not a valid string");
        }
        // With no queries, LIST lists everything and SET selects nothing;
        // `base:` alone lists every context of the namespace (LIST only).
        let selected = if req.queries.is_empty() {
            !set
        } else {
            req.queries.iter().any(|q| q == BASE_ALLOCATION.as_bytes() || (!set && q == b"base:"))
        };
        if set {
            self.base_allocation = selected;
        }
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(out, option, REP_META_CONTEXT, &d);
        }
        put_option_reply(out, option, REP_ACK, &[]);
        Step::Continue
    }
}

fn invalid(out: &mut Vec<u8>, option: u32, why: &str) -> Step {
    put_option_reply(out, option, REP_ERR_INVALID, why.as_bytes());
    Step::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export(read_only: bool) -> ExportInfo {
        ExportInfo { name: "disk".into(), description: "a test disk".into(), size: 1 << 30, read_only }
    }

    const FIXED: ClientFlags = ClientFlags { fixed_newstyle: true, no_zeroes: true };

    /// Splits option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let mut c = Cursor::new(b);
            assert_eq!(c.u64(), Some(OPTION_REPLY_MAGIC));
            let (opt, kind, len) = (c.u32().expect("opt"), c.u32().expect("type"), c.u32().expect("len"));
            let data = c.bytes(len as usize).expect("data").to_vec();
            out.push((opt, kind, data));
            b = &b[20 + len as usize..];
        }
        out
    }

    fn info_data(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &[u8], queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn go_sends_export_info_block_sizes_and_asked_for_strings() {
        let e = export(false);
        let mut n = Negotiation::new(&e, FIXED);
        let mut out = Vec::new();
        let step = n.option(OPT_GO, &info_data(b"disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]), &mut out);
        let Step::Transmit(neg) = step else { panic!("GO must start transmission, got {step:?}") };
        assert!(!neg.structured);
        let r = replies(&out);
        let kinds: Vec<u16> =
            r.iter().filter(|x| x.1 == REP_INFO).map(|x| u16::from_be_bytes([x.2[0], x.2[1]])).collect();
        assert_eq!(kinds, vec![INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
        assert_eq!(r.last().map(|x| x.1), Some(REP_ACK));
        let info = &r[0].2;
        assert_eq!(u64::from_be_bytes(info[2..10].try_into().expect("size")), 1 << 30);
        let flags = u16::from_be_bytes([info[10], info[11]]);
        assert_eq!(flags, neg.flags);
        let bs = &r[1].2;
        assert_eq!(u32::from_be_bytes(bs[10..14].try_into().expect("max")), MAX_BLOCK);
    }

    #[test]
    fn unknown_export_gets_an_error_and_haggling_goes_on() {
        let e = export(false);
        let mut n = Negotiation::new(&e, FIXED);
        let mut out = Vec::new();
        assert_eq!(n.option(OPT_GO, &info_data(b"other", &[]), &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert_eq!(n.option(OPT_EXPORT_NAME, b"other", &mut out), Step::Close);
        assert!(out.is_empty());
        // The empty name is the default export.
        assert!(matches!(n.option(OPT_GO, &info_data(b"", &[]), &mut out), Step::Transmit(_)));
    }

    #[test]
    fn export_name_sends_size_flags_and_zeroes_unless_refused() {
        let e = export(true);
        let mut out = Vec::new();
        let step = Negotiation::new(&e, ClientFlags { fixed_newstyle: true, no_zeroes: false }).option(
            OPT_EXPORT_NAME,
            b"disk",
            &mut out,
        );
        assert!(matches!(step, Step::Transmit(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_ne!(u16::from_be_bytes([out[8], out[9]]) & TFLAG_READ_ONLY, 0);
        out.clear();
        let _ = Negotiation::new(&e, FIXED).option(OPT_EXPORT_NAME, b"disk", &mut out);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_select_base_allocation() {
        let e = export(false);
        let mut n = Negotiation::new(&e, FIXED);
        let mut out = Vec::new();
        n.option(OPT_SET_META_CONTEXT, &meta_data(b"disk", &["base:allocation"]), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);

        out.clear();
        n.option(OPT_STRUCTURED_REPLY, &[], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ACK);

        out.clear();
        n.option(OPT_LIST_META_CONTEXT, &meta_data(b"disk", &[]), &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(r[1].1, REP_ACK);

        out.clear();
        n.option(OPT_SET_META_CONTEXT, &meta_data(b"disk", &["qemu:dirty-bitmap:x"]), &mut out);
        assert_eq!(replies(&out).len(), 1, "nothing selected: only the ack");

        out.clear();
        n.option(OPT_SET_META_CONTEXT, &meta_data(b"disk", &["base:allocation"]), &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(u32::from_be_bytes(r[0].2[..4].try_into().expect("id")), BASE_ALLOCATION_ID);

        out.clear();
        let Step::Transmit(neg) = n.option(OPT_GO, &info_data(b"disk", &[]), &mut out) else { panic!("GO") };
        assert!(neg.structured);
        assert_eq!(neg.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(neg.flags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn list_abort_unknown_and_malformed_options() {
        let e = export(false);
        let mut n = Negotiation::new(&e, FIXED);
        let mut out = Vec::new();
        n.option(OPT_LIST, &[], &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..], b"disk");
        assert_eq!(r[1].1, REP_ACK);

        for (opt, data) in [(OPT_LIST, &b"x"[..]), (OPT_STRUCTURED_REPLY, b"x"), (OPT_INFO, b"\xff\xff")] {
            out.clear();
            assert_eq!(n.option(opt, data, &mut out), Step::Continue);
            assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "option {opt}");
        }
        out.clear();
        n.option(999, b"whatever", &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        out.clear();
        n.option(OPT_STARTTLS, &[], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
        out.clear();
        assert_eq!(n.option(OPT_INFO, &info_data(b"disk", &[]), &mut out), Step::Continue);
        out.clear();
        assert_eq!(n.option(OPT_ABORT, &[], &mut out), Step::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    proptest! {
        /// Any sequence of options with any data gets well-formed replies
        /// and never a panic.
        #[test]
        fn any_options_get_well_formed_replies(
            opts in proptest::collection::vec((0u32..14, proptest::collection::vec(any::<u8>(), 0..64)), 1..8),
            no_zeroes: bool,
        ) {
            let e = export(false);
            let mut n = Negotiation::new(&e, ClientFlags { fixed_newstyle: true, no_zeroes });
            for (opt, data) in opts {
                let mut out = Vec::new();
                let step = n.option(opt, &data, &mut out);
                if opt == OPT_EXPORT_NAME {
                    prop_assert!(matches!(step, Step::Close | Step::Transmit(_)));
                    break;
                }
                let r = replies(&out);
                prop_assert!(!r.is_empty());
                prop_assert!(r.iter().all(|x| x.0 == opt));
                if step != Step::Continue {
                    break;
                }
            }
        }
    }
}
