//! [`DataReader`]: the body of `DATA`, with RFC 5321 §4.5.2 dot-unstuffing, byte-exact and 8-bit
//! clean.
//!
//! Lines end with CRLF only. A bare LF (or bare CR) is kept as data: it never ends the message and a
//! period after it is not a stuffed period. So `\n.\n`, `\n.\r\n` and `\r\n.\n` never end the body
//! (no SMTP smuggling); only `<CRLF>.<CRLF>` does (or `.<CRLF>` as the very first line: an empty
//! message). A line whose first character is a period loses that period. The CRLF before the final
//! period belongs to the message. The reader works on any split of the input (it keeps its state
//! between calls), so it can be fed lines, chunks or single bytes.
//!
//! The reader holds no body: each [`DataReader::push`] appends the unstuffed octets of its input to
//! the caller's buffer, which the session hands to the store's body writer chunk by chunk. So
//! memory per connection is one socket read plus the store's inline buffer, whatever the message
//! size or line length.
//!
//! **Long lines** (decision, for DESIGN §6): a DATA line longer than RFC 5321's 1000 octets is
//! accepted and stored byte-exact, as Postfix does; there is no line-length limit inside a
//! message, only the message size limit. Memory stays bounded because nothing here works by
//! lines. A message over the size limit is read (and thrown away) to its end marker, then refused
//! with `552 5.3.4`; nothing of it is stored.

/// Where the line-start state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line.
    Mid,
    /// Inside a line, just after a CR.
    Cr,
    /// At the start of a line (after CRLF, or at the start of the body).
    LineStart,
    /// A period at the start of a line.
    Dot,
    /// A period and a CR at the start of a line.
    DotCr,
}

/// What a call to [`DataReader::push`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEnd {
    /// The end marker has not been seen yet.
    More,
    /// The end marker ended after this many octets of the input; the rest is not part of the body.
    Done(usize),
}

/// Unstuffs a DATA body up to a size cap, chunk by chunk.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    max: usize,
    /// Octets of body seen, including those dropped over the cap.
    total: usize,
}

impl DataReader {
    /// A reader that passes on at most `max` octets (the message counts as too big past it).
    pub fn new(max: usize) -> Self {
        Self {
            state: State::LineStart,
            max,
            total: 0,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len());
        if self.total <= self.max {
            out.extend_from_slice(bytes);
        }
    }

    /// Feeds input, appending the body octets it holds to `out` (nothing once over the cap);
    /// stops at the end marker.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataEnd {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Mid => match input[i..].iter().position(|&b| b == b'\r') {
                    Some(p) => {
                        self.emit(out, &input[i..i + p + 1]);
                        i += p + 1;
                        self.state = State::Cr;
                    }
                    None => {
                        self.emit(out, &input[i..]);
                        i = input.len();
                    }
                },
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    self.emit(out, &[b]);
                    self.state = match b {
                        b'\n' => State::LineStart,
                        b'\r' => State::Cr,
                        _ => State::Mid,
                    };
                }
                State::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // A stuffed period: dropped; the octet is ordinary data.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        return DataEnd::Done(i + 1);
                    }
                    // ".\r" + something: the period was stuffing, the CR is data.
                    self.emit(out, b"\r");
                    self.state = State::Cr;
                }
            }
        }
        DataEnd::More
    }

    /// True once the body went over the cap.
    pub fn too_big(&self) -> bool {
        self.total > self.max
    }

    /// Octets of body seen so far (over the cap too).
    pub fn len(&self) -> usize {
        self.total
    }

    /// True if no body octet was seen.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Dot-stuffs a body for sending, chunk by chunk (our reader's inverse: a period at the start of
/// a CRLF line is doubled); [`Stuffer::finish`] ends it with CRLF if needed. Does not add the
/// final `.<CRLF>`.
#[derive(Debug)]
pub(crate) struct Stuffer {
    line_start: bool,
    prev: u8,
    any: bool,
}

