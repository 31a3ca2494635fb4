//! protocol.md is the contract: its script table and ACL list must match
//! the code.

use std::collections::BTreeMap;

fn protocol_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol.md")).unwrap()
}

#[test]
fn the_script_table_matches_the_embedded_scripts() {
    let doc = protocol_md();
    let section = doc
        .split(". Script versions and SHA1\n")
        .nth(1)
        .expect("protocol.md has a section 'Script versions and SHA1'")
        .split("\n## ")
        .next()
        .unwrap();
    let documented: BTreeMap<String, (u32, String)> = section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let version = cells.get(1)?.parse().ok()?;
            Some((cells[0].to_owned(), (version, cells.get(2)?.to_string())))
        })
        .collect();
    let actual: BTreeMap<String, (u32, String)> = job_async_redis::scripts::all()
        .iter()
        .map(|s| (s.name().to_owned(), (s.version(), s.sha1().to_owned())))
        .collect();
    assert_eq!(
        documented, actual,
        "update protocol.md's table of script versions"
    );
}

#[test]
fn every_script_has_a_section() {
    let doc = protocol_md();
    for s in job_async_redis::scripts::all() {
        let heading = format!("`{}`", s.name());
        assert!(
            doc.lines()
                .any(|l| l.starts_with("### ") && l.ends_with(&heading)),
            "protocol.md has no section for {}",
            s.name()
        );
    }
}

/// Section 14's rules, wrapped as protocol.md shows them.
fn wrapped(rules: &[String]) -> String {
    let mut lines = vec![String::new()];
    for rule in rules {
        let line = lines.last_mut().unwrap();
        if !line.is_empty() && line.len() + 1 + rule.len() > 76 {
            lines.push(rule.clone());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(rule);
        }
    }
    lines.join("\n")
}

#[test]
fn the_acl_profiles_match_acl_profile_rules() {
    use job_async_redis::{AclProfile, AclRole};
    let doc = protocol_md();
    let section = doc
        .split("\n## 14. ")
        .nth(1)
        .expect("protocol.md has a section 14 (least privilege)")
        .split("\n## ")
        .next()
        .unwrap();
    // Each profile's rules are the code block after `<!-- acl: <label> -->`.
    let profiles = [
        ("client-and-worker", AclProfile::new("<prefix>")),
        ("client", AclProfile::new("<prefix>").role(AclRole::Client)),
        ("worker", AclProfile::new("<prefix>").role(AclRole::Worker)),
        (
            "client-and-worker, one queue",
            AclProfile::new("<prefix>").queue("<queue>"),
        ),
        (
            "client, one queue",
            AclProfile::new("<prefix>")
                .role(AclRole::Client)
                .queue("<queue>"),
        ),
    ];
    for (label, profile) in profiles {
        let rules = profile.rules().unwrap();
        let documented: Vec<&str> = section
            .split(&format!("<!-- acl: {label} -->"))
            .nth(1)
            .and_then(|after| after.split("```").nth(1))
            .unwrap_or_else(|| {
                panic!("protocol.md section 14 lacks the profile <!-- acl: {label} -->")
            })
            .split_whitespace()
            .collect();
        assert_eq!(
            documented,
            rules,
            "protocol.md section 14, profile {label}: the block must read\n{}",
            wrapped(&rules)
        );
    }
    // The table of commands: one row per command, marking the roles that
    // have it.
    let client = AclProfile::new("<prefix>").role(AclRole::Client).commands();
    let worker = AclProfile::new("<prefix>").role(AclRole::Worker).commands();
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `+")) {
        // `\|` is a pipe inside a cell (`+cluster\|slots`).
        let line = line.replace("\\|", "\u{0}");
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('\u{0}', "|"))
            .collect();
        let command = cells[0].trim_matches('`');
        assert_eq!(
            (cells[1] == "yes", cells[2] == "yes"),
            (client.contains(&command), worker.contains(&command)),
            "protocol.md section 14: row {command} (client, worker)"
        );
        rows.push(command.to_owned());
    }
    for command in AclProfile::new("<prefix>").commands() {
        assert!(
            rows.iter().any(|r| r == command),
            "protocol.md section 14 has no row for {command}"
        );
    }
}

#[test]
fn every_sha1_quoted_in_protocol_md_is_a_current_script() {
    let doc = protocol_md();
    let current: Vec<&str> = job_async_redis::scripts::all()
        .iter()
        .map(|s| s.sha1())
        .collect();
    let quoted = doc
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 40);
    for sha in quoted {
        assert!(
            current.contains(&sha),
            "protocol.md quotes {sha}, which is no current script's SHA1"
        );
    }
}
