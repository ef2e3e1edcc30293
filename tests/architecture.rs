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
fn no_import_circles_between_top_level_modules() {
    // The same edges, each module taken as the top-level module it is in: `functions::worker`
    // naming `pipelines::sink` is `functions` naming `pipelines`.
    let mut top: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, tos) in graph() {
        let from_top = vec![from[0].clone()];
        for to in tos {
            let to_top = vec![to[0].clone()];
            if to_top != from_top {
                top.entry(from_top.clone()).or_default().insert(to_top.clone());
                top.entry(to_top).or_default();
            }
        }
    }
    assert!(top.len() > 10, "{} top-level modules with edges", top.len());
    let found = circles(&top);
    assert!(found.is_empty(), "import circles between top-level modules: {found:#?}");
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

/// Every name docs/ARCHITECTURE.md gives in backquotes that says where something is, exists:
///
/// - a path with `::` (generic arguments aside): its longest prefix that is a module of this crate
///   or of the dispatch crate (`tensor_wasm_dispatch::` for that crate alone), matched by its last
///   segments so that `conn::Transport` finds `server::conn`, then items that module's file
///   defines; or a type, then its members (fields, variants, functions) in the files that define
///   or `impl` it. A path into `std` or a dependency is not ours to check;
/// - a file path (with `/`, or a file name with its extension): from the repository's root, or
///   in a row of the module table, anywhere under that row's module;
/// - in a row of the module table, a bare name (`published`): a module of that row's module, or
///   an item one of its files defines;
/// - elsewhere, a bare type or constant name (`ShardMetrics`, `IOV_MAX`): an item some file of the
///   repository defines;
/// - a crate name (`tensor-wasm-abi`): a package or binary of the repository; a flag
///   (`--max-instances`): a name in the command lines' code, src/cli or bench/src (clap names a
///   flag after its field, `max_instances`).
///
/// Names are whole words: `fn serv` does not define `serv`, and a field is a field, not any
/// `name:` in the file.
#[test]
fn every_path_the_map_names_exists() {
    let map = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let missing = unknown_names(&map);
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md names what does not exist: {missing:#?}");
}

#[test]
fn the_map_check_catches_a_wrong_name() {
    for wrong in [
        "`server::serv`",
        "`Shard::keep_spen`",
        "`Shard::keep`",
        "`TokenEntry::count`",
        "`src/nowhere.rs`",
        "`NoSuchType`",
        "`--max-instance`",
        "`tensor_wasm_dispatch::Dispatche`",
        "| `runtime` | a module it does not have (`nowhere_module`) |",
        "| `wasm::tensor` | an item it does not define (`TensorContext`) |",
    ] {
        assert!(!unknown_names(wrong).is_empty(), "{wrong} passed");
    }
    for right in [
        "`server::conn::serve`",
        "`Shard::keep_spent`",
        "`TokenEntry::counts`",
        "`runtime::published::Published<T>`",
        "`dispatch/src/worker.rs`",
        "`ShardMetrics`",
        "`--max-instances`",
        "`tensor-wasm-abi`",
        "| `runtime` | `published`, `fair_yield::Turn::within_slice` |",
    ] {
        assert!(unknown_names(right).is_empty(), "{right} failed: {:?}", unknown_names(right));
    }
}

/// What `text` (markdown) names in backquotes that does not exist; see
/// `every_path_the_map_names_exists`.
fn unknown_names(text: &str) -> Vec<String> {
    let repo = Repo::read();
    let mut missing = Vec::new();
    for line in text.lines() {
        let quoted: Vec<&str> = line.split('`').skip(1).step_by(2).collect();
        // A row of the module table: its first name is the module.
        let row = line.starts_with("| `").then(|| quoted.first().map(|key| repo.scope(key))).flatten();
        for q in quoted.iter().skip(usize::from(row.is_some())) {
            if !repo.exists(q, row.as_deref()) {
                missing.push(q.to_string());
            }
        }
        if let (Some(scope), Some(key)) = (&row, quoted.first()) {
            if scope.is_empty() {
                missing.push(format!("{key} (no such module or folder)"));
            }
        }
    }
    missing
}

/// The repository's files, read once.
struct Repo {
    ours: BTreeMap<Module, PathBuf>,
    dispatch: BTreeMap<Module, PathBuf>,
    /// Every file of the repository but build output, from its root.
    files: Vec<PathBuf>,
    /// The text of every `.rs` file, comments cut.
    rust: BTreeMap<PathBuf, String>,
    /// Names that start a path into another crate: `std`, `core` and our dependencies.
    external: BTreeSet<String>,
    /// Package and binary names of the repository's crates.
    crates: BTreeSet<String>,
}

impl Repo {
    fn read() -> Repo {
        let mut ours = BTreeMap::new();
        modules(&src(), &src(), &mut ours);
        let mut dispatch = BTreeMap::new();
        let dispatch_src = root().join("dispatch/src");
        modules(&dispatch_src, &dispatch_src, &mut dispatch);
        let mut files = Vec::new();
        all_files(&root(), &mut files);
        let rust = files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "rs"))
            .map(|f| (f.clone(), strip_comments(&std::fs::read_to_string(root().join(f)).unwrap())))
            .collect();
        let mut external: BTreeSet<String> = ["std", "core", "alloc"].map(String::from).into();
        let mut crates = BTreeSet::new();
        for manifest in files.iter().filter(|f| f.file_name().is_some_and(|n| n == "Cargo.toml")) {
            let text = std::fs::read_to_string(root().join(manifest)).unwrap();
            let mut section = String::new();
            for line in text.lines() {
                if line.starts_with('[') {
                    section = line.trim_matches(|c| c == '[' || c == ']').to_string();
                } else if section.ends_with("dependencies") {
                    if let Some((name, _)) = line.split_once('=') {
                        external.insert(name.trim().replace('-', "_"));
                    }
                } else if let Some(name) = line.strip_prefix("name = ") {
                    crates.insert(name.trim_matches('"').to_string());
                }
            }
        }
        external.remove("tensor_wasm_dispatch");
        Repo { ours, dispatch, files, rust, external, crates }
    }

    /// The files of a module-table row's module: `runtime`, `wasm::tensor`, `dispatch/`.
    fn scope(&self, key: &str) -> Vec<PathBuf> {
        let base = if key.contains('/') {
            PathBuf::from(key.trim_end_matches('/'))
        } else {
            Path::new("src").join(key.replace("::", "/"))
        };
        let file = base.with_extension("rs");
        self.files.iter().filter(|f| **f == file || f.starts_with(&base)).cloned().collect()
    }

    /// Whether what one backquoted name `q` says exists (in a table row, within `scope`).
    fn exists(&self, q: &str, scope: Option<&[PathBuf]>) -> bool {
        let is_file_name = [".rs", ".md", ".sh", ".py", ".toml"].iter().any(|e| q.ends_with(e));
        if let Some(flag) = q.strip_prefix("--") {
            let field = flag.split(' ').next().unwrap().replace('-', "_");
            return self.rust.iter().any(|(f, t)| {
                (f.starts_with("src/cli") || f.starts_with("bench/src")) && words(t, &field).next().is_some()
            });
        }
        if q.starts_with('/') || q.contains(|c: char| c.is_whitespace() || c == '<' && !q.contains("::")) {
            return true; // a route, a command line, a pattern: prose
        }
        if q.contains("::") {
            return self.path_exists(q);
        }
        if q.contains('/') || is_file_name {
            let rel = Path::new(q.trim_end_matches('/'));
            return self.files.iter().any(|f| f.starts_with(rel))
                || scope.is_some_and(|s| {
                    s.iter().any(|f| f.ends_with(rel) || f.parent().is_some_and(|d| d.ends_with(rel)))
                });
        }
        if q.starts_with("tensor-wasm") {
            return self.crates.contains(q);
        }
        if !q.chars().all(|c| c.is_alphanumeric() || c == '_') || q.is_empty() {
            return true;
        }
        if let Some(scope) = scope {
            // A module of the crate's top level (`api`), one of the row's own (a file or folder of
            // that name), or an item one of its files defines.
            return self.ours.keys().any(|m| m.len() == 1 && m[0] == q)
                || scope.iter().any(|f| {
                    f.file_stem().is_some_and(|s| s == q)
                        || f.parent().and_then(Path::file_name).is_some_and(|n| n == q)
                        || self.rust.get(f).is_some_and(|t| defines(t, q))
                });
        }
        let typelike = q.starts_with(|c: char| c.is_ascii_uppercase());
        !typelike || self.rust.values().any(|t| defines(t, q))
    }

    fn path_exists(&self, q: &str) -> bool {
        let q = q.split('<').next().unwrap().trim_end_matches("()");
        let path: Vec<&str> = q.split("::").collect();
        if path.iter().any(|s| s.is_empty() || !s.chars().all(|c| c.is_alphanumeric() || c == '_')) {
            return false;
        }
        if self.external.contains(path[0]) {
            return true;
        }
        let (trees, path): (Vec<&BTreeMap<Module, PathBuf>>, &[&str]) = match path[0] {
            "tensor_wasm_dispatch" => (vec![&self.dispatch], &path[1..]),
            _ => (vec![&self.ours, &self.dispatch], &path[..]),
        };
        trees.iter().any(|tree| resolves(tree, path))
    }
}

