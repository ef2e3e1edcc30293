//! The crate's shape stays as docs/ARCHITECTURE.md draws it: no import circles between modules,
//! and nothing below the server names `crate::server`.
//!
//! The graph is read from the source text: an edge `a -> b` means a file of module `a` names
//! `crate::b::...` (or `super::...` that resolves to `b`). A module naming its own descendants
//! (a parent declaring or re-exporting its children) is no edge. Comments and unit tests (from a
//! file's first `#[cfg(test)]` on) are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with the module it defines.
fn modules(dir: &Path, out: &mut BTreeMap<Module, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src()).unwrap().with_extension("");
            let mut module: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            out.insert(module, path);
        }
    }
}

fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// The paths of a use tree starting at `s` (just past `crate::` or `super::`): `a::b`,
/// `a::{b, c::{d}}`, `{a, b}`.
fn use_tree(s: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        let start = i;
        while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
            i += 1;
        }
        if i > start {
            path.push(String::from_utf8_lossy(&s[start..i]).into_owned());
        }
        if s[i..].starts_with(b"::") {
            i += 2;
            continue;
        }
        if i < s.len() && s[i] == b'{' {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                i = use_tree(s, i, path.clone(), out);
                // Skip `as name` and anything else up to the next item.
                while i < s.len() && s[i] != b',' && s[i] != b'}' {
                    i += 1;
                }
            }
        }
        out.push(path);
        return i;
    }
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = BTreeMap::new();
    modules(&src(), &mut files);
    let resolve = |path: &[String]| (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| files.contains_key(m));
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, file) in &files {
        if module.is_empty() {
            continue;
        }
        let text = strip_comments(&std::fs::read_to_string(file).unwrap());
        let bytes = text.as_bytes();
        // Unit tests (at the end of a file) are not part of the shape; their `super` is the file.
        let text = text.split("#[cfg(test)]").next().unwrap();
        let parent = &module[..module.len() - 1];
        let mut paths = Vec::new();
        for (needle, prefix) in [("crate::", Vec::new()), ("super::", parent.to_vec())] {
            let mut from = 0;
            while let Some(at) = text[from..].find(needle) {
                let i = from + at;
                let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                from = i + needle.len();
                if boundary {
                    from = use_tree(bytes, from, prefix.clone(), &mut paths).max(from);
                }
            }
        }
        for path in paths {
            let Some(target) = resolve(&path) else { continue };
            if target.starts_with(module) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    edges
}

/// The strongly connected components of more than one module (Tarjan).
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, (usize, usize)>,
        stack: Vec<&'a Module>,
        next: usize,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(v: &'a Module, st: &mut State<'a>) {
        st.index.insert(v, (st.next, st.next));
        st.next += 1;
        st.stack.push(v);
        for w in st.edges.get(v).into_iter().flatten() {
            if !st.index.contains_key(w) {
                visit(w, st);
                let low = st.index[w].1.min(st.index[v].1);
                st.index.get_mut(v).unwrap().1 = low;
            } else if st.stack.contains(&w) {
                let low = st.index[w].0.min(st.index[v].1);
                st.index.get_mut(v).unwrap().1 = low;
            }
        }
        if st.index[v].0 == st.index[v].1 {
            let mut component = Vec::new();
            loop {
                let w = st.stack.pop().unwrap();
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                st.found.push(component);
            }
        }
    }
    let mut st = State { edges, index: BTreeMap::new(), stack: Vec::new(), next: 0, found: Vec::new() };
    for v in edges.keys() {
        if !st.index.contains_key(v) {
            visit(v, &mut st);
        }
    }
    st.found
}

#[test]
fn the_reader_finds_edges() {
    let edges = graph();
    let conn: Module = vec!["server".into(), "conn".into()];
    let api: Module = vec!["api".into()];
    assert!(edges[&conn].contains(&api), "the connection loop names api::handle");
    let module: Module = vec!["wasm".into(), "module".into()];
    let tensor: Module = vec!["wasm".into(), "tensor".into()];
    assert!(edges[&module].contains(&tensor), "`use super::{{tensor, ..}}` is an edge");
    assert!(edges.len() > 40, "{} modules with edges", edges.len());
}

