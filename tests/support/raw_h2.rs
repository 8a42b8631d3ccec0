//! A raw HTTP/2 client (h2c, prior knowledge). The `h2` crate will not send connection-specific
//! fields nor an endless CONTINUATION sequence, which is what these tests must send; so the
//! frames are written by hand (RFC 9113 §3.4, §4.1) and the header blocks encoded without
//! Huffman or indexing (RFC 7541 §5.1, §6.2.2), the edge's decoder reading them as written.

// Each test file uses part of it.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// One frame: 24-bit length, type, flags, 31-bit stream id, then the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24);
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer on a 7-bit prefix, high bit clear (no Huffman): 127 and more continue
/// in 7-bit groups, least significant first.
fn int7(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// "Literal header field without indexing, new name": any name at all, and no state left
/// in either HPACK table.
pub fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    int7(out, name.len());
    out.extend_from_slice(name.as_bytes());
    int7(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        literal(&mut out, name, value);
    }
    out
}

/// What the edge did with stream 1.
#[derive(Debug)]
pub enum Answer {
    /// A HEADERS frame: its `:status` when the first field can be read, and its first byte.
    Headers {
        status: Option<u16>,
        first: u8,
        /// The whole header block, padding and priority removed.
        block: Vec<u8>,
    },
    RstStream(&'static str),
    GoAway(&'static str),
    /// The TCP connection ended (EOF, or reset) before any of the above.
    Closed(io::ErrorKind),
    /// Nothing within the time given.
    Silent,
}

/// For the reports: `HEADERS 200 (0x88)`, `RST_STREAM PROTOCOL_ERROR`, ...
impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Headers { status, first, .. } => match status {
                Some(s) => write!(f, "HEADERS {s} ({first:#04x})"),
                None => write!(f, "HEADERS, status unread ({first:#04x})"),
            },
            Answer::RstStream(code) => write!(f, "RST_STREAM {code}"),
            Answer::GoAway(code) => write!(f, "GOAWAY {code}"),
            Answer::Closed(kind) => write!(f, "connection closed ({kind:?})"),
            Answer::Silent => write!(f, "nothing"),
        }
    }
}

impl Answer {
    pub fn is_2xx(&self) -> bool {
        matches!(self, Answer::Headers { status: Some(s), .. } if (200..300).contains(s))
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Headers { status, .. } => *status,
            _ => None,
        }
    }
}

fn reason(code: &[u8]) -> &'static str {
    match u32::from_be_bytes([code[0], code[1], code[2], code[3]]) {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "other",
    }
}

/// A connection past the preface, with frames read ahead kept in `buf`.
pub struct Conn {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Conn {
    /// Connects, sends the preface and an empty SETTINGS, and acknowledges the server's
    /// SETTINGS (an unacknowledged SETTINGS may be a connection error).
    pub async fn open(addr: SocketAddr) -> Conn {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let (kind, flags, _, _) =
                tokio::time::timeout(Duration::from_secs(5), next_frame(&mut s, &mut buf))
                    .await
                    .expect("no SETTINGS from the edge")
                    .expect("the edge closed before its SETTINGS");
            if kind == SETTINGS && flags & ACK == 0 {
                s.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
                return Conn { s, buf };
            }
        }
    }

    /// Sends a request as one HEADERS frame (END_HEADERS | END_STREAM) on stream 1 and
    /// waits (up to 10 s) for what comes back.
    pub async fn request(&mut self, block: &[u8]) -> Answer {
        let f = frame(HEADERS, END_HEADERS | END_STREAM, 1, block);
        if let Err(e) = self.s.write_all(&f).await {
            return Answer::Closed(e.kind());
        }
        answer(&mut self.s, &mut self.buf, Duration::from_secs(10)).await
    }
}

/// One frame: (type, flags, stream id, payload); an error once the connection ends.
async fn next_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<(u8, u8, u32, Vec<u8>)> {
    loop {
        if buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() >= 9 + len {
                let f: Vec<u8> = buf.drain(..9 + len).collect();
                let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                return Ok((f[3], f[4], stream, f[9..].to_vec()));
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match r.read(&mut chunk).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The first answer to stream 1 within `within`: HEADERS, RST_STREAM, GOAWAY, or the end
/// of the connection. SETTINGS, WINDOW_UPDATE and PING are skipped.
pub async fn answer<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    within: Duration,
) -> Answer {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (kind, flags, stream, p) =
            match tokio::time::timeout_at(deadline, next_frame(r, buf)).await {
                Err(_) => return Answer::Silent,
                Ok(Err(e)) => return Answer::Closed(e.kind()),
                Ok(Ok(f)) => f,
            };
        match (kind, stream) {
            (HEADERS, 1) => return headers(flags, &p),
            (RST_STREAM, 1) if p.len() >= 4 => return Answer::RstStream(reason(&p[..4])),
            (GOAWAY, 0) if p.len() >= 8 => return Answer::GoAway(reason(&p[4..8])),
            _ => {}
        }
    }
}

fn headers(flags: u8, p: &[u8]) -> Answer {
    let mut p = p;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = p.first().copied().unwrap_or(0) as usize;
        p = p.get(1..).unwrap_or_default();
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..).unwrap_or_default();
    }
    let block = p.get(..p.len().saturating_sub(pad)).unwrap_or_default();
    Answer::Headers {
        status: status(block),
        first: block.first().copied().unwrap_or(0),
        block: block.to_vec(),
    }
}