/// Every file under `dir`, from the repository's root, but build output and hidden folders.
fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path.strip_prefix(root()).unwrap().to_path_buf());
        }
    }
}

/// Where `word` occurs in `text` as a whole word.
fn words<'a>(text: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    let bytes = text.as_bytes();
    text.match_indices(word).map(|(i, _)| i).filter(move |&i| {
        let end = i + word.len();
        (i == 0 || !is_ident(bytes[i - 1])) && (end == bytes.len() || !is_ident(bytes[end]))
    })
}

/// Whether `path` is a module of `tree` (by its last segments; none: the crate root) followed by
/// items it defines, or a type of `tree` followed by its members (`Shard::keep_spent`).
fn resolves(tree: &BTreeMap<Module, PathBuf>, path: &[&str]) -> bool {
    let texts: Vec<String> =
        tree.values().map(|file| strip_comments(&std::fs::read_to_string(file).unwrap())).collect();
    let by_module = (0..=path.len()).rev().any(|n| {
        let (module, items) = path.split_at(n);
        tree.keys().zip(&texts).filter(|(m, _)| m.len() >= n && m[m.len() - n..].iter().eq(module.iter())).any(
            |(m, text)| match items {
                [] => true,
                // An item of the module, a type of it and its members, or a submodule.
                [item, rest @ ..] => {
                    defines(text, item) && (rest.is_empty() || member_of(&texts, item, rest))
                        || (n == 0 && rest.iter().all(|r| defines(text, r)) && defines(text, item))
                        || rest.is_empty()
                            && tree.keys().any(|c| c.len() == m.len() + 1 && c.starts_with(m) && c[m.len()] == *item)
                }
            },
        )
    });
    by_module || member_of(&texts, path[0], &path[1..])
}

