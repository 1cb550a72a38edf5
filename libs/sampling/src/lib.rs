//! The sampling parameters of a generation: which sampler denoises each block, how many
//! steps it may take, and how the model's distribution is filtered before a draw.
//!
//! One typed model shared by every layer: the diffusion library samples with it, the
//! session record stores it (serde), the coordinator validates and merges requests into
//! it, and the command line builds it from flags. It links no tensor library, so the
//! coordinator can use it without candle. The gRPC conversions live in `bd3lm-proto`.
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// Softmax temperature when a request names none.
pub const DEFAULT_TEMPERATURE: f64 = 1.0;
/// Nucleus mass when a request names none (the reference's sampling default).
pub const DEFAULT_TOP_P: f64 = 0.9;
/// Confidence threshold when a request names none.
pub const DEFAULT_THRESHOLD: f64 = 0.9;

/// A parameter outside its valid range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid parameter `{field}`: expected {expected}, found {found}")]
pub struct ParamError {
    /// The parameter's name as users spell it (`top_p`, `steps`, ...).
    pub field: &'static str,
    /// What was expected.
    pub expected: String,
    /// What was found.
    pub found: String,
}

impl ParamError {
    fn new(field: &'static str, expected: impl Into<String>, found: impl ToString) -> Self {
        Self {
            field,
            expected: expected.into(),
            found: found.to_string(),
        }
    }
}

/// How a block is denoised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Sampler {
    /// `steps` DDPM steps at `t_i = 1 - i/T`: each masked position unmasks with probability
    /// `(p(t) - p(s)) / p(t)`, `s = t - 1/T`; the last step unmasks everything left.
    Ddpm,
    /// The first-hitting sampler: exactly one uniformly chosen masked position per step.
    FirstHitting,
    /// Every masked position whose most likely token has probability above `threshold`
    /// is unmasked; at least one per step, and enough that the block ends within `steps`.
    Confidence {
        /// Probability a position's top token must exceed, in [0, 1].
        threshold: f64,
    },
}

/// A sampler named without its parameters, as requests and command lines name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SamplerKind {
    /// DDPM steps; a position unmasks with probability (p(t) - p(s)) / p(t).
    Ddpm,
    /// Exactly one masked position per step.
    FirstHitting,
    /// Every position whose top probability exceeds the threshold (at least one per step).
    Confidence,
}

impl Sampler {
    /// Which sampler this is.
    pub fn kind(&self) -> SamplerKind {
        match self {
            Self::Ddpm => SamplerKind::Ddpm,
            Self::FirstHitting => SamplerKind::FirstHitting,
            Self::Confidence { .. } => SamplerKind::Confidence,
        }
    }

    /// The name used on command lines and in stored records.
    pub fn name(&self) -> &'static str {
        match self.kind() {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::FirstHitting => "first-hitting",
            SamplerKind::Confidence => "confidence",
        }
    }

    /// The confidence threshold, for the sampler that has one.
    pub fn threshold(&self) -> Option<f64> {
        match self {
            Self::Confidence { threshold } => Some(*threshold),
            _ => None,
        }
    }
}

/// Filtering applied to the model's distribution before drawing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1 keeps all.
    pub top_p: f64,
}

impl Default for Filter {
    /// No filtering: the model's own distribution.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
        }
    }
}

/// Everything that decides how the blocks of a session are sampled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// The update rule.
    pub sampler: Sampler,
    /// Denoising steps per block `T` (DDPM; the bound on confidence steps).
    pub steps: usize,
    /// Temperature, top-k and top-p applied to the model's distribution.
    pub filter: Filter,
    /// Take the most likely token instead of drawing.
    pub greedy: bool,
}

impl SamplingParams {
    /// The defaults for a model with `block_size`: first-hitting, one token per step
    /// (T = block size), temperature 1, nucleus 0.9.
    pub fn new(block_size: usize) -> Self {
        Self {
            sampler: Sampler::FirstHitting,
            steps: block_size,
            filter: Filter {
                temperature: DEFAULT_TEMPERATURE,
                top_k: None,
                top_p: DEFAULT_TOP_P,
            },
            greedy: false,
        }
    }

    /// Checks every parameter's range; the error names the parameter.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.steps < 1 {
            return Err(ParamError::new("steps", "at least 1", self.steps));
        }
        let f = &self.filter;
        if !(f.temperature > 0.0 && f.temperature.is_finite()) {
            return Err(ParamError::new(
                "temperature",
                "a finite value > 0",
                f.temperature,
            ));
        }
        if !(f.top_p > 0.0 && f.top_p <= 1.0) {
            return Err(ParamError::new("top_p", "a value in (0, 1]", f.top_p));
        }
        if f.top_k == Some(0) {
            return Err(ParamError::new("top_k", "at least 1", 0));
        }
        if let Some(threshold) = self.sampler.threshold()
            && !(0.0..=1.0).contains(&threshold)
        {
            return Err(ParamError::new("threshold", "a value in [0, 1]", threshold));
        }
        Ok(())
    }
}

