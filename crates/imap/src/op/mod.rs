//! The commands, one small module per family; [`Session::dispatch`] routes a parsed command
//! to its module after checking the state (RFC 3501 §6).

use imap_types::command::CommandBody;
use imap_types::mailbox::Mailbox;

use crate::Result;
use crate::msg::mutf7;
use crate::response::Reply;
use crate::session::{Flow, Session, State};

mod append;
mod auth;
mod copy_move;
mod expunge;
mod fetch;
mod idle;
mod list;
mod mailbox;
mod search;
mod select;
mod status;
mod store;

/// A mailbox name as the client sent it (modified UTF-7) in UTF-8; `None` if invalid.
pub(crate) fn mailbox_name(mailbox: &Mailbox<'_>) -> Option<String> {
    match mailbox {
        Mailbox::Inbox => Some(ds_store::mailbox::INBOX.to_string()),
        Mailbox::Other(other) => {
            let raw: &[u8] = other.inner().as_ref();
            let text = std::str::from_utf8(raw).ok()?;
            if text.is_ascii() {
                mutf7::decode(text)
            } else {
                // Raw UTF-8 from a client that ignores RFC 3501 §5.1.3: take it as meant.
                Some(text.to_string())
            }
        }
    }
}

fn bad_name() -> Reply {
    Reply::bad("Invalid mailbox name")
}

/// The reply for a store error.
pub(crate) fn store_error(e: &ds_store::Error) -> Reply {
    match e {
        ds_store::Error::NotFound(_) => Reply::no("No such mailbox").code("NONEXISTENT"),
        ds_store::Error::Conflict(text) => Reply::no(text.clone()).code("CANNOT"),
        // The account is being moved to another node (DESIGN.md §11).
        ds_store::Error::Frozen(_) => {
            Reply::no("Account is being moved, try again later").code("UNAVAILABLE")
        }
        e => {
            tracing::warn!(error = %e, "store error");
            Reply::no("Server error, try again later").code("SERVERBUG")
        }
    }
}

impl Session {
    fn require_auth(&self) -> Option<Reply> {
        (!self.logged_in()).then(|| Reply::bad("Log in first"))
    }

    fn require_selected(&self) -> Option<Reply> {
        match self.state {
            State::Selected(_) => None,
            State::NotAuthenticated => Some(Reply::bad("Log in first")),
            _ => Some(Reply::bad("No mailbox selected")),
        }
    }

    /// Run one command; the tagged reply is written by the caller.
    pub(crate) async fn dispatch(
        &mut self,
        tag: &str,
        body: CommandBody<'static>,
    ) -> Result<(Reply, Flow)> {
        use CommandBody as C;
        let reply = match body {
            C::Capability => {
                let line = format!("* CAPABILITY {}\r\n", self.capabilities());
                self.send(line.as_bytes()).await?;
                Reply::ok("CAPABILITY completed")
            }
            C::Noop => Reply::ok("NOOP completed"),
            C::Logout => {
                self.state = State::Logout;
                Reply::ok("LOGOUT completed")
            }
            C::Id { parameters } => self.id(parameters).await?,
            C::StartTLS => return self.starttls(),
            C::Login { username, password } => self.login_command(username, password).await?,
            body => {
                if let Some(reply) = self.require_auth() {
                    return Ok((reply, Flow::Continue));
                }
                self.authenticated(tag, body).await?
            }
        };
        Ok((reply, Flow::Continue))
    }

    async fn authenticated(&mut self, tag: &str, body: CommandBody<'static>) -> Result<Reply> {
        use CommandBody as C;
        let _ = tag;
        Ok(match body {
            C::Enable { capabilities } => self.enable(capabilities).await?,
            C::Namespace => {
                self.send(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n").await?;
                Reply::ok("NAMESPACE completed")
            }
            C::Select {
                mailbox,
                parameters,
            } => self.select(&mailbox, false, parameters).await?,
            C::Examine {
                mailbox,
                parameters,
            } => self.select(&mailbox, true, parameters).await?,
            C::Create { mailbox } => self.create(&mailbox)?,
            C::Delete { mailbox } => self.delete(&mailbox)?,
            C::Rename { from, to } => self.rename(&from, &to)?,
            C::Subscribe { mailbox } => self.subscribe(&mailbox, true)?,
            C::Unsubscribe { mailbox } => self.subscribe(&mailbox, false)?,
            C::List {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, false).await?,
            C::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, true).await?,
            C::Status {
                mailbox,
                item_names,
            } => self.status(&mailbox, &item_names).await?,
            C::Append {
                mailbox,
                flags,
                date,
                message,
            } => self.append(&mailbox, flags, date, message).await?,
            body => {
                if let Some(reply) = self.require_selected() {
                    return Ok(reply);
                }
                self.selected(body).await?
            }
        })
    }

    async fn selected(&mut self, body: CommandBody<'static>) -> Result<Reply> {
        use CommandBody as C;
        Ok(match body {
            C::Check => Reply::ok("CHECK completed"),
            C::Close => self.close()?,
            C::Unselect => {
                self.state = State::Authenticated;
                Reply::ok("UNSELECT completed")
            }
            C::Expunge => self.expunge(None).await?,
            C::ExpungeUid { sequence_set } => self.expunge(Some(&sequence_set)).await?,
            C::Search {
                charset,
                criteria,
                uid,
            } => self.search(charset, criteria, uid).await?,
            C::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(&sequence_set, macro_or_item_names, uid, modifiers)
                    .await?
            }
            C::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                self.store(&sequence_set, kind, response, flags, uid, modifiers)
                    .await?
            }
            C::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_move(&sequence_set, &mailbox, uid, false).await?,
            C::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_move(&sequence_set, &mailbox, uid, true).await?,
            other => Reply::bad(format!("{} is not supported", other.name())),
        })
    }
}
