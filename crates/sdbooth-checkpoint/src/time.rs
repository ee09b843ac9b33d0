//! Calendar time in UTC, for the dates sdbooth writes: modelspec's `date`, log folder names and
//! sample file names. One conversion (Howard Hinnant's civil_from_days), two spellings.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl UtcTime {
    /// Seconds since 1970-01-01T00:00:00 UTC.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = (secs % 86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        UtcTime {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }

    /// Now (the Unix epoch if the clock is set before it).
    pub fn now() -> Self {
        Self::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    /// ISO 8601 without zone: `2023-11-14T22:13:20`.
    pub fn iso(&self) -> String {
        let UtcTime { year, month, day, hour, minute, second } = *self;
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}")
    }

    /// Python's `%Y%m%d%H%M%S`, as kohya names log folders and samples: `20231114221320`.
    pub fn compact(&self) -> String {
        let UtcTime { year, month, day, hour, minute, second } = *self;
        format!("{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(UtcTime::from_unix(0).iso(), "1970-01-01T00:00:00");
        assert_eq!(UtcTime::from_unix(1_700_000_000).iso(), "2023-11-14T22:13:20");
        assert_eq!(UtcTime::from_unix(1_700_000_000).compact(), "20231114221320");
        // A leap day, and the last second of a century year.
        assert_eq!(UtcTime::from_unix(951_782_400).iso(), "2000-02-29T00:00:00");
        assert_eq!(UtcTime::from_unix(4_102_444_799).iso(), "2099-12-31T23:59:59");
    }
}
