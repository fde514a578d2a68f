//! The MIME tree of a stored message, as byte ranges into the raw message (RFC 2045/2046).
//!
//! Everything IMAP shows of a message (ENVELOPE, BODYSTRUCTURE, BODY[section]) is computed from
//! this tree, so sections are byte-exact slices of what was stored. The parser is lenient (it never
//! fails) and bounded: nesting deeper than [`MAX_DEPTH`] or more than [`MAX_PARTS`] entities are
//! not split further, and recursion is limited by the same depth.

use std::ops::Range;

/// Deepest multipart / message/rfc822 nesting that is split into parts.
pub const MAX_DEPTH: usize = 20;
/// Most MIME entities split out of one message; the rest stay unsplit.
pub const MAX_PARTS: usize = 1000;

/// One header field; offsets are absolute into the message.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    /// The field name, without the colon or trailing blanks.
    pub name: Range<usize>,
    /// The raw value after the colon, folding included, line break of the last line excluded.
    pub value: Range<usize>,
    /// The whole field: name, value, continuation lines and the final line break.
    pub line: Range<usize>,
}

/// A parsed `Content-Type` (or `Content-Disposition`: `mtype` is then the disposition).
#[derive(Debug, Clone)]
pub(crate) struct ContentType {
    pub mtype: Vec<u8>,
    pub subtype: Vec<u8>,
    /// Parameters as written (RFC 2231 sections and charsets are kept raw), quotes removed.
    pub params: Vec<Param>,
}

/// A `name=value` parameter, both raw bytes.
pub(crate) type Param = (Vec<u8>, Vec<u8>);

impl ContentType {
    fn default_for(digest_parent: bool) -> Self {
        if digest_parent {
            ContentType {
                mtype: b"message".to_vec(),
                subtype: b"rfc822".to_vec(),
                params: Vec::new(),
            }
        } else {
            ContentType {
                mtype: b"text".to_vec(),
                subtype: b"plain".to_vec(),
                params: vec![(b"charset".to_vec(), b"us-ascii".to_vec())],
            }
        }
    }

    pub fn is(&self, mtype: &str, subtype: Option<&str>) -> bool {
        self.mtype.eq_ignore_ascii_case(mtype.as_bytes())
            && subtype.is_none_or(|s| self.subtype.eq_ignore_ascii_case(s.as_bytes()))
    }

    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }
}

/// A MIME entity: a whole message, a body part, or the message inside a message/rfc822 part.
#[derive(Debug, Clone)]
pub(crate) struct Entity {
    /// The header including the blank line that ends it (empty if the entity has no header).
    pub header: Range<usize>,
    pub body: Range<usize>,
    pub fields: Vec<Field>,
    pub ctype: ContentType,
    pub content: Content,
}

#[derive(Debug, Clone)]
pub(crate) enum Content {
    Leaf,
    /// Never empty: a multipart without any part gets one empty text/plain part.
    Multipart(Vec<Entity>),
    /// message/rfc822 (not base64 or quoted-printable encoded): the encapsulated message.
    Message(Box<Entity>),
}

impl Entity {
    /// The first field called `name` (case-insensitive).
    pub fn field<'m>(&self, msg: &'m [u8], name: &str) -> Option<&'m [u8]> {
        self.fields
            .iter()
            .find(|f| msg[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| &msg[f.value.clone()])
    }

    /// The parts numbered below this entity (RFC 3501 §6.4.5): a multipart's children; for a
    /// message/rfc822 part, the encapsulated message's children, or its body as part 1.
    pub fn subparts(&self) -> &[Entity] {
        match &self.content {
            Content::Multipart(children) => children,
            Content::Message(inner) => match &inner.content {
                Content::Multipart(children) => children,
                _ => std::slice::from_ref(inner),
            },
            Content::Leaf => &[],
        }
    }

    /// Transfer encoding as written, lower-cased and trimmed; empty if absent.
    pub fn encoding(&self, msg: &[u8]) -> Vec<u8> {
        self.field(msg, "content-transfer-encoding")
            .map(|v| trim(&unfold(v)).to_ascii_lowercase())
            .unwrap_or_default()
    }

    fn empty(at: usize) -> Self {
        Entity {
            header: at..at,
            body: at..at,
            fields: Vec::new(),
            ctype: ContentType::default_for(false),
            content: Content::Leaf,
        }
    }
}

