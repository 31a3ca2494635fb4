//! Human output (aligned tables) and JSON output of the admin API's values.

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, Table};
use job_async_redis::admin::{JobDetail, JobList, QueueInfo, QueueOverview};
use serde::Serialize;

/// `value` as pretty JSON, or as `human` renders it.
pub fn output<T: Serialize + ?Sized>(json: bool, value: &T, human: fn(&T) -> String) -> String {
    if json {
        serde_json::to_string_pretty(value).expect("admin values serialise")
    } else {
        human(value)
    }
}

/// A table without borders, columns aligned, numbers to the right.
fn table(header: &[&str], numeric: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    if header.iter().any(|h| !h.is_empty()) {
        t.set_header(header.to_vec());
    }
    for &i in numeric {
        if let Some(column) = t.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Milliseconds as a short duration: `850ms`, `12.3s`, `4m05s`, `2h10m`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

pub fn queues(queues: &Vec<QueueInfo>) -> String {
    if queues.is_empty() {
        return "no queues".to_owned();
    }
    let mut t = table(&["QUEUE", "MODE", "PROTOCOL"], &[]);
    for q in queues {
        t.add_row(vec![q.name.clone(), q.mode.clone(), q.protocol.clone()]);
    }
    t.to_string()
}

pub fn overview(o: &QueueOverview) -> String {
    let mut t = table(&["", ""], &[]);
    let c = &o.counts;
    let rows: Vec<(&str, String)> = vec![
        ("queue", o.name.clone()),
        ("mode", o.mode.clone()),
        ("waiting", c.waiting.to_string()),
        ("delayed", c.delayed.to_string()),
        ("active", opt(c.active)),
        ("dead", c.dead.to_string()),
        ("oldest waiting", opt(o.oldest_waiting_age_ms.map(age))),
        ("paused", if o.paused { "yes" } else { "no" }.to_owned()),
        (
            "rate limit",
            match (o.rate_max, o.rate_window_ms) {
                (Some(max), Some(window)) => format!("{max} per {}", age(window)),
                _ => "-".to_owned(),
            },
        ),
        ("concurrency limit", opt(o.concurrency_limit)),
        ("events", opt(o.events)),
        ("schedules", o.schedules.to_string()),
        ("workers", o.workers.len().to_string()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    let mut out = t.to_string();
    if !o.workers.is_empty() {
        let mut w = table(&["WORKER", "HEARTBEAT", "IN FLIGHT"], &[2]);
        for worker in &o.workers {
            let heartbeat = if worker.heartbeat_left_ms >= 0 {
                format!("{} left", age(worker.heartbeat_left_ms as u64))
            } else {
                format!(
                    "expired {} ago",
                    age(worker.heartbeat_left_ms.unsigned_abs())
                )
            };
            w.add_row(vec![
                worker.id.clone(),
                heartbeat,
                worker.in_flight.to_string(),
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&w.to_string());
    }
    out
}

pub fn jobs(list: &JobList) -> String {
    let state = list.state.as_str();
    if list.entries.is_empty() {
        return format!(
            "no {state} jobs at offset {} ({} in all)",
            list.offset, list.total
        );
    }
    let mut t = table(&["#", "JOB", "AT (ms)", "WORKER"], &[0, 2]);
    for (i, e) in list.entries.iter().enumerate() {
        t.add_row(vec![
            (list.offset + i).to_string(),
            e.id.clone(),
            opt(e.at_ms),
            e.worker.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let last = list.offset + list.entries.len();
    format!(
        "{t}\n{state} jobs {} to {last} of {}",
        list.offset + 1,
        list.total
    )
}

pub fn job(job: &JobDetail) -> String {
    let mut t = table(&["FIELD", "VALUE"], &[]);
    t.add_row(vec!["id".to_owned(), job.id.clone()]);
    for (k, v) in &job.fields {
        t.add_row(vec![k.clone(), v.clone()]);
    }
    let mut out = t.to_string();
    for (name, body) in [
        ("payload", Some(&job.payload)),
        ("result", job.result.as_ref()),
        ("progress", job.progress.as_ref()),
    ] {
        let Some(body) = body else { continue };
        out.push_str(&format!("\n\n{name} ({} bytes):\n", body.bytes));
        match (&body.json, &body.undecoded) {
            (Some(json), _) => {
                out.push_str(&serde_json::to_string_pretty(json).expect("JSON serialises"))
            }
            (None, Some((why, hex))) => out.push_str(&format!("not decoded ({why}): {hex}")),
            (None, None) => {}
        }
    }
    out
}

pub fn requeued(rows: &Vec<(String, job_async_redis::admin::Requeued)>) -> String {
    use job_async_redis::admin::Requeued;
    let mut t = table(&["JOB", "OUTCOME"], &[]);
    for (id, outcome) in rows {
        let text = match outcome {
            Requeued::Requeued => "requeued".to_owned(),
            Requeued::Missing => "missing".to_owned(),
            Requeued::NotAJob => "not a job".to_owned(),
            Requeued::Unchanged(state) => format!("unchanged ({state})"),
            other => format!("{other:?}"),
        };
        t.add_row(vec![id.clone(), text]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::age;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_345), "12.3s");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(7_800_000), "2h10m");
    }
}
