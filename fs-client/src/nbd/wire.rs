//! NBD wire format: constants, and pure functions from bytes to messages
//! and back. No I/O here; every parser takes untrusted bytes and returns an
//! error instead of panicking.
//!
//! Numbers follow the protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>);
//! everything on the wire is big-endian.

use bytes::{BufMut, Bytes, BytesMut};

// ---- Handshake -------------------------------------------------------------

/// `NBDMAGIC`, the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags (sent with the export) -----------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---- Requests and replies ----------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Bytes of a request header.
pub const REQUEST_BYTES: usize = 28;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error values of the protocol (errno numbers, restricted to these).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;

// ---- Small readers -----------------------------------------------------------

/// A cursor over untrusted bytes; every read checks the length.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }
}

// ---- Handshake messages ------------------------------------------------------

/// What the server says first.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The client's flags after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client flags; unknown bits are refused (the server must
/// then close the connection).
pub fn parse_client_flags(raw: [u8; 4]) -> Option<ClientFlags> {
    let f = u32::from_be_bytes(raw);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return None;
    }
    Some(ClientFlags { fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: f & FLAG_C_NO_ZEROES != 0 })
}

/// Header of a client option: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// `None` on a wrong magic (the connection is then closed).
pub fn parse_option_header(raw: [u8; 16]) -> Option<OptionHeader> {
    let mut c = Cursor::new(&raw);
    if c.u64()? != IHAVEOPT {
        return None;
    }
    Some(OptionHeader { option: c.u32()?, len: c.u32()? })
}

/// Appends one option reply.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: an export name and the information
/// the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let mut c = Cursor::new(data);
    let name_len = c.u32()? as usize;
    if name_len > MAX_STRING_BYTES {
        return None;
    }
    let name = c.bytes(name_len)?.to_vec();
    let n = c.u16()? as usize;
    if c.remaining() != n * 2 {
        return None;
    }
    let requests = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
    Some(InfoRequest { name, requests })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data: an
/// export name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

pub fn parse_meta_context_request(data: &[u8]) -> Option<MetaContextRequest> {
    let mut c = Cursor::new(data);
    let name_len = c.u32()? as usize;
    if name_len > MAX_STRING_BYTES {
        return None;
    }
    let name = c.bytes(name_len)?.to_vec();
    let n = c.u32()? as usize;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n > c.remaining() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        let len = c.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return None;
        }
        queries.push(c.bytes(len)?.to_vec());
    }
    if c.remaining() != 0 {
        return None;
    }
    Some(MetaContextRequest { name, queries })
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s);
    v
}

// ---- Transmission --------------------------------------------------------------

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// `None` on a wrong magic (the connection is then closed).
pub fn parse_request(raw: &[u8; REQUEST_BYTES]) -> Option<Request> {
    let mut c = Cursor::new(raw);
    if c.u32()? != REQUEST_MAGIC {
        return None;
    }
    Some(Request { flags: c.u16()?, kind: c.u16()?, cookie: c.u64()?, offset: c.u64()?, len: c.u32()? })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_BYTES] {
    let mut out = [0u8; REQUEST_BYTES];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// A simple reply header (read data, if any, follows it).
pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + 16);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
    b
}

/// A structured error chunk, the final one of its reply.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Bytes {
    // The message is for humans; keep it within the protocol's string limit.
    let mut msg = message.as_bytes();
    if msg.len() > MAX_STRING_BYTES {
        let mut end = MAX_STRING_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        msg = &msg[..end];
    }
    let mut b = chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u32);
    b.put_u32(error);
    b.put_u16(msg.len() as u16);
    b.extend_from_slice(msg);
    b.freeze()
}

/// The final, empty chunk of a structured reply.
pub fn none_chunk(cookie: u64) -> Bytes {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).freeze()
}

/// A piece of a structured read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Data { offset: u64, data: Bytes },
    Hole { offset: u64, len: u32 },
}

/// Granularity at which a read reply looks for runs of zeros.
pub const HOLE_GRAIN: u64 = 4096;

