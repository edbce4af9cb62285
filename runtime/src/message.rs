//! The owned form of a consumed Kafka record, detached from the consumer so it can wait
//! in the buffer and travel to a worker.

use std::sync::Arc;

use bytes::Bytes;

/// A topic and partition. The topic is shared, so cloning is cheap.
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl PartialEq for TopicPartition {
    /// Topic names are shared `Arc`s from the Kafka thread's cache: compare pointers
    /// first, contents only when they differ.
    fn eq(&self, other: &Self) -> bool {
        self.partition == other.partition
            && (Arc::ptr_eq(&self.topic, &other.topic) || self.topic == other.topic)
    }
}

impl std::hash::Hash for TopicPartition {
    /// By content, consistent with `eq` (equal pointers imply equal contents).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.topic.hash(state);
        self.partition.hash(state);
    }
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
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
