//! The optimiser of the paper: AdamW with a warm-up learning-rate schedule, global
//! gradient-norm clipping, and an exponential moving average of the weights.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters; the defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of f32 parameters, with its moments exposed so a run can be
/// saved and resumed exactly.
pub struct AdamW {
    /// Hyper-parameters (the learning rate is given per step).
    pub params: AdamWParams,
    /// Updates applied so far.
    pub steps: u64,
    /// First moments, one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.zeros_like();
        Ok(Self {
            params,
            steps: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of `vars` with `grads` (same order) at learning rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        let p = self.params;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            // Gradients carry the graph that made them: detached, the moments hold data
            // only, or every step would keep the previous steps' graphs alive.
            let g = g.detach();
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + p.eps)?)?;
            let mut w = var.as_tensor().clone();
            if p.weight_decay > 0.0 {
                w = (w * (1.0 - lr * p.weight_decay))?;
            }
            var.set(&(w - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

pub use bd3lm_config::Decay;

/// Linear warm-up from 0 to the peak over `warmup` steps, then [`Decay`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// After warm-up.
    pub decay: Decay,
    /// Last step of the run (the end of a cosine decay).
    pub total: u64,
}

impl LrSchedule {
    /// The learning rate of update `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup) as f64 / span).min(1.0);
                let floor = 0.1 * self.peak;
                floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Err(Error::Param {
            name: "gradients",
            reason: format!("the gradient norm is {norm}: the loss diverged"),
        });
    }
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Exponential moving average of the weights, with the reference's warm-up of the decay:
/// `min(decay, (1 + k) / (10 + k))` at update `k`, so early averages are not dominated by
/// the random initial weights.
pub struct Ema {
    /// The target decay (paper: 0.9999).
    pub decay: f64,
    /// Updates applied so far.
    pub updates: u64,
    /// The averaged weights, one per parameter.
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// An average starting at the current values of `vars`.
    pub fn new(vars: &[Var], decay: f64) -> Result<Self> {
        Ok(Self {
            decay,
            updates: 0,
            shadow: vars
                .iter()
                .map(|v| Ok(v.as_tensor().copy()?.detach()))
                .collect::<Result<_>>()?,
        })
    }

    /// Moves the average toward the current values of `vars`.
    pub fn update(&mut self, vars: &[Var]) -> Result<()> {
        let k = self.updates as f64;
        let d = self.decay.min((1.0 + k) / (10.0 + k));
        for (s, v) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
        }
        self.updates += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step from zero moments moves each weight by `lr` against its gradient's
    /// sign (bias correction makes m̂/√v̂ = ±1), as PyTorch does.
    #[test]
    fn first_adamw_step_is_lr_times_the_gradient_sign() {
        let var = Var::from_slice(&[1.0f32, -2.0, 0.5], 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&var), AdamWParams::default()).unwrap();
        let grad = Tensor::new(&[0.3f32, -4.0, 0.0], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[grad], 0.1).unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (w[0] - 0.9).abs() < 1e-5 && (w[1] + 1.9).abs() < 1e-5,
            "{w:?}"
        );
        assert_eq!(w[2], 0.5);
    }

    #[test]
    fn schedule_warms_up_linearly_then_holds_or_decays() {
        let mut s = LrSchedule {
            peak: 1.0,
            warmup: 4,
            decay: Decay::Constant,
            total: 14,
        };
        assert_eq!([s.at(0), s.at(3), s.at(10)], [0.25, 1.0, 1.0]);
        s.decay = Decay::Cosine;
        assert!((s.at(9) - 0.55).abs() < 1e-12 && (s.at(14) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        assert_eq!(clip_grad_norm(&mut grads, 1.0).unwrap(), 5.0);
        let a = grads[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        grads[0] = Tensor::new(&[f32::NAN], &dev).unwrap();
        assert!(clip_grad_norm(&mut grads, 1.0).is_err());
    }

    #[test]
    fn ema_warms_up_its_decay() {
        let var = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let mut ema = Ema::new(std::slice::from_ref(&var), 0.9999).unwrap();
        var.set(&Tensor::new(&[10.0f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(std::slice::from_ref(&var)).unwrap();
        // First decay is 1/10: the average moves 90% of the way.
        let v = ema.shadow[0].to_vec1::<f32>().unwrap()[0];
        assert!((v - 9.0).abs() < 1e-5, "{v}");
    }
}
