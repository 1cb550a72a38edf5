//! Data-parallel training inside one trainer: a replica of the network per device (rank),
//! each micro-batch split between the ranks by rows, the gradients averaged across them,
//! and the same update applied on every rank, so the replicas stay identical. A
//! micro-batch of `world * batch_size` rows and its noise are drawn as one process draws
//! them, then shared out: a run's data and noise do not depend on how it is split, and
//! with one rank the step is exactly the single-device step.
//!
//! The average goes through NCCL when every rank is a CUDA device and the crate is built
//! with `nccl` (one communicator per device, an all-reduce per gradient in one NCCL
//! group), and through the host otherwise (summed in rank order, so every rank gets the
//! same bits).

use bd3lm_diffusion::loss::Noised;
use bd3lm_model::Bd3lm;
use candle_core::{Device, Tensor, Var};

use crate::Result;
use crate::optim::AdamW;

/// A rank above 0: its own copy of the weights, network and optimiser state.
pub(super) struct Replica {
    pub(super) vars: Vec<Var>,
    pub(super) model: Bd3lm,
    pub(super) opt: AdamW,
}

/// How the ranks' gradients are averaged.
pub(super) enum Reduce {
    /// Through host memory.
    Host,
    /// NCCL across CUDA devices.
    #[cfg(feature = "nccl")]
    Nccl(nccl::Comms),
}

impl Reduce {
    /// The reduction for ranks on `devices`.
    pub(super) fn for_devices(devices: &[Device]) -> Result<Self> {
        #[cfg(feature = "nccl")]
        if devices.len() > 1 && devices.iter().all(Device::is_cuda) {
            return Ok(Reduce::Nccl(nccl::Comms::new(devices)?));
        }
        let _ = devices;
        Ok(Reduce::Host)
    }

    /// Replaces every rank's gradients (`grads[rank][param]`) with their mean over ranks.
    pub(super) fn mean(&self, grads: &mut [Vec<Tensor>]) -> Result<()> {
        let world = grads.len();
        if world == 1 {
            return Ok(());
        }
        match self {
            Reduce::Host => {
                for p in 0..grads[0].len() {
                    let mut sum = grads[0][p].to_device(&Device::Cpu)?;
                    for rank in &grads[1..] {
                        sum = (sum + rank[p].to_device(&Device::Cpu)?)?;
                    }
                    let mean = (sum / world as f64)?;
                    for rank in grads.iter_mut() {
                        rank[p] = mean.to_device(rank[p].device())?;
                    }
                }
            }
            #[cfg(feature = "nccl")]
            Reduce::Nccl(comms) => {
                comms.sum(grads)?;
                for rank in grads.iter_mut() {
                    for g in rank.iter_mut() {
                        *g = (&*g / world as f64)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Rank `rank`'s equal share, of `world`, of a batch of rows of `n` tokens: its token ids
/// and their noise.
pub(super) fn share(
    ids: &[u32],
    noised: &Noised,
    (rank, world): (usize, usize),
    n: usize,
) -> (Vec<u32>, Noised) {
    let rows = ids.len() / n / world;
    let tokens = rank * rows * n..(rank + 1) * rows * n;
    let part = Noised {
        xt: noised.xt[tokens.clone()].to_vec(),
        t: noised.t[tokens.clone()].to_vec(),
        sigma: noised.sigma[rank * rows..(rank + 1) * rows].to_vec(),
    };
    (ids[tokens].to_vec(), part)
}

#[cfg(feature = "nccl")]
mod nccl {
    //! The NCCL all-reduce of one process driving every device: one communicator per
    //! device, and each gradient's all-reduce issued for every rank inside one NCCL group
    //! (a single thread cannot wait on one rank's collective before issuing the next).

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp, group_end, group_start};
    use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

    use crate::{Error, Result};

    fn nccl_error(e: impl std::fmt::Debug) -> Error {
        Error::Candle(candle_core::Error::Msg(format!("NCCL: {e:?}")))
    }

    /// One communicator per rank's device.
    pub(in super::super) struct Comms(Vec<Comm>);

    impl Comms {
        pub(super) fn new(devices: &[Device]) -> Result<Self> {
            let streams = devices
                .iter()
                .map(|d| Ok(d.as_cuda_device()?.cuda_stream()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Self(Comm::from_devices(streams).map_err(nccl_error)?))
        }

        /// Replaces each gradient with its sum over the ranks.
        pub(super) fn sum(&self, grads: &mut [Vec<Tensor>]) -> Result<()> {
            for p in 0..grads[0].len() {
                group_start().map_err(nccl_error)?;
                let summed: Vec<candle_core::Result<Tensor>> = self
                    .0
                    .iter()
                    .zip(grads.iter())
                    .map(|(comm, rank)| rank[p].contiguous()?.apply_op1_no_bwd(&AllReduce(comm)))
                    .collect();
                group_end().map_err(nccl_error)?;
                for (rank, sum) in grads.iter_mut().zip(summed) {
                    rank[p] = sum?;
                }
            }
            Ok(())
        }
    }

    /// The sum over the ranks of one rank's tensor, into a fresh buffer on its device.
    struct AllReduce<'c>(&'c Comm);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("an NCCL all-reduce needs a CUDA tensor")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let count = l.shape().elem_count();
            let start = l.start_offset();
            let src = s.as_cuda_slice::<f32>()?.slice(start..start + count);
            let device = s.device().clone();
            let mut dst = device.alloc_zeros::<f32>(count)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, device), l.shape().clone()))
        }
    }
}
