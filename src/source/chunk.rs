//! The decoded records the poll thread collects before it hands them to the pipeline.

use crate::envelope::Decoded;

/// When a chunk is handed over: at `records` records or `bytes` of decoded size, whichever
/// comes first. The byte limit keeps a queue of wide or large changes from holding far more
/// memory than the batch they will join (`batch.max_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    pub records: usize,
    pub bytes: usize,
}

/// Decoded records in fetch order, with their decoded size ([`Decoded::size_bytes`]).
#[derive(Debug, Default)]
pub struct Chunk {
    records: Vec<Decoded>,
    bytes: usize,
}

impl Chunk {
    pub fn push(&mut self, record: Decoded) {
        self.bytes += record.size_bytes();
        self.records.push(record);
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn is_full(&self, limits: ChunkLimits) -> bool {
        self.records.len() >= limits.records || self.bytes >= limits.bytes
    }

    /// The records and their decoded size, leaving the chunk empty.
    pub fn take(&mut self) -> (Vec<Decoded>, usize) {
        (
            std::mem::take(&mut self.records),
            std::mem::take(&mut self.bytes),
        )
    }

    /// Puts back records a full pipeline did not take, with the size `take` gave (the poll
    /// thread offers a chunk again every millisecond while the pipeline is busy: no re-count).
    pub fn restore(&mut self, records: Vec<Decoded>, bytes: usize) {
        debug_assert!(self.records.is_empty());
        self.records = records;
        self.bytes = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::KafkaCoordinates;
    use crate::envelope::SkipReason;

    fn skip(offset: i64) -> Decoded {
        let coords = KafkaCoordinates {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: None,
        };
        Decoded::Skip(coords, SkipReason::Tombstone)
    }

    #[test]
    fn a_chunk_is_full_at_its_record_or_byte_limit_and_counts_restored_records() {
        let by_records = ChunkLimits {
            records: 3,
            bytes: usize::MAX,
        };
        let by_bytes = ChunkLimits {
            records: 1000,
            bytes: 2 * skip(0).size_bytes(),
        };
        let mut chunk = Chunk::default();
        chunk.push(skip(0));
        assert!(!chunk.is_full(by_records) && !chunk.is_full(by_bytes));
        chunk.push(skip(1));
        assert!(!chunk.is_full(by_records) && chunk.is_full(by_bytes));
        let (back, bytes) = chunk.take();
        assert!(chunk.is_empty() && !chunk.is_full(by_bytes));
        chunk.restore(back, bytes);
        assert!(chunk.is_full(by_bytes), "restored records count again");
        chunk.push(skip(2));
        assert!(chunk.is_full(by_records));
    }
}
