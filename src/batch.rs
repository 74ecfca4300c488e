//! Batches of decoded records. A batch closes by count, bytes or age, whichever comes first.
//!
//! The batcher also tracks, per partition, where the consumer's stream stands, so that every
//! batch says where it continues from (`Batch::starts`). A sink checks that against its stored
//! checkpoint before advancing it: a batch that does not continue from the checkpoint would
//! leave a gap, and is refused (see `sink::checkpoint::after_batch`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::BatchConfig;
use crate::domain::TopicPartition;
use crate::envelope::Decoded;

/// Records in Kafka order within each partition.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Decoded>,
    pub bytes: usize,
    /// Per partition: the stream position this batch continues from, i.e. the offset after the
    /// previous batch's last record, or the offset the partition was assigned at. It can be
    /// below the first record's offset (Kafka offsets have gaps). Absent: the first record.
    pub starts: BTreeMap<TopicPartition, i64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Per partition: where the batch continues the stream from (see [`Batch::starts`]) and its
    /// last offset.
    pub fn ranges(&self) -> BTreeMap<TopicPartition, (i64, i64)> {
        let mut out: BTreeMap<TopicPartition, (i64, i64)> = BTreeMap::new();
        // A partition's records come in runs: each run is folded before its partition is
        // looked up, so the map is touched (and its key built) once per run, not per record.
        // Every sink calls this for every batch.
        let mut coords = self.records.iter().map(Decoded::coords).peekable();
        while let Some(first) = coords.next() {
            let (mut lo, mut hi) = (first.offset, first.offset);
            while let Some(c) =
                coords.next_if(|c| c.partition == first.partition && c.topic == first.topic)
            {
                lo = lo.min(c.offset);
                hi = hi.max(c.offset);
            }
            out.entry(first.topic_partition())
                .and_modify(|(l, h)| {
                    *l = (*l).min(lo);
                    *h = (*h).max(hi);
                })
                .or_insert((lo, hi));
        }
        for (tp, (lo, _)) in &mut out {
            if let Some(start) = self.starts.get(tp) {
                *lo = (*lo).min(*start);
            }
        }
        out
    }
}

/// Accumulates records and says when the batch must close.
pub struct Batcher {
    limits: BatchConfig,
    current: Batch,
    opened_at: Option<Instant>,
    /// Per assigned partition: the offset after the last record accepted (or the assigned start).
    positions: HashMap<TopicPartition, i64>,
}

impl Batcher {
    pub fn new(limits: BatchConfig) -> Self {
        Self {
            limits,
            current: Batch::default(),
            opened_at: None,
            positions: HashMap::new(),
        }
    }

    /// A partition was assigned and the consumer starts it at `start`.
    pub fn assign(&mut self, tp: TopicPartition, start: i64) {
        self.positions.insert(tp, start);
    }

    /// Adds a record. A record below its partition's position is a redelivery (records fetched
    /// before a rebalance and delivered after the new assignment's seek): every sink already
    /// has it or will get it from this stream, so it is dropped here. Returns whether it was
    /// added.
    pub fn push(&mut self, record: Decoded) -> bool {
        let c = record.coords();
        let tp = c.topic_partition();
        let offset = c.offset;
        match self.positions.get_mut(&tp) {
            Some(pos) if offset < *pos => return false,
            Some(pos) => {
                self.current.starts.entry(tp).or_insert(*pos);
                *pos = offset + 1;
            }
            None => {
                self.current.starts.entry(tp.clone()).or_insert(offset);
                self.positions.insert(tp, offset + 1);
            }
        }
        self.opened_at.get_or_insert_with(Instant::now);
        self.current.bytes += record.size_bytes();
        self.current.records.push(record);
        true
    }

    /// The most records a batch holds (`batch.max_records`).
    pub fn max_records(&self) -> usize {
        self.limits.max_records
    }

    /// The most a batch holds in decoded size (`batch.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.limits.max_bytes.0
    }

    /// True when the batch reached its count or byte limit.
    pub fn is_full(&self) -> bool {
        self.current.records.len() >= self.limits.max_records
            || self.current.bytes as u64 >= self.limits.max_bytes.0
    }

    /// Time left until the age limit closes the batch; None while it is empty.
    pub fn time_left(&self) -> Option<Duration> {
        self.opened_at
            .map(|t| self.limits.max_age.0.saturating_sub(t.elapsed()))
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    pub fn take(&mut self) -> Batch {
        self.opened_at = None;
        std::mem::take(&mut self.current)
    }

    /// Drops buffered records and positions of revoked partitions: another consumer now owns
    /// them.
    pub fn retain_partitions(&mut self, keep: impl Fn(&TopicPartition) -> bool) {
        self.current
            .records
            .retain(|r| keep(&r.coords().topic_partition()));
        self.current.starts.retain(|tp, _| keep(tp));
        self.positions.retain(|tp, _| keep(tp));
        if self.current.records.is_empty() {
            self.opened_at = None;
            self.current.bytes = 0;
        }
    }
}

