//! Duration and size notation: `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"2d"`, `"off"`;
//! `4096`, `"512B"`, `"64KiB"`, `"16MiB"`, `"1GiB"`.
//!
//! Parsing only checks the notation; the bounds of each key are checked by `validate`.
//! Formatting is the inverse for every value parsing can produce, so `describe` output can
//! be pasted back into a config file.

use std::time::Duration;

pub(crate) const DURATION_FORM: &str = r#"a duration such as "500ms", "10s", "5m" or "1h""#;
pub(crate) const SIZE_FORM: &str =
    r#"a size in bytes such as 65536, "512B", "64KiB", "16MiB" or "1GiB""#;

/// A parsed duration: `off` is kept apart from `0` so that keys which cannot be disabled
/// can say so instead of "must be greater than 0".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    Off,
    After(Duration),
}

const DURATION_UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

const SIZE_UNITS: [(&str, u64); 5] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

pub(crate) fn parse_duration(text: &str) -> Result<Timer, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(Timer::Off);
    }
    let (digits, unit) = split_number(text);
    let Ok(value) = digits.parse::<u64>() else {
        return Err(format!(
            "invalid duration {text:?}: expected {DURATION_FORM}"
        ));
    };
    if unit.is_empty() {
        if value == 0 {
            return Ok(Timer::After(Duration::ZERO));
        }
        return Err(format!(
            "invalid duration {text:?}: a unit is required, e.g. \"{value}s\" or \"{value}ms\""
        ));
    }
    let Some(&(_, ms_per_unit)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
        return Err(format!(
            "invalid duration {text:?}: unknown unit {unit:?} (expected ms, s, m, h or d)"
        ));
    };
    value
        .checked_mul(ms_per_unit)
        .map(|ms| Timer::After(Duration::from_millis(ms)))
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = split_number(text);
    let Ok(value) = digits.parse::<u64>() else {
        return Err(format!("invalid size {text:?}: expected {SIZE_FORM}"));
    };
    let multiplier = if unit.is_empty() {
        1
    } else if let Some(&(_, m)) = SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
        m
    } else {
        // Decimal units are refused rather than guessed: "16MB" is 16 000 000 to some
        // readers and 16 MiB to others, and frame limits are usually thought of in MiB.
        return Err(format!(
            "invalid size {text:?}: unknown unit {unit:?} (expected B, KiB, MiB, GiB or TiB)"
        ));
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Splits `"16MiB"` into `("16", "MiB")`, allowing one space between them.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(end);
    (digits, unit.strip_prefix(' ').unwrap_or(unit))
}

pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    DURATION_UNITS
        .iter()
        .rev()
        .find(|(_, per)| ms.is_multiple_of(u128::from(*per)))
        .map(|(unit, per)| format!("{}{unit}", ms / u128::from(*per)))
        .unwrap_or_else(|| format!("{ms}ms"))
}

pub(crate) fn format_timer(d: Option<Duration>) -> String {
    d.map_or_else(|| "off".into(), format_duration)
}

pub(crate) fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".into();
    }
    SIZE_UNITS
        .iter()
        .rev()
        .find(|(_, per)| bytes.is_multiple_of(*per))
        .map(|(unit, per)| format!("{}{unit}", bytes / per))
        .unwrap_or_else(|| format!("{bytes}B"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(ms: u64) -> Result<Timer, String> {
        Ok(Timer::After(Duration::from_millis(ms)))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), after(500));
        assert_eq!(parse_duration("10s"), after(10_000));
        assert_eq!(parse_duration("5m"), after(300_000));
        assert_eq!(parse_duration("1h"), after(3_600_000));
        assert_eq!(parse_duration("2d"), after(172_800_000));
        assert_eq!(parse_duration(" 10 s "), after(10_000));
        assert_eq!(parse_duration("0"), after(0));
        assert_eq!(parse_duration("0s"), after(0));
        assert_eq!(parse_duration("off"), Ok(Timer::Off));
    }

    #[test]
    fn bad_durations_say_the_expected_form() {
        for bad in ["", "s", "ten s", "1.5s", "-1s", "10 sec", "1h30m", "OFF"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{:?}", bad.trim())), "{bad}: {err}");
            assert!(
                err.contains("expected") || err.contains("unit"),
                "{bad}: {err}"
            );
        }
        assert!(parse_duration("10").unwrap_err().contains("\"10s\""));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1 TiB"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(
            parse_size("16MB")
                .unwrap_err()
                .contains("unknown unit \"MB\"")
        );
        assert!(parse_size("16 mib").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").unwrap_err().contains("expected a size"));
        assert!(parse_size("20000000TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["500ms", "10s", "5m", "1h", "2d", "1500ms", "90s"] {
            let Ok(Timer::After(d)) = parse_duration(text) else {
                panic!("{text}")
            };
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_duration(Duration::ZERO), "0");
        assert_eq!(format_timer(None), "off");
        for text in ["512B", "1KiB", "1000B", "16MiB", "1GiB", "3TiB", "1536KiB"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
        assert_eq!(format_size(0), "0B");
    }
}
