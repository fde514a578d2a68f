//! CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE.

use ds_store::mailbox::{DELIMITER, INBOX};
use imap_types::mailbox::Mailbox;

use super::{bad_name, mailbox_name, store_error};
use crate::Result;
use crate::response::Reply;
use crate::session::Session;

impl Session {
    pub(crate) fn create(&mut self, mailbox: &Mailbox<'_>) -> Result<Reply> {
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        // A trailing delimiter only says the client means to create inferiors (RFC 3501 §6.3.3).
        let name = name.trim_end_matches(DELIMITER).to_string();
        if name.eq_ignore_ascii_case(INBOX) {
            return Ok(Reply::no("INBOX always exists").code("ALREADYEXISTS"));
        }
        Ok(
            match self.imap.mail.create_mailbox(&self.account, &name, None) {
                Ok(_) => Reply::ok("CREATE completed"),
                Err(ds_store::Error::Conflict(t)) if t.contains("exists") => {
                    Reply::no("Mailbox exists").code("ALREADYEXISTS")
                }
                Err(e) => store_error(&e),
            },
        )
    }

    pub(crate) fn delete(&mut self, mailbox: &Mailbox<'_>) -> Result<Reply> {
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        Ok(match self.imap.mail.delete_mailbox(&self.account, &name) {
            Ok(()) => Reply::ok("DELETE completed"),
            Err(e) => store_error(&e),
        })
    }

    pub(crate) fn rename(&mut self, from: &Mailbox<'_>, to: &Mailbox<'_>) -> Result<Reply> {
        let (Some(from), Some(to)) = (mailbox_name(from), mailbox_name(to)) else {
            return Ok(bad_name());
        };
        Ok(
            match self.imap.mail.rename_mailbox(&self.account, &from, &to) {
                Ok(()) => Reply::ok("RENAME completed"),
                Err(ds_store::Error::Conflict(t)) if t.contains("exists") => {
                    Reply::no("Target mailbox exists").code("ALREADYEXISTS")
                }
                Err(e) => store_error(&e),
            },
        )
    }

    pub(crate) fn subscribe(&mut self, mailbox: &Mailbox<'_>, on: bool) -> Result<Reply> {
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        Ok(
            match self.imap.mail.set_subscription(&self.account, &name, on) {
                Ok(()) if on => Reply::ok("SUBSCRIBE completed"),
                Ok(()) => Reply::ok("UNSUBSCRIBE completed"),
                Err(e) => store_error(&e),
            },
        )
    }
}
