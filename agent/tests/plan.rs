//! `reconcile::plan` under property tests: over arbitrary worlds (support/world.rs) it never
//! panics and never plans to destroy what the desired state does not explicitly give up.
//! The same worlds feed the fuzz target in `fuzz/`, run for millions of inputs by hand.

mod support;
#[path = "support/world.rs"]
mod world;

use archy_agent::manifest::Catalog;
use archy_agent::reconcile::plan;
use proptest::prelude::*;
use support::repo_root;

fn full_catalog() -> Catalog {
    Catalog::load(&repo_root().join("apps")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn plan_never_destroys_what_the_desired_state_keeps(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        thread_local!(static CATALOG: Catalog = full_catalog());
        let case = CATALOG.with(|c| world::decode(&bytes, c));
        let p = plan(&case.world());
        if let Err(e) = world::check(&case, &p) {
            prop_assert!(false, "{e}\nplan: {:#?}", p.actions);
        }
    }
}

/// The decoder reaches the corners the property is about: the proptest above is not vacuous.
#[test]
fn decoded_worlds_cover_broken_catalogs_lost_apps_strays_and_other_stores() {
    let catalog = full_catalog();
    let (mut broken, mut lost, mut strays, mut destroys) = (0, 0, 0, 0);
    for seed in 0..2000u32 {
        let bytes: Vec<u8> = (0..256u32)
            .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 13) as u8)
            .collect();
        let case = world::decode(&bytes, &catalog);
        let p = plan(&case.world());
        broken += case.state.apps.keys().any(|a| case.catalog.get(a).is_none()) as u32;
        lost += case.observed.iter().any(|c| !case.state.apps.contains_key(&c.app)) as u32;
        strays += case.observed.iter().any(|c| c.name.starts_with("stray-")) as u32;
        destroys += p.actions.iter().any(|a| a.destroys()) as u32;
    }
    for (what, n) in [("broken", broken), ("lost", lost), ("strays", strays), ("destroys", destroys)] {
        assert!(n > 200, "only {n} of 2000 worlds have {what}");
    }
}