/// How a header block represents each field (RFC 7541 §6), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    Indexed,
    /// Literal with incremental indexing: the field enters the dynamic table.
    Incremental,
    WithoutIndexing,
    /// Literal never indexed: the field stays out of every table on its way.
    NeverIndexed,
    SizeUpdate,
}

/// The representations of `block`, strings skipped by length (Huffman or not); `None` if the
/// block does not parse.
pub fn representations(block: &[u8]) -> Option<Vec<Representation>> {
    use Representation::*;
    let mut out = Vec::new();
    let mut p = block;
    while let Some(&b) = p.first() {
        let (kind, prefix, literal) = match b {
            0x80.. => (Indexed, 7, false),
            0x40..=0x7f => (Incremental, 6, true),
            0x20..=0x3f => (SizeUpdate, 5, false),
            0x10..=0x1f => (NeverIndexed, 4, true),
            _ => (WithoutIndexing, 4, true),
        };
        let (index, rest) = int(p, prefix)?;
        p = rest;
        // A literal carries its value, and its name too when the index is 0 (a new name).
        let strings = match (literal, index) {
            (false, _) => 0,
            (true, 0) => 2,
            (true, _) => 1,
        };
        for _ in 0..strings {
            let (len, rest) = int(p, 7)?;
            p = rest.get(len..)?;
        }
        out.push(kind);
    }
    Some(out)
}

/// An HPACK integer on an `n`-bit prefix (RFC 7541 §5.1), and what follows it.
fn int(p: &[u8], n: u32) -> Option<(usize, &[u8])> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*p.first()?) & max;
    let mut p = &p[1..];
    if v < max {
        return Some((v, p));
    }
    let mut shift = 0;
    loop {
        let b = *p.first()?;
        p = &p[1..];
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 28 {
            return Some((v, p));
        }
    }
}

/// `:status` as pingora's h2 encoder writes it first: an indexed static entry (0x88 is
/// 200 ... 0x8e is 500), or a literal on the static name 8 with a Huffman value.
fn status(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if let Some(s) = [200, 204, 206, 304, 400, 404, 500]
        .get(usize::from(first.wrapping_sub(0x88)))
        .filter(|_| first >= 0x88)
    {
        return Some(*s);
    }
    // With incremental indexing, without indexing, never indexed.
    if ![0x48, 0x08, 0x18].contains(&first) {
        return None;
    }
    let head = *block.get(1)?;
    let value = block.get(2..2 + usize::from(head & 0x7f))?;
    let digits = if head & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// A Huffman-coded string of ASCII digits (RFC 7541 Appendix B: '0'-'2' are the 5-bit
/// codes 0-2, '3'-'9' the 6-bit codes 0x19-0x1f; the padding is all ones).
fn huffman_digits(s: &[u8]) -> Option<String> {
    let bits: Vec<u8> = s
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
        .collect();
    let mut out = String::new();
    let mut rest = &bits[..];
    while !rest.is_empty() {
        if rest.len() < 8 && rest.iter().all(|b| *b == 1) {
            break;
        }
        let code = |n: usize| rest.get(..n).map(|b| b.iter().fold(0u8, |a, b| a << 1 | b));
        match (code(5)?, code(6)) {
            (c @ 0..=2, _) => {
                out.push(char::from(b'0' + c));
                rest = &rest[5..];
            }
            (_, Some(c @ 0x19..=0x1f)) => {
                out.push(char::from(b'0' + 3 + c - 0x19));
                rest = &rest[6..];
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The decoder on statuses encoded by hand: 502 fills its two bytes, 431 ends in padding.
/// The walker on a block written by hand: indexed `:status 200`, a literal with incremental
/// indexing on a static name, a never-indexed one on a new name with a 128-byte value.
#[test]
fn walks_a_header_block() {
    use Representation::*;
    let mut b = vec![0x88, 0x5f, 0x02, b'h', b'i', 0x10, 0x01, b'x', 0x7f, 0x01];
    b.extend(std::iter::repeat_n(b'v', 128));
    assert_eq!(
        representations(&b),
        Some(vec![Indexed, Incremental, NeverIndexed])
    );
    assert_eq!(representations(&[0x10, 0x05, b'x']), None);
}

#[test]
fn reads_a_huffman_coded_status() {
    assert_eq!(status(&[0x48, 0x82, 0x6c, 0x02]), Some(502));
    assert_eq!(status(&[0x48, 0x83, 0x69, 0x90, 0xff]), Some(431));
    assert_eq!(status(&[0x08, 0x03, b'4', b'2', b'9']), Some(429));
    assert_eq!(status(&[0x8c]), Some(400));
    assert_eq!(status(&[0x87]), None);
}
