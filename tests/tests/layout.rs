//! The workspace's layout, read from its sources: no module imports another that imports it
//! back (directly or around a circle), and the agent's rooms call one way only (the top
//! calls rooms; rooms call the data plane's room, the database room's connection builder and
//! the shared modules; nothing calls back up).
//!
//! A module's imports are every `crate::…` (and `super::…`) path it names outside its
//! `#[cfg(test)] mod tests`, resolved to the longest module path that exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate target's modules: path (`a::b`, the root is `""`) → its file's text.
fn modules(root_file: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut queue = vec![(String::new(), root_file.to_path_buf(), true)];
    while let Some((path, file, owns_dir)) = queue.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        // A file's children live beside it (crate roots, mod.rs) or in a dir of its name.
        let dir: PathBuf = if owns_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for line in text.lines() {
            let line = line.trim();
            let decl = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("mod "));
            let Some(name) = decl.and_then(|d| d.strip_suffix(';')) else {
                continue;
            };
            let child = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}::{name}")
            };
            let flat = dir.join(format!("{name}.rs"));
            if flat.exists() {
                queue.push((child, flat, false));
            } else {
                queue.push((child, dir.join(name).join("mod.rs"), true));
            }
        }
        found.insert(path, text);
    }
    found
}

/// The code of a module: without its unit tests (they sit at the end of every file here)
/// and its comments (a doc link is not an import).
fn code_of(text: &str) -> String {
    let tests = text.match_indices("#[cfg(test)]\n").find(|(at, m)| {
        let next = text[at + m.len()..].lines().next().unwrap_or("");
        next.ends_with("mod tests {")
    });
    let code = match tests {
        Some((at, _)) => &text[..at],
        None => text,
    };
    code.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a text names after `crate::`/`super::`, use-groups expanded
/// (`crate::a::{b, c::d}` → `a::b`, `a::c::d`), with the prefix that started it.
fn named_paths(text: &str) -> Vec<(String, Vec<String>)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &text[at..];
        let start = ["crate::", "super::"]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min();
        let Some((i, prefix)) = start else { break };
        let before = text[..at + i].chars().last();
        at += i + prefix.len();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `bmfleet_agent::crate::` never happens; `my_crate::` does
        }
        let (paths, end) = parse_tree(text, at);
        for p in paths {
            out.push((prefix.trim_end_matches("::").to_string(), p));
        }
        at = end.max(at);
    }
    out
}

/// Parses a use-tree (or a plain path) at `at`: the paths it names, and where it ends.
fn parse_tree(text: &str, mut at: usize) -> (Vec<Vec<String>>, usize) {
    let bytes = text.as_bytes();
    let mut prefix = Vec::new();
    loop {
        let start = at;
        while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
            at += 1;
        }
        if at > start {
            prefix.push(text[start..at].to_string());
        }
        let group = if text[at..].starts_with("::{") {
            Some(3)
        } else if text[at..].starts_with('{') && at == start {
            Some(1)
        } else {
            None
        };
        if let Some(skip) = group {
            at += skip;
            let mut all = Vec::new();
            loop {
                while at < bytes.len() && bytes[at].is_ascii_whitespace() {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return (all, at + 1);
                }
                let (inner, end) = parse_tree(text, at);
                for p in inner {
                    all.push(prefix.iter().cloned().chain(p).collect());
                }
                at = end;
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
            }
        } else if text[at..].starts_with("::") {
            at += 2;
        } else {
            return (vec![prefix], at);
        }
    }
}

/// Module → the modules it imports (itself and its own descendants left out).
fn import_graph(root_file: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(root_file);
    let mut graph = BTreeMap::new();
    for (module, text) in &modules {
        let mut edges = BTreeSet::new();
        for (prefix, path) in named_paths(&code_of(text)) {
            let mut full: Vec<String> = if prefix == "super" {
                let mut parent: Vec<String> = module.split("::").map(str::to_string).collect();
                parent.pop();
                parent.into_iter().filter(|s| !s.is_empty()).collect()
            } else {
                Vec::new()
            };
            full.extend(path);
            // The longest prefix that is a module.
            let target = (0..=full.len())
                .rev()
                .map(|n| full[..n].join("::"))
                .find(|p| modules.contains_key(p));
            if let Some(target) = target {
                let own = target == *module || target.starts_with(&format!("{module}::"));
                if !own {
                    edges.insert(target);
                }
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

/// A circle in `graph`, as the modules around it, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut found = stack[from..].to_vec();
                found.push(node.to_string());
                return Some(found);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every crate target's root file in the workspace.
fn crate_roots() -> Vec<PathBuf> {
    let root = workspace();
    let mut roots = Vec::new();
    for krate in ["proto", "agent", "orchestrator", "ctl", "tests"] {
        for file in ["lib.rs", "main.rs"] {
            let path = root.join(krate).join("src").join(file);
            if path.exists() {
                roots.push(path);
            }
        }
    }
    roots
}

#[test]
fn no_module_of_the_workspace_imports_one_that_imports_it_back() {
    let roots = crate_roots();
    assert!(roots.len() >= 6, "crate roots found: {roots:?}");
    let mut read = 0;
    for root in roots {
        let graph = import_graph(&root);
        read += graph.len();
        if let Some(c) = circle(&graph) {
            panic!(
                "{}: an import circle: {}",
                root.display(),
                c.iter()
                    .map(|m| if m.is_empty() { "(crate root)" } else { m })
                    .collect::<Vec<_>>()
                    .join(" -> ")
            );
        }
    }
    assert!(
        read > 80,
        "only {read} modules read: the reader lost its way"
    );
}

/// The agent's rooms, by the first segment of a module's path.
fn room(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

#[test]
fn the_agents_rooms_call_one_way() {
    let graph = import_graph(&workspace().join("agent/src/lib.rs"));
    let top = ["server", "data_plane", ""];
    let shared = ["config", "command", "metrics", "operations"];
    let rooms = ["files", "db", "host", "bluemind"];
    for name in top.iter().chain(&shared).chain(&rooms).chain(&["plane"]) {
        assert!(
            graph.keys().any(|m| room(m) == *name),
            "the agent has no module {name:?} any more: update this test and ARCHITECTURE.md"
        );
    }
    let mut wrong = Vec::new();
    for (module, imports) in &graph {
        let from = room(module);
        for target in imports {
            let to = room(target);
            let allowed = if top.contains(&from) {
                true
            } else if shared.contains(&from) {
                shared.contains(&to)
            } else if from == "plane" {
                to == "plane" || shared.contains(&to)
            } else if rooms.contains(&from) {
                to == from || to == "plane" || shared.contains(&to) || target == "db::pg"
            } else {
                false
            };
            if !allowed {
                wrong.push(format!("{module} -> {target}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the rooms' direction (top -> rooms -> plane, db::pg -> shared):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_finds_a_circle_and_expands_use_groups() {
    let paths = named_paths("use crate::{a::{b, c::D}, e};\nfn f() { super::g::h(); }");
    let flat: Vec<String> = paths
        .iter()
        .map(|(p, path)| format!("{p}:{}", path.join("::")))
        .collect();
    assert_eq!(
        flat,
        ["crate:a::b", "crate:a::c::D", "crate:e", "super:g::h"]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    let found = circle(&graph).expect("a -> b -> c -> a");
    assert_eq!(found, ["a", "b", "c", "a"]);
    let mut acyclic = graph.clone();
    acyclic.insert("c".into(), BTreeSet::new());
    assert_eq!(circle(&acyclic), None);
}
