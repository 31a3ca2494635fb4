//! Replays the language-neutral conformance suite in
//! tests/conformance/scenarios.json against a real redis-server: script
//! calls and plain Redis commands with their expected replies and error
//! codes. The Python implementation replays the same file (tests/interop.rs).

mod support;

use redis::Value;
use serde_json::Value as Json;
use support::RedisServer;

fn suite() -> Json {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/scenarios.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An argument: a string (with `<Q>` replaced), `{"hex": ...}` bytes, or
/// `{"concat": [...]}`, the bytes of its parts one after the other.
fn arg(value: &Json, queue: &str) -> Vec<u8> {
    match value {
        Json::String(s) => s.replace("<Q>", queue).into_bytes(),
        Json::Object(o) if o.contains_key("concat") => o["concat"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|part| arg(part, queue))
            .collect(),
        Json::Object(o) => hex::decode(o["hex"].as_str().unwrap()).unwrap(),
        other => other.to_string().into_bytes(),
    }
}

/// Every key of the scenario's queue: (name, type, DUMP of the value,
/// whether it has a TTL), sorted by name. Two equal snapshots mean that
/// nothing was written in between.
fn keyspace(con: &mut redis::Connection, queue: &str) -> Vec<(Vec<u8>, String, Vec<u8>, bool)> {
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("*{{{queue}}}*"))
        .query(con)
        .unwrap();
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let kind: String = redis::cmd("TYPE").arg(&key).query(con).unwrap();
            let dump: Vec<u8> = redis::cmd("DUMP").arg(&key).query(con).unwrap();
            let pttl: i64 = redis::cmd("PTTL").arg(&key).query(con).unwrap();
            (key, kind, dump, pttl >= 0)
        })
        .collect()
}

fn matches(expected: &Json, actual: &Value, queue: &str) -> bool {
    match (expected, actual) {
        (Json::String(s), _) if s == "*" => true,
        (Json::Null, Value::Nil) => true,
        (Json::Number(n), Value::Int(i)) => n.as_i64() == Some(*i),
        (Json::String(_) | Json::Object(_), Value::BulkString(b)) => arg(expected, queue) == *b,
        (Json::String(s), Value::SimpleString(t)) => s == t,
        (Json::String(s), Value::Okay) => s == "OK",
        (Json::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| matches(e, a, queue))
        }
        _ => false,
    }
}

