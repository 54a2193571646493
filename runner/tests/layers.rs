//! The runner's modules stand in layers (ARCHITECTURE.md draws them): no two import each
//! other, directly or through a loop. Read from the source, so a new `use` that closes a
//! loop fails here, naming it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules it names as `crate::<module>`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    fn texts(path: &Path, out: &mut String) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).unwrap().flatten() {
                texts(&e.path(), out);
            }
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let mut graph = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let path = e.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "main" || (path.is_file() && path.extension().is_none_or(|x| x != "rs")) {
            continue;
        }
        let mut text = String::new();
        texts(&path, &mut text);
        let used: BTreeSet<String> = text
            .split("crate::")
            .skip(1)
            .filter_map(|rest| {
                let m: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                (!m.is_empty() && m != name).then_some(m)
            })
            .collect();
        graph.entry(name).or_insert_with(BTreeSet::new).extend(used);
    }
    graph
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

#[test]
fn runner_modules_import_each_other_in_no_loop() {
    let graph = imports(&support::repo_root().join("runner/src"));
    assert!(graph.len() > 10, "the runner's modules were not found: {graph:?}");
    if let Some(c) = cycle(&graph) {
        panic!("runner modules import each other in a loop: {}\n{graph:#?}", c.join(" -> "));
    }
}

#[test]
fn a_loop_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    g.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&g), None);
}
