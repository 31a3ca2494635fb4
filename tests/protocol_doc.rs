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

#[test]
fn the_acl_list_matches_acl_rules() {
    let doc = protocol_md();
    let section = doc
        .split(". Least privilege\n")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let rules = job_async_redis::acl_rules("<prefix>");
    for rule in rules.split(' ') {
        assert!(
            section.contains(rule),
            "protocol.md section 11 lacks {rule}"
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
