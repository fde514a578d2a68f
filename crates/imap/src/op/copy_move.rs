//! COPY, MOVE and their UID forms, with UIDPLUS `COPYUID`.

use imap_types::mailbox::Mailbox;
use imap_types::sequence::SequenceSet;

use super::store::compress;
use super::{bad_name, mailbox_name};
use crate::Result;
use crate::response::Reply;
use crate::session::{Session, State};

impl Session {
    pub(crate) async fn copy_move(
        &mut self,
        set: &SequenceSet,
        target: &Mailbox<'_>,
        uid: bool,
        remove: bool,
    ) -> Result<Reply> {
        let verb = if remove { "MOVE" } else { "COPY" };
        let Some(target) = mailbox_name(target) else {
            return Ok(bad_name());
        };
        let State::Selected(view) = &self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        if remove && view.read_only {
            return Ok(Reply::no("Mailbox is read-only").code("READ-ONLY"));
        }
        let Some(indices) = view.resolve(set, uid) else {
            return Ok(Reply::bad("Invalid message sequence number"));
        };
        let expunged_asked = indices.iter().any(|&i| view.messages[i].expunged);
        let uids: Vec<u32> = indices
            .iter()
            .filter(|&&i| !view.messages[i].expunged)
            .map(|&i| view.messages[i].uid)
            .collect();
        let (account, name) = (view.account.clone(), view.name.clone());
        let mail = self.imap.mail.clone();
        let target_info = match mail.mailbox(&account, &target) {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(Reply::no("No such mailbox").code("TRYCREATE")),
            Err(e) => return Ok(super::store_error(&e)),
        };
        if expunged_asked && !uid {
            return Ok(Reply::no("Some messages were expunged").code("EXPUNGEISSUED"));
        }
        let result = if remove {
            mail.move_messages(&account, &name, &uids, &target)
        } else {
            mail.copy(&account, &name, &uids, &target)
        };
        let pairs = match result {
            Ok(p) => p,
            Err(ds_store::Error::NotFound(_)) => {
                return Ok(Reply::no("No such mailbox").code("TRYCREATE"));
            }
            Err(e) => return Ok(super::store_error(&e)),
        };
        if let Err(e) = self.imap.store.flush_async().await {
            return Ok(super::store_error(&e));
        }
        if pairs.is_empty() {
            return Ok(Reply::ok(format!("{verb} completed (nothing to do)")));
        }
        let src: Vec<u32> = pairs.iter().map(|p| p.0).collect();
        let dst: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        let code = format!(
            "COPYUID {} {} {}",
            target_info.uidvalidity,
            compress(&src),
            compress(&dst)
        );
        if remove {
            // RFC 6851: COPYUID goes in an untagged OK before the EXPUNGEs.
            self.send(format!("* OK [{code}] Moved\r\n").as_bytes())
                .await?;
            return Ok(Reply::ok("MOVE completed"));
        }
        Ok(Reply::ok("COPY completed").code(code))
    }
}