/// The parameters a request sets; unset ones keep a base (the defaults for a new session,
/// the session's own for a continuation).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingOverrides {
    /// The update rule.
    pub sampler: Option<SamplerKind>,
    /// Denoising steps per block.
    pub steps: Option<usize>,
    /// Confidence threshold (the confidence sampler only).
    pub threshold: Option<f64>,
    /// Softmax temperature.
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// `Some(None)` clears a top-k; `Some(Some(k))` sets one.
    pub top_k: Option<Option<usize>>,
    /// Greedy decoding on or off.
    pub greedy: Option<bool>,
}

impl SamplingOverrides {
    /// `base` with these overrides applied, every range checked. A threshold is refused
    /// unless the resulting sampler is the confidence one, which keeps its base threshold
    /// (or takes the default) when none is given.
    pub fn apply(&self, base: &SamplingParams) -> Result<SamplingParams, ParamError> {
        let kind = self.sampler.unwrap_or(base.sampler.kind());
        let sampler = match kind {
            SamplerKind::Ddpm | SamplerKind::FirstHitting => {
                if let Some(t) = self.threshold {
                    return Err(ParamError::new(
                        "threshold",
                        "no threshold: only the confidence sampler takes one",
                        t,
                    ));
                }
                if kind == SamplerKind::Ddpm {
                    Sampler::Ddpm
                } else {
                    Sampler::FirstHitting
                }
            }
            SamplerKind::Confidence => Sampler::Confidence {
                threshold: self
                    .threshold
                    .or(base.sampler.threshold())
                    .unwrap_or(DEFAULT_THRESHOLD),
            },
        };
        let params = SamplingParams {
            sampler,
            steps: self.steps.unwrap_or(base.steps),
            filter: Filter {
                temperature: self.temperature.unwrap_or(base.filter.temperature),
                top_k: self.top_k.unwrap_or(base.filter.top_k),
                top_p: self.top_p.unwrap_or(base.filter.top_p),
            },
            greedy: self.greedy.unwrap_or(base.greedy),
        };
        params.validate()?;
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_block_size_and_validate() {
        let p = SamplingParams::new(4);
        assert_eq!(
            (p.sampler, p.steps, p.filter.top_p),
            (Sampler::FirstHitting, 4, 0.9)
        );
        assert!(p.validate().is_ok());
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        let base = SamplingParams::new(4);
        let cases = [
            (
                SamplingOverrides {
                    steps: Some(0),
                    ..Default::default()
                },
                "steps",
            ),
            (
                SamplingOverrides {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingOverrides {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingOverrides {
                    temperature: Some(0.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingOverrides {
                    temperature: Some(f64::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingOverrides {
                    top_k: Some(Some(0)),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingOverrides {
                    sampler: Some(SamplerKind::Confidence),
                    threshold: Some(2.0),
                    ..Default::default()
                },
                "threshold",
            ),
            (
                SamplingOverrides {
                    threshold: Some(0.5),
                    ..Default::default()
                },
                "threshold",
            ),
        ];
        for (o, field) in cases {
            let err = o.apply(&base).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    /// Unset fields keep the base; a top-k can be cleared; a confidence session keeps its
    /// threshold when only other fields change.
    #[test]
    fn overrides_merge_into_the_base() {
        let base = SamplingOverrides {
            sampler: Some(SamplerKind::Confidence),
            threshold: Some(0.7),
            top_k: Some(Some(5)),
            greedy: Some(true),
            ..Default::default()
        }
        .apply(&SamplingParams::new(4))
        .unwrap();
        assert_eq!(base.sampler, Sampler::Confidence { threshold: 0.7 });
        assert_eq!(SamplingOverrides::default().apply(&base).unwrap(), base);
        let next = SamplingOverrides {
            top_k: Some(None),
            temperature: Some(0.5),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!(next.filter.top_k, None);
        assert_eq!(next.sampler, base.sampler);
        assert!(next.greedy);
        let ddpm = SamplingOverrides {
            sampler: Some(SamplerKind::Ddpm),
            ..Default::default()
        }
        .apply(&base)
        .unwrap();
        assert_eq!(ddpm.sampler, Sampler::Ddpm);
    }

    #[test]
    fn records_round_trip_and_unknown_samplers_are_refused() {
        let p = SamplingParams {
            sampler: Sampler::Confidence { threshold: 0.8 },
            ..SamplingParams::new(16)
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""name":"confidence""#), "{json}");
        assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), p);
        let unknown = json.replace("confidence", "beam-search");
        assert!(serde_json::from_str::<SamplingParams>(&unknown).is_err());
    }
}
