//! The documents that name things the code defines stay true to it: every flag of `serve` in
//! docs/CONFIG.md with its variable and default, and every runbook an alert links to.

use std::path::PathBuf;

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

#[test]
fn every_runbook_an_alert_links_exists() {
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/tensor-wasm-rules.yaml")).unwrap();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: \""))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    assert!(links.len() >= 7);
    for link in links {
        assert!(root().join(link).is_file(), "the runbook {link} does not exist");
    }
    for runbook in ["rollback", "availability-burn", "invoke-latency", "dispatch-latency", "audit-unavailable"] {
        assert!(root().join(format!("docs/runbooks/{runbook}.md")).is_file(), "docs/runbooks/{runbook}.md");
    }
}
