//! RFC 3461 DSN parameters: `MAIL … RET=FULL|HDRS ENVID=xtext` and `RCPT … NOTIFY=…
//! ORCPT=rfc822;xtext`. smtp-proto parses them (and decodes xtext); this checks what it lets
//! through (both `RET` values, characters that would break a DSN's header fields), and writes
//! them again for the next hop that advertises `DSN`.

use ds_store::queue::{Notify, RcptDsn, Ret};
use smtp_proto::{
    MAIL_RET_FULL, MAIL_RET_HDRS, RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER,
    RCPT_NOTIFY_SUCCESS,
};

/// The DSN parameters of a `MAIL` command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MailDsn {
    pub ret: Option<Ret>,
    pub envid: Option<String>,
}

/// `501 5.5.4` for a DSN parameter smtp-proto accepted but we cannot use.
fn invalid(param: &str) -> String {
    format!("501 5.5.4 Invalid parameter \"{param}\"\r\n")
}

/// Printable US-ASCII only (RFC 3461 §4: what xtext may encode here): the values go into DSN
/// header fields and into our own `MAIL`/`RCPT` lines.
fn printable(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) || b == b' ')
}

/// `RET` and `ENVID` from a parsed `MAIL`; `Err` is the reply.
pub(crate) fn mail(flags: u64, envid: Option<&str>) -> Result<MailDsn, String> {
    let ret = match (flags & MAIL_RET_FULL != 0, flags & MAIL_RET_HDRS != 0) {
        (true, true) => return Err(invalid("RET")),
        (true, false) => Some(Ret::Full),
        (false, true) => Some(Ret::Hdrs),
        (false, false) => None,
    };
    let envid = match envid {
        Some(id) if !printable(id) => return Err(invalid("ENVID")),
        Some(id) => Some(id.to_string()),
        None => None,
    };
    Ok(MailDsn { ret, envid })
}

/// `NOTIFY` and `ORCPT` from a parsed `RCPT`; `Err` is the reply.
pub(crate) fn rcpt(flags: u64, orcpt: Option<&str>) -> Result<RcptDsn, String> {
    let any = RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY;
    let notify = if flags & RCPT_NOTIFY_NEVER != 0 {
        // smtp-proto takes `NEVER,SUCCESS` (not `SUCCESS,NEVER`); RFC 3461 §4.1 neither.
        if flags & any != 0 {
            return Err(invalid("NOTIFY"));
        }
        Some(Notify::default())
    } else if flags & any != 0 {
        Some(Notify {
            success: flags & RCPT_NOTIFY_SUCCESS != 0,
            failure: flags & RCPT_NOTIFY_FAILURE != 0,
            delay: flags & RCPT_NOTIFY_DELAY != 0,
        })
    } else {
        None
    };
    let orcpt = match orcpt {
        Some(a) if !printable(a) || a.contains(' ') => return Err(invalid("ORCPT")),
        Some(a) => Some(a.to_string()),
        None => None,
    };
    Ok(RcptDsn { notify, orcpt })
}

/// RFC 3461 §4 xtext: `+XX` for `+`, `=`, and anything outside `!`..`~`.
pub(crate) fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// ` RET=… ENVID=…` for a `MAIL` line to a next hop that advertises `DSN`.
pub(crate) fn mail_params(ret: Option<Ret>, envid: Option<&str>) -> String {
    let mut out = String::new();
    match ret {
        Some(Ret::Full) => out.push_str(" RET=FULL"),
        Some(Ret::Hdrs) => out.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(id) = envid {
        out.push_str(&format!(" ENVID={}", xtext(id)));
    }
    out
}

/// ` NOTIFY=… ORCPT=rfc822;…` for a `RCPT` line to a next hop that advertises `DSN`.
pub(crate) fn rcpt_params(dsn: &RcptDsn) -> String {
    let mut out = String::new();
    if let Some(n) = dsn.notify {
        let words: Vec<&str> = [
            (n.success, "SUCCESS"),
            (n.failure, "FAILURE"),
            (n.delay, "DELAY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        if words.is_empty() {
            out.push_str(" NOTIFY=NEVER");
        } else {
            out.push_str(&format!(" NOTIFY={}", words.join(",")));
        }
    }
    if let Some(orcpt) = &dsn.orcpt {
        out.push_str(&format!(" ORCPT=rfc822;{}", xtext(orcpt)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::Request;

    fn parse(line: &str) -> Request<std::borrow::Cow<'_, str>> {
        Request::parse(&mut line.as_bytes().iter()).unwrap()
    }

    #[test]
    fn parameters_survive_a_round_trip_through_smtp_proto() {
        let Request::Mail { from } = parse("MAIL FROM:<a@b.c> RET=HDRS ENVID=QQ+2B314+3D159\r\n")
        else {
            panic!()
        };
        let m = mail(from.flags, from.env_id.as_deref()).unwrap();
        assert_eq!(m.ret, Some(Ret::Hdrs));
        assert_eq!(m.envid.as_deref(), Some("QQ+314=159"));
        let line = format!(
            "MAIL FROM:<a@b.c>{}\r\n",
            mail_params(m.ret, m.envid.as_deref())
        );
        assert_eq!(line, "MAIL FROM:<a@b.c> RET=HDRS ENVID=QQ+2B314+3D159\r\n");

        let Request::Rcpt { to } =
            parse("RCPT TO:<x@y.z> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+2Bx@Example.COM\r\n")
        else {
            panic!()
        };
        let r = rcpt(to.flags, to.orcpt.as_deref()).unwrap();
        assert!(r.wants_success() && r.wants_delay() && !r.wants_failure());
        assert_eq!(r.orcpt.as_deref(), Some("Bob+x@Example.COM"));
        assert_eq!(
            rcpt_params(&r),
            " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+2Bx@Example.COM"
        );

        let Request::Rcpt { to } = parse("RCPT TO:<x@y.z> NOTIFY=NEVER\r\n") else {
            panic!()
        };
        let never = rcpt(to.flags, None).unwrap();
        assert!(!never.wants_failure() && !never.wants_delay() && !never.wants_success());
        assert_eq!(rcpt_params(&never), " NOTIFY=NEVER");
        assert_eq!(rcpt_params(&RcptDsn::default()), "");
    }

    #[test]
    fn values_that_would_break_a_report_are_refused() {
        assert!(mail(MAIL_RET_FULL | MAIL_RET_HDRS, None).is_err());
        assert!(rcpt(RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS, None).is_err());
        assert!(mail(0, Some("a\r\nb")).is_err());
        assert!(mail(0, Some("caf\u{e9}")).is_err());
        assert!(rcpt(0, Some("a@b\r\nX-Evil: 1")).is_err());
        assert!(rcpt(0, Some("a b@c")).is_err());
        assert_eq!(mail(0, None).unwrap(), MailDsn::default());
        assert!(rcpt(0, None).unwrap().is_empty());
    }
}
