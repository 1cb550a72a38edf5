//! The edge every binary shares: arguments parsed with one-line errors, durations
//! validated as they are parsed, and a failure printed as one line with exit code 2.

use std::process::ExitCode;
use std::time::Duration;

/// Parses the process arguments; a bad one is clap's first line on stderr and exit code 2
/// (help and version print as usual).
pub fn parse_args<A: clap::Parser>() -> A {
    match A::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            std::process::exit(2)
        }
    }
}

/// Prints `err` as one line (see [`one_line`]) and returns exit code 2.
pub fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(err));
    ExitCode::from(2)
}

/// The error and its causes on one line, without the backtraces candle attaches.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.lines().next().unwrap_or_default().trim();
        // Errors that print their source in their own message are not repeated.
        if !line.contains(text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text);
        }
    }
    line
}

/// A clap value parser of a positive, finite number of seconds: zero would busy-loop a
/// periodic task and a negative value has no duration.
pub fn positive_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "expected a positive number of seconds, found {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert_eq!(positive_secs("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "nan", "inf", "1e300", "x"] {
            assert!(positive_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn causes_join_on_one_line() {
        let err = anyhow::anyhow!("inner\nbacktrace line").context("outer");
        assert_eq!(one_line(&err), "outer: inner");
    }
}
