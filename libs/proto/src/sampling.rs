//! The wire's sampling parameters and the typed ones, converted in one place.

use bd3lm_sampling::{ParamError, SamplerKind, SamplingOverrides, SamplingParams};

use crate::v1::{Sampler, SamplingParameters};

impl From<SamplerKind> for Sampler {
    fn from(kind: SamplerKind) -> Self {
        match kind {
            SamplerKind::Ddpm => Sampler::Ddpm,
            SamplerKind::FirstHitting => Sampler::FirstHitting,
            SamplerKind::Confidence => Sampler::Confidence,
        }
    }
}

/// What a request sets: unset fields stay unset, `top_k = 0` clears a top-k.
impl TryFrom<&SamplingParameters> for SamplingOverrides {
    type Error = ParamError;

    fn try_from(p: &SamplingParameters) -> Result<Self, ParamError> {
        let sampler = match Sampler::try_from(p.sampler) {
            Ok(Sampler::Unspecified) => None,
            Ok(Sampler::Ddpm) => Some(SamplerKind::Ddpm),
            Ok(Sampler::FirstHitting) => Some(SamplerKind::FirstHitting),
            Ok(Sampler::Confidence) => Some(SamplerKind::Confidence),
            Err(_) => {
                return Err(ParamError {
                    field: "sampler",
                    expected: "a Sampler value (0 to 3)".into(),
                    found: p.sampler.to_string(),
                });
            }
        };
        Ok(Self {
            sampler,
            steps: p.steps.map(|s| s as usize),
            threshold: p.threshold,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k.map(|k| (k > 0).then_some(k as usize)),
            greedy: p.greedy,
        })
    }
}

/// A request that sets exactly the given overrides (the command line's flags).
impl From<&SamplingOverrides> for SamplingParameters {
    fn from(o: &SamplingOverrides) -> Self {
        Self {
            sampler: o.sampler.map_or(Sampler::Unspecified, Sampler::from) as i32,
            steps: o.steps.map(saturate),
            threshold: o.threshold,
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k.map(|k| k.map_or(0, saturate)),
            greedy: o.greedy,
        }
    }
}

/// A session's parameters, every field set (GetSession).
impl From<&SamplingParams> for SamplingParameters {
    fn from(p: &SamplingParams) -> Self {
        Self {
            sampler: Sampler::from(p.sampler.kind()) as i32,
            steps: Some(saturate(p.steps)),
            threshold: p.sampler.threshold(),
            temperature: Some(p.filter.temperature),
            top_p: Some(p.filter.top_p),
            top_k: Some(p.filter.top_k.map_or(0, saturate)),
            greedy: Some(p.greedy),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's parameters sent back as a request change nothing; overrides survive
    /// the wire, top-k clearing included.
    #[test]
    fn conversions_round_trip() {
        let base = SamplingOverrides {
            sampler: Some(SamplerKind::Confidence),
            threshold: Some(0.7),
            top_k: Some(Some(3)),
            ..Default::default()
        }
        .apply(&SamplingParams::new(4))
        .unwrap();
        let wire = SamplingParameters::from(&base);
        let back = SamplingOverrides::try_from(&wire).unwrap();
        assert_eq!(back.apply(&SamplingParams::new(8)).unwrap(), base);
        let clear = SamplingOverrides {
            top_k: Some(None),
            greedy: Some(false),
            ..Default::default()
        };
        assert_eq!(
            SamplingOverrides::try_from(&SamplingParameters::from(&clear)).unwrap(),
            clear
        );
        let unknown = SamplingParameters {
            sampler: 42,
            ..Default::default()
        };
        assert_eq!(
            SamplingOverrides::try_from(&unknown).unwrap_err().field,
            "sampler"
        );
    }
}
