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

fn vectors() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/vectors.json"
    ))
    .unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    file["vectors"].as_array().unwrap().clone()
}

fn vector<'a>(vectors: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    vectors
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| {
            panic!("protocol.md shows the vector {name:?}, which vectors.json lacks")
        })
}

/// Section 6.5: each `<!-- vector: name -->` is followed by a block whose
/// lines start with the record's bytes in hex (the annotation begins after
/// two spaces). Those bytes must be the vector's, and every record must
/// have its example.
#[test]
fn the_byte_level_examples_are_the_golden_vectors() {
    let doc = protocol_md();
    let vectors = vectors();
    let mut shown = Vec::new();
    for part in doc.split("<!-- vector: ").skip(1) {
        let (name, rest) = part.split_once(" -->").unwrap();
        let block = rest
            .split("```")
            .nth(1)
            .unwrap_or_else(|| panic!("no code block after <!-- vector: {name} -->"));
        let mut bytes = Vec::new();
        for line in block.lines() {
            let hex_part = line.trim_start().split("  ").next().unwrap_or("");
            for byte in hex_part.split_whitespace() {
                assert_eq!(byte.len(), 2, "vector {name}: {byte:?} in {line:?}");
                bytes.push(u8::from_str_radix(byte, 16).unwrap_or_else(|_| {
                    panic!("vector {name}: {byte:?} is not a hex byte, in {line:?}")
                }));
            }
        }
        assert_eq!(
            hex::encode(&bytes),
            vector(&vectors, name)["msgpack"].as_str().unwrap(),
            "protocol.md's bytes of the vector {name:?}"
        );
        shown.push(name.to_owned());
    }
    for name in [
        "simple-mode job envelope",
        "simple-mode envelope without reply",
        "simple-mode reply, completed",
        "simple-mode reply, failed",
        "doorbell from job_finish, completed",
        "doorbell from job_finish_batch, two jobs of one client",
        "doorbell from job_start, dead",
        "simple-mode dead-letter record",
    ] {
        assert!(
            shown.iter().any(|s| s == name),
            "protocol.md section 6.5 has no byte-level example of {name:?}"
        );
    }
}

/// The keys of a record's table in protocol.md (section `heading`), in
/// order, with their types.
fn table_keys(doc: &str, heading: &str) -> Vec<(String, String)> {
    let section = doc
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("protocol.md has no section {heading:?}"))
        .split("\n### ")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].trim_matches('`').to_owned(), cells[1].to_owned())
        })
        .collect()
}

/// Section 6.4: writers emit the keys in the order of the record's table.
/// Every exact vector of a record lists its keys in that order, each with
/// the table's type.
#[test]
fn the_record_tables_give_the_key_order_and_types_of_the_exact_vectors() {
    let doc = protocol_md();
    let tables = [
        ("envelope", table_keys(&doc, "### 6.1 Job envelope")),
        ("reply", table_keys(&doc, "### 6.2 Reply message")),
        ("doorbell", table_keys(&doc, "### 6.2 Reply message")),
        ("dead", table_keys(&doc, "### 6.3 Dead-letter record")),
    ];
    let error_table = vec![
        ("kind".to_owned(), "str".to_owned()),
        ("message".to_owned(), "str".to_owned()),
    ];
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v["exact"] == true) {
        let Some((_, table)) = tables.iter().find(|(r, _)| v["record"] == *r) else {
            continue;
        };
        let bytes = hex::decode(v["msgpack"].as_str().unwrap()).unwrap();
        let value = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        let records = match &value {
            rmpv::Value::Array(elements) => elements.clone(),
            one => vec![one.clone()],
        };
        for record in &records {
            check_keys(v["name"].as_str().unwrap(), record, table, &error_table);
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} exact record vectors");
}

