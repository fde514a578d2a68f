//! EXPUNGE and UID EXPUNGE (UIDPLUS). The EXPUNGE responses come from the view's sync after
//! the command.

use imap_types::sequence::SequenceSet;

use crate::Result;
use crate::response::Reply;
use crate::session::{Session, State};

impl Session {
    pub(crate) async fn expunge(&mut self, set: Option<&SequenceSet>) -> Result<Reply> {
        let State::Selected(view) = &self.state else {
            return Ok(Reply::bad("No mailbox selected"));
        };
        if view.read_only {
            return Ok(Reply::no("Mailbox is read-only").code("READ-ONLY"));
        }
        let (account, name) = (view.account.clone(), view.name.clone());
        let mail = self.imap.mail.clone();
        let result = match set {
            None => mail.expunge_deleted(&account, &name),
            Some(set) => {
                let Some(indices) = view.resolve(set, true) else {
                    return Ok(Reply::bad("Invalid UID set"));
                };
                let uids: Vec<u32> = indices.iter().map(|&i| view.messages[i].uid).collect();
                match self.current_metas(&uids) {
                    Ok(metas) => {
                        let mut deleted: Vec<u32> = metas
                            .values()
                            .filter(|m| m.has_flag("\\Deleted"))
                            .map(|m| m.uid)
                            .collect();
                        deleted.sort_unstable();
                        mail.expunge(&account, &name, &deleted)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            return Ok(super::store_error(&e));
        }
        if let Err(e) = self.imap.store.flush_async().await {
            return Ok(super::store_error(&e));
        }
        Ok(Reply::ok("EXPUNGE completed"))
    }
}
