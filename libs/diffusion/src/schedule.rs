//! Noise schedules: the masking probability `p(t)` of a token at noise level `t` in [0, 1]
//! and the NELBO weight `-p'(t) / p(t)`.

use std::f64::consts::{FRAC_PI_2, LN_2};
use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A masking schedule, `p(0) = 0` and `p(1) = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseSchedule {
    /// `p = t` (the paper's default).
    #[default]
    #[serde(rename = "loglinear")]
    LogLinear,
    /// `p = 1 - cos(pi t / 2)`.
    Cosine,
    /// `p = t^2`.
    Square,
    /// `p = t^(1/2)`.
    SquareRoot,
    /// `p = log2(1 + t)`.
    Log,
}

impl NoiseSchedule {
    /// Every schedule, for listings and tests.
    pub const ALL: [NoiseSchedule; 5] = [
        Self::LogLinear,
        Self::Cosine,
        Self::Square,
        Self::SquareRoot,
        Self::Log,
    ];

    /// Probability that a token is masked at noise level `t`.
    pub fn move_chance(self, t: f64) -> f64 {
        match self {
            Self::LogLinear => t,
            Self::Cosine => 1.0 - (FRAC_PI_2 * t).cos(),
            Self::Square => t * t,
            Self::SquareRoot => t.sqrt(),
            Self::Log => (1.0 + t).log2(),
        }
    }

    /// Derivative `p'(t)`.
    pub fn move_chance_rate(self, t: f64) -> f64 {
        match self {
            Self::LogLinear => 1.0,
            Self::Cosine => FRAC_PI_2 * (FRAC_PI_2 * t).sin(),
            Self::Square => 2.0 * t,
            Self::SquareRoot => 0.5 / t.sqrt(),
            Self::Log => 1.0 / ((1.0 + t) * LN_2),
        }
    }

    /// NELBO weight of a masked token's log-likelihood: `-p'(t) / p(t)` (negative).
    pub fn loss_scale(self, t: f64) -> f64 {
        match self {
            // Closed forms avoid 0/0 rounding near t = 0 and match the reference exactly.
            Self::LogLinear => -1.0 / t,
            Self::Square => -2.0 / t,
            Self::SquareRoot => -0.5 / t,
            _ => -self.move_chance_rate(t) / self.move_chance(t),
        }
    }

    /// The name used on command lines and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::LogLinear => "loglinear",
            Self::Cosine => "cosine",
            Self::Square => "square",
            Self::SquareRoot => "square_root",
            Self::Log => "log",
        }
    }
}

impl fmt::Display for NoiseSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NoiseSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::Param {
                name: "schedule",
                reason: format!(
                    "expected one of loglinear, cosine, square, square_root, log; found {s:?}"
                ),
            })
    }
}

/// A clipped noise interval `[eps_min, eps_max]` from which training draws `t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Lower end.
    pub min: f64,
    /// Upper end.
    pub max: f64,
}

impl Interval {
    /// The interval `[min, max]`, checked to satisfy `0 <= min < max <= 1`.
    pub fn new(min: f64, max: f64) -> Result<Self, Error> {
        if !(0.0 <= min && min < max && max <= 1.0) {
            return Err(Error::Param {
                name: "eps",
                reason: format!("expected 0 <= eps_min < eps_max <= 1, found [{min}, {max}]"),
            });
        }
        Ok(Self { min, max })
    }

    /// Maps `u` in [0, 1) into the interval.
    pub fn scale(&self, u: f64) -> f64 {
        self.min + (self.max - self.min) * u
    }

    /// Whether `p` lies inside the interval (ends included).
    pub fn contains(&self, p: f64) -> bool {
        self.min <= p && p <= self.max
    }
}

impl Default for Interval {
    /// The paper's evaluation interval `[1e-3, 1]`.
    fn default() -> Self {
        Self {
            min: 1e-3,
            max: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_run_from_zero_to_one() {
        for s in NoiseSchedule::ALL {
            assert!(s.move_chance(0.0).abs() < 1e-12, "{s}");
            assert!((s.move_chance(1.0) - 1.0).abs() < 1e-12, "{s}");
        }
    }

    #[test]
    fn closed_forms_match_the_definitions() {
        let t = 0.37f64;
        assert_eq!(NoiseSchedule::LogLinear.move_chance(t), t);
        assert!(
            (NoiseSchedule::Cosine.move_chance(t) - (1.0 - (std::f64::consts::PI * t / 2.0).cos()))
                .abs()
                < 1e-15
        );
        assert_eq!(NoiseSchedule::Square.move_chance(t), t * t);
        assert_eq!(NoiseSchedule::SquareRoot.move_chance(t), t.sqrt());
        assert!((NoiseSchedule::Log.move_chance(t) - (1.0 + t).ln() / 2f64.ln()).abs() < 1e-15);
        assert_eq!(NoiseSchedule::LogLinear.loss_scale(t), -1.0 / t);
        assert!((NoiseSchedule::Square.loss_scale(t) + 2.0 / t).abs() < 1e-12);
        assert!((NoiseSchedule::SquareRoot.loss_scale(t) + 0.5 / t).abs() < 1e-12);
        assert!(
            (NoiseSchedule::Log.loss_scale(t) + 1.0 / ((1.0 + t) * (1.0 + t).ln())).abs() < 1e-12
        );
    }

    /// `loss_scale = -p'/p` against a central finite difference of `p`.
    #[test]
    fn loss_scale_is_minus_the_log_derivative() {
        for s in NoiseSchedule::ALL {
            for t in [0.05, 0.3, 0.5, 0.9] {
                let h = 1e-6;
                let rate = (s.move_chance(t + h) - s.move_chance(t - h)) / (2.0 * h);
                let expected = -rate / s.move_chance(t);
                assert!(
                    (s.loss_scale(t) - expected).abs() < 1e-5 * expected.abs(),
                    "{s} at {t}"
                );
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for s in NoiseSchedule::ALL {
            assert_eq!(s.name().parse::<NoiseSchedule>().unwrap(), s);
        }
        assert!(
            "linear"
                .parse::<NoiseSchedule>()
                .unwrap_err()
                .to_string()
                .contains("schedule")
        );
    }

    #[test]
    fn intervals_are_validated() {
        assert!(Interval::new(0.3, 0.8).is_ok());
        assert!(Interval::new(0.8, 0.3).is_err());
        assert!(Interval::new(-0.1, 0.3).is_err());
        assert_eq!(Interval::new(0.2, 0.6).unwrap().scale(0.5), 0.4);
    }
}
