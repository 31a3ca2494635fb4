//! `jarctl`: the queues of job-async-redis, from the command line.
//!
//! Every subcommand prints a human table, or JSON with `--json`. The Redis
//! URL comes from `--url` or `REDIS_URL` (a `redis+cluster://` URL for a
//! cluster). Exit codes: 0 on success, 1 when the command failed (the
//! reason on stderr), 2 for a usage error.

mod render;
mod requeue;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use job_async_redis::admin::ListState;
use job_async_redis::{Client, Config, Error};

/// The queues of job-async-redis: what waits, runs and died, and why.
#[derive(Debug, Parser)]
#[command(name = "jarctl", version, about)]
struct Cli {
    /// Redis URL: redis://, rediss:// or redis+cluster://host1,host2.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        global = true
    )]
    url: String,
    /// The key prefix of the queues.
    #[arg(long, default_value = job_async_redis::keys::DEFAULT_PREFIX, global = true)]
    prefix: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the queues (found with SCAN, on every primary of a cluster).
    Queues,
    /// One queue: its jobs per state, oldest waiting job, workers, controls.
    Inspect {
        /// The queue's name.
        queue: String,
    },
    /// The jobs of a queue in one state, a page at a time.
    Jobs {
        /// The queue's name.
        queue: String,
        /// waiting, delayed, active or dead.
        #[arg(long, default_value = "waiting", value_parser = parse_state)]
        state: ListState,
        /// The position of the first job listed.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Most jobs listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One job with every field; payload and result as JSON when they
    /// decode.
    Job {
        /// The queue's name.
        queue: String,
        /// The job's ID.
        id: String,
    },
    /// Puts dead or failed jobs back on their queue, with all their
    /// attempts: the jobs named, or with --dead every dead job (asks first
    /// unless --yes; batches of --batch jobs, interruptible with Ctrl-C
    /// between batches).
    Requeue {
        /// The queue's name.
        queue: String,
        /// The jobs to requeue.
        #[arg(required_unless_present = "dead")]
        ids: Vec<String>,
        /// Requeue the jobs of the dead-letter set, oldest death first.
        #[arg(long, conflicts_with = "ids")]
        dead: bool,
        /// With --dead: at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// With --dead: jobs per atomic call, 1 to 1000.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
        batch: u16,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Prints a shell completion script (bash, zsh, fish, elvish,
    /// powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn parse_state(s: &str) -> Result<ListState, String> {
    ListState::parse(s).ok_or_else(|| format!("{s:?} is not waiting, delayed, active or dead"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jarctl: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    if let Command::Requeue {
        limit: Some(_),
        dead: false,
        ..
    } = cli.command
    {
        // A usage error, told before connecting (clap's `requires` is
        // always met by a flag that defaults to false).
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--limit goes with --dead",
            )
            .exit();
    }
    let command = match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "jarctl", &mut std::io::stdout());
            return Ok(());
        }
        other => other,
    };
    let client = Client::connect(Config::new(cli.url).prefix(cli.prefix)).await?;
    let admin = client.admin();
    let out = match command {
        Command::Completions { .. } => String::new(),
        Command::Queues => {
            let queues = admin.queues().await?;
            render::output(cli.json, &queues, render::queues)
        }
        Command::Inspect { queue } => {
            let overview = admin.overview(&queue).await?;
            render::output(cli.json, &overview, render::overview)
        }
        Command::Jobs {
            queue,
            state,
            offset,
            limit,
        } => {
            let list = admin.jobs(&queue, state, offset, limit).await?;
            render::output(cli.json, &list, render::jobs)
        }
        Command::Requeue {
            queue,
            ids,
            dead,
            limit,
            batch,
            yes,
        } => {
            if dead {
                return requeue::dead(&admin, &queue, limit, batch.into(), yes, cli.json).await;
            }

            let outcomes = admin.requeue(&queue, &ids).await?;
            let rows: Vec<(String, job_async_redis::admin::Requeued)> =
                ids.into_iter().zip(outcomes).collect();
            render::output(cli.json, &rows, render::requeued)
        }
        Command::Job { queue, id } => match admin.job(&queue, &id).await? {
            Some(job) => render::output(cli.json, &job, render::job),
            None => {
                return Err(Error::JobNotFound { job_id: id, queue });
            }
        },
    };
    println!("{out}");
    Ok(())
}
