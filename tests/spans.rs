//! Tracing spans: one per submit on the client and one per attempt on the
//! worker, with OpenTelemetry's messaging field names, captured by a
//! subscriber layer while real jobs run against a real redis-server.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use job_async_redis::{Client, Job, JobOptions, Mode, Worker};
use support::{RedisServer, config, queue_name, spawn_built};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

const WAIT: Duration = Duration::from_secs(20);

/// A span's name and its fields, as text.
type Captured = (String, BTreeMap<String, String>);

/// Every span's name and fields, kept when it closes.
#[derive(Clone, Default)]
struct Spans {
    open: Arc<Mutex<HashMap<u64, Captured>>>,
    closed: Arc<Mutex<Vec<Captured>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.open
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_owned(), fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(span) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(span);
        }
    }
}

impl Spans {
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.closed
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn submits_and_attempts_have_messaging_spans() {
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();
    let server = RedisServer::start();
    let name = queue_name("spans");
    let client = Client::connect(config(&server)).await.unwrap();
    let queue = client.queue(&name, Mode::Reliable).await.unwrap();
    let worker = spawn_built(
        Worker::builder(config(&server))
            .mode(Mode::Reliable)
            .queue(&name),
        |job: Job<u32>| async move {
            if job.payload == 0 {
                Err("zero".to_owned())
            } else {
                Ok(job.payload)
            }
        },
    )
    .await;
    let ok = queue
        .submit_with(&7u32, JobOptions::default().id("seven"))
        .await
        .unwrap();
    let failing = queue.submit_many(&[0u32, 0]).await.unwrap();
    assert_eq!(ok.result_timeout::<u32>(WAIT).await.unwrap(), 7);
    for h in failing {
        assert!(h.result_timeout::<u32>(WAIT).await.is_err());
    }
    worker.stop().await;

    let submits = spans.named("submit");
    let single = submits
        .iter()
        .find(|f| f.get("messaging.message.id").map(String::as_str) == Some("seven"))
        .expect("the single submit's span");
    assert_eq!(single["otel.kind"], "producer");
    assert_eq!(single["messaging.operation.type"], "send");
    assert_eq!(single["messaging.destination.name"], name);
    assert_eq!(single["messaging.batch.message_count"], "1");
    assert_eq!(single["job_async_redis.mode"], "reliable");
    assert!(
        submits.iter().any(
            |f| f.get("messaging.batch.message_count").map(String::as_str) == Some("2")
                && !f.contains_key("messaging.message.id")
        ),
        "the batch's span: {submits:?}"
    );

    let jobs = spans.named("job");
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let seven = jobs
        .iter()
        .find(|f| f["messaging.message.id"] == "seven")
        .expect("the attempt's span");
    assert_eq!(seven["otel.kind"], "consumer");
    assert_eq!(seven["otel.name"], format!("process {name}"));
    assert_eq!(seven["messaging.operation.type"], "process");
    assert_eq!(seven["messaging.destination.name"], name);
    assert_eq!(seven["job_async_redis.attempt"], "1");
    assert_eq!(seven["otel.status_code"], "OK");
    let failed: Vec<_> = jobs
        .iter()
        .filter(|f| f.get("otel.status_code").map(String::as_str) == Some("ERROR"))
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|f| f["error.type"] == "handler"));
}