#[test]
fn no_import_circles_between_modules() {
    let edges = graph();
    let found = circles(&edges);
    let shown: Vec<String> = found
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| {
                    let to: Vec<String> = edges[m].iter().filter(|t| c.contains(t)).map(|t| t.join("::")).collect();
                    format!("{} -> {}", m.join("::"), to.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(found.is_empty(), "import circles (state belongs below the code that uses it): {shown:#?}");
}

#[test]
fn nothing_below_the_server_names_it() {
    // Only what starts the server may name it: the CLI, and the server's own children.
    // `wasm::tensor` is owned by another change and still names `server::fair_yield`, a
    // re-export of `runtime::fair_yield`.
    let allowed = ["cli", "server", "wasm/tensor.rs"];
    let mut files = BTreeMap::new();
    modules(&src(), &mut files);
    let mut found = Vec::new();
    for file in files.values() {
        let rel = file.strip_prefix(src()).unwrap().to_string_lossy().into_owned();
        if allowed.iter().any(|a| rel == *a || rel.starts_with(&format!("{a}/")) || rel == format!("{a}.rs")) {
            continue;
        }
        if strip_comments(&std::fs::read_to_string(file).unwrap()).contains("crate::server") {
            found.push(rel);
        }
    }
    assert!(found.is_empty(), "modules below the server that name it: {found:?}");
}

/// Every `module::Item` path the map names (in backquotes, with `::`) exists: its longest prefix
/// that is a module of this crate (or of the dispatch crate, for `tensor_wasm_dispatch::` and
/// paths only it has), matched by its last segments so that `conn::Transport` finds
/// `server::conn`, and every segment after it is an item defined in that module's file.
#[test]
fn every_path_the_map_names_exists() {
    let map = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md")).unwrap();
    let mut ours = BTreeMap::new();
    modules(&src(), &mut ours);
    let mut dispatch = BTreeMap::new();
    let dispatch_src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dispatch/src");
    dispatch_modules(&dispatch_src, &dispatch_src, &mut dispatch);
    let mut missing = Vec::new();
    for quoted in map.split('`').skip(1).step_by(2) {
        let path: Vec<&str> = quoted.split("::").collect();
        let plausible =
            path.len() > 1 && path.iter().all(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'));
        if !plausible {
            continue;
        }
        let (trees, path): (Vec<&BTreeMap<Module, PathBuf>>, &[&str]) = match path[0] {
            "tensor_wasm_dispatch" => (vec![&dispatch], &path[1..]),
            _ => (vec![&ours, &dispatch], &path[..]),
        };
        if !trees.iter().any(|tree| resolves(tree, path)) {
            missing.push(quoted.to_string());
        }
    }
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md names paths that do not exist: {missing:?}");
}

/// The dispatch crate's modules, as `modules` reads ours.
fn dispatch_modules(root: &Path, dir: &Path, out: &mut BTreeMap<Module, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            dispatch_modules(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut module: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|l| l == "mod" || l == "lib") {
                module.pop();
            }
            out.insert(module, path);
        }
    }
}

/// Whether `path` is a module of `tree` (by its last segments; none: the crate root) followed by
/// items it defines, or a type of `tree` followed by its members (`Shard::keep_spent`).
fn resolves(tree: &BTreeMap<Module, PathBuf>, path: &[&str]) -> bool {
    let by_module = (0..=path.len()).rev().any(|n| {
        let (module, items) = path.split_at(n);
        tree.iter().filter(|(m, _)| m.len() >= n && m[m.len() - n..].iter().eq(module.iter())).any(|(_, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            items.iter().all(|item| defines(&text, item))
        })
    });
    let texts: Vec<String> = tree.values().map(|file| std::fs::read_to_string(file).unwrap()).collect();
    let ty = path[0];
    let defined =
        texts.iter().any(|t| ["struct", "enum", "trait"].iter().any(|kind| t.contains(&format!("{kind} {ty} "))));
    // Members live in the type's own file or in an `impl` of it elsewhere (`shard::slots`).
    let about = |t: &&String| {
        t.contains(&format!("struct {ty} ")) || t.contains(&format!("enum {ty} ")) || t.contains(&format!(" {ty} {{"))
    };
    by_module || (defined && path[1..].iter().all(|member| texts.iter().filter(about).any(|t| has_member(t, member))))
}

/// Whether `text` has `member`: an item, a field or a variant.
fn has_member(text: &str, member: &str) -> bool {
    defines(text, member) || [":", " {", "(", ","].iter().any(|after| text.contains(&format!("{member}{after}")))
}

/// Whether `text` defines `item`: a function, type, constant, module, or a re-export of it.
fn defines(text: &str, item: &str) -> bool {
    ["fn", "struct", "enum", "trait", "type", "const", "static", "mod", "macro_rules!"]
        .iter()
        .any(|kind| text.contains(&format!("{kind} {item}")))
        || text.lines().any(|l| l.trim_start().starts_with("pub use") && l.contains(item))
}
