//! APPEND with flags and date (UIDPLUS `APPENDUID`); the literal's cap (the message size
//! limit) is enforced while it is read, in the session, which streams the message into the body
//! store ([`Session::staged_append`]); the tagged OK follows the flush (durable).

use imap_types::datetime::DateTime;
use imap_types::extensions::binary::LiteralOrLiteral8;
use imap_types::flag::Flag;
use imap_types::mailbox::Mailbox;

use super::{bad_name, mailbox_name};
use crate::Result;
use crate::response::Reply;
use crate::session::Session;

impl Session {
    pub(crate) async fn append(
        &mut self,
        mailbox: &Mailbox<'_>,
        flags: Vec<Flag<'static>>,
        date: Option<DateTime>,
        message: LiteralOrLiteral8<'static>,
    ) -> Result<Reply> {
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        // A message streamed into the body store while it was read, or a small literal.
        let staged = self.staged_append.take();
        let body: &[u8] = match &message {
            LiteralOrLiteral8::Literal(l) => l.data(),
            LiteralOrLiteral8::Literal8(l) => &l.data,
        };
        let len = staged.as_ref().map_or(body.len() as u64, |s| s.body().len);
        if len > self.imap.config.max_message_size as u64 {
            return Ok(Reply::no("Message too large").code("TOOBIG"));
        }
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let date = date.map_or_else(ds_store::unix_now, |d| d.as_ref().timestamp());
        let mail = self.imap.mail.clone();
        let account = self.account.clone();
        let appended = match staged {
            Some(staged) => {
                tokio::task::spawn_blocking(move || {
                    mail.append_staged(&account, &name, &staged, &flags, date)
                })
                .await?
            }
            None => mail.append(&account, &name, body, &flags, date),
        };
        let (validity, uid) = match appended {
            Ok(r) => r,
            Err(ds_store::Error::NotFound(_)) => {
                return Ok(Reply::no("No such mailbox").code("TRYCREATE"));
            }
            Err(e) => return Ok(super::store_error(&e)),
        };
        drop(message);
        if let Err(e) = self.imap.store.flush_async().await {
            return Ok(super::store_error(&e));
        }
        Ok(Reply::ok("APPEND completed").code(format!("APPENDUID {validity} {uid}")))
    }
}