/// Splits the data of a read at `offset` into data and hole pieces, at
/// [`HOLE_GRAIN`] boundaries of the export. With `df` (don't fragment) it
/// is one piece: a hole if all zeros, else data.
pub fn read_contents(offset: u64, data: &Bytes, df: bool) -> Vec<Content> {
    if data.is_empty() {
        return Vec::new();
    }
    if df || data.len() as u64 <= HOLE_GRAIN {
        return vec![if is_zero(data) {
            Content::Hole { offset, len: data.len() as u32 }
        } else {
            Content::Data { offset, data: data.clone() }
        }];
    }
    let mut out: Vec<Content> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let next_grain = (abs / HOLE_GRAIN + 1) * HOLE_GRAIN;
        let end = ((next_grain - offset) as usize).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match out.last_mut() {
            Some(Content::Hole { len, .. }) if zero => *len += (end - pos) as u32,
            Some(Content::Data { offset: o, data: d }) if !zero => *d = data.slice((*o - offset) as usize..end),
            _ if zero => out.push(Content::Hole { offset: abs, len: (end - pos) as u32 }),
            _ => out.push(Content::Data { offset: abs, data: data.slice(pos..end) }),
        }
        pos = end;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(16);
    let rest = words.remainder();
    words.fold(0u128, |acc, w| acc | u128::from_ne_bytes(w.try_into().unwrap_or([1; 16]))) == 0
        && rest.iter().all(|&x| x == 0)
}

/// The chunks of a structured read reply: each piece, the last marked done.
pub fn read_reply_chunks(cookie: u64, contents: &[Content]) -> Vec<Bytes> {
    if contents.is_empty() {
        return vec![none_chunk(cookie)];
    }
    let mut out = Vec::with_capacity(contents.len() * 2);
    for (i, c) in contents.iter().enumerate() {
        let flags = if i + 1 == contents.len() { REPLY_FLAG_DONE } else { 0 };
        match c {
            Content::Data { offset, data } => {
                let mut h = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32);
                h.put_u64(*offset);
                out.push(h.freeze());
                out.push(data.clone());
            }
            Content::Hole { offset, len } => {
                let mut h = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
                h.put_u64(*offset);
                h.put_u32(*len);
                out.push(h.freeze());
            }
        }
    }
    out
}

/// One `base:allocation` extent: a length and its state flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A block status chunk for one context, the final one of its reply.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[Extent]) -> Bytes {
    let mut b = chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * extents.len() as u32);
    b.put_u32(context);
    for e in extents {
        b.put_u32(e.len);
        b.put_u32(e.flags);
    }
    b.freeze()
}

