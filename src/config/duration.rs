//! Durations as operators write them: `"30s"`, `"1m 30s"`, `"250ms"`.

use std::time::Duration;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write it like \"30s\", \"250ms\" or \"5m\"")
    })?;
    if parsed.is_zero() {
        return Err(format!("`{text}` must be greater than zero"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_millis() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_garbage_and_zero() {
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
