//! FETCH and UID FETCH: FLAGS, INTERNALDATE, RFC822(.HEADER/.TEXT/.SIZE), ENVELOPE, BODY,
//! BODYSTRUCTURE, BODY[section]<partial>, BODY.PEEK (non-PEEK sets `\Seen`), UID, MODSEQ and
//! CHANGEDSINCE (CONDSTORE).
//!
//! Literals are written straight to the connection, not built in `imap-next`'s encoder. Whole
//! messages, byte ranges, HEADER and TEXT stream from the store in [`LITERAL_CHUNK`] pieces;
//! only ENVELOPE (the header alone), BODY/BODYSTRUCTURE and part sections read a message into
//! memory, and ENVELOPE/BODY/BODYSTRUCTURE and the header length are cached per stored body
//! ([`msg::Structure`]), so they are parsed once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use ds_store::mailbox::FlagOp;
use ds_store::{MessageMeta, MessageReader, Store};
use imap_types::command::FetchModifier;
use imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Section};
use imap_types::sequence::SequenceSet;

use crate::Result;
use crate::msg;
use crate::response::{self, Reply};
use crate::session::{Session, State};

/// Literal bytes are written in pieces of this size.
const LITERAL_CHUNK: usize = 64 * 1024;

fn needs_body(item: &MessageDataItemName<'_>) -> bool {
    use MessageDataItemName as N;
    matches!(
        item,
        N::Body
            | N::BodyExt { .. }
            | N::BodyStructure
            | N::Envelope
            | N::Rfc822
            | N::Rfc822Header
            | N::Rfc822Text
    )
}

fn sets_seen(item: &MessageDataItemName<'_>) -> bool {
    use MessageDataItemName as N;
    matches!(
        item,
        N::BodyExt { peek: false, .. } | N::Rfc822 | N::Rfc822Text
    )
}

/// A literal's content: bytes at hand, or a range of the stored message streamed from it.
enum Lit<'a> {
    Bytes(Cow<'a, [u8]>),
    Range { start: u64, len: u64 },
}

/// `NAME {len}\r\n`; the caller writes the content after it.
fn literal<'a>(out: &mut Vec<u8>, name: &str, lit: Lit<'a>) -> Lit<'a> {
    let len = match &lit {
        Lit::Bytes(b) => b.len() as u64,
        Lit::Range { len, .. } => *len,
    };
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(format!(" {{{len}}}\r\n").as_bytes());
    lit
}

/// `<start.len>` of a range `[base, base + total)` of the message: the range actually sent.
fn clip(base: u64, total: u64, partial: Option<(u32, std::num::NonZeroU32)>) -> (u64, u64, u64) {
    match partial {
        Some((start, len)) => {
            let start = u64::from(start).min(total);
            let len = u64::from(len.get()).min(total - start);
            (start, base + start, len)
        }
        None => (0, base, total),
    }
}

/// One message being fetched: its stream, opened once (so a body released meanwhile stays
/// readable), and what was read or parsed of it.
struct Source<'m> {
    meta: &'m MessageMeta,
    store: &'m Store,
    reader: MessageReader,
    whole: Option<Vec<u8>>,
    header: Option<Vec<u8>>,
    structure: Option<msg::Structure>,
}

impl<'m> Source<'m> {
    fn whole(&mut self) -> std::io::Result<&[u8]> {
        if self.whole.is_none() {
            self.whole = Some(msg::read_whole(&mut self.reader, self.meta.size)?);
        }
        Ok(self.whole.as_deref().unwrap_or_default())
    }

    /// The top-level header block.
    fn header(&mut self) -> std::io::Result<&[u8]> {
        if self.header.is_none() && self.whole.is_none() {
            match msg::read_header(&mut self.reader, self.meta.size)? {
                Some(h) => self.header = Some(h),
                None => {
                    self.whole()?;
                }
            }
        }
        if let Some(h) = &self.header {
            return Ok(h);
        }
        let whole = self.whole.as_deref().unwrap_or_default();
        let end = msg::ParsedMessage::new(whole).header_len();
        Ok(&whole[..end.min(whole.len())])
    }

