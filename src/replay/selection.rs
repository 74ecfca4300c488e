//! What a replay selects: topics, tables, offsets and an end point (`--until`).

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

use super::error::{ReplayError, ReplayResult};
use crate::envelope::Decoded;

/// A point in time to rebuild state as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Changes the source committed at or before this time (`source.ts_ms`).
    Time(DateTime<Utc>),
    /// Changes at or before this source LSN.
    Lsn(i64),
}

impl std::str::FromStr for Until {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((hi, lo)) = s.split_once('/') {
            let hi = u32::from_str_radix(hi, 16);
            let lo = u32::from_str_radix(lo, 16);
            if let (Ok(hi), Ok(lo)) = (hi, lo) {
                return Ok(Until::Lsn(((i64::from(hi)) << 32) | i64::from(lo)));
            }
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Until::Lsn).map_err(|e| e.to_string());
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(Until::Time(t.with_timezone(&Utc)));
        }
        for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
                return Ok(Until::Time(t.and_utc()));
            }
        }
        // A date alone is its first instant, UTC: the lake's `date=` partitions are UTC days.
        if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Ok(Until::Time(d.and_time(NaiveTime::MIN).and_utc()));
        }
        Err(format!(
            "{s:?} is neither a timestamp (2026-11-21T09:30:00Z, UTC 2026-11-21 09:30:00, or a UTC date 2026-11-21) nor an LSN (0/16B3748 or a number)"
        ))
    }
}

impl fmt::Display for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Until::Time(t) => write!(f, "{}", t.to_rfc3339()),
            Until::Lsn(l) => write!(f, "{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF),
        }
    }
}

/// Which changes to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub from_offset: i64,
    /// Last offset included.
    pub to_offset: Option<i64>,
    pub until: Option<Until>,
}

impl Selection {
    /// Checks the selection itself, before any I/O.
    pub fn validate(&self) -> ReplayResult<()> {
        if self.from_offset < 0 {
            return Err(ReplayError::BadArguments(format!(
                "--from-offset must be 0 or more, not {}",
                self.from_offset
            )));
        }
        if let Some(to) = self.to_offset {
            if to < self.from_offset {
                return Err(ReplayError::BadArguments(format!(
                    "invalid range: --to-offset {to} is below --from-offset {}",
                    self.from_offset
                )));
            }
        }
        if self.partition.is_some_and(|p| p < 0) {
            return Err(ReplayError::BadArguments(
                "--partition must be 0 or more".into(),
            ));
        }
        if self.topic.as_ref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ReplayError::BadArguments("--topic is empty".into()));
        }
        Ok(())
    }

    /// Whether the range has an end: then a rebuilt target is deliberately behind the log.
    pub fn is_bounded(&self) -> bool {
        self.to_offset.is_some() || self.until.is_some()
    }

    pub fn until_time(&self) -> Option<DateTime<Utc>> {
        match self.until {
            Some(Until::Time(t)) => Some(t),
            _ => None,
        }
    }

    pub fn until_lsn(&self) -> Option<i64> {
        match self.until {
            Some(Until::Lsn(l)) => Some(l),
            _ => None,
        }
    }

    /// Whether a decoded record is selected (the lake filters after decoding).
    pub fn selects(&self, r: &Decoded) -> bool {
        let c = r.coords();
        if c.offset < self.from_offset
            || self.to_offset.is_some_and(|to| c.offset > to)
            || self.topic.as_ref().is_some_and(|t| *t != c.topic)
            || self.partition.is_some_and(|p| p != c.partition)
        {
            return false;
        }
        let Decoded::Change(e) = r else {
            return true;
        };
        match self.until {
            None => true,
            Some(Until::Time(t)) => e
                .event_time_ms()
                .is_none_or(|ms| ms <= t.timestamp_millis()),
            Some(Until::Lsn(l)) => e.source.lsn.is_none_or(|lsn| lsn <= l),
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offsets {}..", self.from_offset)?;
        if let Some(to) = self.to_offset {
            write!(f, "={to}")?;
        }
        if let Some(t) = &self.topic {
            write!(f, " of topic {t}")?;
        }
        if let Some(p) = self.partition {
            write!(f, " partition {p}")?;
        }
        if let Some(u) = &self.until {
            write!(f, " until {u}")?;
        }
        Ok(())
    }
}

/// Where a replay reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// The PostgreSQL audit log `cdc_raw.cdc_events`.
    Raw,
    /// The lake's Parquet files (when raw retention has dropped old rows).
    Lake,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Raw => "raw log",
            SourceKind::Lake => "lake",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_reads_lsns_timestamps_and_dates() {
        let at = |s: &str| match s.parse::<Until>().unwrap() {
            Until::Time(t) => t.to_rfc3339(),
            Until::Lsn(l) => l.to_string(),
        };
        assert_eq!(at("0/16B3748"), "23803720");
        assert_eq!(at("23803720"), "23803720");
        assert_eq!(at("2026-11-21T09:30:00+01:00"), "2026-11-21T08:30:00+00:00");
        assert_eq!(at("2026-11-21 09:30:00"), "2026-11-21T09:30:00+00:00");
        assert_eq!(at("2026-11-21"), "2026-11-21T00:00:00+00:00");
        assert!("2026-13-01".parse::<Until>().is_err());
    }
}
