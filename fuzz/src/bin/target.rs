//! One cargo-afl driver per fuzz target; the binary's name picks the target of `ds-fuzz`.

fn main() {
    let name = env!("CARGO_BIN_NAME");
    let Some(&(_, target)) = ds_fuzz::TARGETS.iter().find(|(n, _)| *n == name) else {
        panic!("no fuzz target {name}");
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
