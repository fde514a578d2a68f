//! FETCH and UID FETCH: FLAGS, INTERNALDATE, RFC822(.HEADER/.TEXT/.SIZE), ENVELOPE, BODY,
//! BODYSTRUCTURE, BODY[section]<partial>, BODY.PEEK (non-PEEK sets `\Seen`), UID, MODSEQ and
//! CHANGEDSINCE (CONDSTORE).
//!
//! Literals are written straight to the connection, not built in `imap-next`'s encoder.

use std::borrow::Cow;
use std::collections::HashMap;

use ds_store::MessageMeta;
use ds_store::mailbox::FlagOp;
use imap_types::command::FetchModifier;
use imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName};
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

/// `NAME {len}\r\n`; the caller writes the bytes after it.
fn literal<'a>(
    out: &mut Vec<u8>,
    name: &str,
    data: impl Into<Cow<'a, [u8]>>,
) -> Option<Cow<'a, [u8]>> {
    let data = data.into();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(format!(" {{{}}}\r\n", data.len()).as_bytes());
    Some(data)
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

    /// The bytes of a message. The one place bodies are read (switches to the streaming store
    /// API later).
    pub(crate) fn message_bytes(&self, meta: &MessageMeta) -> ds_store::Result<Option<Vec<u8>>> {
        self.imap.mail.body(meta.blob)
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
        let mut expunge_issued = false;
        for (seq, uid, recent) in targets {
            let Some(meta) = metas.get(&uid) else {
                expunge_issued = true;
                continue;
            };
            if changed_since.is_some_and(|c| meta.modseq <= c) {
                continue;
            }
            let body = if with_body {
                match self.message_bytes(meta) {
                    Ok(Some(b)) => Some(b),
                    Ok(None) => {
                        expunge_issued = true;
                        continue;
                    }
                    Err(e) => return Ok(super::store_error(&e)),
                }
            } else {
                None
            };
            let body = body.as_deref().unwrap_or_default();
            let mut out = format!("* {seq} FETCH (").into_bytes();
            let mut first = true;
            let mut sent_flags = false;
            for item in &items {
                if !first {
                    out.push(b' ');
                }
                first = false;
                let data = self.fetch_item(&mut out, item, meta, recent, body, &mut sent_flags);
                if let Some(data) = data {
                    // Literals go out in pieces, never copied whole into the write buffer.
                    self.send(&out).await?;
                    out.clear();
                    for chunk in data.chunks(LITERAL_CHUNK) {
                        self.send(chunk).await?;
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

    /// Append one item to `out`; a literal's bytes are returned for the caller to write.
    fn fetch_item<'a>(
        &self,
        out: &mut Vec<u8>,
        item: &MessageDataItemName<'_>,
        meta: &MessageMeta,
        recent: bool,
        body: &'a [u8],
        sent_flags: &mut bool,
    ) -> Option<Cow<'a, [u8]>> {
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
            N::Envelope => out.extend(response::encode_item(MessageDataItem::Envelope(
                msg::envelope(body),
            ))),
            N::BodyStructure => out.extend(response::encode_item(MessageDataItem::BodyStructure(
                msg::body_structure(body),
            ))),
            N::Body => out.extend(response::encode_item(MessageDataItem::Body(
                msg::body_structure(body),
            ))),
            N::Rfc822 => return literal(out, "RFC822", body),
            N::Rfc822Header => return literal(out, "RFC822.HEADER", msg::split_message(body).0),
            N::Rfc822Text => return literal(out, "RFC822.TEXT", msg::split_message(body).1),
            N::BodyExt {
                section, partial, ..
            } => {
                let data: Cow<'a, [u8]> = match section {
                    None => Cow::Borrowed(body),
                    Some(_) => Cow::Owned(
                        msg::section_bytes(body, section.as_ref(), false).unwrap_or_default(),
                    ),
                };
                let spec = response::section_spec(section.as_ref());
                return match partial {
                    Some((start, len)) => {
                        let start = (*start as usize).min(data.len());
                        let end = start.saturating_add(len.get() as usize).min(data.len());
                        let name = format!("BODY[{spec}]<{start}>");
                        let piece = match data {
                            Cow::Borrowed(b) => Cow::Borrowed(&b[start..end]),
                            Cow::Owned(v) => Cow::Owned(v[start..end].to_vec()),
                        };
                        literal(out, &name, piece)
                    }
                    None => literal(out, &format!("BODY[{spec}]"), data),
                };
            }
            N::Binary { .. } | N::BinarySize { .. } => {}
        }
        None
    }
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
