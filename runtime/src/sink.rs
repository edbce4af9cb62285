//! Sinks: where a message goes, and the dead-letter writer.
//!
//! A sink performs one attempt and reports an [`Attempt`]; it never retries or decides
//! anything (that is [`crate::outcome::decide`]). The caller applies `--timeout`.

use std::io::Write;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};

use crate::config::SinkSpec;
use crate::message::Message;
use crate::outcome::{parse_retry_after, Attempt};

/// CloudEvents `type` of every delivered record.
pub const CE_TYPE: &str = "dev.pacer.kafka.record";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("invalid sink URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] rdkafka::error::KafkaError),
}

/// One configured sink.
#[derive(Clone)]
pub enum Sink {
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
        /// `ce-source`, built once.
        source: HeaderValue,
    },
    Kafka {
        producer: FutureProducer,
        topic: String,
    },
    Stdout,
    Null,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Http { url, .. } => write!(f, "Sink::Http({url})"),
            Sink::Kafka { topic, .. } => write!(f, "Sink::Kafka({topic})"),
            Sink::Stdout => f.write_str("Sink::Stdout"),
            Sink::Null => f.write_str("Sink::Null"),
        }
    }
}

/// A producer for the Kafka sink and the dead-letter topic. Idempotence keeps broker
/// retries from duplicating records.
pub fn producer(
    bootstrap: &str,
    extra: &[(String, String)],
    timeout: Duration,
) -> Result<FutureProducer, SinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            timeout.as_millis().clamp(1000, 300_000).to_string(),
        );
    // Only connection-level properties are shared with the consumer (security, client id).
    for (k, v) in extra {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            c.set(k, v);
        }
    }
    c.create().map_err(SinkError::Producer)
}

impl Sink {
    pub fn build(
        spec: &SinkSpec,
        bootstrap: &str,
        kafka_config: &[(String, String)],
        timeout: Duration,
        idle_connections: usize,
        group_id: &str,
    ) -> Result<Sink, SinkError> {
        Ok(match spec {
            SinkSpec::Http(url) => Sink::Http {
                client: reqwest::Client::builder()
                    // A redirect is the handler's answer, not an instruction: following
                    // a 301/302/303 would turn the POST into a bodiless GET whose 2xx
                    // would count the message as delivered. 3xx is classified instead.
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_max_idle_per_host(idle_connections.max(16))
                    .tcp_nodelay(true)
                    .build()
                    .map_err(SinkError::HttpClient)?,
                // Validated by the config parser.
                url: reqwest::Url::parse(url).map_err(|e| SinkError::Url {
                    url: url.clone(),
                    message: e.to_string(),
                })?,
                source: HeaderValue::from_str(&format!("/pacer/{group_id}"))
                    .unwrap_or_else(|_| HeaderValue::from_static("/pacer")),
            },
            SinkSpec::Kafka(topic) => Sink::Kafka {
                producer: producer(bootstrap, kafka_config, timeout)?,
                topic: topic.clone(),
            },
            SinkSpec::Stdout => Sink::Stdout,
            SinkSpec::Null => Sink::Null,
        })
    }

    /// Whether a delivery completes without waiting (`null`, `stdout`): such sinks are
    /// called inline by the dispatcher instead of from a task per message.
    pub fn is_synchronous(&self) -> bool {
        matches!(self, Sink::Null | Sink::Stdout)
    }

    /// One delivery attempt.
    pub async fn deliver(&self, msg: &Message) -> Attempt {
        match self {
            Sink::Null => Attempt::Delivered,
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                let value = msg.payload.as_deref().unwrap_or_default();
                match out.write_all(value).and_then(|_| out.write_all(b"\n")) {
                    Ok(()) => Attempt::Delivered,
                    Err(e) => Attempt::Transport(format!("stdout: {e}")),
                }
            }
            Sink::Http {
                client,
                url,
                source,
            } => {
                // Built directly rather than through a RequestBuilder, whose `headers`
                // re-inserts every header into a second map.
                let mut req = reqwest::Request::new(reqwest::Method::POST, url.clone());
                *req.headers_mut() = http_headers(msg, source);
                *req.body_mut() = Some(msg.payload.clone().unwrap_or_default().into());
                match client.execute(req).await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        let retry_after = resp
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_retry_after);
                        // Drain the body so the connection goes back to the pool.
                        let _ = resp.bytes().await;
                        if (200..300).contains(&code) {
                            Attempt::Delivered
                        } else {
                            Attempt::Status { code, retry_after }
                        }
                    }
                    Err(e) if e.is_timeout() => Attempt::Timeout,
                    Err(e) => Attempt::Transport(transport_error(&e)),
                }
            }
            Sink::Kafka { producer, topic } => {
                let headers = kafka_headers(msg, &[]);
                produce(producer, topic, msg, headers).await
            }
        }
    }
}