/// Parses a whole message.
pub(crate) fn parse(msg: &[u8]) -> Entity {
    let mut count = 0;
    parse_entity(msg, 0..msg.len(), 0, &mut count, false)
}

fn parse_entity(
    msg: &[u8],
    range: Range<usize>,
    depth: usize,
    count: &mut usize,
    digest_parent: bool,
) -> Entity {
    *count += 1;
    let (fields, header_end) = parse_header(msg, range.clone());
    let ctype = fields
        .iter()
        .find(|f| msg[f.name.clone()].eq_ignore_ascii_case(b"content-type"))
        .and_then(|f| parse_content_type(&msg[f.value.clone()]))
        .unwrap_or_else(|| ContentType::default_for(digest_parent));
    let mut entity = Entity {
        header: range.start..header_end,
        body: header_end..range.end,
        fields,
        ctype,
        content: Content::Leaf,
    };
    let may_split = depth < MAX_DEPTH && *count < MAX_PARTS;
    if entity.ctype.is("multipart", None) {
        let mut children = Vec::new();
        let boundary = entity
            .ctype
            .param("boundary")
            .filter(|b| !b.is_empty())
            .map(<[u8]>::to_vec);
        if let Some(boundary) = boundary.filter(|_| may_split) {
            let digest = entity.ctype.is("multipart", Some("digest"));
            for part in split_multipart(msg, entity.body.clone(), &boundary) {
                if *count >= MAX_PARTS {
                    break;
                }
                children.push(parse_entity(msg, part, depth + 1, count, digest));
            }
        }
        if children.is_empty() {
            children.push(Entity::empty(entity.body.end));
        }
        entity.content = Content::Multipart(children);
    } else if entity.ctype.is("message", Some("rfc822")) && may_split {
        let enc = entity.encoding(msg);
        if enc != b"base64" && enc != b"quoted-printable" {
            let inner = parse_entity(msg, entity.body.clone(), depth + 1, count, false);
            entity.content = Content::Message(Box::new(inner));
        }
    }
    entity
}

/// End of the line starting at `pos` (after its `\n`, or `end`).
fn line_end(msg: &[u8], pos: usize, end: usize) -> usize {
    msg[pos..end]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(end, |i| pos + i + 1)
}

/// Splits the header into fields; returns them and the offset where the body starts.
///
/// An entity whose first line is not a header field (nor an mbox `From ` line) has no header:
/// its body starts right away. Later lines that are not fields are skipped.
fn parse_header(msg: &[u8], range: Range<usize>) -> (Vec<Field>, usize) {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let end = line_end(msg, pos, range.end);
        let line = &msg[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return (fields, end);
        }
        let content_end = end - trailing_newline(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = fields.last_mut() {
                last.value.end = content_end;
                last.line.end = end;
            }
        } else if let Some(field) = field_at(msg, pos, content_end, end) {
            fields.push(field);
        } else if pos == range.start && !line.starts_with(b"From ") {
            return (fields, range.start);
        }
        pos = end;
    }
    (fields, range.end)
}

/// The field starting a line, if the line is `name: value` with a name of visible characters.
fn field_at(msg: &[u8], pos: usize, content_end: usize, end: usize) -> Option<Field> {
    let colon = pos + msg[pos..content_end].iter().position(|&b| b == b':')?;
    let mut name_end = colon;
    while name_end > pos && matches!(msg[name_end - 1], b' ' | b'\t') {
        name_end -= 1;
    }
    let name = &msg[pos..name_end];
    if name.is_empty() || name.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return None;
    }
    Some(Field {
        name: pos..name_end,
        value: (colon + 1)..content_end,
        line: pos..end,
    })
}