impl Stuffer {
    pub(crate) fn new() -> Self {
        Self {
            line_start: true,
            prev: 0,
            any: false,
        }
    }

    /// Appends the stuffed form of `chunk` to `out`.
    pub(crate) fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64 + 2);
        for &b in chunk {
            if self.line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.line_start = b == b'\n' && self.prev == b'\r';
            self.prev = b;
        }
        self.any |= !chunk.is_empty();
    }

    /// Ends the body with CRLF unless it does already.
    pub(crate) fn finish(self, out: &mut Vec<u8>) {
        if self.any && !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// [`Stuffer`] over a whole body.
#[cfg(test)]
pub(crate) fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = Stuffer::new();
    s.push(body, &mut out);
    s.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> (Vec<u8>, usize) {
        let mut r = DataReader::new(1 << 20);
        let mut out = Vec::new();
        match r.push(input, &mut out) {
            DataEnd::Done(n) => (out, n),
            DataEnd::More => panic!("no end marker in {input:?}"),
        }
    }

    fn bytewise(input: &[u8]) -> (Vec<u8>, usize) {
        let mut r = DataReader::new(1 << 20);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if let DataEnd::Done(n) = r.push(std::slice::from_ref(b), &mut out) {
                assert_eq!(n, 1);
                return (out, i + 1);
            }
        }
        panic!("no end marker");
    }

    #[test]
    fn unstuffs_and_stops_at_the_marker() {
        let cases: &[(&[u8], &[u8])] = &[
            (b".\r\n", b""),
            (b"a\r\n.\r\n", b"a\r\n"),
            (b"..\r\n.\r\n", b".\r\n"),
            (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
            (b"x\n.\ny\r\n.\r\n", b"x\n.\ny\r\n"),
            (b"x\r\n.\ny\r\n.\r\n", b"x\r\n\ny\r\n"),
            (b"x\n.\r\ny\r\n.\r\n", b"x\n.\r\ny\r\n"),
            (b".\r\r\n.\r\n", b"\r\r\n"),
            (b"\xff\x00\xc3\xa9\r\n.\r\n", b"\xff\x00\xc3\xa9\r\n"),
            (b"a\r\n.\r\nMAIL FROM:<>\r\n", b"a\r\n"),
        ];
        for (input, body) in cases {
            let (b1, n1) = whole(input);
            let (b2, n2) = bytewise(input);
            assert_eq!(&b1, body, "{input:?}");
            assert_eq!(b1, b2);
            assert_eq!(n1, n2);
            assert!(input[..n1].ends_with(b".\r\n"));
        }
    }

    #[test]
    fn caps_the_size() {
        let mut r = DataReader::new(4);
        let mut out = Vec::new();
        assert_eq!(r.push(b"12345\r\n", &mut out), DataEnd::More);
        assert_eq!(r.push(b".\r\n", &mut out), DataEnd::Done(3));
        assert!(r.too_big());
        assert!(out.is_empty());
    }

    #[test]
    fn stuffing_round_trips() {
        for body in [
            &b"a\r\n.b\r\n..\r\n.\r\n"[..],
            b".start\r\n",
            b"x\n.\ny\r\n",
            b"\r\n.\r\n",
        ] {
            let mut wire = stuff(body);
            wire.extend_from_slice(b".\r\n");
            assert_eq!(whole(&wire).0, body);
        }
        assert_eq!(stuff(b"no newline"), b"no newline\r\n");
        assert_eq!(stuff(b"bare\n"), b"bare\n\r\n");
        assert_eq!(stuff(b""), b"");
        // Chunked stuffing equals whole stuffing at every split.
        let body = b"a\r\n.b\r\n..\r\n.\r\nx\r";
        for cut in 0..body.len() {
            let mut out = Vec::new();
            let mut s = Stuffer::new();
            s.push(&body[..cut], &mut out);
            s.push(&body[cut..], &mut out);
            s.finish(&mut out);
            assert_eq!(out, stuff(body), "cut {cut}");
        }
    }
}
