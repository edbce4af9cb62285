//! The owned form of a consumed Kafka record, detached from the consumer so it can wait
//! in the buffer and travel to a worker.

use bytes::Bytes;

/// Interns a topic name for the life of the process. Topic names are few (the
/// subscribed topics), and a `&'static str` is copied without the reference count an
/// `Arc<str>` bumps on the Kafka thread and drops on a worker for every message (one
/// contended cache line per topic, in the benchmark's profile).
pub fn intern(name: &str) -> &'static str {
    static TABLE: std::sync::OnceLock<std::sync::Mutex<crate::hash::FxHashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut table = TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = table.get(name) {
        return t;
    }
    let t: &'static str = Box::leak(name.into());
    table.insert(t);
    t
}

/// A topic and partition. The topic is interned ([`intern`]), so cloning is a copy.
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: &'static str,
    pub partition: i32,
}

impl PartialEq for TopicPartition {
    /// Interned names compare by pointer; contents only when the pointers differ.
    fn eq(&self, other: &Self) -> bool {
        self.partition == other.partition
            && (std::ptr::eq(self.topic, other.topic) || self.topic == other.topic)
    }
}

impl std::hash::Hash for TopicPartition {
    /// By content, consistent with `eq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.topic.hash(state);
        self.partition.hash(state);
    }
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: intern(topic),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Message {
    pub tp: TopicPartition,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch, when the record carries a timestamp.
    pub timestamp_ms: Option<i64>,
    /// Assignment generation of the partition when the record was fetched; work for an
    /// older generation belongs to a revoked assignment and must not move offsets.
    pub generation: u64,
}

impl Message {
    /// Bytes counted against `--buffer-bytes`: key, value and headers.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.payload.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}

#[cfg(test)]
pub(crate) fn test_message(partition: i32, offset: i64, key: Option<&str>) -> Message {
    Message {
        tp: TopicPartition::new("t", partition),
        offset,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        payload: Some(Bytes::from_static(b"v")),
        headers: Vec::new(),
        timestamp_ms: None,
        generation: 0,
    }
}