#[test]
fn the_conformance_suite_passes() {
    let server = RedisServer::start();
    let mut con = server.connection();
    let suite = suite();
    let scenarios = suite["scenarios"].as_array().unwrap();
    assert!(scenarios.len() >= 7);
    let mut failures = Vec::new();
    for scenario in scenarios {
        let queue = format!("conf-{}", uuid::Uuid::new_v4().simple());
        let name = scenario["name"].as_str().unwrap();
        for (number, step) in scenario["steps"].as_array().unwrap().iter().enumerate() {
            if let Some(ms) = step.get("sleep_ms") {
                std::thread::sleep(std::time::Duration::from_millis(ms.as_u64().unwrap()));
                continue;
            }
            let before = step
                .get("writes_nothing")
                .and_then(Json::as_bool)
                .unwrap_or(false)
                .then(|| keyspace(&mut con, &queue));
            let result: redis::RedisResult<Value> = if let Some(script) = step.get("script") {
                let script = job_async_redis::scripts::all()
                    .iter()
                    .find(|s| s.name() == script.as_str().unwrap())
                    .unwrap_or_else(|| panic!("no script {script}"));
                let script = redis::Script::new(script.source());
                let mut invocation = script.prepare_invoke();
                for k in step["keys"].as_array().unwrap() {
                    invocation.key(arg(k, &queue));
                }
                for a in step["args"].as_array().unwrap() {
                    invocation.arg(arg(a, &queue));
                }
                invocation.invoke(&mut con)
            } else {
                let words = step["redis"].as_array().unwrap();
                let mut cmd = redis::cmd(words[0].as_str().unwrap());
                for w in &words[1..] {
                    cmd.arg(arg(w, &queue));
                }
                cmd.query(&mut con)
            };
            let ok = match (step.get("error"), &result) {
                (Some(code), Err(e)) => e.code() == code.as_str(),
                (None, Ok(value)) => matches(&step["reply"], value, &queue),
                _ => false,
            };
            if let Some(before) = before {
                let after = keyspace(&mut con, &queue);
                if before != after {
                    failures.push(format!(
                        "{name}, step {}: {step}\n  wrote something: before {before:?}\n  after {after:?}",
                        number + 1
                    ));
                }
            }
            if !ok {
                failures.push(format!(
                    "{name}, step {}: {step}\n  got {result:?}",
                    number + 1
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_suite_covers_every_script_and_error_code() {
    let text = serde_json::to_string(&suite()).unwrap();
    for script in job_async_redis::scripts::all() {
        assert!(
            text.contains(&format!("\"script\":\"{}\"", script.name())),
            "no step runs {}",
            script.name()
        );
    }
    for code in [
        "JQ_MODE_MISMATCH",
        "JQ_PROTOCOL_MISMATCH",
        "JQ_QUEUE_UNKNOWN",
        "JQ_DUPLICATE",
        "JQ_NO_JOB",
        "JQ_LEASE_LOST",
        "JQ_ALREADY_FINISHED",
        "JQ_WRONGTYPE",
        "JQ_BAD_ARGS",
    ] {
        assert!(text.contains(code), "no step expects {code}");
    }
}

/// The golden backoff delays (tests/conformance/backoff.json, protocol.md
/// 8.7): each case a policy, a job ID, a failed attempt and the delay in
/// ms. The Python implementation checks its `backoff_ms` against the same
/// file (tests/interop.rs).
fn backoff_cases() -> Vec<Json> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/backoff.json"
    );
    let file: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["cases"].as_array().unwrap().clone()
}

#[test]
fn the_library_computes_the_golden_backoff_delays() {
    let cases = backoff_cases();
    assert!(cases.len() >= 50);
    let mut failures = Vec::new();
    for case in &cases {
        let policy = case["policy"].as_str().unwrap();
        let id = case["id"].as_str().unwrap();
        let attempt = u32::try_from(case["attempt"].as_u64().unwrap()).unwrap();
        let want = case["delay_ms"].as_u64().unwrap();
        match job_async_redis::Backoff::from_wire(policy) {
            Some(backoff) if case["valid"] == true => {
                let got = backoff.delay(id, attempt);
                if got != std::time::Duration::from_millis(want) {
                    failures.push(format!(
                        "{policy:?} {id:?} attempt {attempt}: {got:?}, want {want} ms"
                    ));
                }
            }
            None if case["valid"] == false => {}
            parsed => failures.push(format!(
                "{policy:?}: read as {parsed:?}, valid {}",
                case["valid"]
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same cases through the scripts' own computation: job_finish's
/// `backoff_ms` (with the `integer` and `hex8` it uses), run with EVAL on a real
/// redis-server, so that the scripts, the Rust library and the Python
/// implementation agree to the ms. (The scenarios check that job_finish
/// waits what it computes.)
#[test]
fn the_scripts_compute_the_golden_backoff_delays() {
    let source = job_async_redis::scripts::all()
        .iter()
        .find(|s| s.name() == "job_finish")
        .unwrap()
        .source();
    let function = |name: &str| {
        let start = source
            .find(&format!("\nlocal function {name}("))
            .unwrap_or_else(|| panic!("job_finish has no function {name}"));
        let end = start + source[start..].find("\nend\n").unwrap() + "\nend\n".len();
        source[start..end].to_owned()
    };
    let snippet = format!(
        "{}{}{}\nlocal out = {{}}\nfor i = 1, #ARGV, 3 do\n  out[#out + 1] = backoff_ms(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))\nend\nreturn out\n",
        function("integer"),
        function("hex8"),
        function("backoff_ms")
    );
    let server = RedisServer::start();
    let mut con = server.connection();
    let cases = backoff_cases();
    let mut eval = redis::cmd("EVAL");
    eval.arg(&snippet).arg(0);
    for case in &cases {
        eval.arg(case["policy"].as_str().unwrap())
            .arg(case["id"].as_str().unwrap())
            .arg(case["attempt"].as_u64().unwrap());
    }
    let got: Vec<u64> = eval.query(&mut con).unwrap();
    let failures: Vec<String> = cases
        .iter()
        .zip(&got)
        .filter(|(case, got)| case["delay_ms"].as_u64() != Some(**got))
        .map(|(case, got)| format!("{case}: the script computes {got} ms"))
        .collect();
    assert_eq!(got.len(), cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
