//! The least privilege a client and a worker need: Redis ACL rules per
//! profile (protocol.md, section 14).

use crate::error::Error;
use crate::keys::{QueueKeys, validate_prefix};

/// What an ACL user of an [`AclProfile`] may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum AclRole {
    /// Everything the library does: run [`crate::Client`]s and
    /// [`crate::Worker`]s.
    #[default]
    ClientAndWorker,
    /// Submit jobs, read their status, watch them and await their outcomes.
    /// No `PUBLISH`/`SPUBLISH` (so it cannot ring a doorbell or send an
    /// outcome on any reply channel, even from inside a script: Redis checks
    /// the commands a script runs against the caller), no blocking pops, no
    /// `DEL`, and only the queue keys the submit and watch scripts touch
    /// (`meta`, `pending`, `tickets`, `job:*`).
    Client,
    /// Run jobs: take them, start them, send their outcomes, keep leases and
    /// heartbeats, recover stalled jobs and dead workers, dead-letter.
    /// No `SUBSCRIBE`/`SSUBSCRIBE`, no `WAIT`.
    Worker,
}

/// Redis ACL rules for a user of this library: the keys, channels and
/// commands it needs under one key prefix, and nothing else (protocol.md,
/// section 14).
///
/// [`AclProfile::rules`] returns one `ACL SETUSER` argument per rule, with
/// glob characters of the prefix and queue names escaped, so that the rules
/// cannot reach another application's keys.
///
/// ```
/// use job_async_redis::{AclProfile, AclRole};
///
/// // Clients of one tenant: only queues "emails" and "sms", no PUBLISH,
/// // and no SCRIPT LOAD (an operator loads the scripts, see `load_scripts`).
/// let rules = AclProfile::new("jq")
///     .role(AclRole::Client)
///     .queue("emails")
///     .queue("sms")
///     .script_loading(false)
///     .rules()?;
/// assert!(rules.contains(&"~jq:{emails}:job:*".to_string()));
/// assert!(rules.contains(&"&jq:{sms}:reply:*".to_string()));
/// assert!(!rules.contains(&"+publish".to_string()));
/// assert!(!rules.contains(&"+script|load".to_string()));
/// // Run as: ACL SETUSER <user> reset on ><password> <rules...>
/// // (on every node of a cluster).
///
/// // Glob characters are escaped: prefix "a*" does not reach "ab:...".
/// let rules = AclProfile::new("a*").rules()?;
/// assert!(rules.contains(&r"~a\*:{*}:*".to_string()));
/// # Ok::<(), job_async_redis::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AclProfile {
    /// The key prefix ([`crate::Config::prefix`]).
    pub prefix: String,
    /// What the user may do. Default [`AclRole::ClientAndWorker`].
    pub role: AclRole,
    /// The queues the user is confined to; empty (the default) means every
    /// queue under the prefix.
    pub queues: Vec<String>,
    /// Whether the user may load scripts (`SCRIPT LOAD`). Default true.
    /// Without it the user can only run scripts already in the server's
    /// cache (`EVALSHA`), so it cannot run arbitrary Lua; an operator loads
    /// the library's scripts with [`crate::load_scripts`] after every
    /// restart, failover or `SCRIPT FLUSH`, and until then calls fail with
    /// [`Error::ScriptsNotLoaded`].
    pub script_loading: bool,
}

/// Who needs a command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Both,
    Client,
    Worker,
    /// Both roles, unless scripts are loaded by an operator.
    Loading,
}

