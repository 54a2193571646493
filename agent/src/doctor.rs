pub fn run(_: &crate::config::Config) -> bool {
    false
}
