//! `jarctl requeue --dead`: every dead job back on its queue, in batches,
//! with a confirmation, a progress bar (plain lines when stderr is not a
//! terminal) and Ctrl-C honoured between batches.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use job_async_redis::Error;
use job_async_redis::admin::{Admin, ListState};

/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
const INTERRUPTED: i32 = 130;

pub async fn dead(
    admin: &Admin,
    queue: &str,
    limit: Option<u64>,
    batch: usize,
    yes: bool,
    json: bool,
) -> Result<(), Error> {
    let total = admin.jobs(queue, ListState::Dead, 0, 0).await?.total;
    let planned = limit.map_or(total, |l| l.min(total));
    if planned == 0 {
        println!(
            "{}",
            if json {
                "{\"requeued\":0,\"skipped\":0,\"remaining\":0}".to_owned()
            } else {
                format!("no dead jobs in {queue}")
            }
        );
        return Ok(());
    }
    if !yes && !confirm(&format!("Requeue {planned} dead jobs of queue {queue}?")) {
        eprintln!("jarctl: aborted (nothing requeued); --yes skips this question");
        std::process::exit(1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(planned);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requeued, {per_sec}, eta {eta}")
                .expect("a valid template"),
        );
        bar
    });
    let progress = admin
        .requeue_dead(queue, batch, limit, |p| {
            match &bar {
                Some(bar) => bar.set_position(p.requeued),
                None => eprintln!(
                    "requeued {} of {planned} ({} skipped, {} left in the dead-letter set)",
                    p.requeued, p.skipped, p.remaining
                ),
            }
            !stop.load(Ordering::SeqCst)
        })
        .await?;
    if let Some(bar) = bar {
        bar.finish();
    }
    let interrupted = stop.load(Ordering::SeqCst);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "requeued": progress.requeued,
                "skipped": progress.skipped,
                "remaining": progress.remaining,
                "interrupted": interrupted,
            })
        );
    } else {
        println!(
            "requeued {} dead jobs of {queue} ({} skipped, {} left)",
            progress.requeued, progress.skipped, progress.remaining
        );
    }
    if interrupted {
        eprintln!("jarctl: interrupted between batches: every batch sent took effect");
        std::process::exit(INTERRUPTED);
    }
    Ok(())
}

/// Asks `question` on stderr; true for an answer starting with y. No
/// answer (stdin closed, as in a script) is no.
fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(n) if n > 0 => matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"),
        _ => false,
    }
}