/// Every command the library sends or its scripts run, once, with who needs
/// it and why (protocol.md section 14 is checked against the rules built
/// from this list).
const COMMANDS: &[(&str, Need, &str)] = &[
    // Connections.
    (
        "+hello",
        Need::Both,
        "RESP3 handshake (and AUTH) of every connection",
    ),
    ("+ping", Need::Both, "connection checks"),
    (
        "+cluster|slots",
        Need::Both,
        "Redis Cluster: topology discovery and refresh",
    ),
    (
        "+asking",
        Need::Both,
        "Redis Cluster: ASK redirections while a slot migrates",
    ),
    // Scripts.
    ("+evalsha", Need::Both, "every state change is a script"),
    (
        "+script|load",
        Need::Loading,
        "loading the scripts (at connect, and after NOSCRIPT)",
    ),
    // Client, outside scripts.
    (
        "+subscribe",
        Need::Both,
        "reply and progress channels; workers' control channels (single server)",
    ),
    (
        "+ssubscribe",
        Need::Both,
        "reply and progress channels; workers' control channels (Redis Cluster)",
    ),
    ("+wait", Need::Client, "Config::wait_for_replicas"),
    // Worker, outside scripts.
    (
        "+blmpop",
        Need::Worker,
        "waiting for jobs (simple) and tickets (recoverable)",
    ),
    ("+blmove", Need::Worker, "waiting for jobs (reliable)"),
    // Both, outside scripts (status) and inside (queue_register,
    // simple_submit, job_submit, job_watch and the worker's scripts).
    (
        "+hmget",
        Need::Both,
        "status; every script that reads a hash",
    ),
    (
        "+hset",
        Need::Both,
        "queue_register, job_submit, job_watch; job transitions",
    ),
    (
        "+exists",
        Need::Both,
        "job_submit, job_watch; job_start, reliable_start",
    ),
    (
        "+type",
        Need::Both,
        "every script checks the type of the keys it touches; workers name a key of the wrong type",
    ),
    (
        "+time",
        Need::Both,
        "queue_register, job_submit; leases, deadlines",
    ),
    (
        "+lpush",
        Need::Both,
        "simple_submit, job_submit; requeues, wake lists, tickets",
    ),
    // Worker, inside scripts (and the wake lists, reliable look-ahead).
    (
        "+hget",
        Need::Both,
        "start scripts; the dead path reads a unique lock's key; job_requeue",
    ),
    (
        "+hdel",
        Need::Both,
        "job_finish, job_finish_batch; schedule_set, schedule_remove",
    ),
    ("+hkeys", Need::Client, "schedule_remove"),
    (
        "+persist",
        Need::Client,
        "job_requeue: a requeued job's hash no longer expires",
    ),
    ("+rpush", Need::Worker, "requeues to the front of the queue"),
    ("+lpop", Need::Worker, "job_claim"),
    ("+rpop", Need::Worker, "job_claim"),
    (
        "+llen",
        Need::Both,
        "job_claim, simple_dead; ringing the clock list once",
    ),
    (
        "+lrange",
        Need::Worker,
        "reliable look-ahead and lost replies; reliable_start",
    ),
    ("+ltrim", Need::Worker, "simple_dead, reliable_start"),
    ("+lrem", Need::Worker, "finishing and releasing jobs"),
    ("+lpos", Need::Worker, "reliable_start"),
    ("+lmove", Need::Worker, "reliable_requeue_worker"),
    ("+incr", Need::Worker, "job_claim: fencing tokens"),
    ("+incrby", Need::Worker, "reliable_start: fencing tokens"),
    (
        "+get",
        Need::Both,
        "job_claim, reliable_start: the fencing counter; job_submit: unique locks",
    ),
    (
        "+set",
        Need::Both,
        "the sweep guard; job_submit: unique locks",
    ),
    (
        "+pttl",
        Need::Both,
        "the sweep guard: one without an expiry is replaced; job_submit: a unique lock's expiry",
    ),
    ("+del", Need::Worker, "job_claim; wake lists"),
    (
        "+xadd",
        Need::Both,
        "lifecycle events (job_submit and the transitions of jobs that record them)",
    ),
    (
        "+xrange",
        Need::Client,
        "Queue::events: reading the lifecycle event stream",
    ),
    (
        "+xread",
        Need::Client,
        "Queue::follow_events: following the lifecycle event stream",
    ),
    (
        "+xrevrange",
        Need::Client,
        "Queue::follow_events from the newest entry (\"$\")",
    ),
    (
        "+zcard",
        Need::Worker,
        "job_claim, reliable_start: counting running jobs and starts for the queue's limits",
    ),
    (
        "+zremrangebyscore",
        Need::Worker,
        "job_claim, reliable_start: starts that left the rate limit's window",
    ),
    ("+pexpire", Need::Worker, "outcome retention; wake lists"),
    (
        "+zadd",
        Need::Both,
        "delayed jobs; leases, heartbeats, dead workers, dead jobs",
    ),
    (
        "+zrange",
        Need::Both,
        "the earliest delayed job (submits, retries, job_promote)",
    ),
    ("+zrem", Need::Both, "leases, workers; schedules"),
    (
        "+zscore",
        Need::Both,
        "job_extend, reliable_heartbeat, reliable_requeue_worker; a status read (delayed)",
    ),
    (
        "+zrangebyscore",
        Need::Worker,
        "job_requeue_stale: stale leases",
    ),
    (
        "+zrevrangebyscore",
        Need::Worker,
        "reliable_find_dead: dead workers",
    ),
    (
        "+zremrangebyrank",
        Need::Worker,
        "trimming dead_jobs; job_promote",
    ),
    (
        "+publish",
        Need::Worker,
        "outcomes and doorbells (single server)",
    ),
    (
        "+spublish",
        Need::Worker,
        "outcomes and doorbells (Redis Cluster)",
    ),
];