fn trailing_newline(line: &[u8]) -> usize {
    if line.ends_with(b"\r\n") {
        2
    } else if line.ends_with(b"\n") {
        1
    } else {
        0
    }
}

/// The ranges of the body parts of a multipart body (RFC 2046 §5.1.1): the line break before a
/// delimiter belongs to the delimiter; preamble and epilogue are dropped; a missing close
/// delimiter ends the last part at the end of the body.
fn split_multipart(msg: &[u8], body: Range<usize>, boundary: &[u8]) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut current: Option<usize> = None;
    let mut pos = body.start;
    while pos < body.end {
        let end = line_end(msg, pos, body.end);
        let line = &msg[pos..end];
        if line.len() >= 2 + boundary.len()
            && line.starts_with(b"--")
            && &line[2..2 + boundary.len()] == boundary
        {
            let rest = &line[2 + boundary.len()..];
            let close = rest.starts_with(b"--");
            if close || rest.iter().all(|b| b.is_ascii_whitespace()) {
                if let Some(start) = current {
                    let mut content_end = pos;
                    if content_end > body.start && msg[content_end - 1] == b'\n' {
                        content_end -= 1;
                        if content_end > body.start && msg[content_end - 1] == b'\r' {
                            content_end -= 1;
                        }
                    }
                    parts.push(start..content_end.max(start));
                }
                if close {
                    return parts;
                }
                current = Some(end);
                if parts.len() >= MAX_PARTS {
                    return parts;
                }
            }
        }
        pos = end;
    }
    if let Some(start) = current {
        parts.push(start..body.end);
    }
    parts
}

/// Removes CR and LF (unfolding) and NUL bytes.
pub(crate) fn unfold(v: &[u8]) -> Vec<u8> {
    v.iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n' && b != 0)
        .collect()
}

pub(crate) fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// Counts text lines: line breaks, plus one for an unterminated last line.
pub(crate) fn count_lines(body: &[u8]) -> u32 {
    let n = body.iter().filter(|&&b| b == b'\n').count()
        + usize::from(!body.is_empty() && !body.ends_with(b"\n"));
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Cursor over a structured header value: tokens, quoted strings, comments (RFC 2045 §5.1).
struct Lexer<'v> {
    v: &'v [u8],
    pos: usize,
}

const TSPECIALS: &[u8] = b"()<>@,;:\\\"/[]?=";

