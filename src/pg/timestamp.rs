//! PostgreSQL timestamps (microseconds since 2000-01-01 00:00 UTC, as the replication
//! protocol carries them) as text that any `timestamptz` or `timestamp` column reads the
//! same whatever the session's TimeZone: ISO with an explicit `+00` offset.

/// Microseconds from 2000-01-01 to 1970-01-01 (negative: the Unix epoch is earlier).
const UNIX_EPOCH_US: i64 = -946_684_800_000_000;

/// `YYYY-MM-DD HH:MM:SS.ffffff+00` of a PostgreSQL timestamp.
pub fn timestamp_text(pg_us: i64) -> String {
    let unix_us = pg_us - UNIX_EPOCH_US;
    let secs = unix_us.div_euclid(1_000_000);
    let micros = unix_us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of a day count from 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_in_utc() {
        assert_eq!(timestamp_text(0), "2000-01-01 00:00:00.000000+00");
        assert_eq!(timestamp_text(1), "2000-01-01 00:00:00.000001+00");
        assert_eq!(timestamp_text(-1), "1999-12-31 23:59:59.999999+00");
        // 2024-02-29 12:34:56.789012 UTC (a leap day).
        let leap = (8825 * 86_400 + 12 * 3600 + 34 * 60 + 56) * 1_000_000 + 789_012;
        assert_eq!(timestamp_text(leap), "2024-02-29 12:34:56.789012+00");
        assert_eq!(
            timestamp_text(UNIX_EPOCH_US),
            "1970-01-01 00:00:00.000000+00"
        );
    }
}
