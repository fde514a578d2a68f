//! [`DataReader`]: the body of `DATA`, with RFC 5321 §4.5.2 dot-unstuffing, byte-exact and 8-bit
//! clean.
//!
//! Lines end with CRLF only. A bare LF (or bare CR) is kept as data: it never ends the message and a
//! period after it is not a stuffed period. So `\n.\n`, `\n.\r\n` and `\r\n.\n` never end the body
//! (no SMTP smuggling); only `<CRLF>.<CRLF>` does (or `.<CRLF>` as the very first line: an empty
//! message). A line whose first character is a period loses that period. The CRLF before the final
//! period belongs to the message. The reader works on any split of the input (it keeps its state
//! between calls), so it can be fed lines, chunks or single bytes.

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

/// Collects a DATA body up to a size cap.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    body: Vec<u8>,
    max: usize,
    /// Octets of body seen, including those dropped over the cap.
    total: usize,
}

impl DataReader {
    /// A reader that keeps at most `max` octets (the message counts as too big past it).
    pub fn new(max: usize) -> Self {
        Self {
            state: State::LineStart,
            body: Vec::new(),
            max,
            total: 0,
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len());
        if self.total <= self.max {
            self.body.extend_from_slice(bytes);
        } else if !self.body.is_empty() {
            self.body = Vec::new();
        }
    }

    /// Feeds input; stops at the end marker.
    pub fn push(&mut self, input: &[u8]) -> DataEnd {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Mid => match input[i..].iter().position(|&b| b == b'\r') {
                    Some(p) => {
                        self.emit(&input[i..i + p + 1]);
                        i += p + 1;
                        self.state = State::Cr;
                    }
                    None => {
                        self.emit(&input[i..]);
                        i = input.len();
                    }
                },
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    self.emit(&[b]);
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
                    self.emit(b"\r");
                    self.state = State::Cr;
                }
            }
        }
        DataEnd::More
    }

    /// Marks the body as over the cap after a line too long to buffer was thrown away up to and
    /// including its LF; the reader goes on looking for the end marker.
    pub fn overflow(&mut self) {
        self.total = self.max.saturating_add(1).max(self.total);
        self.body = Vec::new();
        self.state = State::LineStart;
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

    /// The body (empty if it went over the cap).
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }
}

/// Dot-stuffs a body for sending, ending it with CRLF if needed (our reader's inverse: a period at
/// the start of a CRLF line is doubled). Does not add the final `.<CRLF>`.
pub(crate) fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 2);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' && prev == b'\r';
        prev = b;
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> (Vec<u8>, usize) {
        let mut r = DataReader::new(1 << 20);
        match r.push(input) {
            DataEnd::Done(n) => (r.into_body(), n),
            DataEnd::More => panic!("no end marker in {input:?}"),
        }
    }

    fn bytewise(input: &[u8]) -> (Vec<u8>, usize) {
        let mut r = DataReader::new(1 << 20);
        for (i, b) in input.iter().enumerate() {
            if let DataEnd::Done(n) = r.push(std::slice::from_ref(b)) {
                assert_eq!(n, 1);
                return (r.into_body(), i + 1);
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
        assert_eq!(r.push(b"12345\r\n"), DataEnd::More);
        assert_eq!(r.push(b".\r\n"), DataEnd::Done(3));
        assert!(r.too_big());
        assert!(r.into_body().is_empty());
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
    }
}
