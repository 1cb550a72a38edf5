//! Figures (losses, speeds, perplexity bounds) in job and model-version records, as JSON
//! that always decodes: a finite figure is a number; an infinite or NaN one (a diverged
//! job's loss, a perplexity bound that overflowed) is the string `"inf"`, `"-inf"` or
//! `"nan"`, which JSON numbers cannot hold (serde_json would write `null` and then fail
//! to read it back). `null`, as records of earlier versions hold, reads as NaN.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One figure, however finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure(pub f64);

impl Serialize for Figure {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            v if v.is_finite() => s.serialize_f64(v),
            v if v.is_nan() => s.serialize_str("nan"),
            v if v > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }
}

impl<'de> Deserialize<'de> for Figure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Number(f64),
            Word(String),
            Null(()),
        }
        Ok(Figure(match Stored::deserialize(d)? {
            Stored::Number(v) => v,
            Stored::Word(w) => match w.as_str() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" => f64::NAN,
                other => {
                    return Err(serde::de::Error::custom(format!("not a figure: {other:?}")));
                }
            },
            Stored::Null(()) => f64::NAN,
        }))
    }
}

/// `#[serde(with = "figure")]` for an `f64` field.
pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    Figure(*v).serialize(s)
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Figure::deserialize(d)?.0)
}

/// `#[serde(with = "figure::step_pair")]` for a validation: step, NELBO, perplexity bound.
pub mod step_pair {
    use super::*;

    /// Writes it.
    pub fn serialize<S: Serializer>(v: &Option<(u64, f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        v.map(|(step, a, b)| (step, Figure(a), Figure(b)))
            .serialize(s)
    }

    /// Reads it.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<(u64, f64, f64)>, D::Error> {
        let stored = Option::<(u64, Figure, Figure)>::deserialize(d)?;
        Ok(stored.map(|(step, a, b)| (step, a.0, b.0)))
    }
}

/// `#[serde(with = "figure::pair")]` for a validation's NELBO and perplexity bound.
pub mod pair {
    use super::*;

    /// Writes it.
    pub fn serialize<S: Serializer>(v: &Option<(f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        v.map(|(a, b)| (Figure(a), Figure(b))).serialize(s)
    }

    /// Reads it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
        Ok(Option::<(Figure, Figure)>::deserialize(d)?.map(|(a, b)| (a.0, b.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Figures {
        #[serde(with = "super")]
        loss: f64,
        #[serde(with = "pair")]
        validation: Option<(f64, f64)>,
    }

    /// Every f64 comes back as it was written, the non-finite ones included; `null` (an
    /// earlier version's infinity) reads as NaN; anything else is an error, not a panic.
    #[test]
    fn every_figure_round_trips() {
        for v in [
            0.0,
            -1.5,
            1e308,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
        ] {
            let json = serde_json::to_string(&Figures {
                loss: v,
                validation: Some((v, 2.0)),
            })
            .unwrap();
            let back: Figures = serde_json::from_str(&json).unwrap();
            assert_eq!((back.loss, back.validation), (v, Some((v, 2.0))), "{json}");
        }
        let nan = serde_json::to_string(&Figures {
            loss: f64::NAN,
            validation: None,
        })
        .unwrap();
        assert!(serde_json::from_str::<Figures>(&nan).unwrap().loss.is_nan());
        let legacy: Figures =
            serde_json::from_str(r#"{"loss":null,"validation":[null,3.0]}"#).unwrap();
        assert!(legacy.loss.is_nan() && legacy.validation.unwrap().0.is_nan());
        assert!(serde_json::from_str::<Figures>(r#"{"loss":"lots","validation":null}"#).is_err());
    }
}