    /// The structure; `full`: with BODY/BODYSTRUCTURE (else ENVELOPE and the header length
    /// suffice).
    fn structure(&mut self, full: bool) -> std::io::Result<&msg::Structure> {
        let have = |s: &Option<msg::Structure>| s.as_ref().is_some_and(|s| s.complete() || !full);
        if !have(&self.structure) {
            let cached = msg::Structure::cached(self.store, self.meta);
            if have(&cached) {
                self.structure = cached;
            } else {
                let s = if full {
                    msg::Structure::of_message(self.whole()?)
                } else if let Some(w) = &self.whole {
                    msg::Structure::of_message(w)
                } else {
                    msg::Structure::of_header(self.header()?)
                };
                if cached.is_none() || s.complete() {
                    s.cache(self.store, self.meta);
                }
                self.structure = Some(s);
            }
        }
        Ok(self
            .structure
            .as_ref()
            .unwrap_or_else(|| unreachable!("set above")))
    }

    fn header_len(&mut self) -> std::io::Result<u64> {
        Ok(self.structure(false)?.header_len.min(self.meta.size))
    }
}

impl Session {
    /// The current metadata of the given UIDs (missing: expunged).
    pub(crate) fn current_metas(
        &self,
        uids: &[u32],
    ) -> ds_store::Result<HashMap<u32, MessageMeta>> {
        let State::Selected(view) = &self.state else {
            return Ok(HashMap::new());
        };
        let mail = &self.imap.mail;
        let mut out = HashMap::with_capacity(uids.len());
        if uids.len() > 16 {
            let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
            for m in mail.messages(&view.account, &view.name)? {
                if wanted.contains(&m.uid) {
                    out.insert(m.uid, m);
                }
            }
        } else {
            for &uid in uids {
                if let Some(m) = mail.message(&view.account, &view.name, uid)? {
                    out.insert(uid, m);
                }
            }
        }
        Ok(out)
    }

    /// A whole message in memory (SEARCH on text); `None` if its body is gone.
    pub(crate) fn message_bytes(&self, meta: &MessageMeta) -> ds_store::Result<Option<Vec<u8>>> {
        let Some(mut reader) = self.imap.mail.open_message(meta)? else {
            return Ok(None);
        };
        Ok(Some(msg::read_whole(&mut reader, meta.size)?))
    }