/// The keys of a queue the client role may touch (what `queue_register`,
/// `simple_submit`, `job_submit`, `job_watch`, `queue_control`,
/// `job_requeue` and status reads use).
const CLIENT_KEYS: &[&str] = &[
    "meta",
    "pending",
    "tickets",
    "delayed",
    "clock",
    "schedules",
    "schedule:*",
    "gate",
    "unique:*",
    "events",
    "dead_jobs",
    "job:*",
];

/// Escapes the characters that Redis ACL patterns (stringmatchlen) treat
/// as glob syntax, so that `text` matches only itself.
pub(crate) fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Refuses what an ACL pattern cannot hold: Redis refuses a key or channel
/// pattern with whitespace ("Syntax error"), and ACL files split rules on
/// spaces.
fn expressible(what: &str, name: &str) -> Result<(), Error> {
    if name.bytes().any(|b| b.is_ascii_whitespace() || b == 0) {
        return Err(Error::InvalidName(format!(
            "{what} {name:?} contains whitespace, which Redis ACL key and channel patterns cannot hold: \
             no ACL rules can confine a user to it (use a {what} without spaces)"
        )));
    }
    Ok(())
}

impl AclProfile {
    /// The full profile (clients and workers, every queue, script loading
    /// allowed) for keys under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            role: AclRole::default(),
            queues: Vec::new(),
            script_loading: true,
        }
    }

    /// Sets [`AclProfile::role`].
    pub fn role(mut self, role: AclRole) -> Self {
        self.role = role;
        self
    }

    /// Confines the user to `queue` (and to the other queues given this
    /// way): its keys `<prefix>:{<queue>}:...` and its reply channels.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// Sets [`AclProfile::script_loading`].
    pub fn script_loading(mut self, allowed: bool) -> Self {
        self.script_loading = allowed;
        self
    }

    /// The command rules (`+command` or `+command|subcommand`), in a fixed
    /// order. They follow `-@all` in [`AclProfile::rules`].
    pub fn commands(&self) -> Vec<&'static str> {
        COMMANDS
            .iter()
            .filter(|(_, need, _)| match (need, self.role) {
                (Need::Both, _) => true,
                (Need::Loading, _) => self.script_loading,
                (Need::Client, AclRole::Client | AclRole::ClientAndWorker) => true,
                (Need::Worker, AclRole::Worker | AclRole::ClientAndWorker) => true,
                _ => false,
            })
            .map(|(rule, _, _)| *rule)
            .collect()
    }

    /// The rules, one per `ACL SETUSER` argument:
    /// `clearselectors resetkeys <key patterns> resetchannels <channel
    /// patterns> -@all <commands>`. They replace every permission the user
    /// had; give authentication yourself, e.g. `ACL SETUSER jobs reset on
    /// >secret <rules...>`, on every node of a cluster.
    ///
    /// Key patterns cover `<prefix>:{<queue>}:*` for every queue
    /// (`<prefix>:{*}:*`) or for the named queues, and for the client role
    /// only the keys its scripts touch; channel patterns cover the reply,
    /// progress and worker control channels `<prefix>:{<queue>}:reply:*`,
    /// `progress:*` and `worker:*` (only the worker role may publish). `*`, `?`, `[`, `]` and `\` in
    /// the prefix and queue names are escaped with `\`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] when the prefix or a queue name is not valid
    /// for the library (see [`crate::keys::QueueKeys::new`]) or contains a
    /// space, which Redis ACL patterns cannot hold.
    pub fn rules(&self) -> Result<Vec<String>, Error> {
        validate_prefix(&self.prefix)?;
        expressible("prefix", &self.prefix)?;
        let mut bases = Vec::new();
        if self.queues.is_empty() {
            bases.push(format!("{}:{{*}}:", escape_glob(&self.prefix)));
        }
        for queue in &self.queues {
            QueueKeys::new(&self.prefix, queue)?;
            expressible("queue name", queue)?;
            let base = format!("{}:{{{}}}:", escape_glob(&self.prefix), escape_glob(queue));
            if !bases.contains(&base) {
                bases.push(base);
            }
        }
        let mut rules = vec!["clearselectors".to_owned(), "resetkeys".to_owned()];
        for base in &bases {
            match self.role {
                AclRole::Client => {
                    rules.extend(CLIENT_KEYS.iter().map(|key| format!("~{base}{key}")));
                }
                AclRole::Worker | AclRole::ClientAndWorker => rules.push(format!("~{base}*")),
            }
        }
        rules.push("resetchannels".to_owned());
        for base in &bases {
            for channel in ["reply", "progress", "worker"] {
                rules.push(format!("&{base}{channel}:*"));
            }
        }
        rules.push("-@all".to_owned());
        rules.extend(self.commands().into_iter().map(str::to_owned));
        Ok(rules)
    }
}