/// Whether `ty` is a type some file of `texts` defines and each of `members` is a field, variant
/// or function in a file that defines `ty` or has an `impl` of it.
fn member_of(texts: &[String], ty: &str, members: &[&str]) -> bool {
    let about = |t: &&String| {
        ["struct", "enum", "trait", "union"].iter().any(|k| declared(t, k, ty))
            || t.lines().any(|l| {
                let l = l.trim_start();
                (l.starts_with("impl ") || l.starts_with("impl<")) && words(l, ty).next().is_some()
            })
    };
    let defined = texts.iter().any(|t| ["struct", "enum", "trait", "union", "type"].iter().any(|k| declared(t, k, ty)));
    defined && !members.is_empty() && members.iter().all(|m| texts.iter().filter(about).any(|t| has_member(t, m)))
}

/// Whether `text` declares `name` after the keyword `kind` (`fn`, `struct`…), as whole words.
fn declared(text: &str, kind: &str, name: &str) -> bool {
    words(text, name).any(|i| {
        let before = text[..i].trim_end();
        before.ends_with(kind) && words(before, kind).any(|k| k + kind.len() == before.len())
    })
}

/// Whether `text` has `member`: a function, a field or a variant.
fn has_member(text: &str, member: &str) -> bool {
    defines(text, member)
        || text.lines().any(|l| {
            let l = l.trim_start();
            let l = ["pub(crate) ", "pub(super) ", "pub "].iter().find_map(|v| l.strip_prefix(v)).unwrap_or(l);
            let Some(rest) = l.strip_prefix(member) else { return false };
            rest.is_empty()
                || rest.starts_with(',')
                || rest.starts_with('(')
                || rest.starts_with(" {")
                || rest.starts_with(':') && !rest.starts_with("::")
                || rest.starts_with(" = ") && rest.ends_with(',')
        })
}

/// Whether `text` defines `item`: a function, type, constant, module or macro, or re-exports it.
fn defines(text: &str, item: &str) -> bool {
    ["fn", "struct", "enum", "trait", "type", "const", "static", "mod", "union", "macro_rules!"]
        .iter()
        .any(|kind| declared(text, kind, item))
        || text.lines().enumerate().any(|(n, l)| {
            let l = l.trim_start();
            ["pub use ", "pub(crate) use "].iter().any(|kw| l.starts_with(kw)) && {
                // The use tree may span lines: read it from here.
                let rest: String = text.lines().skip(n).collect::<Vec<_>>().join("\n");
                let start = rest.find("use ").unwrap() + 4;
                let mut leaves = Vec::new();
                use_tree(rest.as_bytes(), start, Vec::new(), &mut leaves);
                leaves.iter().any(|(_, name)| name == item)
            }
        })
}
