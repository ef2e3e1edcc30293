//! The crate's shape stays as docs/ARCHITECTURE.md draws it: no import circles between modules,
//! and nothing below the server names `crate::server`.
//!
//! The graph is read from the source text: an edge `a -> b` means a file of module `a` names
//! `crate::...`, `super::...` or `self::...`, and what it names is defined in module `b`'s file.
//! A name is followed through every `use` that brings it into a module's scope (`pub use` in a
//! `mod.rs`, or a module's own import that a child reaches with `super::`) to the file that
//! defines it, so a re-export hides no circle: `crate::wasm::GuestState` is an edge to
//! `wasm::state`, not to `wasm`. A module naming itself or its own descendants is no edge.
//! Comments and unit tests (from a file's first `#[cfg(test)]` on) are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn src() -> PathBuf {
    root().join("src")
}

/// Every `.rs` file under `dir`, with the module it defines below `base` (`mod.rs`, `lib.rs` and
/// `main.rs` define their folder's module).
fn modules(base: &Path, dir: &Path, out: &mut BTreeMap<Module, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(base, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(base).unwrap().with_extension("");
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

/// A file's text as the graph reads it: without comments, and without its unit tests (at the end
/// of a file; their `super` is the file).
fn code(file: &Path) -> String {
    let text = strip_comments(&std::fs::read_to_string(file).unwrap());
    text.split("#[cfg(test)]").next().unwrap().to_string()
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The paths of a use tree starting at `s[i]`, each with the name it brings into scope: `a::b`,
/// `a::{b, c::{d}}`, `{a, b}`, `a as b`, `a::{self, b}`.
fn use_tree(s: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<(Vec<String>, String)>) -> usize {
    let mut path = prefix;
    loop {
        let start = i;
        while i < s.len() && is_ident(s[i]) {
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
                // Anything else up to the next item.
                while i < s.len() && s[i] != b',' && s[i] != b'}' {
                    i += 1;
                }
            }
        }
        if path.last().is_some_and(|l| l == "self") {
            path.pop();
        }
        let mut name = path.last().cloned().unwrap_or_default();
        let rest = &s[i..];
        let spaces = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if rest[spaces..].starts_with(b"as ") {
            let at = i + spaces + 3;
            let end = at + s[at..].iter().take_while(|b| is_ident(**b)).count();
            name = String::from_utf8_lossy(&s[at..end]).into_owned();
            i = end;
        }
        out.push((path, name));
        return i;
    }
}

/// `path` as seen from `module`, from the crate root: `crate`, `super` and `self` resolved.
fn absolute(module: &[String], path: &[String]) -> Option<Module> {
    let mut out = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super" | "self") => module.to_vec(),
        _ => return None,
    };
    for (n, segment) in path.iter().enumerate() {
        match segment.as_str() {
            "crate" if n == 0 => {}
            "self" if n == 0 => {}
            "super" => {
                out.pop()?;
            }
            _ => out.push(segment.clone()),
        }
    }
    Some(out)
}

/// What a `use` brings into scope: its path from the crate root, or `None` for another crate's.
enum Import {
    Ours(Module),
    Theirs,
}

struct Crate {
    files: BTreeMap<Module, PathBuf>,
    code: BTreeMap<Module, String>,
}

impl Crate {
    fn read() -> Crate {
        let mut files = BTreeMap::new();
        modules(&src(), &src(), &mut files);
        let code = files.iter().map(|(m, f)| (m.clone(), code(f))).collect();
        Crate { files, code }
    }

    /// The module whose file defines what `path` (from the crate root) names, following `use`s;
    /// `None` for a name of the crate root or of another crate.
    fn resolve(&self, path: &[String]) -> Option<Module> {
        self.resolve_within(path, 16)
    }

    fn resolve_within(&self, path: &[String], hops: usize) -> Option<Module> {
        let n = (1..=path.len()).rev().find(|&n| self.files.contains_key(&path[..n]))?;
        let module = path[..n].to_vec();
        let Some(item) = path.get(n).filter(|_| hops > 0) else { return Some(module) };
        match self.imported(&module, item) {
            Some(Import::Ours(mut from)) => {
                from.extend_from_slice(&path[n + 1..]);
                self.resolve_within(&from, hops - 1).or(Some(module))
            }
            Some(Import::Theirs) => None,
            None => Some(module),
        }
    }

    /// Where `module` brings `item` into its scope with a `use` (at the top level of its file).
    fn imported(&self, module: &Module, item: &str) -> Option<Import> {
        let text = &self.code[module];
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let at = offset;
            offset += line.len();
            let Some(after) = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
                .iter()
                .find_map(|kw| line.starts_with(kw).then(|| at + kw.len()))
            else {
                continue;
            };
            let mut leaves = Vec::new();
            use_tree(text.as_bytes(), after, Vec::new(), &mut leaves);
            for (path, name) in leaves {
                if name != item {
                    continue;
                }
                if let Some(from) = absolute(module, &path) {
                    return Some(Import::Ours(from));
                }
                // A child module (`pub use engine::build_engine`), else another crate.
                let mut child = module.clone();
                child.push(path[0].clone());
                if self.files.contains_key(&child) {
                    child.extend_from_slice(&path[1..]);
                    return Some(Import::Ours(child));
                }
                return Some(Import::Theirs);
            }
        }
        None
    }

    /// Every path a module's code names from `crate::`, `super::` or `self::`, from the crate root.
    fn named(&self, module: &Module) -> Vec<Module> {
        let text = &self.code[module];
        let bytes = text.as_bytes();
        let mut paths = Vec::new();
        let mut leaves = Vec::new();
        for needle in ["crate::", "super::", "self::"] {
            let mut from = 0;
            while let Some(at) = text[from..].find(needle) {
                let i = from + at;
                from = i + needle.len();
                if i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == b':') {
                    from = use_tree(bytes, i, Vec::new(), &mut leaves).max(from);
                }
            }
        }
        for (path, _) in leaves {
            paths.extend(absolute(module, &path));
        }
        paths
    }
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let krate = Crate::read();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for module in krate.files.keys() {
        if module.is_empty() {
            continue;
        }
        for path in krate.named(module) {
            let Some(target) = krate.resolve(&path) else { continue };
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

fn module(path: &str) -> Module {
    path.split("::").map(String::from).collect()
}

#[test]
fn the_reader_finds_edges() {
    let edges = graph();
    assert!(edges[&module("server::conn")].contains(&module("api")), "the connection loop names api::handle");
    assert!(edges[&module("wasm::module")].contains(&module("wasm::tensor")), "`use super::{{tensor, ..}}` is an edge");
    // Followed to the defining file: `crate::wasm::GuestState` is re-exported by wasm/mod.rs from
    // wasm/state.rs, and `crate::wasm::module::ModuleShape` by wasm/module.rs from config.
    let loader = &edges[&module("functions::loader")];
    assert!(loader.contains(&module("wasm::state")), "{loader:?}");
    assert!(loader.contains(&module("config")), "{loader:?}");
    assert!(!loader.contains(&module("wasm")), "a re-export is no edge to the module that re-exports: {loader:?}");
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
    let allowed = |m: &Module| m.first().is_some_and(|top| top == "cli" || top == "server");
    let edges = graph();
    let mut found: BTreeSet<String> = edges
        .iter()
        .filter(|(from, to)| !allowed(from) && to.iter().any(|t| t.first().is_some_and(|top| top == "server")))
        .map(|(from, _)| from.join("::"))
        .collect();
    // Unit tests too, which the graph skips.
    let mut files = BTreeMap::new();
    modules(&src(), &src(), &mut files);
    for (m, file) in &files {
        if !m.is_empty()
            && !allowed(m)
            && strip_comments(&std::fs::read_to_string(file).unwrap()).contains("crate::server")
        {
            found.insert(m.join("::"));
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
    modules(&src(), &src(), &mut ours);
    let mut dispatch = BTreeMap::new();
    let dispatch_src = root().join("dispatch/src");
    modules(&dispatch_src, &dispatch_src, &mut dispatch);
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