/// The rules of the full profile ([`AclProfile::new`]) joined with spaces.
///
/// # Panics
/// When the prefix cannot be expressed (see [`AclProfile::rules`]).
#[deprecated(
    note = "use AclProfile::new(prefix).rules(): one rule per ACL SETUSER argument, a typed error for a prefix ACL rules cannot express, and the client, worker, per-queue and no-script-loading profiles"
)]
pub fn acl_rules(prefix: &str) -> String {
    match AclProfile::new(prefix).rules() {
        Ok(rules) => rules.join(" "),
        Err(e) => panic!("acl_rules: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The scripts each role calls (the worker registers its queues too).
    const CLIENT_SCRIPTS: &[&str] = &[
        "queue_register",
        "simple_submit",
        "job_submit",
        "job_watch",
        "schedule_set",
        "schedule_remove",
        "queue_control",
        "job_requeue",
    ];

    fn role_runs(role: AclRole, script: &str) -> bool {
        match role {
            AclRole::Client => CLIENT_SCRIPTS.contains(&script),
            AclRole::Worker => script == "queue_register" || !CLIENT_SCRIPTS.contains(&script),
            AclRole::ClientAndWorker => true,
        }
    }

    /// The commands a script's text runs: `redis.call('X'` and
    /// `redis.pcall('X'` (either quote), and a `'PUBLISH'`/`'SPUBLISH'`
    /// literal (the publishing scripts pick one and call it through a
    /// variable). Comments are skipped.
    fn commands_in(source: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for line in source.lines() {
            let code = line.split("--").next().unwrap_or("");
            for opener in ["redis.call(", "redis.pcall("] {
                for (at, _) in code.match_indices(opener) {
                    let rest = code[at + opener.len()..].trim_start();
                    let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"')
                    else {
                        continue;
                    };
                    if let Some(name) = rest[1..].split(quote).next() {
                        found.insert(name.to_ascii_lowercase());
                    }
                }
            }
            for publish in ["PUBLISH", "SPUBLISH"] {
                if code.contains(&format!("'{publish}'"))
                    || code.contains(&format!("\"{publish}\""))
                {
                    found.insert(publish.to_ascii_lowercase());
                }
            }
        }
        found
    }

    #[test]
    fn every_command_a_script_runs_is_allowed_to_the_roles_that_call_it() {
        for role in [AclRole::Client, AclRole::Worker, AclRole::ClientAndWorker] {
            let allowed: BTreeSet<String> = AclProfile::new("jq")
                .role(role)
                .commands()
                .iter()
                .map(|c| c.trim_start_matches('+').to_owned())
                .collect();
            for script in crate::scripts::all() {
                if !role_runs(role, script.name()) {
                    continue;
                }
                let needed = commands_in(script.source());
                assert!(!needed.is_empty(), "{} runs no command?", script.name());
                for command in needed {
                    assert!(
                        allowed.contains(&command),
                        "lua/{}.lua runs {command}, which the {role:?} role lacks: add it to src/acl.rs (and protocol.md section 14)",
                        script.name()
                    );
                }
            }
        }
    }

    #[test]
    fn every_allowed_command_is_needed_by_its_roles() {
        // Commands sent outside scripts (src/), by role.
        let client_plain = [
            "hello",
            "ping",
            "cluster|slots",
            "asking",
            "evalsha",
            "script|load",
            "subscribe",
            "ssubscribe",
            "wait",
            "hmget",
            "zscore",
            "zrange",
            "time",
            "xrange",
            "xread",
            "xrevrange",
        ];
        let worker_plain = [
            "hello",
            "ping",
            "cluster|slots",
            "asking",
            "evalsha",
            "script|load",
            "blmpop",
            "blmove",
            "type",
            "lrange",
            "lpush",
            "pexpire",
            "del",
            "subscribe",
            "ssubscribe",
        ];
        for (role, plain) in [
            (AclRole::Client, &client_plain[..]),
            (AclRole::Worker, &worker_plain[..]),
        ] {
            let mut needed: BTreeSet<String> = plain.iter().map(|c| c.to_string()).collect();
            for script in crate::scripts::all() {
                if role_runs(role, script.name()) {
                    needed.extend(commands_in(script.source()));
                }
            }
            for command in AclProfile::new("jq").role(role).commands() {
                let command = command.trim_start_matches('+');
                assert!(
                    needed.contains(command),
                    "the {role:?} role allows {command}, which it never sends: remove it from src/acl.rs"
                );
            }
        }
    }

    #[test]
    fn the_client_role_cannot_publish_and_the_roles_add_up_to_the_full_profile() {
        let client = AclProfile::new("jq").role(AclRole::Client).commands();
        let worker = AclProfile::new("jq").role(AclRole::Worker).commands();
        let full = AclProfile::new("jq").commands();
        for forbidden in ["+publish", "+spublish", "+blmpop", "+blmove", "+del"] {
            assert!(!client.contains(&forbidden), "{forbidden}");
        }
        assert!(!worker.contains(&"+wait"), "+wait");
        let union: BTreeSet<&str> = client.iter().chain(&worker).copied().collect();
        assert_eq!(union, full.iter().copied().collect::<BTreeSet<_>>());
        assert_eq!(full.len(), union.len(), "no command is listed twice");
        for dropped in ["+client|unblock", "+client|id", "+eval", "+script|flush"] {
            assert!(!full.contains(&dropped), "{dropped}");
        }
    }

    #[test]
    fn without_script_loading_only_script_load_goes() {
        for role in [AclRole::Client, AclRole::Worker, AclRole::ClientAndWorker] {
            let with = AclProfile::new("jq").role(role).rules().unwrap();
            let without = AclProfile::new("jq")
                .role(role)
                .script_loading(false)
                .rules()
                .unwrap();
            let gone: Vec<&String> = with.iter().filter(|r| !without.contains(r)).collect();
            assert_eq!(gone, ["+script|load"]);
            assert_eq!(without.len() + 1, with.len());
            assert!(without.contains(&"+evalsha".to_string()));
        }
    }

    #[test]
    fn the_full_profile_covers_every_queue_of_the_prefix() {
        let rules = AclProfile::new("jq").rules().unwrap();
        assert_eq!(
            rules[..8],
            [
                "clearselectors",
                "resetkeys",
                "~jq:{*}:*",
                "resetchannels",
                "&jq:{*}:reply:*",
                "&jq:{*}:progress:*",
                "&jq:{*}:worker:*",
                "-@all"
            ]
        );
        #[allow(deprecated)]
        let joined = acl_rules("jq");
        assert_eq!(joined, rules.join(" "));
    }

    #[test]
    fn per_queue_rules_name_each_queue_once() {
        let rules = AclProfile::new("jq")
            .queue("a")
            .queue("b")
            .queue("a")
            .rules()
            .unwrap();
        assert_eq!(
            rules[..11],
            [
                "clearselectors",
                "resetkeys",
                "~jq:{a}:*",
                "~jq:{b}:*",
                "resetchannels",
                "&jq:{a}:reply:*",
                "&jq:{a}:progress:*",
                "&jq:{a}:worker:*",
                "&jq:{b}:reply:*",
                "&jq:{b}:progress:*",
                "&jq:{b}:worker:*"
            ]
        );
        let client = AclProfile::new("jq")
            .role(AclRole::Client)
            .queue("a")
            .rules()
            .unwrap();
        assert_eq!(
            client[..15],
            [
                "clearselectors",
                "resetkeys",
                "~jq:{a}:meta",
                "~jq:{a}:pending",
                "~jq:{a}:tickets",
                "~jq:{a}:delayed",
                "~jq:{a}:clock",
                "~jq:{a}:schedules",
                "~jq:{a}:schedule:*",
                "~jq:{a}:gate",
                "~jq:{a}:unique:*",
                "~jq:{a}:events",
                "~jq:{a}:dead_jobs",
                "~jq:{a}:job:*",
                "resetchannels"
            ]
        );
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
        assert_eq!(escape_glob("plain:name-1"), "plain:name-1");
        let rules = AclProfile::new("a*").queue("q?[x]").rules().unwrap();
        assert!(
            rules.contains(&r"~a\*:{q\?\[x\]}:*".to_string()),
            "{rules:?}"
        );
        assert!(rules.contains(&r"&a\*:{q\?\[x\]}:reply:*".to_string()));
    }

    #[test]
    fn what_acl_patterns_cannot_hold_is_refused() {
        for prefix in ["my app", "", "a{b", "a}b", "a\tb", "a\nb"] {
            let e = AclProfile::new(prefix).rules().unwrap_err();
            assert!(matches!(e, Error::InvalidName(_)), "{prefix:?}: {e}");
        }
        let e = AclProfile::new("my app").rules().unwrap_err();
        assert!(e.to_string().contains("whitespace"), "{e}");
        for queue in ["a b", "", "a{b", &"x".repeat(257)] {
            let e = AclProfile::new("jq").queue(queue).rules().unwrap_err();
            assert!(matches!(e, Error::InvalidName(_)), "{queue:?}: {e}");
        }
        // A queue name with a space works with the library; only the
        // per-queue profile cannot name it.
        assert!(QueueKeys::new("jq", "a b").is_ok());
    }
}
