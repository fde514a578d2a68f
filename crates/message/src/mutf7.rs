//! Modified UTF-7 for mailbox names (RFC 3501 §5.1.3): the form IMAP4rev1 puts on the wire.
//!
//! Printable US-ASCII other than `&` stands for itself, `&` is `&-`, and every run of other
//! characters is UTF-16BE in base64 with `,` for `/`, no padding, between `&` and `-`.
//! [`decode`] accepts only the canonical form, so `decode(s).map(|u| encode(&u)) == Some(s)`.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

fn is_direct(c: char) -> bool {
    ('\x20'..='\x7e').contains(&c) && c != '&'
}

/// Encodes a UTF-8 mailbox name in modified UTF-7.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending: Vec<u16> = Vec::new();
    for c in s.chars() {
        if is_direct(c) {
            flush(&mut pending, &mut out);
            out.push(c);
        } else if c == '&' {
            flush(&mut pending, &mut out);
            out.push_str("&-");
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Writes `&<modified base64 of the UTF-16BE units>-` and empties `units`.
fn flush(units: &mut Vec<u16>, out: &mut String) {
    if units.is_empty() {
        return;
    }
    out.push('&');
    let bytes: Vec<u8> = units.iter().flat_map(|u| u.to_be_bytes()).collect();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = chunk.len() + 1; // 1 byte -> 2 chars, 2 -> 3, 3 -> 4
        for i in 0..sextets {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out.push('-');
    units.clear();
}

fn sextet(b: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == b).map(|p| p as u32)
}

/// Decodes a modified UTF-7 mailbox name; `None` if it is not valid, canonical modified UTF-7
/// (8-bit or control bytes, an unterminated or malformed `&…-` run, leftover non-zero bits,
/// a printable ASCII character encoded in base64, two runs back to back, or broken UTF-16
/// surrogates).
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    // Where the last base64 run ended: a run right after it should have been one run.
    let mut run_end = usize::MAX;
    while i < bytes.len() {
        let b = bytes[i];
        if !(0x20..=0x7e).contains(&b) {
            return None;
        }
        if b != b'&' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let start = i + 1;
        let end = start + bytes[start..].iter().position(|&c| c == b'-')?;
        i = end + 1;
        if end == start {
            out.push('&');
            continue;
        }
        if run_end == start - 1 {
            return None;
        }
        run_end = i;
        let mut bits: u32 = 0;
        let mut nbits = 0u32;
        let mut units: Vec<u16> = Vec::new();
        let mut byte_pair: Vec<u8> = Vec::with_capacity(2);
        for &c in &bytes[start..end] {
            bits = (bits << 6) | sextet(c)?;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                byte_pair.push(((bits >> nbits) & 0xff) as u8);
                bits &= (1 << nbits) - 1;
                if byte_pair.len() == 2 {
                    units.push(u16::from_be_bytes([byte_pair[0], byte_pair[1]]));
                    byte_pair.clear();
                }
            }
        }
        // Leftover: fewer than 6 zero bits, and no half UTF-16 unit.
        if nbits >= 6 || bits != 0 || !byte_pair.is_empty() {
            return None;
        }
        let decoded = String::from_utf16(&units).ok()?;
        if decoded.chars().any(|c| is_direct(c) || c == '&') {
            return None;
        }
        out.push_str(&decoded);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3501_example() {
        let wire = "~peter/mail/&U,BTFw-/&ZeVnLIqe-";
        let name = "~peter/mail/台北/日本語";
        assert_eq!(encode(name), wire);
        assert_eq!(decode(wire).as_deref(), Some(name));
    }

    #[test]
    fn ampersand_and_ascii() {
        assert_eq!(encode("Tom & Jerry"), "Tom &- Jerry");
        assert_eq!(decode("Tom &- Jerry").as_deref(), Some("Tom & Jerry"));
        assert_eq!(encode("INBOX"), "INBOX");
        assert_eq!(encode(""), "");
        assert_eq!(decode("").as_deref(), Some(""));
    }

    #[test]
    fn round_trips() {
        for name in [
            "Entwürfe",
            "Gelöschte Elemente",
            "Отправленные",
            "送信済み",
            "a&b/ä&ö",
            "emoji 📬 box",
            "\u{1}control",
            "ü",
            "üü",
            "üüü",
            "&&&",
        ] {
            let wire = encode(name);
            assert!(wire.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{wire}");
            assert_eq!(decode(&wire).as_deref(), Some(name), "{wire}");
        }
        assert_eq!(encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(encode("📬"), "&2D3c7A-");
    }

    #[test]
    fn invalid_rejected() {
        for bad in [
            "&",             // unterminated
            "&U,BTFw",       // unterminated run
            "&U,B!Fw-",      // bad base64 character
            "&AGE-",         // encodes "a": must be direct
            "&ACY-",         // encodes "&": must be "&-"
            "&2D0-",         // lone high surrogate
            "&APx-",         // leftover bits not zero (U+00FC then junk)
            "&AP-",          // half a UTF-16 unit
            "Entw\u{fc}rfe", // 8-bit
            "a\tb",          // control character
            "&U/BTFw-",      // '/' is not modified base64
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pseudo_random_round_trips() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pool: Vec<char> = "aZ09 &-+,/~.&ä中📬\u{7f}\u{1}".chars().collect();
        for _ in 0..5000 {
            let len = (next() % 12) as usize;
            let name: String = (0..len)
                .map(|_| pool[(next() % pool.len() as u64) as usize])
                .collect();
            assert_eq!(
                decode(&encode(&name)).as_deref(),
                Some(name.as_str()),
                "{name:?}"
            );
            // Any wire string that decodes is the canonical encoding of what it decodes to.
            let wire: String = (0..len)
                .map(|_| char::from(b"&-AZaz09+,/ "[(next() % 12) as usize]))
                .collect();
            if let Some(decoded) = decode(&wire) {
                assert_eq!(encode(&decoded), wire);
            }
        }
    }
}
