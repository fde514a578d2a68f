use std::net::IpAddr;

use super::*;

const CHEAP: HashCost = HashCost {
    memory_kib: 64,
    iterations: 1,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The CommuniGate Pro multihoming sample: company.com (main, 127.0.0.1), client1.com
/// (127.0.0.2), client2.com (no address), each with `info`.
fn sample() -> Directory {
    let store = Store::temporary().unwrap();
    let domains = Domains::new(
        "company.com",
        vec![
            Domain {
                name: "company.com".into(),
                shared: true,
                addresses: vec![ip("127.0.0.1")],
            },
            Domain {
                name: "Client1.com".into(),
                shared: false,
                addresses: vec![ip("127.0.0.2")],
            },
            Domain {
                name: "client2.com".into(),
                shared: false,
                addresses: vec![],
            },
        ],
    )
    .unwrap();
    let dir = Directory::new(&store, domains)
        .unwrap()
        .with_hash_cost(CHEAP);
    for a in ["info@company.com", "info@client1.com", "info@client2.com"] {
        dir.add_account(a, "secret", 0).unwrap();
    }
    dir
}

fn ctx(local: &str, sni: Option<&str>) -> ResolveContext {
    ResolveContext {
        local_ip: Some(ip(local)),
        sni: sni.map(str::to_string),
    }
}

fn account(a: &str) -> Outcome {
    Outcome::Account {
        address: a.into(),
        enabled: true,
    }
}

#[test]
fn communigate_multihoming_sample() {
    let dir = sample();
    let cases: &[(&str, &str, Option<&str>, Outcome)] = &[
        ("info", "127.0.0.1", None, account("info@company.com")),
        ("info", "127.0.0.2", None, account("info@client1.com")),
        (
            "info%client2.com",
            "127.0.0.1",
            None,
            account("info@client2.com"),
        ),
        (
            "info@client2.com",
            "127.0.0.2",
            None,
            account("info@client2.com"),
        ),
        (
            "info",
            "127.0.0.1",
            Some("mail.client2.com"),
            account("info@client2.com"),
        ),
        (
            "info",
            "127.0.0.2",
            Some("imap.company.com"),
            account("info@company.com"),
        ),
        // An SNI naming no served domain falls back to the local address.
        (
            "info",
            "127.0.0.2",
            Some("www.elsewhere.org"),
            account("info@client1.com"),
        ),
        // An address with no domain assigned falls back to the main domain.
        ("INFO", "127.0.0.9", None, account("info@company.com")),
        (
            "info",
            "::ffff:127.0.0.2",
            None,
            account("info@client1.com"),
        ),
        (
            "nobody",
            "127.0.0.2",
            None,
            Outcome::Unknown("nobody@client1.com".into()),
        ),
        (
            "info@elsewhere.org",
            "127.0.0.1",
            None,
            Outcome::Remote("info@elsewhere.org".into()),
        ),
    ];
    for (name, local, sni, want) in cases {
        let got = dir.resolve_login(name, &ctx(local, *sni)).unwrap();
        assert_eq!(&got.outcome, want, "{name} on {local} sni {sni:?}");
    }
}

#[test]
fn communigate_alias_and_moved_account() {
    let dir = sample();
    dir.add_account("john@company.com", "pw", 0).unwrap();
    dir.add_alias("john_smith", "john").unwrap();
    let r = dir.resolve_address("John_Smith@company.com").unwrap();
    assert_eq!(r.outcome, account("john@company.com"));
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.steps[1].rule, "alias");

    // The account moves to client1.com as j.smith: the Router record names the main domain
    // on its left side.
    dir.delete_account("john@company.com").unwrap();
    dir.add_account("j.smith@client1.com", "pw", 0).unwrap();
    dir.add_route("<john>", "j.smith@client1.com").unwrap();
    let r = dir.resolve_login("john", &ctx("127.0.0.1", None)).unwrap();
    assert_eq!(r.outcome, account("j.smith@client1.com"));
    assert_eq!(r.steps[1].rule, "router");
    // Deleting the account removed its alias.
    let r = dir.resolve_address("john_smith@company.com").unwrap();
    assert_eq!(r.outcome, Outcome::Unknown("john_smith@company.com".into()));
    // `john` on client1's address is client1's john, whom the record does not touch.
    let r = dir.resolve_login("john", &ctx("127.0.0.2", None)).unwrap();
    assert_eq!(r.outcome, Outcome::Unknown("john@client1.com".into()));
}

