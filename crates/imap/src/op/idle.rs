//! IDLE (RFC 2177): the session waits for DONE while the mailbox's change watch pushes
//! EXISTS/EXPUNGE/FETCH (see `Session::read_message`).

use crate::Result;
use crate::response::Reply;
use crate::session::{Flow, Session};

impl Session {
    pub(crate) async fn idle(&mut self, tag: String) -> Result<Flow> {
        if !self.logged_in() {
            let status = imap_types::response::Status::bad(
                imap_types::core::Tag::try_from(tag.clone()).ok(),
                None,
                "Log in first",
            )
            .unwrap_or_else(|_| unreachable!("static text"));
            if self.server_mut().idle_reject(status).is_err() {
                self.send(&Reply::bad("Log in first").line(&tag)).await?;
            }
            self.drain().await?;
            return Ok(Flow::Continue);
        }
        if self
            .server_mut()
            .idle_accept(Session::continuation("idling"))
            .is_err()
        {
            tracing::warn!("imap-next refused IDLE");
        }
        self.drain().await?;
        self.idle_tag = Some(tag);
        self.push_updates(true).await?;
        Ok(Flow::Continue)
    }

    pub(crate) async fn idle_done(&mut self) -> Result<Flow> {
        let tag = self.idle_tag.take().unwrap_or_else(|| "*".into());
        self.push_updates(true).await?;
        self.send(&Reply::ok("IDLE terminated").line(&tag)).await?;
        Ok(Flow::Continue)
    }
}
