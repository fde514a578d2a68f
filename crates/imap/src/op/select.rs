//! SELECT, EXAMINE (with CONDSTORE), CLOSE.

use imap_types::command::SelectParameter;
use imap_types::mailbox::Mailbox;

use super::{bad_name, mailbox_name, store_error};
use crate::Result;
use crate::mailbox_view::MailboxView;
use crate::response::Reply;
use crate::session::{Session, State};

impl Session {
    pub(crate) async fn select(
        &mut self,
        mailbox: &Mailbox<'_>,
        read_only: bool,
        parameters: Vec<SelectParameter>,
    ) -> Result<Reply> {
        let was_selected = matches!(self.state, State::Selected(_));
        // A failed SELECT leaves no mailbox selected (RFC 3501 §6.3.1).
        self.state = State::Authenticated;
        if was_selected && self.condstore {
            self.send(b"* OK [CLOSED] Previous mailbox closed\r\n")
                .await?;
        }
        if parameters
            .iter()
            .any(|p| matches!(p, SelectParameter::CondStore))
        {
            self.condstore = true;
        }
        if parameters
            .iter()
            .any(|p| matches!(p, SelectParameter::QResync { .. }))
        {
            return Ok(Reply::bad("QRESYNC is not supported"));
        }
        let Some(name) = mailbox_name(mailbox) else {
            return Ok(bad_name());
        };
        let mail = self.imap.mail.clone();
        let view = match MailboxView::open(&mail, &self.account, &name, read_only) {
            Ok(v) => v,
            Err(e) => return Ok(store_error(&e)),
        };
        let info = match mail.mailbox(&self.account, &name) {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(Reply::no("No such mailbox").code("NONEXISTENT")),
            Err(e) => return Ok(store_error(&e)),
        };
        let mut out = view.flags_response();
        out.extend_from_slice(format!("* {} EXISTS\r\n", view.exists()).as_bytes());
        out.extend_from_slice(format!("* {} RECENT\r\n", view.recent()).as_bytes());
        if let Some(i) = view
            .messages
            .iter()
            .position(|m| !m.flags.iter().any(|f| f == "\\Seen"))
        {
            out.extend_from_slice(format!("* OK [UNSEEN {}] First unseen\r\n", i + 1).as_bytes());
        }
        out.extend_from_slice(
            format!("* OK [UIDVALIDITY {}] UIDs valid\r\n", view.uidvalidity).as_bytes(),
        );
        out.extend_from_slice(
            format!("* OK [UIDNEXT {}] Predicted next UID\r\n", info.uidnext).as_bytes(),
        );
        out.extend_from_slice(
            format!(
                "* OK [HIGHESTMODSEQ {}] Highest\r\n",
                view.highest_modseq.max(1)
            )
            .as_bytes(),
        );
        self.send(&out).await?;
        self.state = State::Selected(Box::new(view));
        Ok(if read_only {
            Reply::ok("EXAMINE completed").code("READ-ONLY")
        } else {
            Reply::ok("SELECT completed").code("READ-WRITE")
        })
    }

    /// CLOSE: expunge `\Deleted` messages silently (not when read-only), leave the mailbox.
    pub(crate) fn close(&mut self) -> Result<Reply> {
        let state = std::mem::replace(&mut self.state, State::Authenticated);
        if let State::Selected(view) = state
            && !view.read_only
            && let Err(e) = self.imap.mail.expunge_deleted(&view.account, &view.name)
        {
            return Ok(store_error(&e));
        }
        Ok(Reply::ok("CLOSE completed"))
    }
}