fn check_keys(
    name: &str,
    record: &rmpv::Value,
    table: &[(String, String)],
    error_table: &[(String, String)],
) {
    let mut last = None;
    for (key, value) in record.as_map().unwrap() {
        let key = key.as_str().unwrap();
        let position = table
            .iter()
            .position(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("vector {name:?}: key {key:?} is not in its table"));
        assert!(
            last.is_none_or(|l| l < position),
            "vector {name:?}: key {key:?} comes out of the table's order"
        );
        last = Some(position);
        let ok = match table[position].1.as_str() {
            "str" => value.is_str(),
            "bin" => value.is_bin(),
            "uint" => value.as_u64().is_some(),
            "map" => {
                check_keys(name, value, error_table, error_table);
                true
            }
            other => panic!("protocol.md: unknown type {other:?} for {key:?}"),
        };
        assert!(
            ok,
            "vector {name:?}: {key:?} is not of type {}",
            table[position].1
        );
    }
}

/// Section 18 lists every setting, and the defaults of the public settings
/// are the code's.
#[test]
fn section_18_lists_every_setting_with_the_code_s_defaults() {
    let doc = protocol_md();
    let section = doc
        .split("\n## 18. For implementers: settings a conforming worker chooses\n")
        .nth(1)
        .expect("protocol.md has section 18, settings a conforming worker chooses")
        .split("\n## ")
        .next()
        .unwrap();
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| ")).collect();
    let row = |setting: &str| {
        rows.iter()
            .find(|r| r.starts_with(&format!("| {setting} ")))
            .unwrap_or_else(|| panic!("protocol.md section 18 has no row for {setting:?}"))
            .to_string()
    };
    for setting in [
        "lease (recoverable)",
        "a job's own lease",
        "lease renewal",
        "heartbeat TTL (reliable)",
        "heartbeat renewal",
        "sweep guard, recovery guard",
        "sweep limit",
        "recovery limit",
        "retention of dead worker IDs",
        "dead-letter maximum",
        "max stalls",
        "result TTL",
        "block timeout",
        "result size limit (`too_large`)",
        "claim count",
        "finish batch size",
    ] {
        row(setting);
    }
    let config = job_async_redis::Config::new("redis://127.0.0.1");
    assert_eq!(config.block_timeout, std::time::Duration::from_secs(5));
    assert!(row("block timeout").contains("5 s (`Config::block_timeout`"));
    assert_eq!(config.max_payload_bytes, 1024 * 1024);
    assert!(row("result size limit (`too_large`)").contains("1 MiB (`Config::max_payload_bytes`"));
    assert_eq!(
        config.result_poll_interval,
        std::time::Duration::from_secs(5)
    );
    assert!(row("result poll interval (client)").contains("5 s (`Config::result_poll_interval`)"));
    // The worker's defaults, as its builder shows them.
    let builder = format!("{:?}", job_async_redis::Worker::builder(config));
    for (shown, documented) in [
        (
            "lease: 30s",
            row("lease (recoverable)").contains("30 s (`WorkerBuilder::lease`"),
        ),
        (
            "max_stalls: 3",
            row("max stalls").contains("3 (`WorkerBuilder::max_stalls`)"),
        ),
        (
            "dead_letter_max: 10000",
            row("dead-letter maximum").contains("10,000 (`WorkerBuilder::dead_letter_max`)"),
        ),
        (
            "result_ttl: 86400s",
            row("result TTL").contains("24 h (`WorkerBuilder::result_ttl`)"),
        ),
        (
            "concurrency: 10",
            row("concurrency, grace period").contains("10 (`WorkerBuilder::concurrency`)"),
        ),
        (
            "grace_period: 30s",
            row("concurrency, grace period").contains("30 s (`WorkerBuilder::grace_period`)"),
        ),
        (
            "sweep_interval: None",
            row("sweep interval (recoverable), recovery interval (reliable)")
                .contains("half the lease"),
        ),
    ] {
        assert!(
            builder.contains(shown) && documented,
            "protocol.md section 18 and the code disagree on {shown:?}: {builder}"
        );
    }
}
