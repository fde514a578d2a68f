//! STATUS.

use imap_types::mailbox::Mailbox;
use imap_types::status::StatusDataItemName;

use super::{bad_name, mailbox_name, store_error};
use crate::Result;
use crate::response::{self, Reply};
use crate::session::Session;

impl Session {
    pub(crate) async fn status(
        &mut self,
        mailbox: &Mailbox<'_>,
        items: &[StatusDataItemName],
    ) -> Result<Reply> {
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        let mail = self.imap.mail.clone();
        let info = match mail.mailbox(&self.account, &name) {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(Reply::no("No such mailbox").code("NONEXISTENT")),
            Err(e) => return Ok(store_error(&e)),
        };
        let needs_scan = items.iter().any(|i| {
            matches!(
                i,
                StatusDataItemName::Recent
                    | StatusDataItemName::Deleted
                    | StatusDataItemName::DeletedStorage
            )
        });
        let metas = if needs_scan {
            match mail.messages(&self.account, &info.name) {
                Ok(m) => m,
                Err(e) => return Ok(store_error(&e)),
            }
        } else {
            Vec::new()
        };
        let mut parts = Vec::new();
        for item in items {
            parts.push(match item {
                StatusDataItemName::Messages => format!("MESSAGES {}", info.messages),
                StatusDataItemName::Recent => {
                    let n = mail
                        .unclaimed_recent(info.id, metas.iter().map(|m| m.uid))
                        .unwrap_or(0);
                    format!("RECENT {n}")
                }
                StatusDataItemName::UidNext => format!("UIDNEXT {}", info.uidnext),
                StatusDataItemName::UidValidity => format!("UIDVALIDITY {}", info.uidvalidity),
                StatusDataItemName::Unseen => format!("UNSEEN {}", info.unseen),
                StatusDataItemName::Deleted => format!(
                    "DELETED {}",
                    metas.iter().filter(|m| m.has_flag("\\Deleted")).count()
                ),
                StatusDataItemName::DeletedStorage => format!(
                    "DELETED-STORAGE {}",
                    metas
                        .iter()
                        .filter(|m| m.has_flag("\\Deleted"))
                        .map(|m| m.size)
                        .sum::<u64>()
                ),
                StatusDataItemName::HighestModSeq => {
                    self.condstore = true;
                    format!("HIGHESTMODSEQ {}", info.highest_modseq)
                }
            });
        }
        let mut out = b"* STATUS ".to_vec();
        response::mailbox(&mut out, &info.name);
        out.extend_from_slice(format!(" ({})\r\n", parts.join(" ")).as_bytes());
        self.send(&out).await?;
        Ok(Reply::ok("STATUS completed"))
    }
}
