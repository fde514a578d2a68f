//! One cargo-afl driver per fuzz target; the binary's name picks the target of `ds-fuzz`.

fn main() {
    let target: fn(&[u8]) = match env!("CARGO_BIN_NAME") {
        "smtp_session" => ds_fuzz::smtp_session,
        "pop3_session" => ds_fuzz::pop3_session,
        "imap_session" => ds_fuzz::imap_session,
        "pop3_command" => ds_fuzz::pop3_command,
        "login_name" => ds_fuzz::login_name,
        "config" => ds_fuzz::config,
        other => panic!("no fuzz target {other}"),
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