/// Drops `value` on a background thread, off the caller's path.
///
/// A batch of 10,000 decoded changes takes milliseconds to free (a map and strings per row
/// image). A replay that freed its batch where it applied it kept the target's connection idle
/// meanwhile: about 7% of its wall time (docs/performance.md, "Replay: batches freed off the
/// apply path"). The queue is short: when the thread falls behind, the caller frees the value
/// itself, so memory waiting to be freed stays bounded.
pub fn drop_in_background<T: Send + 'static>(value: T) {
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    use std::sync::OnceLock;
    static QUEUE: OnceLock<Option<SyncSender<Box<dyn Send>>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (queue, freed) = sync_channel::<Box<dyn Send>>(2);
        std::thread::Builder::new()
            .name("cdc-lake-free".into())
            .spawn(move || freed.into_iter().for_each(drop))
            .ok()
            .map(|_| queue)
    });
    if let Some(queue) = queue {
        match queue.try_send(Box::new(value)) {
            Ok(()) => {}
            Err(TrySendError::Full(value) | TrySendError::Disconnected(value)) => drop(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration};
    use crate::domain::KafkaCoordinates;
    use crate::envelope::SkipReason;

    fn skip(partition: i32, offset: i64) -> Decoded {
        Decoded::Skip(
            KafkaCoordinates {
                topic: "t".into(),
                partition,
                offset,
                timestamp_ms: None,
            },
            SkipReason::Tombstone,
        )
    }

    fn limits(records: usize, bytes: u64, age_ms: u64) -> BatchConfig {
        BatchConfig {
            max_records: records,
            max_bytes: ByteSize(bytes),
            max_age: HumanDuration(Duration::from_millis(age_ms)),
        }
    }

    #[test]
    fn closes_by_count_bytes_and_age() {
        let mut b = Batcher::new(limits(2, 1 << 20, 60_000));
        assert_eq!(b.time_left(), None);
        b.push(skip(0, 0));
        assert!(!b.is_full());
        b.push(skip(0, 1));
        assert!(b.is_full(), "count limit");

        let mut b = Batcher::new(limits(100, 100, 60_000));
        b.push(skip(0, 0));
        b.push(skip(0, 1));
        assert!(b.is_full(), "byte limit: two skips count 128 bytes");

        let mut b = Batcher::new(limits(100, 1 << 20, 1));
        b.push(skip(0, 0));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(b.time_left(), Some(Duration::ZERO), "age limit");
    }

    #[test]
    fn ranges_and_revocation_are_per_partition() {
        let mut b = Batcher::new(limits(100, 1 << 20, 60_000));
        for (p, o) in [(0, 5), (1, 9), (0, 6), (1, 10)] {
            b.push(skip(p, o));
        }
        b.retain_partitions(|tp| tp.partition == 0);
        let batch = b.take();
        let ranges: Vec<_> = batch.ranges().into_iter().collect();
        assert_eq!(ranges, vec![(TopicPartition::new("t", 0), (5, 6))]);
        assert!(b.is_empty());
    }

    /// Partitions interleaved in runs: each partition's range covers all of its runs.
    #[test]
    fn ranges_cover_every_run_of_a_partition() {
        let mut b = Batcher::new(limits(100, 1 << 20, 60_000));
        for (p, o) in [
            (0, 5),
            (0, 6),
            (1, 9),
            (0, 7),
            (2, 1),
            (1, 10),
            (1, 11),
            (0, 8),
        ] {
            b.push(skip(p, o));
        }
        let ranges: Vec<_> = b.take().ranges().into_iter().collect();
        assert_eq!(
            ranges,
            vec![
                (TopicPartition::new("t", 0), (5, 8)),
                (TopicPartition::new("t", 1), (9, 11)),
                (TopicPartition::new("t", 2), (1, 1)),
            ]
        );
    }

    #[test]
    fn batches_continue_from_the_assigned_position_and_drop_redeliveries() {
        let mut b = Batcher::new(limits(100, 1 << 20, 60_000));
        let tp = TopicPartition::new("t", 0);
        b.assign(tp.clone(), 3);
        // Offset 3 vanished on the broker (or was compacted): the batch still continues from 3.
        assert!(
            !b.push(skip(0, 2)),
            "below the assigned start: a redelivery"
        );
        assert!(b.push(skip(0, 4)));
        assert!(b.push(skip(0, 5)));
        let first = b.take();
        assert_eq!(first.ranges()[&tp], (3, 5));
        // The next batch continues where the first ended, and a redelivered 5 is dropped.
        assert!(!b.push(skip(0, 5)));
        assert!(b.push(skip(0, 7)));
        assert_eq!(b.take().ranges()[&tp], (6, 7));
        // Revoked, then assigned again elsewhere in the stream.
        b.retain_partitions(|_| false);
        b.assign(tp.clone(), 1);
        assert!(b.push(skip(0, 1)));
        assert_eq!(b.take().ranges()[&tp], (1, 1));
    }

    /// Every value given away is dropped, on the background thread or, when its queue is
    /// full, by the caller: none is leaked.
    #[test]
    fn values_dropped_in_the_background_are_all_dropped() {
        use std::sync::mpsc::{channel, Sender};
        struct Tracked(Sender<std::thread::ThreadId>);
        impl Drop for Tracked {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::current().id());
            }
        }
        let (dropped, seen) = channel();
        for _ in 0..50 {
            drop_in_background(Tracked(dropped.clone()));
        }
        drop(dropped);
        let threads: Vec<_> = (0..50)
            .map(|_| seen.recv_timeout(Duration::from_secs(10)).expect("dropped"))
            .collect();
        assert!(
            threads.iter().any(|t| *t != std::thread::current().id()),
            "some were dropped on the background thread"
        );
    }
}