    pub(crate) async fn fetch(
        &mut self,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'static>,
        uid: bool,
        modifiers: Vec<FetchModifier>,
    ) -> Result<Reply> {
        let mut items: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => m
                .expand()
                .into_iter()
                .map(|i| i.into_static_item())
                .collect(),
            MacroOrMessageDataItemNames::MessageDataItemNames(items) => items,
        };
        if items.iter().any(|i| {
            matches!(
                i,
                MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }
            )
        }) {
            return Ok(Reply::bad("BINARY is not supported"));
        }
        if uid && !items.contains(&MessageDataItemName::Uid) {
            items.insert(0, MessageDataItemName::Uid);
        }
        let mut changed_since = None;
        for m in &modifiers {
            match m {
                FetchModifier::ChangedSince(v) => changed_since = Some(v.get()),
                FetchModifier::Vanished => return Ok(Reply::bad("QRESYNC is not enabled")),
            }
        }
        if changed_since.is_some() || items.contains(&MessageDataItemName::ModSeq) {
            self.condstore = true;
            if !items.contains(&MessageDataItemName::ModSeq) {
                items.push(MessageDataItemName::ModSeq);
            }
        }
        let State::Selected(view) = &self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        let Some(indices) = view.resolve(set, uid) else {
            return Ok(Reply::bad("Invalid message sequence number"));
        };
        let read_only = view.read_only;
        let (account, name) = (view.account.clone(), view.name.clone());
        let targets: Vec<(u32, u32, bool)> = indices
            .iter()
            .map(|&i| (i as u32 + 1, view.messages[i].uid, view.messages[i].recent))
            .collect();
        let uids: Vec<u32> = targets.iter().map(|t| t.1).collect();
        let mut metas = match self.current_metas(&uids) {
            Ok(m) => m,
            Err(e) => return Ok(super::store_error(&e)),
        };

        // Non-PEEK body fetches set \Seen first, so the FLAGS sent reflect it.
        let mut implicit_flags = std::collections::HashSet::new();
        if !read_only && items.iter().any(sets_seen) {
            let unseen: Vec<u32> = metas
                .values()
                .filter(|m| !m.has_flag("\\Seen"))
                .map(|m| m.uid)
                .collect();
            if !unseen.is_empty() {
                match self.imap.mail.store_flags(
                    &account,
                    &name,
                    &unseen,
                    FlagOp::Add,
                    &["\\Seen".to_string()],
                ) {
                    Ok(updated) => {
                        for m in updated {
                            implicit_flags.insert(m.uid);
                            if let State::Selected(view) = &mut self.state {
                                view.note_flags(&m);
                            }
                            metas.insert(m.uid, m);
                        }
                    }
                    Err(e) => return Ok(super::store_error(&e)),
                }
            }
        }

        let with_body = items.iter().any(needs_body);
        let imap = std::sync::Arc::clone(&self.imap);
        let mut expunge_issued = false;
        let mut buf = Vec::new();
        for (seq, uid, recent) in targets {
            let Some(meta) = metas.get(&uid) else {
                expunge_issued = true;
                continue;
            };
            if changed_since.is_some_and(|c| meta.modseq <= c) {
                continue;
            }
            let mut source = if with_body {
                match imap.mail.open_message(meta) {
                    Ok(Some(reader)) => Some(Source {
                        meta,
                        store: &imap.store,
                        reader,
                        whole: None,
                        header: None,
                        structure: None,
                    }),
                    Ok(None) => {
                        expunge_issued = true;
                        continue;
                    }
                    Err(e) => return Ok(super::store_error(&e)),
                }
            } else {
                None
            };
            let mut out = format!("* {seq} FETCH (").into_bytes();
            let mut first = true;
            let mut sent_flags = false;
            for item in &items {
                if !first {
                    out.push(b' ');
                }
                first = false;
                let lit = fetch_item(
                    &mut out,
                    item,
                    meta,
                    recent,
                    source.as_mut(),
                    &mut sent_flags,
                )
                .map_err(ds_store::Error::from)?;
                match lit {
                    None => {}
                    // Literals go out in pieces, never copied whole into the write buffer.
                    Some(Lit::Bytes(data)) => {
                        self.send(&out).await?;
                        out.clear();
                        for chunk in data.chunks(LITERAL_CHUNK) {
                            self.send(chunk).await?;
                        }
                    }
                    Some(Lit::Range { start, len }) => {
                        self.send(&out).await?;
                        out.clear();
                        let Some(src) = source.as_mut() else {
                            continue;
                        };
                        src.reader
                            .seek(SeekFrom::Start(start))
                            .map_err(ds_store::Error::from)?;
                        buf.resize(LITERAL_CHUNK.min(len as usize), 0);
                        let mut left = len;
                        while left > 0 {
                            let want = (left as usize).min(buf.len());
                            // Short reads at the end would break the announced length: the
                            // session ends instead.
                            src.reader
                                .read_exact(&mut buf[..want])
                                .map_err(ds_store::Error::from)?;
                            self.send(&buf[..want]).await?;
                            left -= want as u64;
                        }
                    }
                }
            }
            if implicit_flags.contains(&uid) && !sent_flags {
                out.extend_from_slice(b" FLAGS ");
                response::flag_list(&mut out, &meta.flags, recent);
            }
            out.extend_from_slice(b")\r\n");
            self.send(&out).await?;
        }
        Ok(if expunge_issued {
            Reply::no("Some messages were expunged").code("EXPUNGEISSUED")
        } else {
            Reply::ok("FETCH completed")
        })
    }
}

/// Whether a section is the top-level HEADER or TEXT (streamed from the header length on).
fn top_level(section: &Section<'_>) -> bool {
    matches!(
        section,
        Section::Header(None)
            | Section::Text(None)
            | Section::HeaderFields(None, _)
            | Section::HeaderFieldsNot(None, _)
    )
}

