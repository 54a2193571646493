//! `plan` never panics and never destroys what the desired state keeps: the property of
//! agent/tests/plan.rs, over the same byte-decoded worlds, driven by libFuzzer's coverage.
#![no_main]

#[path = "../../agent/tests/support/world.rs"]
mod world;

use std::sync::OnceLock;

use archy_agent::manifest::Catalog;
use libfuzzer_sys::fuzz_target;

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../apps");
        Catalog::load(&apps).unwrap_or_else(|e| panic!("the real catalog must load: {e}"))
    })
}

fuzz_target!(|bytes: &[u8]| {
    let case = world::decode(bytes, catalog());
    let plan = archy_agent::reconcile::plan(&case.world());
    if let Err(e) = world::check(&case, &plan) {
        panic!("{e}\nplan: {:#?}", plan.actions);
    }
});
