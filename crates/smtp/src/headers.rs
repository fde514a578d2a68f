//! [`HeaderScan`]: the header section of a submitted message, kept while DATA streams past
//! (bounded by [`MAX_HEADER`]), for the sender rules and the `Message-ID`/`Date` check
//! (DESIGN.md §6). The body itself goes on to the store untouched.

/// Most header octets kept; a longer header section is [`Headers::overflow`].
pub(crate) const MAX_HEADER: usize = 64 * 1024;

/// Collects the header section from the unstuffed message octets, in any chunking.
#[derive(Debug, Default)]
pub(crate) struct HeaderScan {
    buf: Vec<u8>,
    done: bool,
    overflow: bool,
}

/// What the sender rules need from a header section.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Headers {
    /// The addresses of every `From:` field (none when there is none).
    pub from: Vec<String>,
    /// A `From:` field is present (even one without a parsable address).
    pub has_from: bool,
    pub has_message_id: bool,
    pub has_date: bool,
    /// The header section was longer than [`MAX_HEADER`]; only its start was looked at.
    pub overflow: bool,
}

impl HeaderScan {
    /// Feeds the next octets of the message.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.done || bytes.is_empty() {
            return;
        }
        let start = self.buf.len().saturating_sub(3);
        let room = MAX_HEADER - self.buf.len();
        let take = bytes.len().min(room);
        self.buf.extend_from_slice(&bytes[..take]);
        if let Some(end) = header_end(&self.buf, start) {
            self.buf.truncate(end);
            self.done = true;
        } else if take < bytes.len() || self.buf.len() >= MAX_HEADER {
            self.overflow = true;
            self.done = true;
        }
    }

    /// The fields the sender rules look at.
    pub fn finish(self) -> Headers {
        let mut h = Headers {
            overflow: self.overflow,
            ..Headers::default()
        };
        for name in field_names(&self.buf) {
            match name.to_ascii_lowercase().as_str() {
                "from" => h.has_from = true,
                "message-id" => h.has_message_id = true,
                "date" => h.has_date = true,
                _ => {}
            }
        }
        if h.has_from
            && let Some(message) = mail_parser::MessageParser::new().parse_headers(&self.buf)
            && let Some(from) = message.from()
        {
            h.from = from
                .iter()
                .filter_map(|a| a.address())
                .map(str::to_string)
                .collect();
        }
        h
    }
}

/// Where the header section ends (after its blank line), searching from `from`.
fn header_end(buf: &[u8], from: usize) -> Option<usize> {
    // A message that starts with an empty line has an empty header section.
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    if buf.starts_with(b"\n") {
        return Some(1);
    }
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1..].starts_with(b"\r\n") {
                return Some(i + 3);
            }
            if buf[i + 1..].starts_with(b"\n") {
                return Some(i + 2);
            }
        }
        i += 1;
    }
    None
}

/// The names of the header fields (lines that do not start with white space).
fn field_names(header: &[u8]) -> impl Iterator<Item = String> + '_ {
    header
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty() && !matches!(line[0], b' ' | b'\t' | b'\r'))
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some(String::from_utf8_lossy(&line[..colon]).trim().to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: Bob <bob@example.com>\r\nTo: x@y.org\r\nSubject: hi\r\n \
        folded\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n\r\nFrom: not@header.org\r\nbody\r\n";

    fn scan(chunks: &[&[u8]]) -> Headers {
        let mut s = HeaderScan::default();
        for c in chunks {
            s.push(c);
        }
        s.finish()
    }

    #[test]
    fn fields_in_any_chunking() {
        let whole = scan(&[MSG]);
        assert_eq!(whole.from, ["bob@example.com"]);
        assert!(whole.has_from && whole.has_date && !whole.has_message_id && !whole.overflow);
        let bytes: Vec<&[u8]> = MSG.chunks(1).collect();
        assert_eq!(scan(&bytes), whole);
        for n in [2, 3, 5, 7, 30] {
            let chunks: Vec<&[u8]> = MSG.chunks(n).collect();
            assert_eq!(scan(&chunks), whole, "chunks of {n}");
        }
    }

    #[test]
    fn several_from_addresses_and_bare_lf() {
        let h = scan(&[b"from: a@x.org, \"B\" <b@x.org>\nMessage-ID: <1@x>\n\nbody\n"]);
        assert_eq!(h.from, ["a@x.org", "b@x.org"]);
        assert!(h.has_message_id && !h.has_date);
    }

    #[test]
    fn no_header_and_no_from() {
        let h = scan(&[b"\r\nFrom: a@x.org\r\n"]);
        assert!(!h.has_from && h.from.is_empty());
        let h = scan(&[b"Subject: x\r\n\r\n"]);
        assert!(!h.has_from);
    }

    #[test]
    fn a_huge_header_is_cut_and_flagged() {
        let mut msg = b"From: a@x.org\r\n".to_vec();
        while msg.len() < MAX_HEADER + 100 {
            msg.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        let mut s = HeaderScan::default();
        for c in msg.chunks(1000) {
            s.push(c);
        }
        assert!(s.buf.len() <= MAX_HEADER);
        let h = s.finish();
        assert!(h.overflow && h.has_from);
    }
}