/// Append one item to `out`; a literal's content is returned for the caller to write.
fn fetch_item<'a>(
    out: &mut Vec<u8>,
    item: &MessageDataItemName<'_>,
    meta: &MessageMeta,
    recent: bool,
    source: Option<&'a mut Source<'_>>,
    sent_flags: &mut bool,
) -> std::io::Result<Option<Lit<'a>>> {
    use MessageDataItemName as N;
    match item {
        N::Uid => out.extend_from_slice(format!("UID {}", meta.uid).as_bytes()),
        N::Flags => {
            out.extend_from_slice(b"FLAGS ");
            response::flag_list(out, &meta.flags, recent);
            *sent_flags = true;
        }
        N::InternalDate => {
            out.extend_from_slice(b"INTERNALDATE ");
            out.extend_from_slice(response::internal_date(meta.internal_date).as_bytes());
        }
        N::Rfc822Size => out.extend_from_slice(format!("RFC822.SIZE {}", meta.size).as_bytes()),
        N::ModSeq => out.extend_from_slice(format!("MODSEQ ({})", meta.modseq).as_bytes()),
        N::Binary { .. } | N::BinarySize { .. } => {}
        _ => {
            let Some(src) = source else {
                return Ok(None);
            };
            return body_item(out, item, src);
        }
    }
    Ok(None)
}

fn body_item<'a>(
    out: &mut Vec<u8>,
    item: &MessageDataItemName<'_>,
    src: &'a mut Source<'_>,
) -> std::io::Result<Option<Lit<'a>>> {
    use MessageDataItemName as N;
    let size = src.meta.size;
    Ok(Some(match item {
        N::Envelope => {
            out.extend_from_slice(&src.structure(false)?.envelope);
            return Ok(None);
        }
        N::BodyStructure => {
            out.extend_from_slice(&src.structure(true)?.body_structure);
            return Ok(None);
        }
        N::Body => {
            out.extend_from_slice(&src.structure(true)?.body);
            return Ok(None);
        }
        N::Rfc822 => literal(
            out,
            "RFC822",
            Lit::Range {
                start: 0,
                len: size,
            },
        ),
        N::Rfc822Header => {
            let h = src.header_len()?;
            literal(out, "RFC822.HEADER", Lit::Range { start: 0, len: h })
        }
        N::Rfc822Text => {
            let h = src.header_len()?;
            literal(
                out,
                "RFC822.TEXT",
                Lit::Range {
                    start: h,
                    len: size - h,
                },
            )
        }
        N::BodyExt {
            section, partial, ..
        } => {
            let spec = response::section_spec(section.as_ref());
            let name = |origin: Option<u64>| match origin {
                Some(o) => format!("BODY[{spec}]<{o}>"),
                None => format!("BODY[{spec}]"),
            };
            let origin = |(o, _, _): (u64, u64, u64)| partial.map(|_| o);
            let range = match section {
                None => Some((0, size)),
                Some(Section::Header(None)) => Some((0, src.header_len()?)),
                Some(Section::Text(None)) => {
                    let h = src.header_len()?;
                    Some((h, size - h))
                }
                _ => None,
            };
            if let Some((base, total)) = range {
                let c = clip(base, total, *partial);
                return Ok(Some(literal(
                    out,
                    &name(origin(c)),
                    Lit::Range {
                        start: c.1,
                        len: c.2,
                    },
                )));
            }
            // Sections that need parsing: HEADER.FIELDS of the top level from the header alone,
            // the rest from the whole message.
            let data: Vec<u8> = match section {
                Some(s) if top_level(s) => {
                    msg::section_bytes(src.header()?, section.as_ref(), false).unwrap_or_default()
                }
                _ => msg::ParsedMessage::new(src.whole()?)
                    .section(section.as_ref(), false)
                    .map(Cow::into_owned)
                    .unwrap_or_default(),
            };
            let c = clip(0, data.len() as u64, *partial);
            let piece = data[c.1 as usize..(c.1 + c.2) as usize].to_vec();
            literal(out, &name(origin(c)), Lit::Bytes(Cow::Owned(piece)))
        }
        _ => return Ok(None),
    }))
}

trait IntoStaticItem {
    fn into_static_item(self) -> MessageDataItemName<'static>;
}

impl IntoStaticItem for MessageDataItemName<'_> {
    fn into_static_item(self) -> MessageDataItemName<'static> {
        use MessageDataItemName as N;
        match self {
            N::Body => N::Body,
            N::BodyStructure => N::BodyStructure,
            N::Envelope => N::Envelope,
            N::Flags => N::Flags,
            N::InternalDate => N::InternalDate,
            N::Rfc822 => N::Rfc822,
            N::Rfc822Header => N::Rfc822Header,
            N::Rfc822Size => N::Rfc822Size,
            N::Rfc822Text => N::Rfc822Text,
            N::Uid => N::Uid,
            N::ModSeq => N::ModSeq,
            _ => N::Flags,
        }
    }
}
