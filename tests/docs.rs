//! The documents that name things the code defines stay true to it: every flag of `serve` in
//! docs/CONFIG.md with its variable and default; every runbook link (alert rules, dashboard, docs)
//! and every relative markdown link resolves; the sections the production tutorial cites exist.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn config_md_names_every_flag_its_variable_and_its_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let config = std::fs::read_to_string(root().join("docs/CONFIG.md")).unwrap();
    let mut lines = help.lines().peekable();
    let mut checked = 0;
    while let Some(line) = lines.next() {
        let Some(flag) = line.trim().strip_prefix("--").map(|f| f.split([' ', '[']).next().unwrap()) else { continue };
        if flag == "help" {
            continue;
        }
        let description = lines.next().unwrap_or_default();
        let row = config
            .lines()
            .find(|l| l.starts_with(&format!("| `--{flag}` |")))
            .unwrap_or_else(|| panic!("docs/CONFIG.md has no row for --{flag}"));
        if let Some(env) = description.split("[env: ").nth(1).map(|e| e.split(['=', ']']).next().unwrap()) {
            assert!(row.contains(&format!("`{env}`")), "--{flag}: docs/CONFIG.md lacks {env}: {row}");
        }
        if let Some(default) = description.split("[default: ").nth(1).map(|d| d.split(']').next().unwrap()) {
            let shown = if default == "\"\"" { "(empty)".to_string() } else { format!("`{default}`") };
            assert!(row.contains(&shown), "--{flag}: docs/CONFIG.md does not give the default {default}: {row}");
        }
        checked += 1;
    }
    assert!(checked > 50, "only {checked} flags found in --help");
}

/// The markdown files whose links must resolve: README.md, everything under docs/, and every
/// README.md under deploy/.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, keep, out);
            } else if keep(&path) {
                out.push(path);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &|p| p.extension().is_some_and(|e| e == "md"), &mut files);
    walk(&root().join("deploy"), &|p| p.file_name().is_some_and(|n| n == "README.md"), &mut files);
    files
}

/// The text outside fenced code blocks: commands in them may hold `](` without being links.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Every `[text](target)` link's target.
fn markdown_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        links.push(target.trim_matches(['<', '>']).to_string());
        rest = &rest[end..];
    }
    links
}

#[test]
fn every_relative_markdown_link_points_at_a_file() {
    let mut checked = 0;
    let mut missing = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in markdown_links(&prose(&text)) {
            if link.is_empty() || link.starts_with('#') || link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let path = link.split('#').next().unwrap();
            let target = file.parent().unwrap().join(path);
            checked += 1;
            if !target.exists() {
                missing.push(format!("{}: {link}", file.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "links to files that do not exist:\n{}", missing.join("\n"));
    assert!(checked >= 40, "only {checked} relative links found");
}

/// Every `runbooks/NAME.md` a text names, as written (`docs/runbooks/x.md`, `runbooks/x.md`, or a
/// URL ending in either).
fn runbook_mentions(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("runbooks/") {
        rest = &rest[at + "runbooks/".len()..];
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
        // `docs/runbooks/` on its own, or followed by a sentence's full stop, names the folder.
        if let Some(stem) = name.strip_suffix(".md").filter(|s| !s.is_empty()) {
            names.push(format!("{stem}.md"));
        }
    }
    names
}

#[test]
fn every_runbook_link_in_the_rules_the_dashboard_and_the_docs_resolves() {
    let mut sources =
        vec![root().join("deploy/prometheus/tensor-wasm-rules.yaml"), root().join("deploy/prometheus/tests.yaml")];
    for entry in std::fs::read_dir(root().join("docs/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            sources.push(path);
        }
    }
    sources.extend(markdown_files());
    let mut checked = 0;
    let mut missing = Vec::new();
    for source in &sources {
        for name in runbook_mentions(&std::fs::read_to_string(source).unwrap()) {
            checked += 1;
            // There is one runbooks folder: `runbooks/x.md` from anywhere means docs/runbooks/x.md.
            if !root().join("docs/runbooks").join(&name).is_file() {
                missing.push(format!("{}: runbooks/{name}", source.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "runbook links to files that do not exist:\n{}", missing.join("\n"));
    assert!(checked >= 30, "only {checked} runbook links found");

    // Every alert names its runbook.
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/tensor-wasm-rules.yaml")).unwrap();
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let urls = rules.lines().filter(|l| l.trim_start().starts_with("runbook_url:")).count();
    assert!(alerts >= 8 && alerts == urls, "{alerts} alerts, {urls} runbook_urls");

    // The names the production tutorial sends operators to, and the section of rollback.md it cites.
    for name in [
        "availability-fast-burn",
        "availability-slow-burn",
        "availability-very-slow-burn",
        "invoke-latency-spike",
        "healthz-slow",
        "dispatch-latency-spike",
        "oncall-paging",
        "rollback",
        "disaster-recovery",
    ] {
        assert!(root().join(format!("docs/runbooks/{name}.md")).is_file(), "docs/runbooks/{name}.md");
    }
    let rollback = std::fs::read_to_string(root().join("docs/runbooks/rollback.md")).unwrap();
    assert!(rollback.lines().any(|l| l.starts_with("## B.")), "rollback.md has no §B");
}

/// The sections other documents cite by name or number exist under those names.
#[test]
fn the_sections_the_tutorial_cites_exist() {
    let headings = |path: &str| -> Vec<String> {
        std::fs::read_to_string(root().join(path))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim().to_string())
            .collect()
    };
    let has = |path: &str, start: &str| {
        assert!(headings(path).iter().any(|h| h.starts_with(start)), "{path} has no section {start:?}");
    };
    for section in [
        "2. Pre-flight",
        "3.2 Blue/green",
        "4.1 The Helm path",
        "6. Post-upgrade verification",
        "8. Rollback",
        "9. Timing",
    ] {
        has("docs/UPGRADE.md", section);
    }
    has("docs/CUDA-SETUP.md", "3. SM-level compatibility matrix");
    has("docs/CUDA-SETUP.md", "9. Verification");
    has("docs/CUDA-SETUP.md", "10. Troubleshooting");
    has("deploy/k8s/README.md", "GPU-node prerequisite checklist");
    has("deploy/k8s/README.md", "Provision the bearer-token secret");
}