/// Transmission flags of an export.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_has_both_magics_and_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags_refuse_unknown_bits() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Some(ClientFlags { fixed_newstyle: true, no_zeroes: true }));
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Some(ClientFlags { fixed_newstyle: false, no_zeroes: false }));
        assert_eq!(parse_client_flags([0, 0, 0, 4]), None);
        assert_eq!(parse_client_flags([0x80, 0, 0, 1]), None);
    }

    #[test]
    fn option_header_checks_magic() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(raw), Some(OptionHeader { option: 7, len: 10 }));
        raw[0] ^= 1;
        assert_eq!(parse_option_header(raw), None);
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

    #[test]
    fn info_requests_parse_and_reject_bad_lengths() {
        let d = info_data(b"disk", &[3, 1]);
        assert_eq!(parse_info_request(&d), Some(InfoRequest { name: b"disk".to_vec(), requests: vec![3, 1] }));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None, "a truncated request list");
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None, "trailing bytes");
        let mut lying = d.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&lying), None, "a name longer than the data");
        assert_eq!(parse_info_request(&[]), None);
        assert_eq!(parse_info_request(&info_data(b"", &[])), Some(InfoRequest { name: vec![], requests: vec![] }));
    }

    fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn meta_context_requests_parse_and_reject_lies() {
        let d = meta_data(b"x", &[b"base:allocation", b"qemu:dirty-bitmap:a"]);
        let r = parse_meta_context_request(&d).expect("parses");
        assert_eq!(r.name, b"x");
        assert_eq!(r.queries.len(), 2);
        let mut lying = meta_data(b"x", &[]);
        let at = lying.len() - 4;
        lying[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_context_request(&lying), None, "a count the data cannot hold");
        assert_eq!(parse_meta_context_request(&d[..d.len() - 2]), None);
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, cookie: 0xdead_beef, offset: 1 << 40, len: 4096 };
        let raw = encode_request(&r);
        assert_eq!(parse_request(&raw), Some(r));
        let mut bad = raw;
        bad[3] ^= 0xff;
        assert_eq!(parse_request(&bad), None);
    }

    #[test]
    fn error_chunk_layout() {
        let c = error_chunk(9, EINVAL, "no");
        assert_eq!(c.len(), 20 + 6 + 2);
        assert_eq!(&c[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([c[4], c[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([c[6], c[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u64::from_be_bytes(c[8..16].try_into().expect("8 bytes")), 9);
        assert_eq!(u32::from_be_bytes(c[16..20].try_into().expect("4 bytes")), 8);
        assert_eq!(u32::from_be_bytes(c[20..24].try_into().expect("4 bytes")), EINVAL);
        let long = "é".repeat(5000);
        let c = error_chunk(1, EIO, &long);
        assert!(c.len() <= 26 + MAX_STRING_BYTES);
    }

    #[test]
    fn reads_split_into_data_and_holes_at_grain_boundaries() {
        let mut v = vec![0u8; 4 * HOLE_GRAIN as usize];
        v[HOLE_GRAIN as usize + 5] = 1; // grain 1 has data
        v[3 * HOLE_GRAIN as usize] = 7; // grain 3 has data
        let data = Bytes::from(v);
        let c = read_contents(0, &data, false);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0], Content::Hole { offset: 0, len: 4096 });
        assert!(matches!(&c[1], Content::Data { offset: 4096, data } if data.len() == 4096));
        assert_eq!(c[2], Content::Hole { offset: 8192, len: 4096 });
        assert!(matches!(&c[3], Content::Data { offset: 12288, data } if data.len() == 4096));
        // An unaligned start: the first piece runs to the next boundary.
        let c = read_contents(100, &data.slice(..5000), false);
        assert_eq!(c[0], Content::Hole { offset: 100, len: 3996 });
        let covered: u64 = c
            .iter()
            .map(|x| match x {
                Content::Data { data, .. } => data.len() as u64,
                Content::Hole { len, .. } => *len as u64,
            })
            .sum();
        assert_eq!(covered, 5000);
        // Don't fragment: one piece.
        assert_eq!(read_contents(0, &data, true).len(), 1);
        let zeros = Bytes::from(vec![0u8; 10_000]);
        assert_eq!(read_contents(0, &zeros, true), vec![Content::Hole { offset: 0, len: 10_000 }]);
        assert_eq!(read_contents(0, &zeros, false), vec![Content::Hole { offset: 0, len: 10_000 }]);
        // Adjacent data grains merge into one piece.
        let ones = Bytes::from(vec![1u8; 3 * 4096]);
        assert_eq!(read_contents(0, &ones, false).len(), 1);
    }

    #[test]
    fn read_reply_marks_only_the_last_chunk_done() {
        let contents =
            vec![Content::Data { offset: 0, data: Bytes::from_static(b"abc") }, Content::Hole { offset: 3, len: 5 }];
        let chunks = read_reply_chunks(4, &contents);
        assert_eq!(chunks.len(), 3);
        assert_eq!(u16::from_be_bytes([chunks[0][4], chunks[0][5]]), 0);
        assert_eq!(u32::from_be_bytes(chunks[0][16..20].try_into().expect("4 bytes")), 11);
        assert_eq!(&chunks[1][..], b"abc");
        assert_eq!(u16::from_be_bytes([chunks[2][4], chunks[2][5]]), REPLY_FLAG_DONE);
        assert_eq!(chunks[2].len(), 32);
        let empty = read_reply_chunks(4, &[]);
        assert_eq!(u16::from_be_bytes([empty[0][6], empty[0][7]]), REPLY_TYPE_NONE);
    }

    #[test]
    fn flags_depend_on_mode() {
        let rw = transmission_flags(false, true);
        assert_ne!(rw & TFLAG_SEND_TRIM, 0);
        assert_ne!(rw & TFLAG_SEND_DF, 0);
        assert_eq!(rw & TFLAG_READ_ONLY, 0);
        let ro = transmission_flags(true, false);
        assert_ne!(ro & TFLAG_READ_ONLY, 0);
        assert_eq!(ro & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_DF), 0);
        assert_ne!(ro & TFLAG_CAN_MULTI_CONN, 0);
    }
}
