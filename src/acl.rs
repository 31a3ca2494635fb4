//! The least privilege a client and a worker need.

/// Redis ACL rules that allow exactly what this library does under `prefix`,
/// for use in `ACL SETUSER <user> on ><password> <rules>`. The commands
/// include those the scripts run (Redis checks them against the caller's ACL).
///
/// ```
/// let rules = job_async_redis::acl_rules("jq");
/// assert!(rules.starts_with("resetkeys ~jq:* resetchannels &jq:* -@all"));
/// ```
pub fn acl_rules(prefix: &str) -> String {
    let commands = [
        // Connection set-up (RESP3 handshake) and health.
        "+hello",
        "+ping",
        "+client|id",
        // Scripts: loading and calling.
        "+script|load",
        "+evalsha",
        // Worker: blocking pop or move, and waking it at shutdown.
        "+blmpop",
        "+blmove",
        // Reliable-mode worker: looking at the oldest IDs waiting, and
        // finding IDs whose move or start reply was lost.
        "+lrange",
        "+client|unblock",
        // Client: outcomes.
        "+subscribe",
        "+unsubscribe",
        // Client on a Redis Cluster: sharded pub/sub.
        "+ssubscribe",
        "+sunsubscribe",
        // Client: job status (recoverable mode).
        // (HMGET is listed below with the commands the scripts run.)
        // Run inside the scripts.
        "+hmget",
        "+hset",
        "+lpush",
        "+rpush",
        "+ltrim",
        "+llen",
        "+publish",
        "+spublish",
        "+time",
        "+exists",
        "+rpop",
        "+lpop",
        "+incr",
        "+incrby",
        "+del",
        "+set",
        "+hdel",
        "+pexpire",
        "+zadd",
        "+zrem",
        "+zscore",
        "+zrangebyscore",
        "+zremrangebyrank",
        "+lmove",
        "+lpos",
        "+lrem",
    ];
    format!(
        "resetkeys ~{prefix}:* resetchannels &{prefix}:* -@all {}",
        commands.join(" ")
    )
}
