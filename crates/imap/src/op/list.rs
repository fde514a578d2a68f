//! LIST and LSUB with `*`/`%` wildcards, `\Noselect` for missing parents, CHILDREN and
//! SPECIAL-USE attributes.

use std::collections::BTreeMap;

use ds_store::mailbox::{DELIMITER, INBOX};
use imap_types::mailbox::{ListMailbox, Mailbox};

use super::{mailbox_name, store_error};
use crate::Result;
use crate::msg::mutf7;
use crate::response::{self, Reply};
use crate::session::Session;

/// Whether `name` matches `pattern` (`*` anything, `%` anything but the delimiter).
fn matches(pattern: &[char], name: &[char]) -> bool {
    match pattern.first() {
        None => name.is_empty(),
        Some('*') => (0..=name.len()).any(|i| matches(&pattern[1..], &name[i..])),
        Some('%') => {
            for i in 0..=name.len() {
                if matches(&pattern[1..], &name[i..]) {
                    return true;
                }
                if i < name.len() && name[i] == DELIMITER {
                    return false;
                }
            }
            false
        }
        Some(&c) => name.first() == Some(&c) && matches(&pattern[1..], &name[1..]),
    }
}

/// `pattern` against a mailbox name, INBOX case-insensitively.
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
    let fold = |s: &str| -> Vec<char> {
        let inbox = s.get(..5).is_some_and(|h| h.eq_ignore_ascii_case(INBOX));
        let rest = s.get(5..).unwrap_or_default();
        if inbox && (rest.is_empty() || rest.starts_with(DELIMITER)) {
            format!("{INBOX}{rest}").chars().collect()
        } else {
            s.chars().collect()
        }
    };
    matches(&fold(pattern), &fold(name))
}

impl Session {
    pub(crate) async fn list(
        &mut self,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
    ) -> Result<Reply> {
        let verb = if lsub { "LSUB" } else { "LIST" };
        let raw_pattern: &[u8] = match pattern {
            ListMailbox::Token(t) => t.as_ref(),
            ListMailbox::String(s) => s.as_ref(),
        };
        let pattern = String::from_utf8_lossy(raw_pattern).into_owned();
        let pattern = mutf7::decode(&pattern).unwrap_or(pattern);
        let reference = match reference {
            Mailbox::Inbox => INBOX.to_string(),
            other => mailbox_name(other).unwrap_or_default(),
        };
        if pattern.is_empty() {
            if !lsub {
                self.send(b"* LIST (\\Noselect) \"/\" \"\"\r\n").await?;
            }
            return Ok(Reply::ok(format!("{verb} completed")));
        }
        let full = format!("{reference}{pattern}");
        let mail = self.imap.mail.clone();
        let boxes = match mail.list_mailboxes(&self.account) {
            Ok(b) => b,
            Err(e) => return Ok(store_error(&e)),
        };
        // name → (exists, special use)
        let mut names: BTreeMap<String, (bool, Option<String>)> = BTreeMap::new();
        for b in &boxes {
            names.insert(b.name.clone(), (true, b.special_use.clone()));
        }
        let existing: Vec<String> = names.keys().cloned().collect();
        for name in &existing {
            for (i, _) in name.match_indices(DELIMITER) {
                names.entry(name[..i].to_string()).or_insert((false, None));
            }
        }
        let has_children = |name: &str| {
            let prefix = format!("{name}{DELIMITER}");
            names.keys().any(|n| n.starts_with(&prefix))
        };
        let subscribed = if lsub {
            match mail.subscriptions(&self.account) {
                Ok(s) => s,
                Err(e) => return Ok(store_error(&e)),
            }
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        let mut ordered: Vec<&String> = names.keys().collect();
        ordered.sort_by_key(|n| (n.as_str() != INBOX, n.as_str()));
        if lsub {
            let mut seen = std::collections::BTreeSet::new();
            for name in &subscribed {
                if name_matches(&full, name) && seen.insert(name.clone()) {
                    let exists = names.get(name).is_some_and(|e| e.0);
                    out.extend_from_slice(b"* LSUB (");
                    if !exists {
                        out.extend_from_slice(b"\\Noselect");
                    }
                    out.extend_from_slice(b") \"/\" ");
                    response::mailbox(&mut out, name);
                    out.extend_from_slice(b"\r\n");
                }
            }
        } else {
            for name in ordered {
                if !name_matches(&full, name) {
                    continue;
                }
                let (exists, special) = &names[name];
                let mut attrs: Vec<&str> = Vec::new();
                if !exists {
                    attrs.push("\\Noselect");
                }
                attrs.push(if has_children(name) {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                });
                if let Some(s) = special {
                    attrs.push(s);
                }
                out.extend_from_slice(format!("* LIST ({}) \"/\" ", attrs.join(" ")).as_bytes());
                response::mailbox(&mut out, name);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.send(&out).await?;
        Ok(Reply::ok(format!("{verb} completed")))
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards() {
        assert!(name_matches("*", "a/b/c"));
        assert!(name_matches("%", "Sent"));
        assert!(!name_matches("%", "a/b"));
        assert!(name_matches("a/%", "a/b"));
        assert!(!name_matches("a/%", "a/b/c"));
        assert!(name_matches("inbox", "INBOX"));
        assert!(name_matches("Inbox/%", "INBOX/x"));
        assert!(!name_matches("sent", "Sent"));
        assert!(name_matches("S*t", "Sent"));
    }
}