/// Produces `msg` (key, value, `headers`) to `topic`.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    msg: &Message,
    headers: OwnedHeaders,
) -> Attempt {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = msg.key.as_deref() {
        record = record.key(k);
    }
    if let Some(v) = msg.payload.as_deref() {
        record = record.payload(v);
    }
    match producer.send(record, Duration::from_secs(0)).await {
        Ok(_) => Attempt::Delivered,
        Err((e, _)) => Attempt::Transport(format!("produce to {topic}: {e}")),
    }
}

/// The record's own headers plus `extra` ones (used for dead-letter error headers).
pub fn kafka_headers(msg: &Message, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(msg.headers.len() + extra.len());
    for (k, v) in &msg.headers {
        h = h.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    for (k, v) in extra {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// Dead-letter headers: what failed, how often, and where the record came from.
pub fn dead_letter_headers(msg: &Message, error: &str, attempts: u32) -> OwnedHeaders {
    kafka_headers(
        msg,
        &[
            ("pacer-error", error.to_string()),
            ("pacer-attempts", attempts.to_string()),
            ("pacer-original-topic", msg.tp.topic.to_string()),
            ("pacer-original-partition", msg.tp.partition.to_string()),
            ("pacer-original-offset", msg.offset.to_string()),
        ],
    )
}

fn transport_error(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// CloudEvents binary-mode headers, the record's coordinates and its Kafka headers.
/// Values that are not printable ASCII (binary keys, say) go base64-encoded under a
/// `-b64` name, so no input can make an invalid HTTP request.
pub fn http_headers(msg: &Message, source: &HeaderValue) -> HeaderMap {
    // Fixed names are static and the source/type values are shared: building headers
    // is on the per-message path.
    static CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
    static CE_ID: HeaderName = HeaderName::from_static("ce-id");
    static CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
    static CE_TYPE_H: HeaderName = HeaderName::from_static("ce-type");
    static CE_TIME: HeaderName = HeaderName::from_static("ce-time");
    static KAFKA_TOPIC: HeaderName = HeaderName::from_static("kafka-topic");
    static KAFKA_PARTITION: HeaderName = HeaderName::from_static("kafka-partition");
    static KAFKA_OFFSET: HeaderName = HeaderName::from_static("kafka-offset");
    static KAFKA_KEY: HeaderName = HeaderName::from_static("kafka-key");
    let mut h = HeaderMap::with_capacity(10 + msg.headers.len());
    h.insert(CE_SPECVERSION.clone(), HeaderValue::from_static("1.0"));
    h.insert(CE_SOURCE.clone(), source.clone());
    h.insert(CE_TYPE_H.clone(), HeaderValue::from_static(CE_TYPE));
    h.insert(KAFKA_PARTITION.clone(), HeaderValue::from(msg.tp.partition));
    h.insert(KAFKA_OFFSET.clone(), HeaderValue::from(msg.offset));
    if let Some(ms) = msg.timestamp_ms {
        if let Some(v) = cached_time(ms) {
            h.insert(CE_TIME.clone(), v);
        }
    }
    // Topic names are printable ASCII (Kafka's own rule), so these never fall back.
    let mut id = String::with_capacity(msg.tp.topic.len() + 24);
    {
        use std::fmt::Write as _;
        let _ = write!(id, "{}-{}-{}", msg.tp.topic, msg.tp.partition, msg.offset);
    }
    put_value(&mut h, &CE_ID, id.as_bytes());
    match cached_topic(msg.tp.topic) {
        Some(v) => {
            h.insert(KAFKA_TOPIC.clone(), v);
        }
        None => put_value(&mut h, &KAFKA_TOPIC, msg.tp.topic.as_bytes()),
    }
    if let Some(k) = &msg.key {
        put_value(&mut h, &KAFKA_KEY, k);
    }
    let mut put = |name: &str, value: &[u8]| {
        let Ok(name_ok) = HeaderName::from_bytes(name.as_bytes()) else {
            return;
        };
        put_value(&mut h, &name_ok, value);
    };
    let mut content_type = false;
    for (k, v) in &msg.headers {
        let lower = k.to_ascii_lowercase();
        if lower == "content-type" {
            content_type = true;
            put("content-type", v.as_deref().unwrap_or_default());
        } else {
            put(
                &format!("kafka-header-{lower}"),
                v.as_deref().unwrap_or_default(),
            );
        }
    }
    if !content_type {
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    h
}

/// Appends `value` under `name`, or base64-encoded under `{name}-b64` when it is not
/// printable ASCII.
fn put_value(h: &mut HeaderMap, name: &HeaderName, value: &[u8]) {
    if value.iter().all(|b| (0x20..0x7f).contains(b)) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(name.clone(), v);
            return;
        }
    }
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(format!("{name}-b64").as_bytes()),
        HeaderValue::from_str(&base64(value)),
    ) {
        h.append(n, v);
    }
}

thread_local! {
    /// The last `ce-time` built on this thread: records of one batch mostly share a
    /// millisecond, and formatting a date is the costliest header.
    static LAST_TIME: std::cell::RefCell<Option<(i64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
    /// The last `kafka-topic` value built on this thread, by topic name.
    static LAST_TOPIC: std::cell::RefCell<Option<(&'static str, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

fn cached_time(ms: i64) -> Option<HeaderValue> {
    LAST_TIME.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((t, v)) = c.as_ref() {
            if *t == ms {
                return Some(v.clone());
            }
        }
        let v = HeaderValue::from_str(&rfc3339_millis(ms)).ok()?;
        *c = Some((ms, v.clone()));
        Some(v)
    })
}

/// `None` when the topic is not a valid header value as is (never for a Kafka topic).
fn cached_topic(topic: &'static str) -> Option<HeaderValue> {
    LAST_TOPIC.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((t, v)) = c.as_ref() {
            if std::ptr::eq(*t, topic) || *t == topic {
                return Some(v.clone());
            }
        }
        if !topic.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return None;
        }
        let v = HeaderValue::from_str(topic).ok()?;
        *c = Some((topic, v.clone()));
        Some(v)
    })
}