impl<'v> Lexer<'v> {
    fn skip_cfws(&mut self) {
        while self.pos < self.v.len() {
            match self.v[self.pos] {
                b' ' | b'\t' | b'\r' | b'\n' => self.pos += 1,
                b'(' => {
                    let mut depth = 0usize;
                    while self.pos < self.v.len() {
                        match self.v[self.pos] {
                            b'\\' => self.pos += 1,
                            b'(' => depth += 1,
                            b')' => {
                                depth -= 1;
                                if depth == 0 {
                                    self.pos += 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
        self.pos = self.pos.min(self.v.len());
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_cfws();
        self.v.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn token(&mut self) -> Option<Vec<u8>> {
        self.skip_cfws();
        let start = self.pos;
        while self.pos < self.v.len() {
            let b = self.v[self.pos];
            if b <= b' ' || b == 0x7f || TSPECIALS.contains(&b) {
                break;
            }
            self.pos += 1;
        }
        (self.pos > start).then(|| self.v[start..self.pos].to_vec())
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = Vec::new();
        while self.pos < self.v.len() {
            let b = self.v[self.pos];
            self.pos += 1;
            match b {
                b'"' => return Some(out),
                b'\\' if self.pos < self.v.len() => {
                    out.push(self.v[self.pos]);
                    self.pos += 1;
                }
                b'\r' | b'\n' => {}
                _ => out.push(b),
            }
        }
        Some(out)
    }

    /// Skips to just after the next `;` (or the end).
    fn skip_to_semicolon(&mut self) {
        while self.pos < self.v.len() {
            let b = self.v[self.pos];
            if b == b'"' {
                self.quoted();
                continue;
            }
            self.pos += 1;
            if b == b';' {
                return;
            }
        }
    }

    /// `*(";" attribute "=" value)`, lenient: a broken parameter is skipped.
    fn params(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut params = Vec::new();
        loop {
            match self.peek() {
                None => return params,
                Some(b';') => self.pos += 1,
                Some(_) => {
                    self.skip_to_semicolon();
                    continue;
                }
            }
            let Some(name) = self.token() else {
                continue;
            };
            if !self.eat(b'=') {
                self.skip_to_semicolon();
                continue;
            }
            let value = if self.peek() == Some(b'"') {
                self.quoted()
            } else {
                self.token()
            };
            match value {
                Some(value) => params.push((name, value)),
                None => self.skip_to_semicolon(),
            }
        }
    }
}

/// Parses a Content-Type value; `None` if it has no valid `type/subtype`.
pub(crate) fn parse_content_type(value: &[u8]) -> Option<ContentType> {
    let mut lx = Lexer { v: value, pos: 0 };
    let mtype = lx.token()?;
    if !lx.eat(b'/') {
        return None;
    }
    let subtype = lx.token()?;
    let params = lx.params();
    Some(ContentType {
        mtype,
        subtype,
        params,
    })
}

/// Parses a Content-Disposition value: `(disposition, params)`.
pub(crate) fn parse_disposition(value: &[u8]) -> Option<(Vec<u8>, Vec<Param>)> {
    let mut lx = Lexer { v: value, pos: 0 };
    let kind = lx.token()?;
    let params = lx.params();
    Some((kind, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_params() {
        let ct = parse_content_type(
            b" multipart/MIXED; boundary=\"=_a b\\\"c\" (comment);\r\n\tcharset=utf-8; title*0*=us-ascii'en'This%20is; title*1=\" fun\"; junk; x=",
        )
        .unwrap();
        assert_eq!(ct.mtype, b"multipart");
        assert_eq!(ct.subtype, b"MIXED");
        let got: Vec<(String, String)> = ct
            .params
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("boundary".into(), "=_a b\"c".into()),
                ("charset".into(), "utf-8".into()),
                ("title*0*".into(), "us-ascii'en'This%20is".into()),
                ("title*1".into(), " fun".into()),
            ]
        );
        assert!(parse_content_type(b"text").is_none());
        assert!(parse_content_type(b"").is_none());
    }

    #[test]
    fn multipart_split_is_exact() {
        let msg = b"Content-Type: multipart/mixed; boundary=b\r\n\r\npre\r\n--b\r\n\r\none\r\n--b \r\nX: y\r\n\r\ntwo\r\n\r\n--b--\r\nepilogue\r\n";
        let root = parse(msg);
        let Content::Multipart(children) = &root.content else {
            panic!("not multipart")
        };
        assert_eq!(children.len(), 2);
        assert_eq!(&msg[children[0].body.clone()], b"one");
        assert_eq!(&msg[children[0].header.clone()], b"\r\n");
        assert_eq!(&msg[children[1].header.clone()], b"X: y\r\n\r\n");
        assert_eq!(&msg[children[1].body.clone()], b"two\r\n");
    }

    #[test]
    fn headerless_part_is_all_body() {
        let msg = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nhello world\r\nX: y\r\n--b--\r\n";
        let root = parse(msg);
        let Content::Multipart(children) = &root.content else {
            panic!("not multipart")
        };
        assert!(children[0].fields.is_empty());
        assert_eq!(&msg[children[0].header.clone()], b"");
        assert_eq!(&msg[children[0].body.clone()], b"hello world\r\nX: y");
        // An mbox From line does not end the header; a junk line later is skipped.
        let msg =
            b"From a@b Mon Jan  1 00:00:00 2024\r\nSubject: s\r\njunk line\r\nTo: t@x\r\n\r\nbody";
        let root = parse(msg);
        assert_eq!(root.fields.len(), 2);
        assert_eq!(&msg[root.body.clone()], b"body");
    }

    #[test]
    fn lines() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a"), 1);
        assert_eq!(count_lines(b"a\r\n"), 1);
        assert_eq!(count_lines(b"a\r\nb"), 2);
    }
}