#[test]
fn router_loops_and_errors() {
    let dir = sample();
    dir.add_route("<a>", "b").unwrap();
    assert!(matches!(dir.add_route("<b>", "a"), Err(Error::RoutingLoop)));
    // The refused record changed nothing.
    assert_eq!(dir.routes().unwrap().len(), 1);
    assert_eq!(
        dir.resolve_address("a@company.com").unwrap().outcome,
        Outcome::Unknown("b@company.com".into())
    );
    dir.add_route("<old>", "error: moved away").unwrap();
    assert_eq!(
        dir.resolve_address("old@company.com").unwrap().outcome,
        Outcome::Error("moved away".into())
    );
    dir.add_route("<*@client2.com>", "*@company.com").unwrap();
    assert_eq!(
        dir.resolve_address("info@client2.com").unwrap().outcome,
        account("info@company.com")
    );
    // A self-loop through a wildcard is refused too.
    assert!(matches!(
        dir.add_route("<*@company.com>", "*@client2.com"),
        Err(Error::RoutingLoop)
    ));
}

#[test]
fn lists_and_accounts_conflicts() {
    let dir = sample();
    dir.add_list("staff").unwrap();
    assert!(dir.subscribe("staff", "info@company.com").unwrap());
    assert!(!dir.subscribe("staff", "INFO@company.com").unwrap());
    assert_eq!(
        dir.resolve_address("staff@company.com").unwrap().outcome,
        Outcome::List("staff@company.com".into())
    );
    assert!(matches!(
        dir.add_account("staff", "pw", 0),
        Err(Error::Exists(_, "a mailing list"))
    ));
    assert!(matches!(
        dir.add_account("INFO@company.com", "pw", 0),
        Err(Error::Exists(_, "an account"))
    ));
    assert!(matches!(
        dir.add_account("x@unknown.org", "pw", 0),
        Err(Error::UnknownDomain(_))
    ));
    assert!(matches!(
        dir.add_alias("info", "info@client1.com"),
        Err(Error::Exists(..))
    ));
    assert!(dir.unsubscribe("staff", "info@company.com").unwrap());
    assert!(
        dir.list("staff@company.com")
            .unwrap()
            .unwrap()
            .members
            .is_empty()
    );
}

#[test]
fn bad_names_change_nothing() {
    let dir = sample();
    let before = dir.accounts(None).unwrap().len();
    let long = format!("{}@company.com", "a".repeat(300));
    let ctx = ResolveContext::default();
    for bad in ["", "@", "a@@b", &long, "a\u{1}b"] {
        assert!(dir.add_account(bad, "pw", 0).is_err(), "{bad:?}");
        assert!(dir.resolve_login(bad, &ctx).is_err(), "{bad:?}");
    }
    // A well-formed name in a domain not served here: no account, and a login resolves
    // to a remote address (which fails authentication), not an error.
    assert!(matches!(
        dir.add_account("x@unknown.org", "pw", 0),
        Err(Error::UnknownDomain(_))
    ));
    assert_eq!(
        dir.resolve_login("x@unknown.org", &ctx).unwrap().outcome,
        Outcome::Remote("x@unknown.org".into())
    );
    assert_eq!(dir.accounts(None).unwrap().len(), before);
}

#[test]
fn passwords_and_disabled_accounts() {
    let dir = sample();
    assert!(dir.verify_password("info@company.com", "secret").unwrap());
    assert!(!dir.verify_password("info@company.com", "wrong").unwrap());
    assert!(!dir.verify_password("ghost@company.com", "secret").unwrap());
    let hash = dir
        .account("info@company.com")
        .unwrap()
        .unwrap()
        .password_hash;
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    dir.set_enabled("info", false).unwrap();
    assert!(!dir.verify_password("info@company.com", "secret").unwrap());
    assert_eq!(
        dir.resolve_address("info@company.com").unwrap().outcome,
        Outcome::Account {
            address: "info@company.com".into(),
            enabled: false
        }
    );
    dir.set_enabled("info", true).unwrap();
    dir.set_password("info", "new").unwrap();
    assert!(dir.verify_password("info@company.com", "new").unwrap());
}

#[test]
fn domains_config_is_checked() {
    let dup = Domains::new(
        "a.com",
        vec![
            Domain {
                name: "a.com".into(),
                shared: false,
                addresses: vec![ip("127.0.0.1")],
            },
            Domain {
                name: "b.com".into(),
                shared: false,
                addresses: vec![ip("127.0.0.1")],
            },
        ],
    );
    assert!(matches!(dup, Err(Error::Config(_))));
    let d = Domains::new("Main.COM", vec![]).unwrap();
    assert_eq!(d.main(), "main.com");
    assert!(d.is_served("main.com"));
    assert_eq!(d.for_sni("smtp.main.com"), Some("main.com"));
    assert_eq!(d.for_sni("www.main.com"), None);
}