/// Standard base64 with padding (RFC 4648); small enough not to need a crate.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds (`ce-time`).
pub fn rfc3339_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::test_message;
    use bytes::Bytes;

    #[test]
    fn base64_matches_the_rfc_examples() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn timestamps_format_as_rfc3339_utc() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn http_headers_carry_cloudevents_and_kafka_coordinates() {
        let mut m = test_message(3, 42, Some("order-1"));
        m.timestamp_ms = Some(0);
        m.headers = vec![("trace".into(), Some(Bytes::from_static(b"abc")))];
        let h = http_headers(&m, &HeaderValue::from_static("/pacer/g"));
        assert_eq!(h["ce-id"], "t-3-42");
        assert_eq!(h["ce-type"], CE_TYPE);
        assert_eq!(h["ce-source"], "/pacer/g");
        assert_eq!(h["ce-time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(h["kafka-partition"], "3");
        assert_eq!(h["kafka-offset"], "42");
        assert_eq!(h["kafka-key"], "order-1");
        assert_eq!(h["kafka-header-trace"], "abc");
        assert_eq!(h["content-type"], "application/octet-stream");
    }

    #[test]
    fn a_binary_key_goes_base64_encoded_and_never_breaks_the_request() {
        let mut m = test_message(0, 1, None);
        m.key = Some(Bytes::from_static(&[0xff, 0x00, b'\n']));
        m.headers = vec![("bad name\n".into(), Some(Bytes::from_static(b"x")))];
        let h = http_headers(&m, &HeaderValue::from_static("s"));
        assert!(h.get("kafka-key").is_none());
        assert_eq!(h["kafka-key-b64"], "/wAK");
    }
}
